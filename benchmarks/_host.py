"""Bootstrap a ComfyUI host for the benchmark scripts, the same way ``tests/conftest.py`` does it.

Import this module FIRST (before torch-heavy or comfy imports) and call :func:`bootstrap`:

1. ``$COMFYUI_PATH`` (default ``~/comfy/ComfyUI``) goes first on ``sys.path``; the repo root is
   taken off it (ComfyUI has its own top-level ``nodes`` module, and so does this pack); ``tests/``
   and ``benchmarks/`` are added (for ``tiny_models`` and the benchmark helpers).
2. ``comfy.cli_args.args`` gets ``cpu = True`` (unless a CUDA run is asked for) and
   ``use_pytorch_cross_attention = True`` BEFORE any other comfy module is imported.
3. ``torch.set_num_threads(threads)`` when given.
4. The repo is registered as the package ``comfyui_tokenflow`` WITHOUT running its ``__init__``.

It also has the small helpers every benchmark uses: peak-RSS reset/read through
``/proc/self/clear_refs`` and ``/proc/self/status`` (used by ``_phases.PeakTracker``), CUDA
synchronisation and the machine description.
"""
from __future__ import annotations

import importlib.util
import os
import platform
import subprocess
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO / "benchmarks"
PACKAGE = "comfyui_tokenflow"
DEFAULT_COMFYUI = Path.home() / "comfy" / "ComfyUI"

_DONE = False
_CODE_AT_START: tuple[str, str] | None = None


def comfyui_path() -> Path:
    root = Path(os.environ.get("COMFYUI_PATH") or DEFAULT_COMFYUI).expanduser()
    if not (root / "comfy" / "model_patcher.py").is_file():
        raise SystemExit(
            f"ComfyUI host not found at {root} (no comfy/model_patcher.py). Set COMFYUI_PATH to a ComfyUI "
            ">= 0.3.64 checkout (bash scripts/host_env.sh finds or clones one)."
        )
    return root.resolve()


def _put_host_first(root: Path) -> None:
    def is_repo(entry: str) -> bool:
        try:
            return Path(entry or os.getcwd()).resolve() == REPO
        except OSError:
            return False

    sys.path[:] = [p for p in sys.path if not is_repo(p) and p != str(root)]
    sys.path.insert(0, str(root))
    for extra in (REPO / "tests", BENCH_DIR):
        if str(extra) not in sys.path:
            sys.path.insert(1, str(extra))


def _register_package() -> ModuleType:
    if PACKAGE in sys.modules:
        return sys.modules[PACKAGE]
    spec = importlib.util.spec_from_file_location(PACKAGE, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    assert spec is not None and spec.loader is not None
    package = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = package
    return package


def bootstrap(device: str = "cpu", threads: int | None = None) -> None:
    """Configure the host for ``device`` ("cpu" or "cuda"); idempotent, must precede comfy imports."""
    global _DONE
    if _DONE:
        return
    root = comfyui_path()
    _put_host_first(root)
    loaded = [m for m in sys.modules if m.startswith("comfy.") and m not in ("comfy.cli_args", "comfy.options")]
    if loaded:
        raise RuntimeError(f"comfy modules were imported before benchmarks/_host.py configured the device: {loaded[:5]}")
    from comfy.cli_args import args

    args.cpu = device == "cpu"
    args.use_pytorch_cross_attention = True
    import torch

    if threads:
        torch.set_num_threads(int(threads))
    _register_package()
    global _CODE_AT_START
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


PACK_CODE = ("__init__.py", "nodes", "tokenflow_ops")  # what a benchmark measures (not tests/ or benchmarks/)


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
