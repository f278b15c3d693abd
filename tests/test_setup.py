"""run.sh's torch set-up (scripts/torch_setup.py): which build it installs, from where, and why.

The decision is a pure function of the request (ATTNKIT_TORCH, ATTNKIT_TORCH_INDEX), the machine (system,
nvidia-smi's answer), the installed torch and the local wheel pip can see. Each situation below spells out the
pip arguments it must produce, written by hand from PyTorch's publishing rules: PyPI's Linux wheel is the
CUDA build, the CPU build lives on https://download.pytorch.org/whl/cpu with a ``+cpu`` label, and PyPI's
macOS and Windows wheels are CPU builds.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "torch_setup.py"
_spec = importlib.util.spec_from_file_location("torch_setup", SCRIPT)
assert _spec is not None and _spec.loader is not None
torch_setup = importlib.util.module_from_spec(_spec)
sys.modules["torch_setup"] = torch_setup  # dataclasses look their module up while the class is built
_spec.loader.exec_module(torch_setup)

CPU_INDEX = "https://download.pytorch.org/whl/cpu"
CU126 = "https://download.pytorch.org/whl/cu126"
WHEEL = "/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"

LINUX = torch_setup.Machine("Linux", "x86_64", gpu=False, gpu_note="no nvidia-smi on PATH")
LINUX_GPU = torch_setup.Machine("Linux", "x86_64", gpu=True, gpu_note="nvidia-smi lists GPU 0: NVIDIA H100 80GB HBM3")
LINUX_ARM = torch_setup.Machine("Linux", "aarch64", gpu=False, gpu_note="no nvidia-smi on PATH")
MAC = torch_setup.Machine("Darwin", "arm64", gpu=False, gpu_note="macOS")
WINDOWS = torch_setup.Machine("Windows", "AMD64", gpu=False, gpu_note="no nvidia-smi on PATH")
WINDOWS_GPU = torch_setup.Machine("Windows", "AMD64", gpu=True, gpu_note="nvidia-smi lists GPU 0: NVIDIA RTX 4090")
FREEBSD = torch_setup.Machine("FreeBSD", "amd64", gpu=False, gpu_note="no nvidia-smi on PATH")

CPU_TORCH = torch_setup.Torch("2.13.0+cpu", "cpu")
CUDA_TORCH = torch_setup.Torch("2.13.0", "cuda")
ROCM_TORCH = torch_setup.Torch("2.13.0+rocm6.4", "rocm")
BROKEN_TORCH = torch_setup.Torch("2.13.0", "cuda", importable=False)
LOCAL_CPU = torch_setup.Torch("2.13.0+cpu", "cpu", location=WHEEL)

# (id, environment, machine, installed torch, local wheel, action, pip arguments, build, words in the reason)
SITUATIONS = [
    # A fresh environment: the build follows nvidia-smi, the source is the local wheel when it is that build.
    ("linux-no-gpu", {}, LINUX, None, None, "install", ("--index-url", CPU_INDEX, "torch==2.13.0+cpu"), "cpu",
     "CPU build of torch (torch==2.13.0+cpu) from PyTorch's CPU index https://download.pytorch.org/whl/cpu: "
     "no usable NVIDIA GPU (no nvidia-smi on PATH)"),
    ("linux-no-gpu-local-wheel", {}, LINUX, None, LOCAL_CPU, "install", ("torch==2.13.0+cpu",), "cpu",
     f"from the local wheel {WHEEL}: no usable NVIDIA GPU"),
    ("linux-arm-no-gpu", {}, LINUX_ARM, None, None, "install", ("--index-url", CPU_INDEX, "torch==2.13.0+cpu"),
     "cpu", "no usable NVIDIA GPU"),
    ("linux-gpu", {}, LINUX_GPU, None, None, "install", ("torch==2.13.0",), "cuda",
     "CUDA build of torch (torch==2.13.0) from PyPI: nvidia-smi lists GPU 0: NVIDIA H100 80GB HBM3"),
    ("linux-gpu-ignores-cpu-wheel", {}, LINUX_GPU, None, LOCAL_CPU, "install", ("torch==2.13.0",), "cuda",
     "from PyPI"),
    ("mac", {}, MAC, None, None, "install", ("torch==2.13.0",), "cpu", "macOS: PyPI's wheel is the CPU/MPS build"),
    ("windows-no-gpu", {}, WINDOWS, None, None, "install", ("torch==2.13.0",), "cpu", "from PyPI: no usable"),
    ("windows-gpu", {}, WINDOWS_GPU, None, None, "install", ("torch==2.13.0",), "cpu",
     "PyPI has no CUDA build for Windows"),
    # Overrides.
    ("cpu-on-gpu-machine", {"ATTNKIT_TORCH": "cpu"}, LINUX_GPU, None, None, "install",
     ("--index-url", CPU_INDEX, "torch==2.13.0+cpu"), "cpu", ": ATTNKIT_TORCH=cpu"),
    ("cuda-without-gpu", {"ATTNKIT_TORCH": " CUDA "}, LINUX, None, LOCAL_CPU, "install", ("torch==2.13.0",), "cuda",
     "from PyPI: ATTNKIT_TORCH=cuda"),
    ("cuda-index", {"ATTNKIT_TORCH": "cuda", "ATTNKIT_TORCH_INDEX": CU126}, LINUX_GPU, None, LOCAL_CPU, "install",
     ("--index-url", CU126, "torch==2.13.0"), "cuda", f"from {CU126}: ATTNKIT_TORCH=cuda"),
    ("cpu-index-mirror", {"ATTNKIT_TORCH": "cpu", "ATTNKIT_TORCH_INDEX": "https://mirror.example/cpu"}, LINUX, None,
     None, "install", ("--index-url", "https://mirror.example/cpu", "torch==2.13.0+cpu"), "cpu", "mirror.example"),
    ("windows-cuda-index", {"ATTNKIT_TORCH": "cuda", "ATTNKIT_TORCH_INDEX": CU126}, WINDOWS_GPU, None, None,
     "install", ("--index-url", CU126, "torch==2.13.0"), "cuda", "ATTNKIT_TORCH=cuda"),
    # An installed torch: kept under auto (with a hint when a GPU goes unused), replaced when it is the other
    # build than the one named, reinstalled when it does not import.
    ("keep-cpu", {}, LINUX, CPU_TORCH, None, "keep", (), None, "keeping torch 2.13.0+cpu (CPU build)"),
    ("keep-cpu-hint-gpu", {}, LINUX_GPU, CPU_TORCH, None, "keep", (), None,
     "although nvidia-smi lists GPU 0: NVIDIA H100 80GB HBM3; set ATTNKIT_TORCH=cuda to switch"),
    ("keep-cuda-no-gpu", {}, LINUX, CUDA_TORCH, None, "keep", (), None, "keeping torch 2.13.0 (CUDA build)"),
    ("keep-rocm", {}, LINUX_GPU, ROCM_TORCH, None, "keep", (), None, "keeping torch 2.13.0+rocm6.4 (ROCm build)"),
    ("keep-on-unknown-system", {}, FREEBSD, CPU_TORCH, None, "keep", (), None, "keeping"),
    ("keep-asked-cpu", {"ATTNKIT_TORCH": "cpu"}, LINUX_GPU, CPU_TORCH, None, "keep", (), None, "ATTNKIT_TORCH=cpu"),
    ("skip", {"ATTNKIT_TORCH": "skip"}, LINUX_GPU, CPU_TORCH, None, "keep", (), None, "ATTNKIT_TORCH=skip"),
    ("switch-to-cuda", {"ATTNKIT_TORCH": "cuda"}, LINUX_GPU, CPU_TORCH, LOCAL_CPU, "install",
     ("--force-reinstall", "torch==2.13.0"), "cuda", "ATTNKIT_TORCH=cuda; replacing torch 2.13.0+cpu (CPU build)"),
    ("switch-to-cpu", {"ATTNKIT_TORCH": "cpu"}, LINUX_GPU, CUDA_TORCH, None, "install",
     ("--force-reinstall", "--index-url", CPU_INDEX, "torch==2.13.0+cpu"), "cpu", "replacing torch 2.13.0 (CUDA"),
    ("switch-to-local-cpu", {"ATTNKIT_TORCH": "cpu"}, LINUX, CUDA_TORCH, LOCAL_CPU, "install",
     ("--force-reinstall", "torch==2.13.0+cpu"), "cpu", "from the local wheel"),
    ("repair-broken", {}, LINUX, BROKEN_TORCH, LOCAL_CPU, "install", ("--force-reinstall", "torch==2.13.0+cpu"),
     "cpu", "the installed torch 2.13.0 does not import, so it is reinstalled"),
]  # fmt: skip


def _recorder(local: object) -> tuple[Callable[[], object], list[int]]:
    """A find_local_wheel stand-in that returns ``local`` and counts its calls."""
    calls: list[int] = []

    def find() -> object:
        calls.append(1)
        return local

    return find, calls


@pytest.mark.parametrize(
    ("env", "machine", "installed", "local", "action", "pip_args", "build", "reason"),
    [situation[1:] for situation in SITUATIONS],
    ids=[situation[0] for situation in SITUATIONS],
)
def test_decision(env, machine, installed, local, action, pip_args, build, reason) -> None:
    find, calls = _recorder(local)
    plan = torch_setup.decide(torch_setup.parse_request(env), machine, installed, find)
    assert (plan.action, plan.pip_args, plan.build) == (action, pip_args, build)
    assert reason in plan.reason
    # pip runs (seconds) only to find a source for an install, and never when the user named the index.
    assert len(calls) == (action == "install" and "ATTNKIT_TORCH_INDEX" not in env)


def test_quiet_unless_installing_or_a_gpu_goes_unused() -> None:
    announced = {
        name: torch_setup.decide(torch_setup.parse_request(env), machine, installed, lambda local=local: local).announce
        for name, env, machine, installed, local, *_ in SITUATIONS
    }
    installs = {name for name, *_, action, _, _, _ in SITUATIONS if action == "install"}
    assert {name for name, loud in announced.items() if loud} == installs | {"keep-cpu-hint-gpu"}


def test_cpu_plans_never_reach_the_cuda_wheel() -> None:
    """Over every combination: a Linux CPU install is pinned to ``+cpu`` (PyPI has no such version, so an
    unreachable CPU index fails instead of resolving PyPI's CUDA build) and reads the CPU index unless the user
    named one or a local ``+cpu`` wheel is used."""
    machines = [LINUX, LINUX_GPU, LINUX_ARM, MAC, WINDOWS, WINDOWS_GPU]
    builds = ["auto", "cpu", "cuda", "skip"]
    indexes = [None, CU126]
    installs = [None, CPU_TORCH, CUDA_TORCH, ROCM_TORCH, BROKEN_TORCH]
    checked = 0
    for machine, build, index, installed, local in itertools.product(
        machines, builds, indexes, installs, [None, LOCAL_CPU]
    ):
        env = {"ATTNKIT_TORCH": build, **({"ATTNKIT_TORCH_INDEX": index} if index else {})}
        try:
            plan = torch_setup.decide(torch_setup.parse_request(env), machine, installed, lambda local=local: local)
        except torch_setup.SetupError:
            continue
        if plan.action != "install" or plan.build != "cpu" or machine.system != "Linux":
            continue
        checked += 1
        assert plan.pip_args[-1] == "torch==2.13.0+cpu", (machine, env, installed, local)
        if index is None and local is None:
            assert plan.pip_args[-3:-1] == ("--index-url", CPU_INDEX)
    assert checked > 20


@pytest.mark.parametrize(
    ("env", "machine", "installed", "message"),
    [
        ({"ATTNKIT_TORCH": "gpu"}, LINUX, None, "ATTNKIT_TORCH must be one of auto, cpu, cuda, skip; got 'gpu'"),
        ({"ATTNKIT_TORCH_INDEX": CU126}, LINUX, None, "ATTNKIT_TORCH_INDEX is set but ATTNKIT_TORCH=auto"),
        ({"ATTNKIT_TORCH": "skip", "ATTNKIT_TORCH_INDEX": CU126}, LINUX, None, "but ATTNKIT_TORCH=skip"),
        ({"ATTNKIT_TORCH": "cuda", "ATTNKIT_TORCH_INDEX": "cu126"}, LINUX, None, "must be a wheel index URL"),
        ({"ATTNKIT_TORCH": "skip"}, LINUX, None, "ATTNKIT_TORCH=skip, but torch does not import"),
        ({"ATTNKIT_TORCH": "skip"}, LINUX, BROKEN_TORCH, "ATTNKIT_TORCH=skip, but torch does not import"),
        ({"ATTNKIT_TORCH": "cuda"}, MAC, None, "no CUDA build for macOS"),
        ({"ATTNKIT_TORCH": "cuda"}, MAC, CPU_TORCH, "no CUDA build for macOS"),
        ({"ATTNKIT_TORCH": "cuda"}, WINDOWS_GPU, None, "also set ATTNKIT_TORCH_INDEX"),
        ({}, FREEBSD, None, "no PyTorch wheels are known for FreeBSD"),
    ],
)
def test_impossible_requests_say_what_to_do(env, machine, installed, message) -> None:
    with pytest.raises(torch_setup.SetupError, match="ATTNKIT_TORCH") as error:
        torch_setup.decide(torch_setup.parse_request(env), machine, installed, lambda: None)
    assert message in str(error.value)


def test_request_defaults_to_auto() -> None:
    assert torch_setup.parse_request({}) == torch_setup.Request("auto", None)
    assert torch_setup.parse_request({"ATTNKIT_TORCH": "", "ATTNKIT_TORCH_INDEX": " "}) == torch_setup.Request(
        "auto", None
    )


@pytest.mark.parametrize(
    ("returncode", "output", "gpu", "note"),
    [
        (0, "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1b2c)\n", True, "nvidia-smi lists GPU 0: NVIDIA H100 80GB HBM3"),
        (0, "GPU 0: A (UUID: GPU-1)\nGPU 1: A (UUID: GPU-2)\nGPU 2: A (UUID: GPU-3)\n", True,
         "nvidia-smi lists GPU 0: A and 2 more"),
        (0, "GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-5)\n  MIG 1g.5gb  Device  0: (UUID: MIG-6)\n", True,
         "nvidia-smi lists GPU 0: NVIDIA A100-SXM4-40GB"),
        (0, "", False, "nvidia-smi lists no GPU"),
        (6, "No devices were found\n", False, "nvidia-smi failed with exit status 6: No devices were found"),
        (15, "GPU 0: NVIDIA A100 (UUID: GPU-1)\n"
             "Unable to determine the device handle for GPU 0000:3B:00.0: Unknown Error\n", False,
         "nvidia-smi failed with exit status 15: Unable to determine the device handle for GPU 0000:3B:00.0"),
        (9, "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\nMake sure ...\n", False,
         "nvidia-smi failed with exit status 9: NVIDIA-SMI has failed because it couldn't communicate"),
    ],
)  # fmt: skip
def test_nvidia_smi_answers(returncode, output, gpu, note) -> None:
    found, said = torch_setup.gpu_from_nvidia_smi(returncode, output)
    assert found is gpu
    assert said.startswith(note)


# PyPI's torch 2.13.0 wheels all carry these (behind Linux markers), the +cpu wheels none.
PYPI_REQUIRES = [
    "filelock",
    'cuda-toolkit[cublas,cudart]==13.0.3; platform_system == "Linux"',
    'nvidia-cudnn-cu13==9.20.0.48; platform_system == "Linux"',
    'triton==3.7.1; platform_system == "Linux" and python_version < "3.15"',
]


@pytest.mark.parametrize(
    ("version", "requires", "system", "build"),
    [
        ("2.13.0+cpu", [], "Linux", "cpu"),
        ("2.13.0+cpu.cxx11.abi", [], "Linux", "cpu"),
        ("2.13.0+cu126", [], "Linux", "cuda"),
        ("2.13.0+cu130", [], "Windows", "cuda"),
        ("2.13.0+rocm6.4", ["pytorch-triton-rocm"], "Linux", "rocm"),
        ("2.13.0", PYPI_REQUIRES, "Linux", "cuda"),
        ("2.13.0", PYPI_REQUIRES, "Windows", "cpu"),
        ("2.13.0", PYPI_REQUIRES, "Darwin", "cpu"),
        ("2.13.0", ["filelock", "sympy>=1.13.3"], "Linux", "cpu"),
    ],
)
def test_build_of_a_wheel(version, requires, system, build) -> None:
    assert torch_setup.build_of_wheel(version, requires, system) == build


def test_pip_report_names_the_local_wheel() -> None:
    report = {
        "version": "1",
        "install": [
            {
                "download_info": {"url": "file:///opt/wheels/torch-2.13.0%2Bcpu-cp311-cp311-manylinux_2_28_x86_64.whl"},
                "metadata": {"name": "torch", "version": "2.13.0+cpu", "requires_dist": ["filelock", "jinja2"]},
            }
        ],
    }
    assert torch_setup.parse_pip_report(json.dumps(report), "Linux") == LOCAL_CPU
    assert torch_setup.parse_pip_report(json.dumps({"version": "1", "install": []}), "Linux") is None


def _plan(env: dict[str, str], machine: object = LINUX) -> object:
    return torch_setup.decide(torch_setup.parse_request(env), machine, None, lambda: None)


def test_installed_torch_is_checked_against_the_plan() -> None:
    cpu_plan, cuda_plan = _plan({}), _plan({"ATTNKIT_TORCH": "cuda"}, LINUX_GPU)
    assert torch_setup.check_installed(cpu_plan, CPU_TORCH, LINUX) is None
    assert (
        torch_setup.check_installed(cuda_plan, torch_setup.Torch("2.13.0", "cuda", gpu_visible=True), LINUX_GPU) is None
    )
    # A find-links wheel of the other build outranks the index (2.13.0+cpu sorts after 2.13.0): an error.
    with pytest.raises(torch_setup.SetupError, match=r"torch 2\.13\.0\+cpu, a CPU build, not the CUDA build asked for"):
        torch_setup.check_installed(cuda_plan, CPU_TORCH, LINUX_GPU)
    with pytest.raises(torch_setup.SetupError, match="torch does not import"):
        torch_setup.check_installed(cpu_plan, BROKEN_TORCH, LINUX)
    warning = torch_setup.check_installed(cuda_plan, torch_setup.Torch("2.13.0", "cuda", gpu_visible=False), LINUX_GPU)
    assert warning is not None and "cannot use the GPU" in warning and "ATTNKIT_TORCH_INDEX" in warning


def test_failed_cpu_install_never_suggests_silence() -> None:
    message = torch_setup.failure_message(_plan({}))
    assert "could not install torch==2.13.0+cpu from https://download.pytorch.org/whl/cpu" in message
    assert "never falls back to PyPI's multi-GB CUDA build" in message
    for way_out in ("ATTNKIT_TORCH_INDEX=", "ATTNKIT_TORCH=skip", "ATTNKIT_TORCH=cuda"):
        assert way_out in message


# ---------------------------------------------------------------------------------------------------------
# The real programs: nvidia-smi on PATH and the script's command line (offline, a few seconds).

needs_linux = pytest.mark.skipif(sys.platform != "linux", reason="fake nvidia-smi is a shell script")


def _fake_nvidia_smi(directory: Path, output: str, status: int) -> Path:
    program = directory / "nvidia-smi"
    program.write_text(f"#!/bin/sh\n[ \"$1\" = -L ] || exit 64\nprintf '%s\\n' '{output}'\nexit {status}\n")
    program.chmod(0o755)
    return directory


@needs_linux
def test_detect_machine_runs_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert torch_setup.detect_machine().gpu_note == "no nvidia-smi on PATH"
    _fake_nvidia_smi(tmp_path, "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-7)", 0)
    machine = torch_setup.detect_machine()
    assert machine.gpu and machine.gpu_note == "nvidia-smi lists GPU 0: NVIDIA H100 80GB HBM3"
    _fake_nvidia_smi(tmp_path, "No devices were found", 6)
    assert not torch_setup.detect_machine().gpu


def _run_script(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    full_env = {key: value for key, value in os.environ.items() if not key.startswith("ATTNKIT_TORCH")}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], env={**full_env, **env}, capture_output=True, text=True, timeout=120
    )


def test_script_rejects_a_bad_override() -> None:
    done = _run_script({"ATTNKIT_TORCH": "gpu"}, "--dry-run")
    assert done.returncode == 2
    assert "ATTNKIT_TORCH must be one of auto, cpu, cuda, skip; got 'gpu'" in done.stderr


@needs_linux
def test_script_dry_run_with_a_gpu_keeps_this_torch(tmp_path: Path) -> None:
    """The whole script, as run.sh calls it, on this environment's torch with a (fake) GPU present."""
    gpu_dir = _fake_nvidia_smi(tmp_path, "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-7)", 0)
    done = _run_script({"PATH": f"{gpu_dir}{os.pathsep}{os.environ['PATH']}"}, "--dry-run")
    assert done.returncode == 0, done.stderr
    build = "CUDA build" if torch.version.cuda else "ROCm build" if torch.version.hip else "CPU build"
    assert f"action:  keep\nreason:  keeping torch {torch.__version__} ({build})" in done.stdout
    if build == "CPU build":
        assert "although nvidia-smi lists GPU 0: NVIDIA H100 80GB HBM3" in done.stdout
    assert "command:" not in done.stdout
