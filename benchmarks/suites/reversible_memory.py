"""Training peak memory vs depth: plain residual layers vs reversible ones (and checkpointing).

One training step (forward + backward of a language model's logits; dim 256, 4 heads, vocab 256,
batch 2 × 1024 tokens) per measurement; peak memory is the resident-set peak the step added over the
state after building the model, so parameters are excluded and what remains is activations plus
parameter gradients (the `grad MB` column: they grow with depth whatever the layers). Reversible
layers should stay flat apart from those gradients: only the last layer's two streams are kept, the
rest are rebuilt in backward.

glibc raises its mmap threshold after big blocks are freed, so freed activations linger in the heap
and the resident peak drifts upward with every layer recomputed in backward (allocator
fragmentation, not live tensors). The workers therefore run with `MALLOC_MMAP_THRESHOLD_=131072`
(fixed at glibc's default), which makes the resident peak track live tensors; set the variable
yourself to measure something else.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from benchmarks.suite import Case, Column, Part, Suite

VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {},
    "checkpointing": {"checkpointing": True},
    "reversible": {"reversible": True},
    "reversible + ff_chunks=4": {"reversible": True, "ff_chunks": 4},
}
DEPTHS = (2, 4, 8, 16)


def training_step(
    length: int, causal: bool, *, variant: str, depth: int, batch: int, dim: int, **changes: Any
) -> Callable[[], torch.Tensor]:
    """A closure running one forward of a ``depth``-layer LM on ``(batch, length)`` tokens (``variant``: its name only)."""
    import attnkit

    cfg = attnkit.TransformerConfig(vocab_size=256, dim=dim, depth=depth, heads=dim // 64, max_len=length, **changes)
    model = attnkit.LanguageModel(cfg).train()
    ids = torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(0))

    def step() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        return model(ids)

    # what any training step keeps whatever its layers: the fp32 parameter gradients
    step.info = lambda: {"grad_mb": model.num_parameters() * 4 / 2**20}  # type: ignore[attr-defined]
    return step


SUITE = Suite(
    name="reversible_memory",
    title="training peak memory vs depth: plain, checkpointed and reversible layers",
    description=__doc__ or "",
    parts=(
        Part(
            "main",
            tuple(
                Case(
                    f"{variant} (depth {depth})",
                    "benchmarks.suites.reversible_memory:training_step",
                    {"variant": variant, "depth": depth, "batch": 2, "dim": 256, **changes},
                )
                for variant, changes in VARIANTS.items()
                for depth in DEPTHS
            ),
            lengths=(1024,),
            causal=(True,),
            modes=("fwd+bwd",),
            repeats=2,
            warmup=1,
            env={"MALLOC_MMAP_THRESHOLD_": "131072"},
            x="depth",
            series="variant",
            columns=(Column("grad MB", lambda r: r["info"]["grad_mb"], "{:.0f}"),),
        ),
    ),
)
