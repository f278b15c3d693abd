"""The arena's parts on their own: config, cell cache, budgets, memory meter, fidelity, tasks, patterns."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import attnkit
from attnkit.arena import ArenaConfig
from attnkit.arena.cells import CellCache, cell_key
from attnkit.arena.efficiency import budget_stop, project
from attnkit.arena.fidelity import fidelity_inputs, measure_fidelity
from attnkit.arena.patterns import attention_picture
from attnkit.arena.plots import pareto_front
from attnkit.arena.quality import quality_options
from attnkit.arena.tasks import get_task
from attnkit.attention.reference import reference_attention
from attnkit.metrics.memory import PeakMemoryMeter

# -- config ---------------------------------------------------------------------------------


def test_presets_are_valid_and_ordered_by_size() -> None:
    quick, default, full = (ArenaConfig.preset(n) for n in ("quick", "default", "full"))
    assert quick.lengths[-1] < default.lengths[-1] < full.lengths[-1] == 65536
    assert default.lengths == (1024, 2048, 4096, 8192)
    assert quick.train_steps < default.train_steps < full.train_steps


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"lengths": (2048, 1024)}, "lengths must be strictly increasing"),
        ({"lengths": ()}, "lengths must name at least one"),
        ({"lengths": (0,)}, "lengths must be a positive integer"),
        ({"tasks": ("imdb",)}, "tasks must be one of"),
        ({"step_budget_s": 0}, "step_budget_s must be a positive number"),
        ({"device": "tpu"}, "device must be"),
        ({"model_dim": 30, "model_heads": 4}, "model_dim must be divisible by model_heads"),
    ],
)
def test_bad_settings_name_the_setting(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ArenaConfig.preset("default", **overrides)


def test_config_round_trips_through_json() -> None:
    config = ArenaConfig.preset("quick", mechanisms=("full",))
    assert ArenaConfig.from_dict(json.loads(json.dumps(config.as_dict()))) == config
    with pytest.raises(ValueError, match="not arena settings: colour"):
        ArenaConfig.from_dict({**config.as_dict(), "colour": "red"})


def test_unknown_preset_and_setting() -> None:
    with pytest.raises(ValueError, match="preset must be one of"):
        ArenaConfig.preset("huge")
    with pytest.raises(TypeError, match="unknown arena setting"):
        ArenaConfig.preset("quick", lenghts=(1,))


# -- cells ------------------------------------------------------------------------------------


def test_cell_cache_round_trip_and_key_mismatch(tmp_path: Path) -> None:
    cache = CellCache(tmp_path)
    key = cell_key("efficiency", "full", {"a": 1}, {"length": 64})
    assert cache.get(key) is None
    cache.put(key, {"status": "ok", "median_ms": 1.5})
    assert cache.get(key) == {"status": "ok", "median_ms": 1.5}
    assert cache.get(cell_key("efficiency", "full", {"a": 2}, {"length": 64})) is None
    (path,) = (tmp_path / "cells" / "efficiency" / "full").glob("*.json")
    stored = json.loads(path.read_text())
    stored["key"]["params"]["length"] = 128  # a file that does not hold the key it is named for
    path.write_text(json.dumps(stored))
    assert cache.get(key) is None
    path.write_text("{ truncated")
    assert cache.get(key) is None
    assert CellCache(tmp_path, enabled=False).get(key) is None


# -- budgets -----------------------------------------------------------------------------------


def test_project_fits_a_power_law_through_the_last_two_points() -> None:
    assert project([(1024, 10.0), (2048, 40.0)], 4096) == pytest.approx(160.0)  # quadratic
    assert project([(1024, 10.0), (2048, 20.0)], 8192) == pytest.approx(80.0)  # linear
    assert project([(1024, 10.0)], 2048) == pytest.approx(40.0)  # one point: assume quadratic
    assert project([(1024, 10.0), (2048, 9.0)], 4096) == pytest.approx(18.0)  # noise: at least linear
    assert project([], 4096) is None


def row(length: int, ms: float, mb: float | None = 10.0, status: str = "ok") -> dict:
    return {"length": length, "median_ms": ms, "peak_mb": mb, "status": status}


def test_budget_stop_reasons() -> None:
    cfg = ArenaConfig.preset("default", step_budget_s=1.0, memory_budget_gb=1.0)
    assert budget_stop(cfg, "fwd", [], 1024) is None
    assert budget_stop(cfg, "fwd", [row(1024, 100.0)], 2048) is None
    assert "took 1.5 s" in budget_stop(cfg, "fwd", [row(1024, 1500.0)], 2048)
    assert "projected fwd step 1.6 s at length 4096" in budget_stop(
        cfg, "fwd", [row(1024, 100.0), row(2048, 400.0)], 4096
    )
    assert "peak memory 2.0 GB" in budget_stop(cfg, "fwd", [row(1024, 1.0, 2048.0)], 2048)
    assert "projected peak memory" in budget_stop(cfg, "fwd", [row(1024, 1.0, 200.0), row(2048, 1.0, 800.0)], 8192)
    assert "after an error" in budget_stop(cfg, "fwd", [row(1024, 1.0, status="error")], 2048)
    assert budget_stop(cfg, "fwd", [row(1024, 1.0, None), row(2048, 1.0, None)], 4096) is None  # no memory method


# -- memory -------------------------------------------------------------------------------------


def test_memory_meter_sees_a_large_allocation() -> None:
    meter = PeakMemoryMeter("cpu")
    if meter.method == "unavailable":
        pytest.skip("no peak-memory method on this platform")
    with meter.track() as peak:
        x = torch.ones(64, 1024, 1024)  # 256 MB, written so every page is resident
        del x
    assert peak.mb is not None and peak.mb > 200
    with meter.track() as small:
        torch.ones(1024)
    assert small.mb is not None and small.mb < 50  # the earlier block does not count


# -- fidelity -------------------------------------------------------------------------------------


def test_fidelity_of_full_is_exact_and_inputs_differ(tiny_config: ArenaConfig) -> None:
    full = attnkit.build_attention("full")
    for kind in ("self", "local", "iid"):
        for causal in (False, True):
            result = measure_fidelity(full, tiny_config, kind, causal)
            assert result["status"] == "ok" and result["relative_error"] < 1e-5
    local = fidelity_inputs("local", 2, 64, 16, 0)
    iid = fidelity_inputs("iid", 2, 64, 16, 0)

    # locally correlated queries: neighbours are similar; i.i.d. ones are not
    def neighbour_cos(q: torch.Tensor) -> float:
        return float(torch.nn.functional.cosine_similarity(q[..., 1:, :], q[..., :-1, :], dim=-1).mean())

    assert neighbour_cos(local[0]) > 0.5 > neighbour_cos(iid[0]) + 0.3
    with pytest.raises(ValueError, match="input_kind"):
        fidelity_inputs("noise", 1, 8, 4, 0)


def test_fidelity_of_an_approximation_matches_an_independent_computation(
    toy_mechanism: str, tiny_config: ArenaConfig
) -> None:
    module = attnkit.build_attention(toy_mechanism, block=8)
    result = measure_fidelity(module, tiny_config, "local", False)
    q, k, v = fidelity_inputs("local", tiny_config.fidelity_heads, tiny_config.fidelity_length, tiny_config.head_dim, 0)
    ref = reference_attention(q, k, v)
    out = module(q, k, v).double()
    assert result["relative_error"] == pytest.approx(float((out - ref).norm() / ref.norm()), rel=1e-6)
    assert 0.01 < result["relative_error"] < 1.0


def test_self_attention_inputs_put_the_mass_near_the_diagonal() -> None:
    """The headline fidelity input: attention over one smooth sequence concentrates locally,
    unlike independent smooth queries and keys (checked on dense float64 softmax weights)."""
    length = 512

    def mass_near_diagonal(q: torch.Tensor, k: torch.Tensor) -> float:
        probs = torch.softmax(q.double() @ k.double().transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        pos = torch.arange(length)
        near = (pos[:, None] - pos[None, :]).abs() <= length // 8  # a quarter of the keys
        return float((probs * near).sum(-1).mean())

    q, k, _ = fidelity_inputs("self", 4, length, 64, 0)
    q_local, k_local, _ = fidelity_inputs("local", 4, length, 64, 0)
    assert mass_near_diagonal(q, k) > 0.6
    assert mass_near_diagonal(q_local, k_local) < 0.4
    again = fidelity_inputs("self", 4, length, 64, 0)
    assert all(torch.equal(a, b) for a, b in zip((q, k), again[:2]))


# -- tasks ------------------------------------------------------------------------------------------


def test_task_baselines_match_counting_by_hand(tiny_config: ArenaConfig) -> None:
    from collections import Counter

    from attnkit.arena.quality import task_baseline
    from attnkit.data.tasks import IGNORE_INDEX

    cfg = tiny_config.with_(train_steps=6, eval_batches=2, batch_size=4)
    for name in ("mqar", "listops", "lm"):
        task = get_task(name, length=cfg.task_length)
        train = Counter(
            int(x)
            for b in task.batches("train", cfg.train_steps, cfg.batch_size, cfg.seed)
            for x in b.labels.flatten()
            if int(x) != IGNORE_INDEX
        )
        val = [
            int(x)
            for b in task.batches("validation", cfg.eval_batches, cfg.batch_size, cfg.seed)
            for x in b.labels.flatten()
            if int(x) != IGNORE_INDEX
        ]
        got = task_baseline(name, cfg)
        if name == "lm":
            total = sum(train.values()) + task.num_outputs
            expected = sum(-math.log2((train[x] + 1) / total) for x in val) / len(val)
            assert got["metric"] == "bits_per_char" and got["value"] == pytest.approx(expected, rel=1e-9)
        else:
            top = max(sorted(train), key=lambda c: train[c])  # the smallest of the most frequent labels
            assert got["value"] == pytest.approx(sum(x == top for x in val) / len(val))


def test_mqar_scores_each_query_with_its_value_and_never_shows_the_answer() -> None:
    task = get_task("mqar", length=32)  # 4 pairs: k v k v k v k v q q q q
    (batch,) = task.batches("train", 1, 4, 0)
    tokens, targets = batch.input_ids, batch.labels
    assert bool(batch.attention_mask.all()) and tokens.shape == (4, 12)
    for row_tokens, row_targets in zip(tokens.tolist(), targets.tolist()):
        pairs = dict(zip(row_tokens[0:8:2], row_tokens[1:8:2]))
        assert sorted(row_tokens[8:]) == sorted(pairs)  # the tail holds every key once, no values
        assert all(y == -100 for y in row_targets[:8])
        for t in range(8, 12):
            assert row_targets[t] == pairs[row_tokens[t]]


def test_tasks_are_deterministic_and_splits_differ() -> None:
    for name in ("listops", "lm"):
        task = get_task(name, length=32)
        a = task.batches("train", 1, 4, 0)[0].input_ids
        assert torch.equal(a, task.batches("train", 1, 4, 0)[0].input_ids)
        assert not torch.equal(a, task.batches("validation", 1, 4, 0)[0].input_ids)
    with pytest.raises(ValueError, match="task must be one of"):
        get_task("imdb", length=64)
    with pytest.raises(ValueError, match="task_length must be at least 32"):
        get_task("mqar", length=8)


def test_quality_options_raise_a_fixed_maximum_length(toy_mechanism: str, tiny_config: ArenaConfig) -> None:
    assert quality_options(toy_mechanism, tiny_config) == {"block": 4}
    for name in attnkit.list_attention():
        options = quality_options(name, tiny_config)
        for key in ("max_len", "max_length", "seq_len"):
            if key in options:
                assert options[key] >= tiny_config.task_length


# -- patterns and plots ---------------------------------------------------------------------------


def test_pattern_pictures(toy_mechanism: str) -> None:
    causal = attention_picture("full", causal=True, length=16)
    assert causal.kind == "pattern" and torch.equal(causal.matrix, torch.ones(16, 16).tril())
    toy = attention_picture(toy_mechanism, causal=False, length=16)
    assert toy.kind == "effective weights"
    # read off with identity values: rows are the softmax weights, so they sum to one,
    # and each block of 4 keys shares one weight (they were averaged)
    assert torch.allclose(toy.matrix.sum(dim=-1), torch.ones(16), atol=1e-5)
    assert torch.allclose(toy.matrix[:, 0], toy.matrix[:, 3], atol=1e-6)
    with pytest.raises(ValueError, match="no causal mode"):
        attention_picture(toy_mechanism, causal=True)


def test_pareto_front() -> None:
    pts = [(1.0, 0.9), (2.0, 0.8), (1.5, 0.7), (4.0, 0.2), (0.5, 0.95)]
    assert pareto_front(pts, higher_is_better=True) == [(0.5, 0.95), (1.0, 0.9), (2.0, 0.8), (4.0, 0.2)]
    assert pareto_front([(1.0, 3.0), (2.0, 2.5), (3.0, 4.0)], higher_is_better=False) == [(2.0, 2.5), (3.0, 4.0)]
