"""The door: how other custom node packs add TokenFlow editors without importing this pack.

ComfyUI imports a folder pack under a name nobody can import (0.3.64: the folder's absolute path
with "." -> "_x_"), and packs load in directory order. So the pack and its neighbours meet on a
module of the HOST that both can always import, ``comfy.model_patcher``: one dict stored on it
under :data:`ATTRIBUTE` (as AnimateDiff-Evolved and Advanced-ControlNet share theirs on
``comfy.hooks``). Whoever comes first creates it (``vars(module).setdefault``)::

    import comfy.model_patcher
    door = vars(comfy.model_patcher).setdefault("tokenflow_door", {})

Keys:

``"editors"``  name -> editor object: THE editor registry (``engine.editors.EDITORS`` is this dict).
               A pack adds ``door.setdefault("editors", {})[editor.name] = editor`` at import, before or
               after TokenFlow loads; the sampler's ``editor`` widget and ``get_editor`` read the dict
               when they are used, so load order does not matter. The built-in editors come first. Every
               editor is checked when the registry is read (``engine/editors/validation.py``): one that
               cannot be served (a required input, an input named like the sampler's own or another
               editor's, a door API version this TokenFlow does not serve) is left out with one logged line.
               An editor may say which version of this door it was written for: ``api_version = 1``
               (an int; without it, 1).
``"api"``      set when TokenFlow loads (a ``SimpleNamespace``): ``version``, ``StepNeeds``, ``Editor``
               (the protocol), ``register_editor``, ``unregister_editor``, ``editing_timesteps``,
               ``sdedit_timesteps``, ``parse_block_list``, ``parse_residual_list``. An editor reads it
               when its methods are called (TokenFlow is loaded by then), never at import.

Only plain data and functions cross the door; nothing here imports ComfyUI beyond ``comfy.model_patcher``, nor
any other module of this pack: the editor registry (``engine/editors``) builds the API and publishes it here.
"""
from __future__ import annotations

import sys
from types import SimpleNamespace

ATTRIBUTE = "tokenflow_door"
# The door API this pack serves: API_VERSION rises when the API gains something (an editor written for the newer one
# is skipped by an older TokenFlow); OLDEST_API_VERSION rises when something older editors rely on is taken away.
API_VERSION = 1
OLDEST_API_VERSION = 1


_LOCAL: dict = {}  # the door while this process has not imported the host (see door())


def _host_module():
    """``comfy.model_patcher`` when this process uses the host, else None.

    Importing ComfyUI is left to whoever sets it up (``comfy.cli_args`` first): the headless runner
    reads the editor registry before it imports the host, and no other pack can be loaded then.
    """
    if "comfy" not in sys.modules:
        return None
    import comfy.model_patcher

    return comfy.model_patcher


def door() -> dict:
    """The shared dict on ``comfy.model_patcher`` (created by whoever asks first); a local one without the host."""
    host = _host_module()
    return _LOCAL if host is None else vars(host).setdefault(ATTRIBUTE, _LOCAL)


def editors() -> dict:
    """The editor registry other packs write into (name -> editor)."""
    return door().setdefault("editors", {})


def host_present() -> bool:
    """Whether this process uses the host, so that other packs can meet this one on the door."""
    return _host_module() is not None


def publish(api: SimpleNamespace) -> None:
    """Put this pack's editor API on the door (``door()["api"]``); the editor registry calls it when it is built."""
    door()["api"] = api


def supports(version: int) -> bool:
    """Whether an editor written for door API ``version`` can be served by this pack."""
    return OLDEST_API_VERSION <= version <= API_VERSION
