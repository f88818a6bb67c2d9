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
editor to it without importing this pack, before or after this pack loads. So every editor is checked
whenever the registry is read (:func:`usable_editors`, :mod:`.validation`), not only by
:func:`register_editor`: one that cannot be served is left out with one logged line, and the sampler
keeps its schema and its other editors.
Nothing here imports ComfyUI at import time.
"""
from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any, Mapping

from ...tokenflow_ops.schedule import editing_timesteps, sdedit_timesteps
from .. import door
from .base import Editor, StepNeeds
from .controlnet import ControlNetEditor
from .pnp import PlugAndPlayEditor
from .sdedit import SDEditEditor
from .settings import EditorSetting, resolve_options, setting_name, setting_required
from .validation import API_VERSION_ATTRIBUTE, refusal

__all__ = ["API_VERSION_ATTRIBUTE", "DEFAULT_EDITOR", "EDITORS", "Editor", "EditorSetting", "StepNeeds",
           "appended_inputs", "editor_names", "editor_options", "editor_tooltip", "get_editor", "register_editor",
           "stable_inputs", "unregister_editor", "usable_editors"]

log = logging.getLogger(__name__)

# Shared with other packs through the door, who may write into it at any time: read through usable_editors().
EDITORS: dict[str, Editor] = door.editors()
_registered_before_us = dict(EDITORS)  # by packs loaded earlier: kept, after the built-in editors
EDITORS.clear()
DEFAULT_EDITOR = "pnp"  # the sampler's and the runner's default (EditSettings.editor)
_BUILTIN: dict[str, Editor] = {}  # the pack's own: always served first, under their names, whatever the door holds
_reported: set[tuple[str, str]] = set()  # refusals already logged (each is logged once, not on every read)


def _report(name: str, message: str) -> None:
    if (name, message) not in _reported:
        _reported.add((name, message))
        log.warning("TokenFlow: %s (the editor is left out)", message)


def _builtin_name(name: str) -> str:
    return (f"editor {name!r}: the name of a built-in editor, whose inputs saved workflows expect; give yours a name "
            "of its own")


def _another_copy_of(editor: Any, builtin: Editor) -> bool:
    """Whether ``editor`` is ``builtin`` from another copy of this pack in the process (the runner imports the pack
    beside the one ComfyUI loads; both share the door): the same class of the same module of the pack."""
    mine, theirs = type(builtin), type(editor)
    return (theirs.__qualname__ == mine.__qualname__
            and theirs.__module__.split(".")[-3:] == mine.__module__.split(".")[-3:])


def _inputs_of(editors: Mapping[str, Editor]) -> dict[str, str]:
    """Input name -> the editor that declares it."""
    return {setting_name(d): name for name, editor in editors.items() for d in getattr(editor, "inputs", ())}


def _review() -> tuple[dict[str, Editor], dict[str, str]]:
    """(the editors served, in order; name -> why each other editor in the door is not), refusals logged once."""
    served: dict[str, Editor] = {}
    refused: dict[str, str] = {}
    shared = door.editors()
    for name, builtin in _BUILTIN.items():
        if name in shared and shared[name] is not builtin and not _another_copy_of(shared[name], builtin):
            refused[name] = _builtin_name(name)
        served[name] = builtin
    for name, editor in list(shared.items()):
        if name in served:
            continue
        message = refusal(name, editor, _inputs_of(served))
        if message is None:
            served[name] = editor
        else:
            refused[name] = message
    for name, message in refused.items():
        _report(name, message)
    return served, refused


def usable_editors() -> dict[str, Editor]:
    """The editors the sampler, the runner and the engine use, in order: the built-in ones, then every other editor
    of the door's dict that passes :func:`.validation.refusal` (the others are left out, each with one logged line)."""
    return _review()[0]


def editor_names() -> list[str]:
    """The sampler's ``editor`` choices: the names of :func:`usable_editors`."""
    return list(usable_editors())


def register_editor(editor: Editor, *, builtin: bool = False) -> None:
    """Make an editor selectable by name. ``builtin`` (the pack's own editors only) allows required inputs.

    An editor the registry would not serve (:func:`.validation.refusal`) is refused here at once: the line is
    logged as on a read, and raised as a ``ValueError``.
    """
    name = getattr(editor, "name", None)
    served = usable_editors()
    if name in _BUILTIN and not builtin:
        message = _builtin_name(name)
    else:
        message = refusal(name, editor, _inputs_of({n: e for n, e in served.items() if n != name}), builtin)
    if message is not None:
        _report(name, message)
        raise ValueError(message)
    door.editors()[name] = editor
    if builtin:
        _BUILTIN[name] = editor


def unregister_editor(name: str) -> None:
    door.editors().pop(name, None)
    _BUILTIN.pop(name, None)


def get_editor(name: str) -> Editor:
    served, refused = _review()
    if name in served:
        return served[name]
    if name in refused:
        raise ValueError(f"editor {name!r} is not available: {refused[name]}")
    raise ValueError(f"editor must be one of {tuple(served)}, got {name!r}")


def _declared(required: bool) -> list[Any]:
    return [d for editor in usable_editors().values() for d in getattr(editor, "inputs", ())
            if setting_required(d) == required]


def stable_inputs() -> list[Any]:
    """The required inputs the served editors declare, in registration order (between cfg and batch_size)."""
    return _declared(True)


def appended_inputs() -> list[Any]:
    """The optional inputs the served editors declare, in registration order (after the sampler's own)."""
    return _declared(False)


def editor_options(editor: Editor, values: Mapping[str, Any]) -> dict[str, Any]:
    """What ``editor`` is handed: the values of the inputs it declared, their defaults where ``values`` lacks one."""
    return resolve_options(getattr(editor, "inputs", ()), values)


def editor_tooltip() -> str:
    """The sampler's ``editor`` tooltip: every registered editor's name and description."""
    return " ".join(f"{editor.name}: {editor.description}" for editor in usable_editors().values())


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
for _taken in sorted(_registered_before_us.keys() & _BUILTIN.keys()):  # dropped above: say so
    if not _another_copy_of(_registered_before_us[_taken], _BUILTIN[_taken]):
        _report(_taken, _builtin_name(_taken))
usable_editors()  # the editors other packs left before this one loaded: their refusals logged now, at load
publish_api()
