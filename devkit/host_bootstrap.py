"""The one recipe that makes a real ComfyUI host importable in-process, for the tests and the benchmarks.

``tests/conftest.py`` (in ``pytest_configure``, before any test module is imported) and
``benchmarks/_host.py`` (both put ``devkit/`` on ``sys.path`` to import this module) call
:func:`bootstrap`. Order matters:

1. ``$COMFYUI_PATH`` (default ``~/comfy/ComfyUI``) goes first on ``sys.path`` and the repo root is
   taken off it: ComfyUI has its own top-level ``nodes`` module, and so does this pack (``nodes/``).
   ``devkit/`` (for ``tiny_models``) and the caller's extra folders follow it.
2. ``comfy.cli_args.args`` gets ``cpu`` and ``use_pytorch_cross_attention = True`` BEFORE any other
   comfy module is imported, so ``comfy.model_management`` picks the device and attention runs
   through PyTorch SDPA.
3. ``torch.set_num_threads(threads)`` when ``threads`` is given.
4. The repo is imported as the package ``comfyui_tokenflow``, the pack's one name outside ComfyUI
   (``devkit/pack_import.py``; its ``__init__`` imports nothing): callers import what they use, e.g.
   ``from comfyui_tokenflow.tokenflow_ops import schedule``. :func:`load_package` also imports the
   node modules when the full package is needed.

Failures raise :class:`HostBootstrapError` with a message saying what to do; pytest shows it as a
usage error, the benchmarks exit with it.
"""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Iterable

import pack_import  # devkit/pack_import.py, beside this file

REPO = pack_import.REPO
DEVKIT_DIR = REPO / "devkit"
PACKAGE = pack_import.PACKAGE
DEFAULT_COMFYUI = Path.home() / "comfy" / "ComfyUI"


class HostBootstrapError(RuntimeError):
    """The host cannot be set up in this process (not found, or comfy imported too early)."""


def comfyui_path() -> Path:
    """The host root: ``$COMFYUI_PATH`` or ``~/comfy/ComfyUI``; it must hold ``comfy/model_patcher.py``."""
    root = Path(os.environ.get("COMFYUI_PATH") or DEFAULT_COMFYUI).expanduser()
    if not (root / "comfy" / "model_patcher.py").is_file():
        raise HostBootstrapError(
            f"ComfyUI host not found at {root} (no comfy/model_patcher.py). Set COMFYUI_PATH to a ComfyUI "
            ">= 0.3.64 checkout, or clone one: git clone --depth 1 --branch v0.3.64 "
            f"https://github.com/comfyanonymous/ComfyUI {DEFAULT_COMFYUI}  (bash scripts/host_env.sh, which "
            "scripts/test.sh sources, finds or clones one)."
        )
    return root.resolve()


def put_host_first(root: Path, extra_paths: Iterable[Path] = ()) -> None:
    """``root`` first on ``sys.path``, the repo root off it, ``devkit/`` and ``extra_paths`` right after the host."""
    def is_repo(entry: str) -> bool:
        try:
            return Path(entry or os.getcwd()).resolve() == REPO
        except OSError:
            return False

    sys.path[:] = [p for p in sys.path if not is_repo(p) and p != str(root)]
    sys.path.insert(0, str(root))
    for extra in (DEVKIT_DIR, *extra_paths):
        if str(extra) not in sys.path:
            sys.path.insert(1, str(extra))


def configure_comfy(cpu: bool = True, threads: int | None = None) -> None:
    """ComfyUI's command-line settings, before any comfy module but ``comfy.cli_args`` is imported."""
    loaded = [m for m in sys.modules if m.startswith("comfy.") and m not in ("comfy.cli_args", "comfy.options")]
    if loaded:
        raise HostBootstrapError(f"comfy modules were imported before the host was configured: {loaded[:5]}")
    from comfy.cli_args import args

    args.cpu = cpu
    args.use_pytorch_cross_attention = True
    if threads:
        import torch

        torch.set_num_threads(int(threads))


def register_package() -> ModuleType:
    """The package ``comfyui_tokenflow`` (:func:`pack_import.import_pack`; imports no node module)."""
    return pack_import.import_pack()


def load_package() -> ModuleType:
    """The package with every node module imported (``nodes/``, the V3 extension)."""
    package = register_package()
    importlib.import_module(f"{PACKAGE}.nodes")
    return package


_done = False


def bootstrap(cpu: bool = True, threads: int | None = None, extra_paths: Iterable[Path] = ()) -> Path:
    """Steps 1-4 of the module docstring; idempotent. Returns the host root."""
    global _done
    root = comfyui_path()
    if not _done:
        put_host_first(root, extra_paths)
        configure_comfy(cpu, threads)
        register_package()
        _done = True
    return root
