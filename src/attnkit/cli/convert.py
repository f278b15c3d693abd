"""``attnkit convert CHECKPOINT_DIR --attention NAME --data PATH... --out DIR``: a pretrained model onto efficient attention.

Loads a Transformers causal LM (Llama, Qwen2, Mistral or GPT-2 family) from a local folder,
swaps its attention for an attnkit mechanism, recovers quality by distillation from the original
(stage 1: each layer's attention output learns the teacher layer's; stage 2: the whole model
learns the teacher's next-token distributions), and writes the checkpoint (loads with
``attnkit.hf.load``) and a report (perplexity; speed and memory vs the original with SDPA). See
:mod:`attnkit.hf.convert`. Imports only the standard library at top level.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from attnkit.cli import add_command

EXAMPLES = """\
examples:
  attnkit convert runs/llama-small --attention sliding_window --option window=256 --data corpus/ --out runs/swa
  attnkit convert runs/llama-small --attention linear --data a.txt b.txt notes/ --layer-steps 300 --steps 300 \\
      --lengths 2048,4096,8192,16384 --out runs/linear
  attnkit convert runs/llama-small --attention performer --option nb_features=128 --data corpus/ --out runs/p --json

An interrupted run (Ctrl-C, kill) resumes from its last saved step when the same command is run again
(the work lives in DIR.partial/ until everything is written, then becomes DIR).
"""


def register(subparsers: Any) -> None:
    parser = add_command(
        subparsers,
        "convert",
        summary="swap a pretrained Transformers LM's attention for an attnkit mechanism and distill it, with a report",
        description=(
            "Convert a pretrained Hugging Face causal LM (Llama, Qwen2, Mistral, GPT-2; a local folder, nothing is "
            "downloaded) to an attnkit attention mechanism. The converted model is distilled from the original in "
            "two stages: layer-wise attention transfer (each converted layer's attention output is trained to match "
            "the original layer's on the same inputs), then a short end-to-end fine-tune against the original's "
            "next-token distributions. Only the attention's query/key projections and the mechanism's own "
            "parameters train by default (--train). --out DIR receives the checkpoint (attnkit.hf.load(DIR)) and a "
            "report (report.md, report.json, report.png): held-out perplexity of the original, of the swapped model "
            "without distillation and after it, and the speed and memory of a forward+backward pass and of "
            "decoding at each --lengths context, against the original with SDPA, measured in the same run. "
            "Text: the folder's own tokenizer if it has one, else UTF-8 bytes + 4 (attnkit's byte tokenizer)."
        ),
        examples=EXAMPLES,
    )
    parser.add_argument("checkpoint", metavar="CHECKPOINT_DIR", help="the original model: a save_pretrained folder")
    parser.add_argument(
        "--attention", required=True, metavar="NAME", help="the attnkit mechanism (attnkit list shows them)"
    )
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a mechanism option, repeatable (e.g. --option window=256); values are JSON when they parse",
    )
    parser.add_argument(
        "--layers", default=None, metavar="I,J,...", help="attention-layer indices to convert (default: all)"
    )
    parser.add_argument(
        "--data", required=True, nargs="+", metavar="PATH", help="UTF-8 text files or folders of .txt/.md/.py files"
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the checkpoint and the report")
    parser.add_argument("--overwrite", action="store_true", help="replace an --out folder that already holds files")
    training = parser.add_argument_group("distillation")
    training.add_argument(
        "--layer-steps", type=int, default=200, metavar="N", help="stage-1 steps, attention transfer (default 200)"
    )
    training.add_argument(
        "--steps", type=int, default=200, metavar="N", help="stage-2 steps, logit distillation (default 200)"
    )
    training.add_argument(
        "--train",
        choices=("qk", "qkvo"),
        default="qk",
        help="what trains: qk = query/key projections + the mechanism's parameters (default); qkvo = also the "
        "value/output projections",
    )
    training.add_argument("--layer-lr", type=float, default=1e-3, metavar="X", help="stage-1 learning rate (1e-3)")
    training.add_argument("--lr", type=float, default=3e-4, metavar="X", help="stage-2 learning rate (3e-4)")
    training.add_argument("--batch-size", type=int, default=4, metavar="N", help="windows per step (default 4)")
    training.add_argument(
        "--seq-len", type=int, default=512, metavar="N", help="tokens per window, training and evaluation (512)"
    )
    training.add_argument(
        "--temperature", type=float, default=1.0, metavar="X", help="temperature of the logit loss (1)"
    )
    training.add_argument(
        "--ce-weight", type=float, default=0.0, metavar="X", help="weight of cross-entropy on the text added (0)"
    )
    training.add_argument(
        "--save-every", type=int, default=25, metavar="N", help="save the resumable state every N steps (25)"
    )
    training.add_argument("--seed", type=int, default=0, help="seed of batches and mechanism initialisation (0)")
    measuring = parser.add_argument_group("evaluation and measurement")
    measuring.add_argument(
        "--lengths",
        default="2048,4096,8192,16384",
        metavar="N,N,...",
        help="context lengths of the speed/memory measurements (default 2048,4096,8192,16384; 'none' skips them)",
    )
    measuring.add_argument("--rounds", type=int, default=3, metavar="N", help="timed rounds per length (default 3)")
    measuring.add_argument(
        "--decode-tokens", type=int, default=8, metavar="N", help="new tokens per decoding measurement (8; 0: none)"
    )
    measuring.add_argument(
        "--eval-windows", type=int, default=32, metavar="N", help="held-out windows for perplexity (default 32)"
    )
    measuring.add_argument(
        "--max-tokens", type=int, default=4_000_000, metavar="N", help="most training tokens read (4,000,000)"
    )
    measuring.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default cpu)")
    measuring.add_argument("--json", action="store_true", help="print the report as JSON instead of the tables")
    measuring.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def parse_options(items: list[str]) -> dict[str, Any]:
    """``["window=256", "kernel=relu"]`` -> ``{"window": 256, "kernel": "relu"}`` (JSON values, else strings)."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--option {item!r} must look like KEY=VALUE (e.g. --option window=256)")
        try:
            options[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            options[key.strip()] = raw
    return options


def parse_ints(flag: str, text: str | None, *, minimum: int) -> list[int] | None:
    """``"2048,4096"`` -> ``[2048, 4096]``; None or ``"none"`` -> None."""
    if text is None or text.strip().lower() == "none":
        return None
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated integers (e.g. {flag} 2048,4096), got {text!r}") from None
    if not values or any(v < minimum for v in values):
        raise ValueError(f"{flag} must be comma-separated integers >= {minimum}, got {text!r}")
    return values


def _check_numbers(args: argparse.Namespace) -> None:
    positive = ("--batch-size", "--seq-len", "--save-every", "--rounds", "--eval-windows", "--max-tokens")
    for flag in positive:
        value = getattr(args, flag[2:].replace("-", "_"))
        if value < 1:
            raise ValueError(f"{flag} must be a positive integer, got {value}")
    for flag in ("--layer-steps", "--steps", "--decode-tokens", "--seed"):
        value = getattr(args, flag[2:].replace("-", "_"))
        if value < 0:
            raise ValueError(f"{flag} must be an integer >= 0, got {value}")
    for flag in ("--layer-lr", "--lr", "--temperature"):
        value = getattr(args, flag[2:].replace("-", "_"))
        if not value > 0:
            raise ValueError(f"{flag} must be a positive number, got {value}")
    if not args.ce_weight >= 0:
        raise ValueError(f"--ce-weight must be a number >= 0 (0 turns it off), got {args.ce_weight}")


def _check_attention(name: str, options: dict[str, Any]) -> None:
    from attnkit.core.registry import accepted_options, list_attention

    if name not in list_attention():
        raise ValueError(
            f"--attention {name!r} is not a registered mechanism; choose one of {', '.join(list_attention())}"
        )
    known = accepted_options(name)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(
            f"--option {', '.join(unknown)}: not an option of {name!r}; its options are "
            f"{', '.join(f'{k} (default {v!r})' for k, v in known.items()) or 'none'}"
        )


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    options = parse_options(args.option)
    layers = parse_ints("--layers", args.layers, minimum=0)
    lengths = parse_ints("--lengths", args.lengths, minimum=2) or []
    _check_numbers(args)
    _check_attention(args.attention, options)
    for path in args.data:
        if not Path(path).exists():
            raise FileNotFoundError(f"--data {path} does not exist; pass text files or folders of them")

    from attnkit.cli import check_device
    from attnkit.core.errors import check_out_dir
    from attnkit.hf.convert import convert
    from attnkit.hf.convert_report import quality_table, speed_table
    from attnkit.hf.transfer import TransferSettings

    check_out_dir(Path(args.out), args.overwrite)
    device = check_device(args.device)
    settings = TransferSettings(
        layer_steps=args.layer_steps,
        steps=args.steps,
        train=args.train,
        layer_lr=args.layer_lr,
        lr=args.lr,
        warmup_steps=min(10, max(args.layer_steps, args.steps) // 10),
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        temperature=args.temperature,
        ce_weight=args.ce_weight,
        save_every=args.save_every,
        seed=args.seed,
    )
    doc = convert(
        args.checkpoint,
        args.attention,
        options,
        args.data,
        args.out,
        layers=layers,
        settings=settings,
        lengths=lengths,
        rounds=args.rounds,
        decode_tokens=args.decode_tokens,
        eval_windows_count=args.eval_windows,
        max_tokens=args.max_tokens,
        overwrite=args.overwrite,
        device=device,
        progress=not args.no_progress,
        command="attnkit convert " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["convert"] else sys.argv[1:]),
    )
    if args.json:
        print(json.dumps(doc))
        return 0
    print(quality_table(doc))
    gap = doc["gap_closed"]
    print(f"gap closed by distillation: {'none to close' if gap is None else f'{gap:.1%}'}")
    print(speed_table(doc))
    print(f"attnkit convert: checkpoint and report (report.md, report.json, report.png) written to {args.out}")
    return 0
