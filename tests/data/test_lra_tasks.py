"""The LRA-style task generators against independent brute-force evaluators.

ListOps is evaluated with a stack machine over the token names; text classification and
document matching are checked by searching the standard library's files for every window;
Pathfinder labels are recomputed by a breadth-first search over the rendered pixels.
"""

from __future__ import annotations

import functools
import sysconfig
from collections import Counter, deque
from pathlib import Path

import pytest
import torch

from attnkit.data import tasks
from attnkit.data.tasks import collate

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def window_bytes(ids: tuple[int, ...] | list[int]) -> bytes:
    """Byte-task ids back to bytes (the byte tokenizer's id is byte + 4)."""
    assert all(4 <= i < 260 for i in ids), "a byte window holds byte ids only"
    return bytes(i - 4 for i in ids)


@functools.lru_cache(maxsize=1)
def stdlib_sources() -> dict[Path, bytes]:
    """Every standard-library ``.py`` file's bytes (installed packages left out)."""
    return {
        p: p.read_bytes()
        for p in sorted(STDLIB.rglob("*.py"))
        if "site-packages" not in p.parts and "dist-packages" not in p.parts
    }


def files_containing(data: bytes, among: dict[Path, bytes] | None = None) -> list[Path]:
    """Brute force: every file whose bytes contain ``data``."""
    return [path for path, text in (among or stdlib_sources()).items() if data in text]


# ----------------------------------------------------------------------------- ListOps


def stack_evaluate(words: list[str]) -> tuple[int, int]:
    """Value and nesting depth of a ListOps expression, by a stack machine (no recursion).

    The root is at depth 1; a node inside ``k`` operators is at depth ``k + 1``.
    """
    stack: list[tuple[str, list[int]]] = []
    result = None
    depth = 0
    for word in words:
        if word.startswith("["):
            stack.append((word[1:], []))
            depth = max(depth, len(stack))
            continue
        if word == "]":
            op, args = stack.pop()
            ordered = sorted(args)
            half = len(ordered) // 2
            value = {
                "MIN": ordered[0],
                "MAX": ordered[-1],
                # LRA: int(np.median(args)), the mean of the middle two truncated
                "MED": ordered[half] if len(ordered) % 2 else (ordered[half - 1] + ordered[half]) // 2,
                "SM": sum(args) % 10,
            }[op]
        else:
            value = int(word)
            depth = max(depth, len(stack) + 1)
        if stack:
            stack[-1][1].append(value)
        else:
            assert result is None, "two roots"
            result = value
    assert not stack and result is not None, "unbalanced expression"
    return result, depth


def test_listops_at_lra_lengths_up_to_2k_evaluates_independently() -> None:
    task = tasks.ListOps(min_length=1500, max_length=2048)  # LRA's operators, depth 10, up to 10 arguments
    examples = task.examples(12, seed=7, split="validation")
    for ex in examples:
        words = task.decode(ex.input_ids).split()
        assert 1500 <= len(words) <= 2048
        value, depth = stack_evaluate(words)
        assert ex.label == value
        assert depth <= 10
    assert {w for ex in examples for w in task.decode(ex.input_ids).split() if w.startswith("[")} == {
        "[MIN",
        "[MAX",
        "[MED",
        "[SM",
    }


@pytest.mark.parametrize("max_depth", [2, 3, 5])
def test_listops_depth_setting_bounds_and_reaches_the_nesting(max_depth: int) -> None:
    task = tasks.ListOps(min_length=1, max_length=400, max_depth=max_depth, leaf_probability=0.3)
    depths = []
    for ex in task.examples(60, seed=1):
        value, depth = stack_evaluate(task.decode(ex.input_ids).split())
        assert ex.label == value
        depths.append(depth)
    assert max(depths) == max_depth


def test_listops_refuses_a_length_no_tree_can_reach() -> None:
    # Depth 3 with 10 arguments: at most 2 + 10 x (2 + 10 x 1) = 122 tokens.
    tasks.ListOps(min_length=122, max_length=500, max_depth=3)
    with pytest.raises(ValueError, match="longest tree with max_depth=3 and max_args=10 has 122 tokens"):
        tasks.ListOps(min_length=123, max_length=500, max_depth=3)


# ----------------------------------------------------------------------------- text classification


def test_text_classification_windows_come_from_their_family_and_splits_share_no_file() -> None:
    task = tasks.ByteTextClassification(length=256)
    families = task.families
    # Brute force: the sources of each family's package directory, tests included (a window of
    # the family's own files must be found there, and in no other family's directory).
    by_family = {
        f: {p: t for p, t in stdlib_sources().items() if p.relative_to(STDLIB).parts[0] == f} for f in families
    }
    found_in: dict[str, set[Path]] = {}
    labels = Counter()
    for split in ("train", "validation", "test"):
        found_in[split] = set()
        for ex in task.examples(40, seed=3, split=split):
            data = window_bytes(ex.input_ids)
            assert 1 <= len(data) <= 256
            homes = {f: files_containing(data, by_family[f]) for f in families}
            assert homes[families[ex.label]], f"window not found in {families[ex.label]}"
            assert not any(homes[f] for f in families if f != families[ex.label]), "window in another family"
            found_in[split].update(homes[families[ex.label]])
            labels[ex.label] += 1
    assert not found_in["train"] & found_in["validation"]
    assert not found_in["train"] & found_in["test"]
    assert not found_in["validation"] & found_in["test"]
    assert set(labels) == set(range(len(families)))  # balanced draws reach every class


def test_text_classification_truncates_long_files_and_pads_short_ones() -> None:
    task = tasks.ByteTextClassification(length=2048)
    examples = task.examples(60, seed=0)
    lengths = [len(e.input_ids) for e in examples]
    assert max(lengths) == 2048 and min(lengths) < 2048  # long files cut, a short file whole
    for ex in examples:
        if len(ex.input_ids) < 2048:  # a whole file: its exact bytes
            data = window_bytes(ex.input_ids)
            assert any(text == data for text in stdlib_sources().values())
    batch = collate(examples[:8], pad_to_multiple_of=2048)
    assert batch.input_ids.shape == (8, 2048)
    assert torch.equal(batch.attention_mask.sum(1), torch.tensor(lengths[:8]))


def test_text_classification_options_are_checked() -> None:
    with pytest.raises(
        ValueError, match=r"family 'no_such_package' has 0 .* choose among \(files\): .*asyncio \(\d+\)"
    ):
        tasks.ByteTextClassification(families=("asyncio", "no_such_package"))
    with pytest.raises(ValueError, match="families must be a list of at least two distinct package names"):
        tasks.ByteTextClassification(families=("asyncio",))
    with pytest.raises(ValueError, match="families must be"):
        tasks.ByteTextClassification(families=("asyncio", "../etc"))
    with pytest.raises(ValueError, match="length must be an integer >= 1"):
        tasks.ByteTextClassification(length=0)
    # A config file gives a list: accepted, and the options round-trip.
    task = tasks.make_task("text_classification", length=64, families=["email", "xml"])
    assert task.num_classes == 2
    assert tasks.make_task("text_classification", **task.options()).examples(3, seed=1) == task.examples(3, seed=1)


# ----------------------------------------------------------------------------- document matching


def test_document_matching_labels_match_a_brute_force_search() -> None:
    task = tasks.DocumentMatching(window=256)
    found_in: dict[str, set[Path]] = {"train": set(), "validation": set()}
    labels = []
    for split in found_in:
        for ex in task.examples(16, seed=5, split=split):
            ids = list(ex.input_ids)
            assert len(ids) == 513 and ids.count(3) == 1 and ids[256] == 3  # window <sep> window
            a, b = window_bytes(ids[:256]), window_bytes(ids[257:])
            homes_a, homes_b = files_containing(a), files_containing(b)
            assert homes_a and homes_b
            both = set(homes_a) & set(homes_b)
            if ex.label == 1:
                # Some file holds both windows, without overlap.
                assert any(_disjoint_occurrences(stdlib_sources()[p], a, b) for p in both)
            else:
                assert not both
            found_in[split].update(homes_a + homes_b)
            labels.append(ex.label)
    assert not found_in["train"] & found_in["validation"]
    assert 0.25 < sum(labels) / len(labels) < 0.75


def _disjoint_occurrences(text: bytes, a: bytes, b: bytes) -> bool:
    """Brute force: an occurrence of ``a`` and one of ``b`` in ``text`` that do not overlap."""
    starts_a = [i for i in range(len(text)) if text.startswith(a, i)]
    starts_b = [i for i in range(len(text)) if text.startswith(b, i)]
    return any(abs(i - j) >= len(a) for i in starts_a for j in starts_b)


def test_document_matching_refuses_a_window_no_file_can_hold() -> None:
    with pytest.raises(ValueError, match=r"use a smaller window"):
        tasks.DocumentMatching(window=10_000_000)


# ----------------------------------------------------------------------------- Pathfinder


def components(grid: list[list[int]], radius: int) -> list[set[tuple[int, int]]]:
    """Groups of non-background pixels linked by steps of Chebyshev distance <= ``radius`` (BFS)."""
    size = len(grid)
    lit = {(r, c) for r in range(size) for c in range(size) if grid[r][c] != 1}
    seen: set[tuple[int, int]] = set()
    out = []
    for start in sorted(lit):
        if start in seen:
            continue
        group = {start}
        queue = deque([start])
        while queue:
            r, c = queue.popleft()
            for dr in range(-radius, radius + 1):
                for dc in range(-radius, radius + 1):
                    nxt = (r + dr, c + dc)
                    if nxt in lit and nxt not in group:
                        group.add(nxt)
                        queue.append(nxt)
        seen |= group
        out.append(group)
    return out


@pytest.mark.parametrize(("size", "distractors", "lengths"), [(32, 1, (16, 40)), (16, 0, (8, 16)), (32, 3, (10, 24))])
def test_pathfinder_labels_match_a_flood_fill_on_the_pixels(
    size: int, distractors: int, lengths: tuple[int, int]
) -> None:
    task = tasks.Pathfinder(
        size=size, num_distractors=distractors, min_path_length=lengths[0], max_path_length=lengths[1]
    )
    labels = []
    for ex in task.examples(40, seed=2):
        assert len(ex.input_ids) == size * size
        grid = [list(ex.input_ids[r * size : (r + 1) * size]) for r in range(size)]
        marks = [(r, c) for r in range(size) for c in range(size) if grid[r][c] == 3]
        assert len(marks) == 2
        # Connected = a chain of lit pixels from one mark to the other, each step jumping at most
        # a one-pixel gap (Chebyshev distance 2).
        curves = components(grid, radius=2)
        joined = any(marks[0] in g and marks[1] in g for g in curves)
        assert ex.label == int(joined)
        # Every curve is one such group (marked ones and distractors), and the curves are dashed:
        # without jumping gaps (8-neighbours only) they fall apart into more pieces.
        assert len(curves) == 2 + distractors
        assert len(components(grid, radius=1)) > len(curves)
        assert all(len(g) >= lengths[0] * 3 // 4 for g in curves)
        labels.append(ex.label)
    assert 0.25 < sum(labels) / len(labels) < 0.75


def test_pathfinder_is_seeded_and_checks_its_options() -> None:
    task = tasks.Pathfinder(size=16, min_path_length=6, max_path_length=12)
    assert task.examples(5, seed=4) == tasks.Pathfinder(**task.options()).examples(5, seed=4)
    assert task.examples(5, seed=4) != task.examples(5, seed=5)
    with pytest.raises(ValueError, match="max_path_length=100 does not fit a 16x16 image"):
        tasks.Pathfinder(size=16, max_path_length=100)
    with pytest.raises(ValueError, match="size must be an integer >= 8"):
        tasks.Pathfinder(size=4)
    with pytest.raises(ValueError, match=r"turn_probability must be in \[0, 1\]"):
        tasks.Pathfinder(turn_probability=2.0)


def test_pathfinder_examples_collate_as_classification() -> None:
    batch = collate([tasks.Pathfinder().example(i, seed=0) for i in range(4)])
    assert batch.input_ids.shape == (4, 1024) and bool(batch.attention_mask.all())
    assert batch.labels.shape == (4,)
    assert set(batch.input_ids.unique().tolist()) <= {1, 2, 3}
