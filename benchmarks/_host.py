"""Bootstrap a ComfyUI host for the benchmark scripts with the recipe the tests use, ``devkit/host_bootstrap.py``.

Import this module FIRST (before torch-heavy or comfy imports) and call :func:`bootstrap`: the host
first on ``sys.path`` (then ``devkit/`` and ``benchmarks/``), ``cpu`` (unless a CUDA run is asked for)
and ``use_pytorch_cross_attention`` set before any other comfy import, ``torch.set_num_threads`` when
given, the repo imported as ``comfyui_tokenflow`` (``devkit/pack_import.py``). Nothing is imported
from ``tests/``: the tiny model builders are ``devkit/tiny_models.py``.

It also has the small helpers every benchmark uses: peak-RSS reset/read through
``/proc/self/clear_refs`` and ``/proc/self/status`` (used by ``_probes.PeakTracker``), CUDA
synchronisation, the clock of the timed runs and the machine description.

The benchmark helpers import one way: ``_host`` (this module, none of the others) <- ``_probes``
(time and memory) <- ``_counting`` (UNet calls and ops) <- ``_phases`` (the workload and the
measurements). This module stays importable before the host is bootstrapped: no torch or comfy import at the top.
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO / "benchmarks"
if str(REPO / "devkit") not in sys.path:
    sys.path.insert(1, str(REPO / "devkit"))
import host_bootstrap  # noqa: E402  (devkit/host_bootstrap.py)

_DONE = False
_CODE_AT_START: tuple[str, str] | None = None


def comfyui_path() -> Path:
    try:
        return host_bootstrap.comfyui_path()
    except host_bootstrap.HostBootstrapError as exc:
        raise SystemExit(str(exc)) from None


def bootstrap(device: str = "cpu", threads: int | None = None) -> None:
    """Configure the host for ``device`` ("cpu" or "cuda"); idempotent, must precede comfy imports."""
    global _DONE, _CODE_AT_START
    if _DONE:
        return
    comfyui_path()  # a missing host exits with the message
    host_bootstrap.bootstrap(cpu=device == "cpu", threads=threads, extra_paths=(BENCH_DIR,))
    _CODE_AT_START = (git_commit(), code_fingerprint())  # the code this process imports, before anyone edits it
    import logging

    logging.getLogger().setLevel(logging.WARNING)
    _DONE = True


# -- memory -------------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_mib() -> float:
    return _status_kib("VmRSS") / 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0). False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    return _status_kib("VmHWM") / 1024


def synchronize(device) -> None:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize()


# -- machine --------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return out + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


PACK_CODE = ("__init__.py", "nodes", "engine", "data", "tokenflow_ops")  # what a benchmark measures (not tests/ or benchmarks/)


def code_fingerprint() -> str:
    """Short hash of the pack code's uncommitted changes (diff to HEAD + untracked files); "" when clean.

    Identifies a measurement made on a dirty working tree: the same fingerprint, the same code.
    """
    import hashlib

    try:
        diff = subprocess.run(["git", "diff", "HEAD", "--binary", "--", *PACK_CODE], cwd=REPO, capture_output=True,
                              check=True).stdout
        untracked = subprocess.run(["git", "ls-files", "--others", "--exclude-standard", "--", *PACK_CODE], cwd=REPO,
                                   capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return ""
    if not diff and not untracked:
        return ""
    digest = hashlib.sha1(diff)
    for name in sorted(untracked):
        digest.update(name.encode() + b"\0" + (REPO / name).read_bytes())
    return digest.hexdigest()[:10]


def machine_lines(device) -> list[str]:
    import torch

    lines = [f"- CPU: {cpu_model()}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}"]
    if getattr(device, "type", str(device)) == "cuda":
        lines.append(f"- GPU: {torch.cuda.get_device_name(device)}")
    comfy_version = "?"
    version_file = comfyui_path() / "comfyui_version.py"
    if version_file.is_file():
        for line in version_file.read_text().splitlines():
            if line.startswith("__version__"):
                comfy_version = line.split("=", 1)[1].strip().strip('"')
    lines.append(f"- torch {torch.__version__}, ComfyUI {comfy_version}, python {platform.python_version()}")
    commit, fingerprint = _CODE_AT_START or (git_commit(), code_fingerprint())
    lines.append(f"- git commit {commit}" + (f" (uncommitted pack code: fingerprint {fingerprint} of the diff "
                                                   f"and untracked files in {', '.join(PACK_CODE)})" if fingerprint else ""))
    return lines


# -- clocks ---------------------------------------------------------------------------------------
# "cpu": this process's CPU seconds (all threads). With one torch thread on a shared CPU this is the
# time the work itself took, unaffected by other jobs taking turns on the cores (wall time there
# varies 2x run to run). "wall": perf_counter (always used on CUDA, and with several threads).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
CLOCK = "wall"


def set_clock(name: str) -> None:
    global CLOCK
    if name not in CLOCKS:
        raise ValueError(f"clock must be one of {tuple(CLOCKS)}")
    CLOCK = name


def clock() -> float:
    return CLOCKS[CLOCK]()


def resolve_clock(clock: str, device: str, threads: int) -> str:
    """``auto``: the process's CPU seconds on a CPU with one thread (robust on a shared machine), else wall time."""
    if clock != "auto":
        return clock
    return "cpu" if device == "cpu" and threads == 1 else "wall"


def start_worker(args) -> None:
    """A benchmark worker's start: the host for ``args.device`` / ``args.threads``, then the clock of its timed
    runs (``args.clock``, see :func:`resolve_clock`)."""
    bootstrap(args.device, args.threads or None)
    set_clock(resolve_clock(args.clock, args.device, args.threads))

