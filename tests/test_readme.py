"""The README's examples run as written.

Every fenced ``python`` block of README.md is executed, top to bottom, in a fresh namespace inside a temporary
working directory (snippets may save models), so a snippet that forgets an import or calls an API that changed
fails here. Every ``attnkit ...`` command the README shows is parsed by the real command-line parser, so a
renamed subcommand or option fails here too (running them all would take minutes: the arena is the main job).
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def _blocks(language: str) -> list[tuple[int, str]]:
    """``(line number, code)`` of every fenced block of ``language`` in the README."""
    text = README.read_text()
    return [(text.count("\n", 0, m.start()) + 1, m.group(2)) for m in _FENCE.finditer(text) if m.group(1) == language]


def _commands() -> list[tuple[int, str]]:
    """``(line number, command)`` of every ``attnkit ...`` command shown in the README.

    Commands come from bash blocks (one per line, comments dropped) and from inline code spans.
    """
    text = README.read_text()
    found: list[tuple[int, str]] = []
    for m in _FENCE.finditer(text):
        if m.group(1) not in ("bash", "sh", "console"):
            continue
        first = text.count("\n", 0, m.start()) + 2
        for offset, line in enumerate(m.group(2).splitlines()):
            command = line.split("#", 1)[0].strip()
            if command.startswith("attnkit "):
                found.append((first + offset, command))
    for m in re.finditer(r"`(attnkit [^`]+)`", text):
        found.append((text.count("\n", 0, m.start()) + 1, m.group(1)))
    return found


PYTHON_BLOCKS = _blocks("python")
COMMANDS = _commands()


def test_the_readme_has_examples() -> None:
    assert len(PYTHON_BLOCKS) >= 2
    assert len(COMMANDS) >= 5


@pytest.mark.parametrize(("line", "code"), PYTHON_BLOCKS, ids=[f"line{line}" for line, _ in PYTHON_BLOCKS])
def test_python_block_runs(line: int, code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for module in re.findall(r"^\s*(?:import|from)\s+(\w+)", code, re.MULTILINE):
        if module in ("transformers",) and importlib.util.find_spec(module) is None:
            pytest.skip(f"README block at line {line} needs the optional {module} (pip install attnkit[hf])")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})


def _placeholders(command: str) -> str:
    """The README writes ``COMMAND --help`` and ``[key=value ...]``; give them concrete stand-ins."""
    command = re.sub(r"\[[^\]]*\]", "", command)  # optional parts
    return command.replace("COMMAND", "list")


@pytest.mark.parametrize(("line", "command"), COMMANDS, ids=[f"line{line}" for line, _ in COMMANDS])
def test_command_parses(line: int, command: str) -> None:
    from attnkit.cli.main import build_parser

    argv = shlex.split(_placeholders(command))[1:]
    parser = build_parser()
    try:
        parser.parse_args(argv)
    except SystemExit as exit_:
        # --help exits 0 after printing; anything else is a parse error the README would show a user.
        assert exit_.code == 0, f"README.md:{line}: `{command}` does not parse"
