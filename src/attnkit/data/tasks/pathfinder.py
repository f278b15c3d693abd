"""Pathfinder-style images from a generator, after LRA's "Pathfinder" task.

Linsley et al., "Learning long-range spatial dependencies with horizontal gated recurrent units"
(2018, https://arxiv.org/abs/1805.08315) introduced the images; Long Range Arena (Tay et al., 2021,
https://arxiv.org/abs/2011.04006) reads them as a sequence of ``32 x 32 = 1,024`` pixels (Path-X:
``128 x 128``). Each image holds ``2 + num_distractors`` dashed curves and two marked endpoints;
the label is 1 when one curve joins the two marks and 0 when they sit on different curves. The
curves are the same in number and kind in both classes, so only tracing a curve from one mark
to the other tells the classes apart.

How an image is drawn: each curve is a random walk over the 8 pixel directions that turns by at
most 45 degrees per step (with probability ``turn_probability``), never comes back within one
pixel of itself and stays at least 3 pixels (Chebyshev distance) from every other curve. A walk
that cannot continue before ``min_path_length`` pixels is redrawn. The curve is dashed: after
every ``dash_length`` pixels drawn, one pixel is left blank, and the last pixel is always drawn.

What "connected" means, exactly: two marks are connected when a chain of curve pixels leads from
one to the other in steps of Chebyshev distance at most 2 (a step may jump a one-pixel gap).
Pixels of one curve are always connected this way; pixels of different curves, 3 apart, never.

Tokens (row-major, ``size x size`` of them): 0 padding, 1 background, 2 curve, 3 endpoint mark.
"""

from __future__ import annotations

import random
from typing import Any

from attnkit.data.tasks.base import Example, Task, check_range

BACKGROUND_ID, CURVE_ID, ENDPOINT_ID = 1, 2, 3
VOCAB_SIZE = 4
#: (row, column) steps of the 8 directions, in turning order (45 degrees apart).
DIRECTIONS: tuple[tuple[int, int], ...] = ((0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1), (-1, 0), (-1, 1))
#: Curves keep this Chebyshev distance from each other, one more than a connecting step.
SEPARATION = 3
#: Walks tried per curve before the whole image is redrawn.
CURVE_ATTEMPTS = 100

Pixel = tuple[int, int]


def _neighbourhood(pixel: Pixel, radius: int) -> list[Pixel]:
    """Every pixel within Chebyshev distance ``radius`` of ``pixel`` (itself included)."""
    r, c = pixel
    return [(r + dr, c + dc) for dr in range(-radius, radius + 1) for dc in range(-radius, radius + 1)]


class Pathfinder(Task):
    """Are the two marked endpoints joined by a dashed curve? (binary classification, 1 = joined)

    Args:
        size: image side in pixels; the sequence is ``size * size`` tokens (LRA: 32, Path-X: 128).
        num_distractors: curves with no mark in either class, besides the two that carry marks.
        min_path_length: shortest curve in pixels (walk steps).
        max_path_length: longest curve in pixels; each curve's target length is uniform in
            ``[min_path_length, max_path_length]``.
        dash_length: pixels drawn between two one-pixel gaps.
        turn_probability: chance that a step turns by 45 degrees (left or right alike).
    """

    name = "pathfinder"
    kind = "classification"
    vocab_size = VOCAB_SIZE
    num_classes = 2

    def __init__(
        self,
        *,
        size: int = 32,
        num_distractors: int = 1,
        min_path_length: int = 16,
        max_path_length: int = 40,
        dash_length: int = 3,
        turn_probability: float = 0.3,
    ) -> None:
        check_range("size", size, "size", size, minimum=8)
        check_range("num_distractors", num_distractors, "num_distractors", num_distractors, minimum=0)
        check_range("min_path_length", min_path_length, "max_path_length", max_path_length, minimum=2)
        check_range("dash_length", dash_length, "dash_length", dash_length)
        if max_path_length > size * size // 4:
            raise ValueError(
                f"max_path_length={max_path_length} does not fit a {size}x{size} image with other curves 3 pixels "
                f"away; use at most {size * size // 4} or a larger size"
            )
        if not isinstance(turn_probability, (int, float)) or not 0.0 <= turn_probability <= 1.0:
            raise ValueError(f"turn_probability must be in [0, 1], got {turn_probability!r}")
        self.size = size
        self.num_distractors = num_distractors
        self.min_path_length = min_path_length
        self.max_path_length = max_path_length
        self.dash_length = dash_length
        self.turn_probability = float(turn_probability)

    @property
    def max_length(self) -> int:
        return self.size * self.size

    def options(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "num_distractors": self.num_distractors,
            "min_path_length": self.min_path_length,
            "max_path_length": self.max_path_length,
            "dash_length": self.dash_length,
            "turn_probability": self.turn_probability,
        }

    def token_names(self) -> list[str]:
        return ["<pad>", ".", "#", "@"]

    def _inside(self, pixel: Pixel) -> bool:
        return 0 <= pixel[0] < self.size and 0 <= pixel[1] < self.size

    def _walk(self, rng: random.Random, blocked: set[Pixel]) -> list[Pixel] | None:
        """One curve's pixels, avoiding ``blocked``; None when it cannot reach the minimum length."""
        start = (rng.randrange(self.size), rng.randrange(self.size))
        if start in blocked:
            return None  # the caller draws again: a uniform start among the free pixels
        path = [start]
        near_self: set[Pixel] = set()  # within one pixel of the curve, but for its head
        heading = rng.randrange(len(DIRECTIONS))
        target = rng.randint(self.min_path_length, self.max_path_length)
        while len(path) < target:
            turn = rng.choice((-1, 1)) if rng.random() < self.turn_probability else 0
            # Try the drawn turn first, then the other two (straight on, 45 degrees) in random order.
            second, third = (t for t in (-1, 0, 1) if t != turn)
            if rng.random() < 0.5:
                second, third = third, second
            for option in (turn, second, third):
                step = DIRECTIONS[(heading + option) % len(DIRECTIONS)]
                head = (path[-1][0] + step[0], path[-1][1] + step[1])
                if self._inside(head) and head not in blocked and head not in near_self:
                    heading = (heading + option) % len(DIRECTIONS)
                    break
            else:
                break
            # The old head's neighbours become off limits only now: the new head is one of them.
            near_self.update(_neighbourhood(path[-1], 1))
            path.append(head)
        return path if len(path) >= self.min_path_length else None

    def _dashed(self, path: list[Pixel]) -> list[Pixel]:
        """The pixels drawn: a one-pixel gap after every ``dash_length`` pixels, the last pixel kept."""
        period = self.dash_length + 1
        if len(path) % period == 0:
            path = path[:-1]  # the last pixel would be a gap; end the curve one pixel earlier
        return [p for i, p in enumerate(path) if i % period != self.dash_length]

    def sample(self, rng: random.Random) -> Example | None:
        blocked: set[Pixel] = set()
        curves = []
        for _ in range(2 + self.num_distractors):
            # A walk that gets stuck (against the border, say) is redrawn on its own: redrawing
            # the whole image instead makes large images with many curves very slow to draw.
            path = next((p for p in (self._walk(rng, blocked) for _ in range(CURVE_ATTEMPTS)) if p), None)
            if path is None:
                return None
            curves.append(self._dashed(path))
            blocked.update(q for p in path for q in _neighbourhood(p, SEPARATION - 1))
        joined = rng.random() < 0.5
        if joined:
            marks = [curves[0][0], curves[0][-1]]
        else:
            marks = [rng.choice((curves[0][0], curves[0][-1])), rng.choice((curves[1][0], curves[1][-1]))]
        image = [BACKGROUND_ID] * (self.size * self.size)
        for curve in curves:
            for r, c in curve:
                image[r * self.size + c] = CURVE_ID
        for r, c in marks:
            image[r * self.size + c] = ENDPOINT_ID
        return Example(input_ids=tuple(image), label=int(joined))
