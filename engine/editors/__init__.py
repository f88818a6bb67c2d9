"""The image editors TokenFlow combines with, each declaring its settings and what its steps need from the engine.

An editor (one module here) declares its sampler inputs (``inputs``: :class:`~.settings.EditorSetting`
values, or ComfyUI ``io`` inputs in a plug-in), says which timesteps it visits and, per step, which
Plug-and-Play injections it wants (:class:`~.base.StepNeeds`). The engine plans its UNet calls from
that alone: no engine code branches on an editor's name, and an editor is handed only the values of
the inputs it declared (:func:`editor_options`). Adding an editor is one new module plus one
:func:`register_editor` line (below, or in your own package).

The registry is the one home of what the sampler shows: its ``editor`` combo lists the registered
names in order with a tooltip made of their descriptions; required inputs (the pack's own editors
only) stand between ``cfg`` and ``batch_size`` and optional ones are appended after the sampler's own,
both in registration order, so saved workflows keep their widget positions.
``scripts/tokenflow_edit.py`` reads the same registry for ``--editor`` and its settings' flags.
The registry is the door's dict on the host (``engine/door.py``): another custom node pack adds an
editor to it without importing this pack, before or after this pack loads.
Nothing here imports ComfyUI at import time.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Mapping

from ...tokenflow_ops.schedule import editing_timesteps, sdedit_timesteps
from .. import door
from .base import Editor, StepNeeds
from .controlnet import ControlNetEditor
from .pnp import PlugAndPlayEditor
from .sdedit import SDEditEditor
from .settings import EditorSetting, resolve_options, setting_name, setting_required

__all__ = ["DEFAULT_EDITOR", "EDITORS", "Editor", "EditorSetting", "StepNeeds", "appended_inputs", "editor_options",
           "editor_tooltip", "get_editor", "register_editor", "stable_inputs", "unregister_editor"]

# Shared with other packs through the door; read at use time (the sampler's schema, get_editor).
EDITORS: dict[str, Editor] = door.editors()
_registered_before_us = dict(EDITORS)  # by packs loaded earlier: kept, after the built-in editors
EDITORS.clear()
DEFAULT_EDITOR = "pnp"  # the sampler's and the runner's default (EditSettings.editor)


def register_editor(editor: Editor, *, builtin: bool = False) -> None:
    """Make an editor selectable by name. ``builtin`` (the pack's own editors only) allows required inputs."""
    taken = {setting_name(d): other.name for other in EDITORS.values() if other.name != editor.name
             for d in getattr(other, "inputs", ())}
    for declared in getattr(editor, "inputs", ()):
        name = setting_name(declared)
        if name in taken:
            raise ValueError(f"editor {editor.name!r}: input {name!r} is already declared by editor {taken[name]!r}; "
                             "give it a name of its own (e.g. prefixed with the editor's name)")
        if setting_required(declared) and not builtin:
            raise ValueError(f"editor {editor.name!r}: input {name!r} must be optional: a required input would move "
                             "the widget values of every saved TokenFlow Sampler")
    EDITORS[editor.name] = editor


def unregister_editor(name: str) -> None:
    EDITORS.pop(name, None)


def get_editor(name: str) -> Editor:
    if name not in EDITORS:
        raise ValueError(f"editor must be one of {tuple(EDITORS)}, got {name!r}")
    return EDITORS[name]


def _declared(required: bool) -> list[Any]:
    return [d for editor in EDITORS.values() for d in getattr(editor, "inputs", ()) if setting_required(d) == required]


def stable_inputs() -> list[Any]:
    """The required inputs the registered editors declare, in registration order (between cfg and batch_size)."""
    return _declared(True)


def appended_inputs() -> list[Any]:
    """The optional inputs the registered editors declare, in registration order (after the sampler's own)."""
    return _declared(False)


def editor_options(editor: Editor, values: Mapping[str, Any]) -> dict[str, Any]:
    """What ``editor`` is handed: the values of the inputs it declared, their defaults where ``values`` lacks one."""
    return resolve_options(getattr(editor, "inputs", ()), values)


def editor_tooltip() -> str:
    """The sampler's ``editor`` tooltip: every registered editor's name and description."""
    return " ".join(f"{editor.name}: {editor.description}" for editor in EDITORS.values())


def publish_api() -> SimpleNamespace | None:
    """This pack's editor API on the door (``door()["api"]``), for editors of other packs; built when the registry is.

    Without the host in this process (the runner reading its flags) there is nobody to publish to.
    """
    if not door.host_present():
        return None
    from ..families.block_lists import parse_block_list, parse_residual_list  # the host is loaded by now

    api = SimpleNamespace(version=door.API_VERSION, StepNeeds=StepNeeds, Editor=Editor, register_editor=register_editor,
                          unregister_editor=unregister_editor, editing_timesteps=editing_timesteps,
                          sdedit_timesteps=sdedit_timesteps, parse_block_list=parse_block_list,
                          parse_residual_list=parse_residual_list)
    door.publish(api)
    return api


register_editor(PlugAndPlayEditor(), builtin=True)
register_editor(SDEditEditor(), builtin=True)
register_editor(ControlNetEditor(), builtin=True)
EDITORS.update({name: e for name, e in _registered_before_us.items() if name not in EDITORS})
publish_api()
