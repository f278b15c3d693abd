"""Tokenizers: byte-level (nothing to train) and subword BPE (trained with HF ``tokenizers``).

Both share the special ids 0 ``<pad>``, 1 ``<bos>``, 2 ``<eos>``, 3 ``<sep>``, and save to and
load from a directory (``tokenizer.json``) next to the model, so a saved model directory is
self-contained.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

PAD_ID, BOS_ID, EOS_ID, SEP_ID = 0, 1, 2, 3
SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>", "<sep>")
TOKENIZER_FILE = "tokenizer.json"


class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer."""

    vocab_size: int
    #: True when every token is one byte (bits per character = bits per token).
    byte_level: bool

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (special tokens dropped)."""
        ...

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``tokenizer.json`` into ``directory``; returns its path."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: id = byte + 4 (after the special tokens); vocabulary 260."""

    vocab_size = 256 + len(SPECIAL_TOKENS)
    byte_level = True

    def encode(self, text: str) -> list[int]:
        offset = len(SPECIAL_TOKENS)
        return [b + offset for b in text.encode("utf-8")]

    def decode(self, ids: Sequence[int]) -> str:
        offset = len(SPECIAL_TOKENS)
        return bytes(i - offset for i in ids if offset <= i < self.vocab_size).decode("utf-8", errors="replace")

    def save(self, directory: str | os.PathLike[str]) -> Path:
        path = Path(directory) / TOKENIZER_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"attnkit_tokenizer": "byte", "vocab_size": self.vocab_size}))
        return path


class BPETokenizer:
    """Byte-level BPE from HF ``tokenizers`` (GPT-2 style pre-tokenisation, no unknown tokens).

    Build with :meth:`train`, or load with :func:`load_tokenizer`.
    """

    byte_level = False

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = int(tokenizer.get_vocab_size())

    @classmethod
    def train(cls, texts: Iterable[str], *, vocab_size: int = 4096, min_frequency: int = 2) -> BPETokenizer:
        """Learn merges from ``texts`` (an iterator is consumed once, streamed).

        Args:
            texts: training text, any number of strings.
            vocab_size: target vocabulary size including the 256 byte tokens and the specials.
            min_frequency: pairs seen fewer times are not merged.

        Raises:
            ValueError: if ``vocab_size`` cannot hold the byte alphabet and special tokens.
        """
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        floor = 256 + len(SPECIAL_TOKENS)
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < floor:
            raise ValueError(f"vocab_size must be an integer >= {floor} (bytes + special tokens), got {vocab_size!r}")
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tokenizer.decode(list(ids), skip_special_tokens=True))

    def save(self, directory: str | os.PathLike[str]) -> Path:
        path = Path(directory) / TOKENIZER_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        self._tokenizer.save(str(path))
        return path


def load_tokenizer(directory: str | os.PathLike[str]) -> ByteTokenizer | BPETokenizer:
    """Load the tokenizer saved in ``directory`` (or the ``tokenizer.json`` path itself).

    Raises:
        FileNotFoundError: if there is no tokenizer file.
        ValueError: if the file is not a tokenizer attnkit wrote.
    """
    path = Path(directory)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer at {path} (expected a {TOKENIZER_FILE} written by save())")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON (line {err.lineno}): {err.msg}") from err
    if data.get("attnkit_tokenizer") == "byte":
        return ByteTokenizer()
    if data.get("model", {}).get("type") == "BPE":
        from tokenizers import Tokenizer as HFTokenizer

        return BPETokenizer(HFTokenizer.from_file(str(path)))
    raise ValueError(f"{path}: not an attnkit tokenizer (expected a byte or BPE tokenizer.json)")


def make_tokenizer(
    name: str, texts: Iterable[str] | None = None, *, vocab_size: int = 4096
) -> ByteTokenizer | BPETokenizer:
    """``"byte"`` or ``"bpe"`` (trained on ``texts``).

    Raises:
        ValueError: for an unknown name, or ``"bpe"`` without training text.
    """
    if name == "byte":
        return ByteTokenizer()
    if name == "bpe":
        if texts is None:
            raise ValueError("tokenizer 'bpe' needs training text (texts=...)")
        return BPETokenizer.train(texts, vocab_size=vocab_size)
    raise ValueError(f"tokenizer must be 'byte' or 'bpe', got {name!r}")
