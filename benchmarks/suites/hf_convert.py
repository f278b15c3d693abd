"""A converted Hugging Face Llama vs the original with SDPA: one training step (forward + backward) at 4K and 16K.

Issue 19's floor for ``attnkit convert``: the converted model's forward+backward at 16K tokens is at
least 4x faster than the original's with PyTorch's SDPA, for ``sliding_window`` and ``linear``.
The model is the recipe's shape (``configs/hf/llama_small.toml``: Llama, width 128, 4 layers, 4
heads, byte vocabulary 260), built from a config (nothing downloaded, weights random: speed does
not depend on them); ``transformers sdpa`` is that model as Transformers builds it, the attnkit
rows are the same model after :func:`attnkit.hf.apply`. A step is the next-token cross-entropy of
one ``(1, T)`` sequence and its backward; ``use_cache=False`` as in training. fp32, batch 1, one thread.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from benchmarks.suite import Case, Part, Suite

#: The recipe teacher's shape (configs/hf/llama_small.toml).
MODEL = {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4, "num_attention_heads": 4}
VOCAB = 260


def llama(attention: str, max_positions: int, **options: Any) -> Any:
    """The recipe-shaped Llama (random weights, eval mode: no dropout) with SDPA or an attnkit mechanism."""
    import transformers

    config = transformers.LlamaConfig(**MODEL, vocab_size=VOCAB, max_position_embeddings=max_positions)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    if attention != "sdpa":
        import attnkit.hf

        attnkit.hf.apply(model, attention, **options)
    return model.eval()


def training_step(length: int, causal: bool, *, attention: str, **options: Any) -> Callable[[], torch.Tensor]:
    """The closure computes the next-token loss of one ``length``-token sequence (the harness runs its backward)."""
    model = llama(attention, length, **options)
    ids = torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(length))

    def run() -> torch.Tensor:
        logits = model(input_ids=ids, use_cache=False).logits  # (1, T, V)
        return torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])

    return run


TARGET = "benchmarks.suites.hf_convert:training_step"

SUITE = Suite(
    name="hf_convert",
    title="a converted HF Llama's forward+backward vs the original with SDPA, 4K and 16K (issue 19)",
    description=__doc__ or "",
    parts=(
        Part(
            "main",
            (
                Case("transformers sdpa", TARGET, {"attention": "sdpa"}, role="sdpa"),
                Case("attnkit sliding_window (w512)", TARGET, {"attention": "sliding_window", "window": 512}),
                Case("attnkit linear", TARGET, {"attention": "linear"}),
            ),
            lengths=(4096, 16384),
            causal=(True,),
            modes=("fwd+bwd",),
            repeats=2,
            warmup=1,
            # one thread: on a shared 2-core machine a second thread mostly waits for the first
            threads=1,
            timeout=1800.0,
            time_budget=600.0,
            max_seconds_per_step=600.0,
        ),
    ),
)
