"""Task generators checked against independent brute-force evaluators."""

from __future__ import annotations

import statistics
from collections import Counter

import pytest
import torch

from attnkit.data import tasks
from attnkit.data.tasks import IGNORE_INDEX, Example, collate

# ----------------------------------------------------------------------------- ListOps


def parse_listops(text: str) -> tuple[int, dict[str, list[int]]]:
    """Recursive-descent evaluator over the token *string*, written without the generator's code.

    Returns the value and statistics: the depth of every node, the argument counts of every
    operator, and for nodes above the depth limit whether each was a leaf.
    """
    words = text.split()
    stats: dict[str, list[int]] = {"depth": [], "args": [], "leaf_above_limit": []}
    pos = 0

    def node(depth: int) -> int:
        nonlocal pos
        word = words[pos]
        pos += 1
        stats["depth"].append(depth)
        if depth > 1 and depth < 10:
            stats["leaf_above_limit"].append(int(word.isdigit()))
        if word.isdigit():
            return int(word)
        assert word.startswith("["), word
        args = []
        while words[pos] != "]":
            args.append(node(depth + 1))
        pos += 1
        stats["args"].append(len(args))
        op = word[1:]
        if op == "MIN":
            return min(args)
        if op == "MAX":
            return max(args)
        if op == "MED":
            return int(statistics.median(args))
        if op == "SM":
            return sum(args) % 10
        raise AssertionError(f"unknown operator {op}")

    value = node(1)
    assert pos == len(words), "trailing tokens after the tree"
    return value, stats


def test_listops_labels_match_an_independent_evaluator() -> None:
    task = tasks.ListOps(min_length=20, max_length=300)
    examples = task.examples(300, seed=3)
    counts: dict[str, list[int]] = {"depth": [], "args": [], "leaf_above_limit": []}
    for ex in examples:
        value, stats = parse_listops(task.decode(ex.input_ids))
        assert ex.label == value
        assert 20 <= len(ex.input_ids) <= 300
        for key in counts:
            counts[key] += stats[key]
    assert max(counts["depth"]) <= 10
    assert min(counts["args"]) >= 2 and max(counts["args"]) <= 10
    # Uniform 2..10 children: every count occurs.
    assert set(counts["args"]) == set(range(2, 11))


def test_listops_tree_shape_statistics_follow_the_recipe() -> None:
    # Without a length filter, non-root nodes above depth 10 are leaves with probability 0.75.
    task = tasks.ListOps(min_length=1, max_length=100_000)
    leaves: list[int] = []
    for ex in task.examples(400, seed=11):
        leaves += parse_listops(task.decode(ex.input_ids))[1]["leaf_above_limit"]
    rate = sum(leaves) / len(leaves)
    assert len(leaves) > 2000
    assert abs(rate - 0.75) < 0.03


def test_listops_med_truncates_and_operators_apply() -> None:
    from attnkit.data.tasks.listops import apply_operator

    assert apply_operator("MED", [1, 2]) == 1
    assert apply_operator("MED", [3, 9, 4]) == 4
    assert apply_operator("MED", [0, 3, 8, 9]) == 5
    assert apply_operator("SM", [9, 9, 5]) == 3
    with pytest.raises(ValueError, match="unknown ListOps operator"):
        apply_operator("AVG", [1])


def test_listops_lra_lengths_and_skewed_labels() -> None:
    task = tasks.ListOps(min_length=500, max_length=2000)
    examples = task.examples(40, seed=0)
    assert all(500 <= len(e.input_ids) <= 2000 for e in examples)
    assert all(parse_listops(task.decode(e.input_ids))[0] == e.label for e in examples)


# ----------------------------------------------------------------------------- determinism and splits


@pytest.mark.parametrize("name", tasks.TASK_NAMES)
def test_same_seed_same_examples_and_other_seed_differs(name: str) -> None:
    opts = {"min_length": 8, "max_length": 40} if name == "listops" else {}
    a = tasks.make_task(name, **opts).examples(8, seed=5)
    b = tasks.make_task(name, **opts).examples(8, seed=5)
    c = tasks.make_task(name, **opts).examples(8, seed=6)
    assert a == b
    assert a != c
    # Random access: example i alone equals the i-th of a list.
    assert tasks.make_task(name, **opts).example(3, seed=5) == a[3]


def test_splits_are_disjoint_even_for_a_small_space() -> None:
    task = tasks.ListOps(min_length=3, max_length=7)
    train = {e.input_ids for e in task.examples(600, seed=0, split="train")}
    valid = {e.input_ids for e in task.examples(200, seed=0, split="validation")}
    test = {e.input_ids for e in task.examples(200, seed=0, split="test")}
    assert not train & valid and not train & test and not valid & test


# ----------------------------------------------------------------------------- copy


def test_copy_task_second_copy_only() -> None:
    task = tasks.CopyTask(min_length=3, max_length=9, num_symbols=5)
    for ex in task.examples(50, seed=1):
        ids = list(ex.input_ids)
        n = (len(ids) - 2) // 2
        assert 3 <= n <= 9
        assert ids[0] == ids[n + 1] == 1
        assert ids[1 : n + 1] == ids[n + 2 :]
        assert all(2 <= i < task.vocab_size for i in ids[1 : n + 1])
        # Brute force: a position is scored iff the next token belongs to the second copy.
        for t, y in enumerate(ex.labels):
            expected = ids[t + 1] if n + 2 <= t + 1 < len(ids) else IGNORE_INDEX
            assert y == expected
        assert ex.num_targets == n


# ----------------------------------------------------------------------------- MQAR


def test_mqar_queries_recall_the_paired_value() -> None:
    task = tasks.MQAR(num_pairs=6, num_queries=4, num_keys=20, num_values=30, gap=3)
    for ex in task.examples(50, seed=2):
        ids = list(ex.input_ids)
        assert len(ids) == 2 * 6 + 3 + 2 * 4 == task.max_length
        context = ids[:12]
        keys, values = context[0::2], context[1::2]
        assert len(set(keys)) == 6 and len(set(values)) == 6
        assert all(2 <= k < 22 for k in keys) and all(22 <= v < 52 for v in values)
        scored = [t for t, y in enumerate(ex.labels) if y != IGNORE_INDEX]
        assert len(scored) == 4
        for t in scored:
            # Brute force: scan the context for the queried key and read the next token.
            hit = next(i for i in range(0, len(context), 2) if context[i] == ids[t])
            assert ex.labels[t] == context[hit + 1] == ids[t + 1]


# ----------------------------------------------------------------------------- reverse / sort


@pytest.mark.parametrize("mode", ["reverse", "sort"])
def test_seq2seq_targets(mode: str) -> None:
    task = tasks.make_task(mode, min_length=2, max_length=12, num_symbols=7)
    for ex in task.examples(40, seed=4):
        src = list(ex.input_ids)
        expected = src[::-1] if mode == "reverse" else sorted(src)
        assert list(ex.labels) == [*expected, 2]
        assert ex.decoder_input_ids == (1, *expected)
        assert Counter(src) == Counter(expected)


# ----------------------------------------------------------------------------- batches


def test_functional_batches_pad_and_mask() -> None:
    b = tasks.listops(6, seed=0, min_length=5, max_length=60)
    lengths = b.attention_mask.sum(1)
    assert b.input_ids.shape == (6, int(lengths.max()))
    assert torch.all(b.input_ids[~b.attention_mask] == 0)
    assert b.labels.shape == (6,)
    m = tasks.mqar(4, seed=0, num_pairs=4)
    assert m.num_targets == 16
    assert torch.equal(m.labels[m.target_mask], m.input_ids[:, 1:][m.target_mask[:, :-1]])
    s = tasks.sort(3, seed=0, min_length=2, max_length=9)
    assert s.decoder_input_ids is not None and s.decoder_attention_mask is not None
    assert torch.all(s.labels[~s.decoder_attention_mask] == IGNORE_INDEX)
    assert s.rows(slice(0, 2)).size == 2


def test_collate_pad_to_multiple_and_errors() -> None:
    a = Example(input_ids=(3, 4, 5), labels=(4, 5, IGNORE_INDEX))
    b = Example(input_ids=(3,), labels=(IGNORE_INDEX,))
    batch = collate([a, b], pad_to_multiple_of=4)
    assert batch.input_ids.tolist() == [[3, 4, 5, 0], [3, 0, 0, 0]]
    assert batch.labels.tolist() == [[4, 5, -100, -100], [-100] * 4]
    with pytest.raises(ValueError, match="at least one example"):
        collate([])
    with pytest.raises(ValueError, match="different kinds"):
        collate([a, Example(input_ids=(1,), label=3)])


def test_bad_task_options_name_the_option() -> None:
    with pytest.raises(ValueError, match="unknown task 'lisops'"):
        tasks.make_task("lisops")
    with pytest.raises(ValueError, match="min_length must be <= max_length"):
        tasks.ListOps(min_length=50, max_length=10)
    with pytest.raises(ValueError, match=r"accepted options: .*num_pairs"):
        tasks.make_task("mqar", pairs=3)
    with pytest.raises(ValueError, match="num_pairs must be <= num_keys"):
        tasks.MQAR(num_pairs=10, num_keys=5)
    with pytest.raises(ValueError, match="split must be one of"):
        tasks.listops(2, split="dev")


def test_unique_examples_drop_repeats_like_lra() -> None:
    task = tasks.ListOps(min_length=4, max_length=4)  # one operator over two digits: 400 trees
    plain = task.examples(60, seed=0)
    assert len(set(plain)) < len(plain)  # the birthday paradox makes repeats near-certain
    unique = task.examples(60, seed=0, unique=True)
    assert len(set(unique)) == 60
    assert unique[0] == plain[0]
    with pytest.raises(ValueError, match=r"found only .* distinct train examples, asked for 500"):
        task.examples(500, seed=0, unique=True)
