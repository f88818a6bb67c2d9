"""The one way to import this pack outside ComfyUI: as the ordinary package ``comfyui_tokenflow``.

Inside ComfyUI the pack is a folder in ``custom_nodes/`` that ComfyUI imports under a name of its own
(0.3.64: the folder's absolute path with "." replaced by "_x_"), and the pack's modules import each
other relatively, so they work under any name. Outside ComfyUI (the scripts, the benchmarks, the
tests) the folder is imported as the package ``comfyui_tokenflow`` by :func:`import_pack`: the repo's
own ``__init__.py`` runs, which imports nothing (its ``comfy_entrypoint`` imports ``nodes/`` when
ComfyUI calls it), so the pure layers are importable without ComfyUI::

    from comfyui_tokenflow.tokenflow_ops import schedule               # torch only
    from comfyui_tokenflow.data import video_decode                    # no ComfyUI
    from comfyui_tokenflow.metric import warp_error, flow_estimation   # no ComfyUI
    from comfyui_tokenflow.engine.ddpm import edit                     # needs a ComfyUI host on sys.path

The repo root itself never goes on ``sys.path``: its ``nodes/`` would shadow ComfyUI's ``nodes``
module. Other custom node packs do not import this pack at all: they use the door on the host
(``engine/door.py``). Standard library only.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

PACKAGE = "comfyui_tokenflow"
REPO = Path(__file__).resolve().parents[1]


def import_pack() -> ModuleType:
    """The package ``comfyui_tokenflow`` (the repo), imported once; its ``__init__`` is cheap."""
    if PACKAGE in sys.modules:
        return sys.modules[PACKAGE]
    spec = importlib.util.spec_from_file_location(PACKAGE, REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    assert spec is not None and spec.loader is not None
    package = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = package
    try:
        spec.loader.exec_module(package)
    except BaseException:
        del sys.modules[PACKAGE]
        raise
    return package
