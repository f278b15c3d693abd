"""A new mechanism touches three places: its file, one registration line, its test file.

The test writes a small but real mechanism (dense softmax attention written out, causal,
with key padding, cross-attention and the default KV cache) into a temporary module, the way
``src/attnkit/attention/<name>.py`` would hold it, and registers it with one import line (the
line ``attention/__init__.py`` would get). Nothing else changes, and yet:

- the contract suite (``tests/attention/test_contract.py``) collects and passes it: its
  exactness against the float64 oracle, exact causality, padding, gradients, decoding equal to
  recompute, empty inputs and the error messages;
- ``attnkit list`` (table, ``--json``, and ``--markdown``: the README's table) lists it;
- the arena's mechanism list (what ``attnkit arena`` runs by default) includes it.

Each check runs in a fresh interpreter, so this test process's registry never sees the toy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: The mechanism's file, as a contributor would write it (exact, so the contract compares it with the oracle).
MECHANISM = '''
"""Dense softmax attention written out: softmax(q kᵀ / sqrt(D)) v over the visible keys. O(T·S)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from attnkit.core.base import AttentionMechanism
from attnkit.core.capabilities import Capabilities
from attnkit.core.registry import register


@register(
    "toy_dense",
    Capabilities(
        exact=True,
        causal=True,
        key_padding=True,
        cross_attention=True,
        decoding="kv_cache",
        complexity="O(N^2)",
        summary="dense softmax attention written out (a test's new mechanism)",
    ),
)
class ToyDenseAttention(AttentionMechanism):
    def _attend(self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool, attention_mask: Tensor | None,
                mask: Any, score_bias: Any, **call_kwargs: Any) -> Tensor:
        dtype = torch.promote_types(q.dtype, torch.float32)  # bfloat16 in, float32 softmax
        t_len, s_len = q.shape[2], k.shape[2]
        scores = q.to(dtype) @ k.to(dtype).transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, T, S)
        allowed = torch.ones(t_len, s_len, dtype=torch.bool, device=q.device)
        if causal:  # end-aligned: query i sees key j iff j <= i + S - T
            allowed = allowed.tril(diagonal=s_len - t_len)
        allowed = allowed.expand(q.shape[0], 1, t_len, s_len)
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, None, :]
        has_key = allowed.any(dim=-1, keepdim=True)  # rows with no visible key output zeros
        scores = scores.masked_fill(~allowed, float("-inf")).masked_fill(~has_key, 0.0)
        probs = torch.softmax(scores, dim=-1).masked_fill(~has_key, 0.0)
        return (probs @ v.to(dtype)).to(q.dtype)
'''

#: The one registration line (in attnkit: a line of ``src/attnkit/attention/__init__.py``).
REGISTRATION = "import toy_dense_attention  # noqa: F401\n"


@pytest.fixture
def plugin_path(tmp_path: Path) -> Path:
    """A folder holding the mechanism's module and the module with its registration line."""
    (tmp_path / "toy_dense_attention.py").write_text(MECHANISM, encoding="utf-8")
    (tmp_path / "toy_registration.py").write_text(REGISTRATION, encoding="utf-8")
    return tmp_path


def run_python(plugin_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run Python in ``ROOT`` with the toy's folder, the tests and the attnkit this process imported."""
    import attnkit

    package_root = Path(attnkit.__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_path), str(ROOT), str(package_root)])}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


def test_the_contract_suite_picks_up_a_new_mechanism(plugin_path: Path) -> None:
    # -p loads the registration module before collection, as importing attnkit.attention would
    proc = run_python(
        plugin_path,
        *("-m", "pytest", "tests/attention/test_contract.py", "-k", "toy_dense", "-q", "-p", "no:cacheprovider"),
        *("-p", "toy_registration"),
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = proc.stdout.strip().splitlines()[-1]
    passed = int(summary.split(" passed")[0].split()[-1])
    assert passed >= 25, summary  # the contract's tests ran on it (29 today), not a stray one
    assert "failed" not in summary and "error" not in summary, summary


LISTING = """
import io, json, sys
from contextlib import redirect_stdout
import toy_registration
from attnkit.arena.runner import resolve_mechanisms
from attnkit.cli.main import main

result = {"arena": resolve_mechanisms(())}
for flag in ("", "--json", "--markdown"):
    out = io.StringIO()
    with redirect_stdout(out):
        code = main(["list", flag] if flag else ["list"])
    result[flag or "table"] = [code, out.getvalue()]
print(json.dumps(result))
"""


def test_the_cli_listing_and_the_arena_pick_up_a_new_mechanism(plugin_path: Path) -> None:
    proc = run_python(plugin_path, "-c", LISTING)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])

    # the baseline first; the new mechanism after the built-ins, though its module was imported first
    assert result["arena"][0] == "full" and result["arena"][-1] == "toy_dense"

    code, table = result["table"]
    (row,) = [line for line in table.splitlines() if line.startswith("toy_dense ")]
    assert code == 0 and row.split()[1:8] == ["exact", "yes", "yes", "yes", "yes", "kv_cache", "-"]
    assert "dense softmax attention written out" in row

    code, listing = result["--json"]
    (entry,) = [r for r in json.loads(listing) if r["name"] == "toy_dense"]
    assert code == 0 and entry["exact"] and entry["decoding"] == "kv_cache" and entry["options"] == {}

    code, markdown = result["--markdown"]
    assert code == 0
    assert markdown.strip().splitlines()[-1] == "| `toy_dense` | exact | exact | yes | yes | yes | kv_cache | O(N^2) |"


def test_the_toy_is_registered_nowhere_else() -> None:
    """The registrations above stayed in their subprocesses."""
    import attnkit

    assert "toy_dense" not in attnkit.list_attention()
