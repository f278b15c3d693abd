"""``import attnkit.hf`` without Transformers 5 fails with the install command (runs with or without it)."""

from __future__ import annotations

import subprocess
import sys

NO_TRANSFORMERS = "sys.modules['transformers'] = None  # makes `import transformers` fail"


def _run(*lines: str) -> subprocess.CompletedProcess[str]:
    code = "\n".join(["import sys", *lines])
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_missing_transformers_names_the_extra() -> None:
    result = _run(NO_TRANSFORMERS, "import attnkit.hf")
    assert result.returncode != 0
    assert "ImportError: attnkit.hf needs Hugging Face Transformers 5.x" in result.stderr
    assert "pip install attnkit[hf]" in result.stderr


def test_transformers_4_is_refused() -> None:
    result = _run(
        "import types", "sys.modules['transformers'] = types.SimpleNamespace(__version__='4.57.1')", "import attnkit.hf"
    )
    assert result.returncode != 0
    assert "needs Transformers 5.x, found 4.57.1" in result.stderr


def test_attnkit_itself_does_not_need_transformers() -> None:
    result = _run(NO_TRANSFORMERS, "import attnkit", "attnkit.build_attention('full')")
    assert result.returncode == 0, result.stderr
