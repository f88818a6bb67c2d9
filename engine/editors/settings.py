"""What an editor's settings are, in plain Python (no ComfyUI, no torch).

An editor declares its sampler inputs as :class:`EditorSetting` values (or, for a plug-in,
ComfyUI ``io`` inputs directly). The declaration is the one home of a setting's default, range
and tooltip: the sampler node turns it into its widget, ``scripts/tokenflow_edit.py`` into a flag
(it reads the declarations before ComfyUI is imported, hence no ComfyUI here), the benchmarks and
the tests read their defaults from it, and the engine hands each editor only the values of what
it declared (:func:`resolve_options`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

__all__ = ["EditorSetting", "resolve_options", "setting_default", "setting_name", "setting_required"]


@dataclass(frozen=True)
class EditorSetting:
    """One sampler input an editor declares.

    ``required`` settings stand between the sampler's ``cfg`` and ``batch_size`` (only the pack's own
    editors may declare them: saved workflows store widget values by position); the others are
    optional inputs appended after the sampler's own.
    """

    name: str
    kind: type  # float, int or str
    default: Any
    tooltip: str
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    required: bool = False

    @property
    def flag(self) -> str:
        """The command-line flag of this setting (``pnp_attn_t`` -> ``--pnp-attn-t``)."""
        return "--" + self.name.replace("_", "-")


def setting_name(declared: Any) -> str:
    """The input name of a declaration: an :class:`EditorSetting` or a ComfyUI ``io`` input (its ``id``)."""
    return declared.name if isinstance(declared, EditorSetting) else declared.id


def setting_default(declared: Any) -> Any:
    return declared.default


def setting_required(declared: Any) -> bool:
    return declared.required if isinstance(declared, EditorSetting) else not getattr(declared, "optional", False)


def resolve_options(declared: Iterable[Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """The values of exactly the ``declared`` settings: given ones, else each declaration's default."""
    return {setting_name(d): values.get(setting_name(d), setting_default(d)) for d in declared}
