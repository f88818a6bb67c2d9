"""The TokenFlow Sampler's settings, in plain Python (no ComfyUI at import time).

:class:`EditSettings` is the one home of the sampler's own defaults: the sampler node's widgets,
``scripts/tokenflow_edit.py``'s flags (it reads this module before ComfyUI is imported) and the
benchmarks read them here. The editors' inputs (``pnp_attn_t``, ``sdedit_start``, ...) are declared
by the editors themselves (:mod:`..editors`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..editors import DEFAULT_EDITOR, usable_editors
from ..editors.settings import setting_name

__all__ = ["EditSettings"]


@dataclass(frozen=True)
class EditSettings:
    """The sampler's own settings (the one home of their defaults: the sampler node's widgets read them) and
    the values of the inputs editors declare.

    ``editor_options`` holds values of inputs the editors declare (``pnp_attn_t``, ``sdedit_start``, a
    plug-in's ...); the chosen editor is handed only its own, its declared defaults filling the gaps.
    """

    editor: str = DEFAULT_EDITOR
    cfg: float = 7.5
    batch_size: int = 8
    keyframes: str = "random"
    seed: int = 1
    blend: str = "official"
    max_keyframes: int = 0
    steps: int = 0  # 0: the inversion's step count
    editor_options: dict = field(default_factory=dict)

    @classmethod
    def of(cls, **values) -> "EditSettings":
        """Settings from flat values: the sampler's own fields, every other name an editor option."""
        own = {name: values.pop(name) for name in list(values) if name in cls.__dataclass_fields__}
        options = {**own.pop("editor_options", {}), **values}
        known = {setting_name(d) for editor in usable_editors().values() for d in getattr(editor, "inputs", ())}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"no registered editor declares {unknown}; the editors' inputs are {sorted(known)}")
        return cls(**own, editor_options=options)
