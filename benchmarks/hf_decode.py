"""Per-token decode time of recurrent mechanisms inside a Hugging Face Llama, at two context lengths.

Issue 19 asks that a generated token of ``linear`` / ``performer`` cost O(1) in the context:
per-token time at 8K context within 1.3x of 1K. This script builds a small Llama from a config
(nothing downloaded), applies each mechanism with :func:`attnkit.hf.apply`, fills the context
with a prompt, then times single-token steps through the model (the same forward ``generate``
runs each step) with two caches:

- ``attnkit state``: :func:`attnkit.hf.new_cache`, the mechanism's recurrent state
  (what ``generate`` builds after ``apply``);
- ``transformers kv``: Transformers' ``DynamicCache``, which keeps every key and value and makes
  the mechanism recompute over all of them at each step (the bridge's behaviour without state).

Reported per row: median milliseconds per token at each context, the ratio of the longest to the
shortest context (the issue's bound is <= 1.3 for the state cache) and the bytes each cache holds.

::

    python benchmarks/hf_decode.py --threads 1             # 1K and 8K, linear and performer, CPU
    python benchmarks/hf_decode.py --device cuda --json out.json
    python benchmarks/hf_decode.py --contexts 256 1024 --steps 16   # a quick look
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from tqdm import tqdm

CACHES = ("attnkit state", "transformers kv")


@dataclass
class Row:
    """One mechanism and cache: per-token milliseconds and cache bytes by context length."""

    mechanism: str
    cache: str
    ms_per_token: dict[int, float]
    cache_bytes: dict[int, int]

    def ratio(self) -> float:
        """Per-token time at the longest context over the shortest."""
        contexts = sorted(self.ms_per_token)
        return self.ms_per_token[contexts[-1]] / self.ms_per_token[contexts[0]]


def build_model(args: argparse.Namespace, mechanism: str) -> Any:
    """A freshly initialised small Llama with ``mechanism`` in every layer, in eval mode."""
    import transformers

    import attnkit.hf

    config = transformers.LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        vocab_size=args.vocab,
        max_position_embeddings=max(args.contexts) + args.warmup + args.steps + 1,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    attnkit.hf.apply(model, mechanism)
    return model.to(device=args.device, dtype=getattr(torch, args.dtype)).eval()


def _cache_bytes(cache: Any) -> int:
    from attnkit.hf import MechanismStateLayer

    total = 0
    for layer in cache.layers:
        tensors = layer.state_tensors() if isinstance(layer, MechanismStateLayer) else [layer.keys, layer.values]
        total += sum(t.numel() * t.element_size() for t in tensors if t is not None)
    return total


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def time_decoding(model: Any, args: argparse.Namespace, context: int, cache_kind: str) -> tuple[float, int]:
    """Median ms per generated token after a ``context``-token prompt, and the cache's bytes then."""
    from transformers import DynamicCache

    import attnkit.hf

    cache = attnkit.hf.new_cache(model) if cache_kind == CACHES[0] else DynamicCache(config=model.config)
    g = torch.Generator().manual_seed(context)
    prompt = torch.randint(0, args.vocab, (args.batch, context), generator=g).to(args.device)
    # Prefill in chunks: a long prompt in one forward would dominate memory, not the decode we time.
    for start in range(0, context, args.prefill_chunk):
        out = model(prompt[:, start : start + args.prefill_chunk], cache=cache, use_cache=True)
    token = out.logits[:, -1:].argmax(-1)
    times = []
    for step in range(args.warmup + args.steps):
        _sync(args.device)
        begin = time.perf_counter()
        out = model(token, cache=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        _sync(args.device)
        if step >= args.warmup:
            times.append(time.perf_counter() - begin)
    return 1e3 * statistics.median(times), _cache_bytes(cache)


def run(args: argparse.Namespace) -> list[Row]:
    """Time every mechanism x cache x context."""
    rows = []
    work = [(m, c) for m in args.mechanisms for c in args.caches]
    with tqdm(total=len(work) * len(args.contexts), desc="decode timings", file=sys.stderr) as bar:
        for mechanism in args.mechanisms:
            model = build_model(args, mechanism)
            for cache_kind in args.caches:
                row = Row(mechanism, cache_kind, {}, {})
                for context in args.contexts:
                    bar.set_postfix_str(f"{mechanism}, {cache_kind}, {context} tokens")
                    row.ms_per_token[context], row.cache_bytes[context] = time_decoding(
                        model, args, context, cache_kind
                    )
                    bar.update()
                rows.append(row)
    return rows


def markdown(rows: list[Row], contexts: list[int]) -> str:
    """The results as a markdown table."""
    short, long = min(contexts), max(contexts)
    header = (
        ["mechanism", "cache"]
        + [f"ms/token @ {c}" for c in contexts]
        + [f"ratio {long}/{short}"]
        + [f"cache MiB @ {c}" for c in contexts]
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row.mechanism, row.cache]
        cells += [f"{row.ms_per_token[c]:.2f}" for c in contexts]
        cells += [f"{row.ratio():.2f}"]
        cells += [f"{row.cache_bytes[c] / 2**20:.2f}" for c in contexts]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Per-token decode time of linear/performer inside a Hugging Face Llama at two or more context lengths, "
            "with attnkit's recurrent state and with Transformers' key/value cache; prints a markdown table "
            "(issue 19's bound: state-cache ratio longest/shortest <= 1.3)."
        )
    )
    parser.add_argument("--mechanisms", nargs="+", default=["linear", "performer"], help="attnkit mechanisms to time")
    parser.add_argument(
        "--contexts", nargs="+", type=int, default=[1024, 8192], help="prompt lengths before the timed steps"
    )
    parser.add_argument("--steps", type=int, default=32, help="timed single-token steps per context (median kept)")
    parser.add_argument("--warmup", type=int, default=4, help="untimed steps before the timed ones")
    parser.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    parser.add_argument("--hidden", type=int, default=256, help="model width")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers")
    parser.add_argument("--heads", type=int, default=4, help="attention heads")
    parser.add_argument("--vocab", type=int, default=1000, help="vocabulary size")
    parser.add_argument("--prefill-chunk", type=int, default=1024, help="prompt tokens per prefill forward")
    parser.add_argument(
        "--caches", nargs="+", choices=CACHES, default=list(CACHES), help="which caches to time (default both)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for PyTorch (default PyTorch's choice; 1 avoids thread-pool stalls on a busy machine)",
    )
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="model dtype")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    args = parser.parse_args(argv)
    for name in ("steps", "batch", "hidden", "layers", "heads", "vocab", "prefill_chunk"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.threads is not None and args.threads <= 0:
        parser.error(f"--threads must be a positive integer, got {args.threads}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if len(set(args.contexts)) < 2 or min(args.contexts) <= 0:
        parser.error(f"--contexts needs at least two distinct positive lengths (e.g. 1024 8192), got {args.contexts}")
    if args.hidden % args.heads:
        parser.error(f"--hidden {args.hidden} must be a multiple of --heads {args.heads}")
    args.contexts = sorted(set(args.contexts))
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table (and write JSON when asked)."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rows = run(args)
    device = (
        torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    )
    print(
        f"Llama {args.layers} layers x {args.hidden} wide, {args.heads} heads, batch {args.batch}, {args.dtype}, "
        f"{device}; median of {args.steps} steps"
    )
    print(markdown(rows, args.contexts))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"settings": vars(args), "rows": [asdict(r) for r in rows]}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
