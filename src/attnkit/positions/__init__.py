"""Position schemes: absolute (sinusoidal, learned), rotary, and relative score biases (ALiBi, T5)."""

from attnkit.positions.absolute import LearnedPositions, SinusoidalPositions
from attnkit.positions.relative import ALiBi, T5RelativeBias, alibi_slopes, t5_bucket
from attnkit.positions.rotary import RotaryEmbedding

__all__ = [
    "ALiBi",
    "LearnedPositions",
    "RotaryEmbedding",
    "SinusoidalPositions",
    "T5RelativeBias",
    "alibi_slopes",
    "t5_bucket",
]
