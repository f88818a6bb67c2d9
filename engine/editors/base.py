"""What an editor declares: its settings, the timesteps it visits and what each step needs from the engine."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Protocol, Sequence

if TYPE_CHECKING:  # pragma: no cover  (the declarations stay importable without ComfyUI: see settings.py)
    import torch

    from ..families.base import BlockKey, ModelLayout


@dataclass(frozen=True)
class StepNeeds:
    """What one editing step asks of the engine besides TokenFlow's own keyframe/propagation passes."""

    attention_injection: "frozenset[BlockKey]" = frozenset()  # source q/k into the edit keyframes' self-attention
    residual_injection: tuple[str, ...] = ()  # ResBlocks whose residual features the source hands the edit branches
    # On a DiT, what the source hands each injected block: (block, "v" | "kv") pairs
    # (:func:`~..families.block_lists.parse_attention_injection`); a block not listed gets what the family's
    # default preset injects.
    attention_tensors: "tuple[tuple[BlockKey, str], ...]" = ()

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
    """An image editor.

    ``inputs``: the sampler inputs it declares (:class:`~.settings.EditorSetting`, or ComfyUI ``io``
    inputs); a plug-in's must be optional (they are appended after the sampler's own) and named unlike the
    sampler's own inputs and every other editor's. ``options``, in every method, holds the values of exactly
    those inputs (their declared defaults where none is given).

    Optional attribute ``api_version`` (an int): the version of the door's API (``engine.door.API_VERSION``,
    ``door["api"].version``) the editor was written for; 1 when absent. An editor whose version this pack does
    not serve is left out (:mod:`.validation`), as is one breaking any rule above.
    """

    name: str
    description: str  # one sentence; the sampler's ``editor`` tooltip is built from every editor's
    inputs: Sequence[Any]

    def timesteps(self, steps: int, options: Mapping[str, Any]) -> list[int]:
        """The editing timesteps visited, largest first."""

    def step_needs(self, timesteps_full: list[int], options: Mapping[str, Any], layout: "ModelLayout",
                   unet: "torch.nn.Module") -> dict[int, StepNeeds]:
        """What each timestep needs (``timesteps_full``: every editing timestep, largest first)."""

    def check_conditioning(self, positive, negative) -> None:
        """Refuse conditioning this editor cannot work with (before any model call)."""
