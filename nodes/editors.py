"""The image editors TokenFlow combines with, each declaring what its steps need from the engine.

An editor says which timesteps it visits and, per step, which Plug-and-Play injections it
wants (:class:`StepNeeds`). The engine plans its UNet calls from that alone: whether the source
branch runs in the keyframe pass, in the propagation pass, and whether it can stop early. No
engine code branches on an editor's name. Adding an editor is a new class here (or in its own
module) plus one :func:`register_editor` call; its extra settings are appended to the sampler's
inputs, never inserted.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from ..tokenflow_ops.schedule import editing_timesteps, sdedit_timesteps
from .model_support import BlockKey, ModelLayout, parse_block_list, parse_residual_list
from .validation import has_controlnet

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # pragma: no cover
    from .edit_plan import EditSettings


@dataclass(frozen=True)
class StepNeeds:
    """What one editing step asks of the engine besides TokenFlow's own keyframe/propagation passes."""

    attention_injection: frozenset[BlockKey] = frozenset()  # source q/k into the edit keyframes' self-attention
    residual_injection: tuple[str, ...] = ()  # ResBlocks whose residual features the source hands the edit branches

    def source_in_keyframe_pass(self, on_the_fly: bool) -> bool:
        """The source branch runs on the keyframes: its tokens (on the fly), q/k or features are needed."""
        return on_the_fly or bool(self.attention_injection) or bool(self.residual_injection)

    def source_in_propagation(self, on_the_fly: bool) -> bool:
        """The source branch runs on every frame: its tokens give the fields, or its features are injected."""
        return on_the_fly or bool(self.residual_injection)

    def source_stops_early(self, on_the_fly: bool) -> bool:
        """With extracted fields the propagated source only feeds the residual injection: stop after it."""
        return not on_the_fly and bool(self.residual_injection)


class Editor(Protocol):
    name: str
    description: str

    def timesteps(self, steps: int, settings: "EditSettings") -> list[int]:
        """The editing timesteps visited, largest first."""

    def step_needs(self, timesteps_full: list[int], settings: "EditSettings", layout: ModelLayout,
                   unet: torch.nn.Module) -> dict[int, StepNeeds]:
        """What each timestep needs (``timesteps_full``: every editing timestep, largest first)."""

    def check_conditioning(self, positive, negative) -> None:
        """Refuse conditioning this editor cannot work with (before any model call)."""


class PlugAndPlayEditor:
    name = "pnp"
    description = ("Plug-and-Play feature injection from the source (the paper's default, best structure): source "
                   "self-attention queries/keys for the first pnp_attn_t of the steps and residual-block features "
                   "for the first pnp_f_t.")

    def timesteps(self, steps: int, settings: "EditSettings") -> list[int]:
        return editing_timesteps(steps)

    def check_conditioning(self, positive, negative) -> None:
        return None

    def step_needs(self, timesteps_full, settings, layout, unet) -> dict[int, StepNeeds]:
        attention = frozenset(parse_block_list(settings.pnp_attention_blocks, layout, layout.default_pnp_attention))
        residual = parse_residual_list(settings.pnp_residual_blocks, unet, layout.default_pnp_residual)
        steps = len(timesteps_full)
        attn_until = set(timesteps_full[:int(steps * settings.pnp_attn_t)]) if settings.pnp_attn_t >= 0 else set()
        res_until = set(timesteps_full[:int(steps * settings.pnp_f_t)]) if settings.pnp_f_t >= 0 else set()
        return {t: StepNeeds(attention if t in attn_until else frozenset(), residual if t in res_until else ())
                for t in timesteps_full}


class SDEditEditor:
    name = "sdedit"
    description = "SDEdit: start from the partly noised source (sdedit_start), no injection."

    def timesteps(self, steps: int, settings: "EditSettings") -> list[int]:
        return sdedit_timesteps(steps, settings.sdedit_start)

    def check_conditioning(self, positive, negative) -> None:
        return None

    def step_needs(self, timesteps_full, settings, layout, unet) -> dict[int, StepNeeds]:
        return {t: StepNeeds() for t in timesteps_full}


class ControlNetEditor:
    name = "controlnet"
    description = ("No injection, full steps; the structure comes from ControlNet hints carried by the conditioning "
                   "(Apply ControlNet).")

    def timesteps(self, steps: int, settings: "EditSettings") -> list[int]:
        return editing_timesteps(steps)

    def step_needs(self, timesteps_full, settings, layout, unet) -> dict[int, StepNeeds]:
        return {t: StepNeeds() for t in timesteps_full}

    def check_conditioning(self, positive, negative) -> None:
        if not has_controlnet(positive) and not has_controlnet(negative):
            # Not refused: TokenFlow without any injection is a legitimate ablation, but rarely what was meant.
            log.warning("TokenFlow: editor 'controlnet' takes its structure from a ControlNet carried by the "
                        "conditioning, but neither positive nor negative has one: the edit runs with no structure "
                        "guidance. Apply a ControlNet to the prompts (Apply ControlNet, one hint per frame) or "
                        "choose editor 'pnp' or 'sdedit'")


EDITORS: dict[str, Editor] = {}


def register_editor(editor: Editor) -> None:
    """Make an editor selectable by name (the sampler's ``editor`` widget lists them in order)."""
    EDITORS[editor.name] = editor


for _editor in (PlugAndPlayEditor(), SDEditEditor(), ControlNetEditor()):
    register_editor(_editor)


def get_editor(name: str) -> Editor:
    if name not in EDITORS:
        raise ValueError(f"editor must be one of {tuple(EDITORS)}, got {name!r}")
    return EDITORS[name]
