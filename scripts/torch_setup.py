#!/usr/bin/env python3
"""Install the PyTorch build that fits this machine into the running Python environment.

``run.sh`` calls this before it installs attnkit. PyPI's ``torch`` wheel for Linux is the CUDA build: with its
``nvidia-*``/``cuda-*`` and ``triton`` dependencies it weighs several GB, which a machine without an NVIDIA GPU
downloads for nothing. PyTorch publishes a CPU-only build on its own wheel index, and that is what such a
machine gets here. The decision, in order:

1. ``ATTNKIT_TORCH=skip``: install nothing (torch must already import).
2. A torch that imports is kept; with ``ATTNKIT_TORCH=cpu`` or ``cuda`` it is replaced if it is the other build.
3. The build: ``ATTNKIT_TORCH`` when it says ``cpu`` or ``cuda``; otherwise (``auto``) CUDA when ``nvidia-smi -L``
   runs and lists a GPU, else CPU. macOS always gets PyPI's wheel (CPU and Apple MPS; there is no CUDA build).
   ``nvcc`` is not evidence: a CUDA toolkit is often installed, or stubbed, where no GPU is.
4. Where from: ``ATTNKIT_TORCH_INDEX`` when set; else a wheel of that build which pip finds without any index
   (your pip configuration's ``find-links``: a wheelhouse, an offline machine's cache); else PyTorch's CPU
   index for the Linux CPU build and PyPI for the rest. The CPU build is pinned by its ``+cpu`` version label,
   so an unreachable CPU index is an error, never a silent multi-GB CUDA download.
5. After installing, torch must import and be the build that was asked for; a CUDA build that cannot see the
   GPU gets a warning (usually a driver older than the wheel's CUDA).

Usage: ``python scripts/torch_setup.py [--dry-run]`` inside the environment to set up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

TORCH_VERSION = "2.13.0"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
CHOICES = ("auto", "cpu", "cuda", "skip")
BUILD_NAMES = {"cpu": "CPU build", "cuda": "CUDA build", "rocm": "ROCm build"}
OVERRIDE_HINT = "set ATTNKIT_TORCH=cpu, cuda or skip to override"
# The distributions only a CUDA build of torch requires (PyPI's Linux wheel lists them in Requires-Dist).
_CUDA_REQUIREMENT_PREFIXES = ("nvidia-", "cuda-", "triton")


class SetupError(Exception):
    """A request that cannot be carried out; the message says what to do instead."""


@dataclass(frozen=True)
class Request:
    """What the user asked for, read from the environment.

    Attributes:
        build: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"skip"`` (``ATTNKIT_TORCH``).
        index: a wheel index URL to install torch from (``ATTNKIT_TORCH_INDEX``), or None.
    """

    build: str = "auto"
    index: str | None = None


@dataclass(frozen=True)
class Machine:
    """The facts about this machine that choose the build.

    Attributes:
        system: ``platform.system()``: ``"Linux"``, ``"Darwin"`` or ``"Windows"``.
        arch: ``platform.machine()``, e.g. ``"x86_64"``, ``"aarch64"``, ``"arm64"``.
        gpu: whether ``nvidia-smi -L`` ran and listed at least one GPU.
        gpu_note: what nvidia-smi said, for the explanation (``"no nvidia-smi on PATH"``, ``"GPU 0: ..."``).
    """

    system: str
    arch: str
    gpu: bool
    gpu_note: str


@dataclass(frozen=True)
class Torch:
    """A torch distribution: the one installed here, or a wheel pip can install without an index.

    Attributes:
        version: the full version, local label included (``"2.13.0+cpu"``).
        build: ``"cpu"``, ``"cuda"`` or ``"rocm"``.
        importable: whether ``import torch`` succeeds (always True for a wheel not yet installed).
        location: where a wheel lies (its URL); empty for an installed torch.
        gpu_visible: for an installed CUDA build, whether ``torch.cuda.is_available()``; None when unknown.
    """

    version: str
    build: str
    importable: bool = True
    location: str = ""
    gpu_visible: bool | None = None


@dataclass(frozen=True)
class Plan:
    """What to do about torch, and why.

    Attributes:
        action: ``"keep"`` (touch nothing) or ``"install"``.
        reason: one sentence for the user.
        announce: whether the reason is worth printing when nothing goes wrong (quiet when all is as asked).
        build: the build the install must produce (``"cpu"``/``"cuda"``), None when keeping.
        pip_args: the arguments after ``pip install``.
        index: the index the install reads (None: pip's configured indexes, or a local wheel).
    """

    action: str
    reason: str
    announce: bool = True
    build: str | None = None
    pip_args: tuple[str, ...] = ()
    index: str | None = None


# ---------------------------------------------------------------------------------------------------------
# Pure decision logic


def parse_request(env: Mapping[str, str]) -> Request:
    """Reads ``ATTNKIT_TORCH`` and ``ATTNKIT_TORCH_INDEX`` from ``env``.

    Raises:
        SetupError: an unknown build name, an index that is not a URL, or an index given where no build is
            installed by name (``auto``: the URL would serve one build whatever the hardware; ``skip``).
    """
    build = env.get("ATTNKIT_TORCH", "").strip().lower() or "auto"
    if build not in CHOICES:
        raise SetupError(
            f"ATTNKIT_TORCH must be one of {', '.join(CHOICES)}; got {env['ATTNKIT_TORCH']!r} "
            "(unset it to choose from the hardware, or set ATTNKIT_TORCH=cpu, say)"
        )
    index = env.get("ATTNKIT_TORCH_INDEX", "").strip() or None
    if index is not None:
        if not index.startswith(("https://", "http://", "file://")):
            raise SetupError(
                f"ATTNKIT_TORCH_INDEX must be a wheel index URL (https://, http:// or file://); got {index!r} "
                "(e.g. ATTNKIT_TORCH_INDEX=https://download.pytorch.org/whl/cu126)"
            )
        if build not in ("cpu", "cuda"):
            raise SetupError(
                f"ATTNKIT_TORCH_INDEX is set but ATTNKIT_TORCH={build}: an index serves one build, so name it "
                "with ATTNKIT_TORCH=cuda (or cpu), or unset ATTNKIT_TORCH_INDEX"
            )
    return Request(build=build, index=index)


def gpu_from_nvidia_smi(returncode: int, output: str) -> tuple[bool, str]:
    """Whether ``nvidia-smi -L`` found a usable GPU, and a note saying what it reported.

    Args:
        returncode: the exit status of ``nvidia-smi -L``.
        output: its stdout and stderr, e.g. ``"GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-...)"`` per GPU.
    """
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    gpus = [line.split(" (UUID")[0] for line in lines if line.startswith("GPU ")]
    if returncode == 0 and gpus:
        more = f" and {len(gpus) - 1} more" if len(gpus) > 1 else ""
        return True, f"nvidia-smi lists {gpus[0]}{more}"
    if returncode == 0:
        return False, "nvidia-smi lists no GPU"
    # A failing nvidia-smi may still list some GPUs (another fell off the bus): quote the error, not a GPU.
    errors = [line for line in lines if not line.startswith(("GPU ", "MIG "))]
    return False, f"nvidia-smi failed with exit status {returncode}: {(errors or lines or ['no output'])[0]}"


def build_of_wheel(version: str, requires: Sequence[str], system: str) -> str:
    """The build of a torch distribution for ``system``, from its version label or its dependencies.

    Args:
        version: e.g. ``"2.13.0+cpu"``, ``"2.13.0+cu126"``, ``"2.13.0+rocm6.4"``, ``"2.13.0"``.
        requires: its ``Requires-Dist`` entries. PyPI's unlabelled wheels all list ``cuda-*``/``nvidia-*``
            packages and ``triton``, but behind ``platform_system == "Linux"`` markers: the Linux wheel is the
            CUDA build, the macOS and Windows wheels are CPU builds.
        system: ``platform.system()`` of the machine the wheel is for.
    """
    label = version.partition("+")[2].lower()
    if label.startswith("cpu"):
        return "cpu"
    if label.startswith("rocm"):
        return "rocm"
    if label.startswith("cu"):
        return "cuda"
    names = (requirement.split(";")[0].strip().lower() for requirement in requires)
    cuda_requirements = any(name.startswith(_CUDA_REQUIREMENT_PREFIXES) for name in names)
    return "cuda" if system == "Linux" and cuda_requirements else "cpu"


def wanted_build(request: Request, machine: Machine) -> tuple[str, str]:
    """The build to install (``"cpu"`` or ``"cuda"``) and why, for a request other than ``skip``.

    Raises:
        SetupError: a CUDA build where none is published (macOS; Windows without an index), or an
            operating system PyTorch publishes no wheels for.
    """
    if machine.system not in ("Linux", "Darwin", "Windows"):
        raise SetupError(
            f"no PyTorch wheels are known for {machine.system}: install torch into this environment yourself, "
            "then set ATTNKIT_TORCH=skip"
        )
    if request.build == "cuda" and machine.system == "Darwin":
        raise SetupError(
            "ATTNKIT_TORCH=cuda, but PyTorch has no CUDA build for macOS (PyPI's wheel runs on the CPU and "
            "Apple's MPS): unset ATTNKIT_TORCH"
        )
    if request.build == "cuda" and machine.system == "Windows" and request.index is None:
        raise SetupError(
            "ATTNKIT_TORCH=cuda, but PyPI's Windows wheel is the CPU build: also set ATTNKIT_TORCH_INDEX to the "
            "CUDA index for your driver from https://pytorch.org/get-started/locally/ "
            "(e.g. https://download.pytorch.org/whl/cu126)"
        )
    if request.build in ("cpu", "cuda"):
        return request.build, f"ATTNKIT_TORCH={request.build}"
    if machine.system == "Darwin":
        return "cpu", "macOS: PyPI's wheel is the CPU/MPS build"
    if not machine.gpu:
        return "cpu", f"no usable NVIDIA GPU ({machine.gpu_note}); {OVERRIDE_HINT}"
    if machine.system == "Windows":
        return "cpu", (
            f"{machine.gpu_note}, but PyPI has no CUDA build for Windows; for one set ATTNKIT_TORCH=cuda and "
            "ATTNKIT_TORCH_INDEX (see python scripts/torch_setup.py --help)"
        )
    return "cuda", f"{machine.gpu_note}; {OVERRIDE_HINT}"


def requirement(build: str, system: str) -> str:
    """The pip requirement for ``build``: the Linux CPU build is pinned by its ``+cpu`` label.

    The pin is what makes a CPU install unable to resolve PyPI's CUDA wheel (PyPI has no ``+cpu`` versions),
    whatever extra indexes pip is configured with. macOS and Windows wheels carry no label.
    """
    if build == "cpu" and system == "Linux":
        return f"torch=={TORCH_VERSION}+cpu"
    return f"torch=={TORCH_VERSION}"


def install_plan(
    build: str, why: str, request: Request, machine: Machine, local: Torch | None, *, reinstall: bool
) -> Plan:
    """Where to install ``build`` from: the user's index, a local wheel of that build, or the default index.

    Args:
        build: ``"cpu"`` or ``"cuda"``.
        why: the reason for ``build``, ending the announcement.
        request: the user's request (its index wins over everything).
        machine: this machine.
        local: the torch wheel pip finds without any index, or None.
        reinstall: replace an installed torch of the same version (pip would call it already satisfied).
    """
    index: str | None
    if request.index is not None:
        index, spec, source = request.index, requirement(build, machine.system), f"from {request.index}"
    elif local is not None and local.build == build:
        index, spec, source = None, f"torch=={local.version}", f"from the local wheel {local.location}"
    elif build == "cpu" and machine.system == "Linux":
        index, spec, source = CPU_INDEX, requirement(build, machine.system), f"from PyTorch's CPU index {CPU_INDEX}"
    else:
        index, spec, source = None, requirement(build, machine.system), "from PyPI"
    args = (("--force-reinstall",) if reinstall else ()) + (("--index-url", index) if index else ()) + (spec,)
    reason = f"installing the {BUILD_NAMES[build]} of torch ({spec}) {source}: {why}"
    return Plan(action="install", reason=reason, build=build, pip_args=args, index=index)


def decide(
    request: Request, machine: Machine, installed: Torch | None, find_local_wheel: Callable[[], Torch | None]
) -> Plan:
    """What to do about torch in this environment.

    Args:
        request: the user's request.
        machine: this machine.
        installed: the torch installed here (importable or not), or None.
        find_local_wheel: returns the torch wheel pip can install without an index, or None; called only
            when an install needs a source (it runs pip, which takes seconds).

    Raises:
        SetupError: the request cannot be carried out (the message says what to do).
    """
    usable = installed if installed is not None and installed.importable else None
    if request.build == "skip":
        if usable is not None:
            return Plan("keep", f"ATTNKIT_TORCH=skip: torch {usable.version} left as it is", announce=False)
        raise SetupError(
            f"ATTNKIT_TORCH=skip, but torch does not import in {sys.prefix}: install torch into it yourself "
            "(e.g. pip install torch --index-url https://download.pytorch.org/whl/cpu), or unset ATTNKIT_TORCH"
        )
    have = f"torch {usable.version} ({BUILD_NAMES.get(usable.build, usable.build)})" if usable else ""
    if usable is not None and request.build == "auto":
        # An installed torch is the user's choice (a ROCm or source build, say): keep it, but say so when a
        # GPU that PyPI's Linux wheel would use goes unused.
        if machine.gpu and machine.system == "Linux" and usable.build == "cpu":
            return Plan("keep", f"keeping {have} although {machine.gpu_note}; set ATTNKIT_TORCH=cuda to switch")
        return Plan("keep", f"keeping {have}", announce=False)
    build, why = wanted_build(request, machine)
    if usable is not None:
        if usable.build == build:
            return Plan("keep", f"keeping {have}: {why}", announce=False)
        why = f"{why}; replacing {have}"
    elif installed is not None:
        why = f"{why}; the installed torch {installed.version} does not import, so it is reinstalled"
    local = find_local_wheel() if request.index is None else None
    # pip calls an installed torch of the same version "already satisfied", whatever its build or state.
    return install_plan(build, why, request, machine, local, reinstall=installed is not None)


def check_installed(plan: Plan, after: Torch | None, machine: Machine) -> str | None:
    """Checks the torch pip installed against ``plan``.

    Returns:
        A warning to print, or None.

    Raises:
        SetupError: torch does not import, or it is not the build the plan asked for.
    """
    if after is None or not after.importable:
        raise SetupError(
            f"pip finished but torch does not import in {sys.prefix} (the error is above): remove the "
            "environment and run again, or install torch yourself and set ATTNKIT_TORCH=skip"
        )
    if after.build != plan.build:
        asked = BUILD_NAMES.get(plan.build or "", plan.build)
        raise SetupError(
            f"pip installed torch {after.version}, a {BUILD_NAMES.get(after.build, after.build)}, not the {asked} "
            "asked for: your pip configuration (pip config list) offers that wheel ahead of the index; "
            "set ATTNKIT_TORCH_INDEX to the index of the build you want (with ATTNKIT_TORCH=cpu or cuda), "
            "or install torch yourself and set ATTNKIT_TORCH=skip"
        )
    if plan.build == "cuda" and machine.gpu and after.gpu_visible is False:
        return (
            f"torch {after.version} is installed but cannot use the GPU ({machine.gpu_note}): the driver is "
            "probably older than the wheel's CUDA; pick the CUDA index for your driver from "
            "https://pytorch.org/get-started/locally/ with ATTNKIT_TORCH=cuda ATTNKIT_TORCH_INDEX=URL"
        )
    return None


def failure_message(plan: Plan) -> str:
    """What to tell the user when pip fails to carry out ``plan`` (pip's own error is printed above)."""
    spec = plan.pip_args[-1]
    if plan.index == CPU_INDEX:
        return (
            f"pip could not install {spec} from {CPU_INDEX} (pip's error is above). The CPU build of torch is "
            "only on PyTorch's index, and this set-up never falls back to PyPI's multi-GB CUDA build. Check the "
            "connection (or proxy) to download.pytorch.org, or set ATTNKIT_TORCH=cpu with "
            "ATTNKIT_TORCH_INDEX=<a mirror of that index>, or install torch into the environment yourself and "
            "set ATTNKIT_TORCH=skip, or set ATTNKIT_TORCH=cuda to accept the CUDA build"
        )
    return (
        f"pip could not install {spec} (pip's error is above): check the connection or ATTNKIT_TORCH_INDEX, or "
        "install torch into the environment yourself and set ATTNKIT_TORCH=skip"
    )


def parse_pip_report(text: str, system: str) -> Torch | None:
    """The torch wheel in a ``pip install --dry-run --report`` JSON report, or None."""
    for item in json.loads(text).get("install", []):
        metadata = item.get("metadata", {})
        if str(metadata.get("name", "")).lower() == "torch":
            version = str(metadata["version"])
            build = build_of_wheel(version, metadata.get("requires_dist") or [], system)
            url = str(item.get("download_info", {}).get("url", ""))
            location = urllib.request.url2pathname(url.removeprefix("file://")) if url.startswith("file:") else url
            return Torch(version=version, build=build, location=location)
    return None


# ---------------------------------------------------------------------------------------------------------
# Facts about this machine and environment (these run programs)


def detect_machine() -> Machine:
    """This machine's system, architecture and NVIDIA GPU, as ``nvidia-smi -L`` reports it."""
    system, arch = platform.system(), platform.machine()
    if system == "Darwin":
        return Machine(system, arch, gpu=False, gpu_note="macOS")
    try:
        done = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=False)
    except FileNotFoundError:
        return Machine(system, arch, gpu=False, gpu_note="no nvidia-smi on PATH")
    except subprocess.TimeoutExpired:
        return Machine(system, arch, gpu=False, gpu_note="nvidia-smi did not answer within 30 s")
    except OSError as error:
        return Machine(system, arch, gpu=False, gpu_note=f"nvidia-smi could not run: {error}")
    gpu, note = gpu_from_nvidia_smi(done.returncode, done.stdout + done.stderr)
    return Machine(system, arch, gpu=gpu, gpu_note=note)


_PROBE = (
    "import json, torch; "
    "print(json.dumps([torch.__version__, torch.version.cuda, getattr(torch.version, 'hip', None), "
    "torch.cuda.is_available() if torch.version.cuda else None]))"
)


def installed_torch() -> Torch | None:
    """The torch installed in this environment, or None; imported in a child process (a broken install can
    crash the interpreter that imports it)."""
    from importlib import metadata

    try:
        dist = metadata.distribution("torch")
    except metadata.PackageNotFoundError:
        return None
    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return Torch(
            dist.version, build_of_wheel(dist.version, dist.requires or [], platform.system()), importable=False
        )
    version, cuda, hip, gpu_visible = json.loads(done.stdout.strip().splitlines()[-1])
    # The compiled-in CUDA/HIP versions are the truth for any torch, source builds included.
    build = "cuda" if cuda else "rocm" if hip else "cpu"
    return Torch(version, build, gpu_visible=gpu_visible)


def find_local_wheel() -> Torch | None:
    """The torch wheel pip can install with no index at all: one in the pip configuration's find-links.

    ``--no-index`` keeps this offline and fast; it resolves torch alone (``--no-deps``) because the
    dependencies may come from indexes, as they do with any install.
    """
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--no-deps", "--ignore-installed"]
    command += ["--quiet", "--disable-pip-version-check", "--report", "-", f"torch=={TORCH_VERSION}"]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return None
    return parse_pip_report(done.stdout, platform.system())


def pip_command(plan: Plan) -> list[str]:
    """The command that carries out an install plan."""
    return [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", *plan.pip_args]


def say(message: str) -> None:
    print(f"[run.sh] torch: {message}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="torch_setup.py",
        description=(__doc__ or "").replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "environment:\n"
            "  ATTNKIT_TORCH=auto   CUDA build when nvidia-smi -L lists a GPU, else the CPU build (default)\n"
            "  ATTNKIT_TORCH=cpu    the CPU build (Linux: from https://download.pytorch.org/whl/cpu)\n"
            "  ATTNKIT_TORCH=cuda   the CUDA build (Linux: PyPI's wheel)\n"
            "  ATTNKIT_TORCH=skip   install nothing; torch must already import\n"
            "  ATTNKIT_TORCH_INDEX=URL  with cpu or cuda: install from this wheel index instead, e.g. the CUDA\n"
            "                       variant for your driver: https://download.pytorch.org/whl/cu126\n"
            f"An installed torch is kept (with cpu/cuda: unless it is the other build). Version: {TORCH_VERSION}."
        ),
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the decision and the pip command; install nothing"
    )
    options = parser.parse_args(argv)
    try:
        request = parse_request(os.environ)
        machine = detect_machine()
        plan = decide(request, machine, installed_torch(), find_local_wheel)
        if options.dry_run:
            print(f"action:  {plan.action}\nreason:  {plan.reason}")
            if plan.action == "install":
                print(f"command: {shlex.join(pip_command(plan))}")
            return 0
        if plan.announce:
            say(plan.reason)
        if plan.action == "keep":
            return 0
        if subprocess.run(pip_command(plan), check=False).returncode != 0:
            raise SetupError(failure_message(plan))
        warning = check_installed(plan, installed_torch(), machine)
        if warning:
            say(f"warning: {warning}")
    except SetupError as error:
        say(f"error: {error}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
