"""The image editors TokenFlow combines with, each declaring what its steps need from the engine.

An editor (one module here) says which timesteps it visits and, per step, which Plug-and-Play
injections it wants (:class:`~.base.StepNeeds`). The engine plans its UNet calls from that alone:
whether the source branch runs in the keyframe pass, in the propagation pass, and whether it can
stop early; no engine code branches on an editor's name. Adding an editor is one new module plus
one :func:`register_editor` line below (or in your own package); the sampler's ``editor`` widget
lists the registered names in order, and inputs an editor declares (``inputs``) are appended to
the sampler's, never inserted, so saved workflows keep their widget positions.

The registry is the door's dict on the host (``engine/door.py``): another custom node pack adds an
editor to it without importing this pack, before or after this pack loads.
"""
from __future__ import annotations

from .. import door as _door
from .base import Editor, StepNeeds
from .controlnet import ControlNetEditor
from .pnp import PlugAndPlayEditor
from .sdedit import SDEditEditor

__all__ = ["EDITORS", "Editor", "StepNeeds", "editor_inputs", "get_editor", "register_editor", "unregister_editor"]

# Shared with other packs through the door; read at use time (the sampler's schema, get_editor).
EDITORS: dict[str, Editor] = _door.editors()
_registered_before_us = dict(EDITORS)  # by packs loaded earlier: kept, after the built-in editors
EDITORS.clear()


def register_editor(editor: Editor) -> None:
    """Make an editor selectable by name."""
    EDITORS[editor.name] = editor


def unregister_editor(name: str) -> None:
    EDITORS.pop(name, None)


def editor_inputs() -> list:
    """The sampler inputs the registered editors declare (``Editor.inputs``), in registration order."""
    return [inp for editor in EDITORS.values() for inp in getattr(editor, "inputs", ())]


def get_editor(name: str) -> Editor:
    if name not in EDITORS:
        raise ValueError(f"editor must be one of {tuple(EDITORS)}, got {name!r}")
    return EDITORS[name]


register_editor(PlugAndPlayEditor())
register_editor(SDEditEditor())
register_editor(ControlNetEditor())
EDITORS.update({name: e for name, e in _registered_before_us.items() if name not in EDITORS})
_door.publish_api()
