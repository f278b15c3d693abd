"""``attnkit generate``: continue a prompt with a saved model, streaming the text as it is produced.

The model directory is one written by ``model.save_pretrained`` (``config.json`` +
``model.safetensors``). Text goes through the ``tokenizer.json`` saved next to the model
when there is one, else through byte-level tokens (UTF-8 bytes, ids offset by the four
special tokens; the model's vocabulary must hold them). ``--ids`` bypasses tokenization.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate text from a saved language model or encoder-decoder (streams tokens)",
        description=(
            "Load a model saved with save_pretrained (a directory with config.json and model.safetensors) and "
            "continue a prompt (language model) or transform it (encoder-decoder). Greedy by default; "
            "--temperature/--top-k/--top-p sample, --num-beams runs beam search."
        ),
        epilog="example: attnkit generate runs/lm --prompt 'Once upon a time' --max-new-tokens 100 --temperature 0.8",
    )
    parser.add_argument("model", help="directory written by model.save_pretrained")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    source.add_argument("--ids", action="append", help="prompt as space-separated token ids (repeat for a batch)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="most tokens to generate (default 64)")
    parser.add_argument("--temperature", type=float, default=None, help="sampling temperature (> 0 samples)")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1]")
    parser.add_argument("--num-beams", type=int, default=1, help="beam search width (default 1: no beam search)")
    parser.add_argument("--length-penalty", type=float, default=1.0, help="beam score = logp / length**penalty")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling generator (default 0)")
    parser.add_argument("--no-cache", action="store_true", help="recompute the prefix at every step (slower)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per prompt instead of streaming")
    parser.set_defaults(func=run)


def _load_tokenizer(model_dir: Path, vocab_size: int) -> Any:
    from attnkit.data.tokenizers import TOKENIZER_FILE, ByteTokenizer, load_tokenizer

    if (model_dir / TOKENIZER_FILE).is_file():
        return load_tokenizer(model_dir)
    tokenizer = ByteTokenizer()
    if vocab_size < tokenizer.vocab_size:
        raise ValueError(
            f"{model_dir} has no {TOKENIZER_FILE} and its vocabulary ({vocab_size}) is too small for byte-level "
            f"tokens ({tokenizer.vocab_size}); pass token ids with --ids '1 2 3'"
        )
    return tokenizer


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"--ids must be space-separated integers, got {text!r}") from None
    if not ids:
        raise ValueError("--ids must hold at least one token id, got an empty string")
    return ids


class _TextStreamer:
    """Prints the text of each new token as soon as it decodes to complete characters."""

    def __init__(self, tokenizer: Any, eos: int | None) -> None:
        self.tokenizer = tokenizer
        self.eos = eos
        self.ids: list[int] = []
        self.printed = ""
        self.done = False

    def __call__(self, tokens: Any) -> None:
        token = int(tokens[0])
        if self.done:
            return
        if token == self.eos:
            self.done = True
            return
        self.ids.append(token)
        if self.tokenizer is None:
            sys.stdout.write(f" {token}")
        else:
            text = self.tokenizer.decode(self.ids)
            if text.endswith("\ufffd"):
                return  # a multi-byte character is still incomplete
            sys.stdout.write(text[len(self.printed) :])
            self.printed = text
        sys.stdout.flush()

    def finish(self) -> None:
        """Print whatever text is still held back (an incomplete character at the end)."""
        if self.tokenizer is not None:
            sys.stdout.write(self.tokenizer.decode(self.ids)[len(self.printed) :])
        sys.stdout.write("\n")
        sys.stdout.flush()


def run(args: argparse.Namespace) -> int:
    import torch

    from attnkit.models import EncoderDecoder, LanguageModel, load_pretrained

    model_dir = Path(args.model)
    model = load_pretrained(model_dir, map_location=args.device)
    if not isinstance(model, (LanguageModel, EncoderDecoder)):
        raise ValueError(
            f"{model_dir} holds a {type(model).__name__}, which does not generate; "
            "use a LanguageModel or EncoderDecoder checkpoint"
        )
    cfg = model.config
    tokenizer: Any = None
    if args.ids:
        prompts = [_parse_ids(t) for t in args.ids]
    else:
        tokenizer = _load_tokenizer(model_dir, cfg.vocab_size)
        prompts = [tokenizer.encode(t) for t in args.prompt]
    if isinstance(model, LanguageModel) and cfg.bos_token_id is not None:
        prompts = [[cfg.bos_token_id, *p] for p in prompts]
    if any(not p for p in prompts):
        raise ValueError("the prompt is empty after tokenization; give some text")
    width = max(map(len, prompts))
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=args.device)
    mask = torch.tensor([[False] * (width - len(p)) + [True] * len(p) for p in prompts], device=args.device)

    stream = not args.json and len(prompts) == 1 and args.num_beams == 1
    streamer = _TextStreamer(tokenizer, cfg.eos_token_id) if stream else None
    options: dict[str, Any] = {
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "num_beams": args.num_beams,
        "length_penalty": args.length_penalty,
        "use_cache": not args.no_cache,
        "generator": torch.Generator(device=args.device).manual_seed(args.seed),
        "streamer": streamer,
    }
    if stream and tokenizer is not None and isinstance(model, LanguageModel):
        sys.stdout.write(args.prompt[0])
    if isinstance(model, LanguageModel):
        out = model.generate(ids, args.max_new_tokens, attention_mask=mask, **options)[:, width:]
    else:
        out = model.generate(ids, args.max_new_tokens, src_mask=mask, **options)
    if streamer is not None:
        streamer.finish()
        return 0
    for prompt, row in zip(prompts, out.tolist()):
        if cfg.eos_token_id is not None and cfg.eos_token_id in row:
            row = row[: row.index(cfg.eos_token_id)]
        text = tokenizer.decode(row) if tokenizer is not None else None
        if args.json:
            print(json.dumps({"prompt_ids": prompt, "ids": row, "text": text}))
        else:
            print(text if text is not None else " ".join(map(str, row)))
    return 0
