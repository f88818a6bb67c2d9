"""What an editor must satisfy to be served: checked whenever the registry is read, however the editor got in.

Editors reach the registry three ways: :func:`~engine.editors.register_editor`, written into the door's
``"editors"`` dict by a pack that loaded before this one, or written there after. The last two never pass
through ``register_editor``, so the registry checks every editor when it is read (the sampler's schema,
``get_editor``, the runner's flags) with :func:`refusal`, and serves only those it accepts: a bad editor
is left out with one logged line and the sampler keeps building.

What is refused, and why:

- a door API version this TokenFlow does not serve (the editor's ``api_version``, see :func:`api_version_of`);
- a name that is not the editor's dict key, or no ``description`` (the sampler's tooltip is made of them);
- a required input from a plug-in: required widgets stand between ``cfg`` and ``batch_size``, so one more
  moves the widget values of every saved TokenFlow Sampler (only the pack's own editors declare them);
- an input named like one of the sampler's own (:data:`RESERVED_INPUTS`), or like another served editor's
  input, or twice: ComfyUI refuses a schema whose input ids repeat, and the whole node would disappear.

Plain Python: no ComfyUI, no torch (the runner reads the registry before the host is imported).
"""
from __future__ import annotations

from typing import Any, Mapping

from .. import door
from .settings import setting_name, setting_required

__all__ = ["API_VERSION_ATTRIBUTE", "DEFAULT_API_VERSION", "RESERVED_INPUTS", "SAMPLER_INPUTS", "api_version_of",
           "refusal"]

# The TokenFlow Sampler's own inputs (nodes/sampler_nodes.py; tests/test_editor_validation.py checks the two agree).
SAMPLER_INPUTS = frozenset({"model", "positive", "negative", "inversion", "editor", "cfg", "batch_size", "keyframes",
                            "seed", "correspondences", "blend", "max_keyframes", "steps"})
# ... and EditSettings.of's own field that is not an input: a value under that name would never reach an editor.
RESERVED_INPUTS = SAMPLER_INPUTS | {"editor_options"}

API_VERSION_ATTRIBUTE = "api_version"  # on an editor: the door API version (door.API_VERSION) it was written for
DEFAULT_API_VERSION = 1  # an editor that declares none was written before the attribute existed: version 1


def api_version_of(editor: Any) -> Any:
    """The door API version ``editor`` needs (its ``api_version``; :data:`DEFAULT_API_VERSION` without one)."""
    return getattr(editor, API_VERSION_ATTRIBUTE, DEFAULT_API_VERSION)


def _version_refusal(key: str, editor: Any) -> str | None:
    version = api_version_of(editor)
    if isinstance(version, bool) or not isinstance(version, int):
        return (f"editor {key!r}: {API_VERSION_ATTRIBUTE} must be an int (the door API version it was written for, "
                f"this TokenFlow's is {door.API_VERSION}), got {version!r}")
    if not door.supports(version):
        return (f"editor {key!r} needs door API version {version}, this TokenFlow's door is version "
                f"{door.API_VERSION} (it serves {door.OLDEST_API_VERSION} to {door.API_VERSION}); update TokenFlow "
                "or the editor's pack so that the two match")
    return None


def _shape_refusal(key: str, editor: Any) -> str | None:
    name = getattr(editor, "name", None)
    if not isinstance(key, str) or not key:
        return f"editor {key!r}: its name must be a non-empty str (the sampler's editor choice)"
    if name != key:
        return (f"editor {key!r}: its name is {name!r}; put it under its own name "
                "(door['editors'][editor.name] = editor)")
    if not isinstance(getattr(editor, "description", None), str):
        return (f"editor {key!r}: give it a description (one sentence, a str): the sampler's editor tooltip is made "
                "of every editor's")
    return None


def _input_refusal(key: str, editor: Any, taken: Mapping[str, str], builtin: bool) -> str | None:
    try:
        declared = list(getattr(editor, "inputs", ()))
    except TypeError:
        return f"editor {key!r}: inputs must be a sequence of EditorSetting values or ComfyUI io inputs"
    own: set[str] = set()
    for position, declaration in enumerate(declared):
        try:
            name = setting_name(declaration)
        except AttributeError:
            return (f"editor {key!r}: input #{position} ({declaration!r}) is neither an EditorSetting nor a ComfyUI "
                    "io input; declare it as one of them")
        rename = f"give it a name of its own (e.g. prefixed with the editor's name: {key}_{name})"
        if name in RESERVED_INPUTS:
            return f"editor {key!r}: input {name!r} is one of the TokenFlow Sampler's own inputs; {rename}"
        if name in own:
            return f"editor {key!r}: input {name!r} is declared twice; declare it once"
        if name in taken:
            return f"editor {key!r}: input {name!r} is already declared by editor {taken[name]!r}; {rename}"
        if setting_required(declaration) and not builtin:
            return (f"editor {key!r}: input {name!r} must be optional: a required input would move the widget values "
                    "of every saved TokenFlow Sampler; declare it optional (optional=True on a ComfyUI io input, "
                    "required=False on an EditorSetting)")
        own.add(name)
    return None


def refusal(key: str, editor: Any, taken: Mapping[str, str], builtin: bool = False) -> str | None:
    """Why the registry cannot serve ``editor`` (held under ``key``), in one line naming the fix; None if it can.

    ``taken``: input name -> the served editor that declared it. ``builtin``: the pack's own editors, which alone
    may declare required inputs.
    """
    return (_version_refusal(key, editor) or _shape_refusal(key, editor)
            or _input_refusal(key, editor, taken, builtin))
