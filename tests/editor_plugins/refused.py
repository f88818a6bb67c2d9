"""Editors the registry must leave out, written as another pack would write them: plain classes, ComfyUI ``io``
inputs, nothing of this pack imported (a subprocess puts them into the door BEFORE the pack is imported)."""
from __future__ import annotations

from typing import Any

from comfy_api.latest import io


class PlainEditor:
    """An editor that is never run: only its declarations are read."""

    name = "plain"
    description = "Test editor: declarations only."
    inputs: tuple = ()

    def timesteps(self, steps, options) -> list[int]:
        return []

    def step_needs(self, timesteps_full, options, layout, unet) -> dict:
        return {}

    def check_conditioning(self, positive, negative) -> None:
        return None


def optional(name: str) -> io.Input:
    return io.Float.Input(name, default=0.5, min=0.0, max=1.0, optional=True, tooltip=f"{name} (test)")


def required(name: str) -> io.Input:
    return io.Float.Input(name, default=0.5, min=0.0, max=1.0, tooltip=f"{name} (test)")


def editor(name: str, *inputs: io.Input, **attributes: Any) -> PlainEditor:
    """An editor instance named ``name`` declaring ``inputs`` (and e.g. ``api_version``)."""
    return type(f"Editor_{name}", (PlainEditor,), {"name": name, "inputs": tuple(inputs), **attributes})()
