"""Local text for ``attnkit convert``: the tokenizer, a by-file held-out split, batches and perplexity.

Tokenizer convention. A teacher directory with a Hugging Face tokenizer (``tokenizer.json`` or
``tokenizer_config.json``) uses it (``AutoTokenizer`` from the local directory, nothing
downloaded). A directory without one uses attnkit's byte tokenizer: token id = UTF-8 byte + 4
(ids 0-3 are attnkit's pad/bos/eos/sep; vocabulary 260), the convention of attnkit's ``text``
task and of the recipe's teacher (``python -m attnkit.hf.recipe``); the teacher's vocabulary must
then hold at least those 260 ids. Files are joined with the end-of-sequence id between them.

Held-out text is chosen by file (a hash of the file's path relative to the ``--data`` path that
found it), so no held-out window shares a file with a training window.

Batches are a pure function of ``(seed, stage, step)``: a resumed run draws exactly the batches
the interrupted run would have drawn, with no data-loader state to save.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

#: Files whose presence marks a Hugging Face tokenizer in a checkpoint directory.
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class TextTokenizer:
    """Text to token ids, with the name shown in reports.

    Attributes:
        name: ``"byte"`` or the Hugging Face tokenizer's class and directory.
        encoder: ``text -> ids``.
        separator: the id placed between files (end of sequence), or None.
    """

    name: str
    encoder: Any
    separator: int | None

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""
        return list(self.encoder(text))


def resolve_tokenizer(directory: str | Path | None, vocab_size: int) -> TextTokenizer:
    """The teacher's tokenizer (see the module docstring for the convention).

    Args:
        directory: the teacher checkpoint directory (None for a model passed in memory).
        vocab_size: the teacher's vocabulary size.

    Raises:
        ValueError: no tokenizer in the directory and a vocabulary too small for byte ids.
    """
    if directory is not None and any((Path(directory) / name).is_file() for name in HF_TOKENIZER_FILES):
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        return TextTokenizer(
            name=f"{type(hf).__name__} ({directory})",
            encoder=lambda text: hf(text, add_special_tokens=False)["input_ids"],
            separator=hf.eos_token_id,
        )
    from attnkit.data.tokenizers import EOS_ID, ByteTokenizer

    byte = ByteTokenizer()
    if vocab_size < byte.vocab_size:
        where = f"{directory} has no tokenizer files ({', '.join(HF_TOKENIZER_FILES)})" if directory else "no tokenizer"
        raise ValueError(
            f"{where} and the teacher's vocabulary ({vocab_size}) is smaller than attnkit's byte tokenizer needs "
            f"({byte.vocab_size}: UTF-8 byte + 4); save the teacher's tokenizer into its directory "
            "(tokenizer.save_pretrained(dir))"
        )
    return TextTokenizer(name="byte (UTF-8 byte + 4)", encoder=byte.encode, separator=EOS_ID)


def find_text_files(paths: Sequence[str | Path]) -> list[tuple[Path, str]]:
    """Every text file under ``paths`` as ``(file, key)``, the key being its path relative to its root.

    A path is a file (read as is) or a directory (its ``.txt``, ``.md`` and ``.py`` files).

    Raises:
        FileNotFoundError: a path that does not exist.
        ValueError: no paths, or a directory without text files.
    """
    from attnkit.data.sources import text_files

    if not paths:
        raise ValueError("--data needs at least one text file or directory")
    found: dict[Path, str] = {}
    for raw in paths:
        root = Path(raw)
        if not root.exists():
            raise FileNotFoundError(f"--data {root} does not exist; pass text files or directories of them")
        for file in text_files(root):
            key = file.name if root.is_file() else file.relative_to(root).as_posix()
            found.setdefault(file.resolve(), key)
    return sorted(((f, k) for f, k in found.items()), key=lambda item: item[1])


def split_by_file(files: Sequence[tuple[Path, str]], heldout_fraction: float) -> tuple[list[Path], list[Path]]:
    """``(train, held-out)`` files: a hash of each key decides; each side gets at least one file.

    Raises:
        ValueError: fewer than two files, or a fraction outside (0, 1).
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction!r}")
    if len(files) < 2:
        raise ValueError(
            f"--data holds {len(files)} text file(s); the held-out text is chosen by file, so pass at least two"
        )

    def bucket(key: str) -> float:
        return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") / 2**64

    ranked = sorted(files, key=lambda item: bucket(item[1]))
    count = min(max(1, round(heldout_fraction * len(files))), len(files) - 1)
    heldout = sorted(ranked[:count], key=lambda item: item[1])
    train = sorted(ranked[count:], key=lambda item: item[1])
    return [f for f, _ in train], [f for f, _ in heldout]


def read_tokens(files: Sequence[Path], tokenizer: TextTokenizer, max_tokens: int) -> Tensor:
    """The files' tokens concatenated (separator between files), cut at ``max_tokens``.

    Raises:
        ValueError: a file that is not UTF-8 text.
    """
    ids: list[int] = []
    for file in files:
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"--data file {file} is not UTF-8 text ({error}); pass text files") from None
        ids.extend(tokenizer.encode(text))
        if tokenizer.separator is not None:
            ids.append(tokenizer.separator)
        if len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens], dtype=torch.long)


def batch_at(tokens: Tensor, *, seed: int, stage: int, step: int, batch_size: int, seq_len: int) -> Tensor:
    """The ``(batch_size, seq_len + 1)`` windows of step ``step`` of ``stage``: random offsets from a seeded generator.

    Raises:
        ValueError: fewer tokens than one window.
    """
    span = tokens.numel() - (seq_len + 1)
    if span < 0:
        raise ValueError(f"the training text has {tokens.numel()} tokens, fewer than one window of {seq_len + 1}")
    generator = torch.Generator().manual_seed(seed * 1_000_003 + stage * 100_003 + step)
    starts = torch.randint(0, span + 1, (batch_size,), generator=generator)
    offsets = starts[:, None] + torch.arange(seq_len + 1)  # (B, T + 1)
    return tokens[offsets]


def eval_windows(tokens: Tensor, *, seq_len: int, max_windows: int) -> Tensor:
    """Consecutive non-overlapping ``(N, seq_len + 1)`` windows from the start of the held-out text.

    Raises:
        ValueError: fewer held-out tokens than one window.
    """
    count = min(max_windows, (tokens.numel() - 1) // seq_len)
    if count < 1:
        raise ValueError(
            f"the held-out text has {tokens.numel()} tokens, fewer than one evaluation window of {seq_len + 1}; "
            "pass more --data or a shorter --seq-len"
        )
    starts = torch.arange(count) * seq_len
    return tokens[starts[:, None] + torch.arange(seq_len + 1)]


@torch.no_grad()
def perplexity(model: nn.Module, windows: Tensor, *, batch_size: int = 4) -> dict[str, float]:
    """``exp`` of the mean next-token negative log-likelihood over every predicted token of ``windows``.

    Args:
        model: a causal LM returning ``.logits`` ``(B, T, V)``.
        windows: ``(N, T + 1)`` token windows; each predicts its last ``T`` tokens.
        batch_size: windows per forward.

    Returns:
        ``{"perplexity", "nll", "tokens"}``.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for chunk in windows.split(batch_size):
        chunk = chunk.to(device)
        logits = model(input_ids=chunk[:, :-1], use_cache=False).logits.double()  # (B, T, V)
        nll = nn.functional.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum")
        total += float(nll)
        count += chunk[:, 1:].numel()
    model.train(was_training)
    mean = total / count
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": float(count)}
