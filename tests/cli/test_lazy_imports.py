"""``attnkit --help`` and ``attnkit COMMAND --help`` run without importing PyTorch, and the package's
lazy top-level exports name the same objects as the modules they come from."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import attnkit
from attnkit.cli.main import build_parser

# Runs the real entry point in a fresh interpreter, then reports which heavy modules it imported.
WRAPPER = """
import sys
from attnkit.cli.main import main
try:
    code = main(sys.argv[1:])
except SystemExit as exit_info:
    code = exit_info.code
sys.stdout.flush()
print("IMPORTED:" + ",".join(m for m in ("torch", "numpy") if m in sys.modules), file=sys.stderr)
sys.exit(code)
"""


def commands() -> list[str]:
    parser = build_parser()
    (subparsers,) = [a for a in parser._actions if a.dest == "command"]
    return sorted(subparsers.choices)  # type: ignore[arg-type]


def run_fresh(*args: str) -> tuple[int, str, set[str]]:
    """Exit code, stdout, and the heavy modules imported, of ``attnkit ARGS`` in a new interpreter."""
    proc = subprocess.run([sys.executable, "-c", WRAPPER, *args], capture_output=True, text=True, timeout=120)
    marker = [line for line in proc.stderr.splitlines() if line.startswith("IMPORTED:")]
    assert marker, proc.stderr
    imported = {m for m in marker[-1].removeprefix("IMPORTED:").split(",") if m}
    return proc.returncode, proc.stdout, imported


def test_top_level_help_does_not_import_torch() -> None:
    code, out, imported = run_fresh("--help")
    assert code == 0 and out.startswith("usage: attnkit")
    for command in commands():
        assert command in out
    assert "torch" not in imported, "attnkit --help imported torch"


@pytest.mark.parametrize("command", commands())
def test_command_help_does_not_import_torch(command: str) -> None:
    code, out, imported = run_fresh(command, "--help")
    assert code == 0 and out.startswith(f"usage: attnkit {command}")
    assert "torch" not in imported, f"attnkit {command} --help imported torch (import it inside run())"


def test_import_attnkit_is_lazy_and_names_resolve_in_a_fresh_process() -> None:
    code = (
        "import sys, attnkit; assert 'torch' not in sys.modules, 'import attnkit imported torch'; "
        "from attnkit import build_attention, list_attention; "
        "print(','.join(list_attention())); print(type(build_attention('full')).__name__); "
        "assert attnkit.metrics.__name__ == 'attnkit.metrics'"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    names, cls = proc.stdout.split()
    assert names.split(",") == attnkit.list_attention()  # every built-in registered, in the usual order
    assert cls == type(attnkit.build_attention("full")).__name__


def type_checking_imports() -> dict[str, str]:
    """``{name: module}`` of the imports under ``if TYPE_CHECKING:`` in attnkit/__init__.py (what mypy sees)."""
    tree = ast.parse(Path(attnkit.__file__).read_text())
    (block,) = [n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING"]
    found: dict[str, str] = {}
    for node in block.body:
        assert isinstance(node, ast.ImportFrom) and node.module is not None
        for alias in node.names:
            found[alias.asname or alias.name] = node.module
    return found


def test_every_export_is_the_object_its_module_defines() -> None:
    declared = type_checking_imports()
    assert set(declared) == set(attnkit.__all__) - {"__version__"}
    for name, module in declared.items():
        assert getattr(attnkit, name) is getattr(importlib.import_module(module), name), name
    namespace: dict[str, object] = {}
    exec("from attnkit import *", namespace)
    assert set(attnkit.__all__) <= set(namespace)
    assert set(attnkit.__all__) <= set(dir(attnkit))


def test_unknown_names_and_subpackages() -> None:
    with pytest.raises(AttributeError, match="module 'attnkit' has no attribute 'no_such_name'"):
        _ = attnkit.no_such_name  # type: ignore[attr-defined]
    with pytest.raises(ImportError):
        exec("from attnkit import no_such_name", {})
    assert attnkit.masks is importlib.import_module("attnkit.masks")
