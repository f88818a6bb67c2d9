"""What a model family adapter declares, shared by the UNet families and the DiT (flow) families.

A family adapter recognises its models (``claims``) and describes them (``describe``) as a
:class:`ModelLayout`: where TokenFlow's self-attention lives, where Plug-and-Play injects by
default and which sampling rule the model follows. The engine reads only the layout; it never
branches on a family's name. Adapters are the entries of :data:`.registry.FAMILIES`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

BlockKey = tuple[str, int, int]  # (block kind, block id, index inside the block)

# The sampling rules a layout can declare (what the model's model_sampling is).
DDPM = "ddpm"  # ModelSamplingDiscrete, 1000 steps, eps or v prediction: DDIM inversion
FLOW = "flow"  # CONST (rectified flow): x_s = (1 - s) x0 + s eps, Euler inversion on the model's sigmas


@dataclass(frozen=True)
class AttentionSize:
    """One patched attention at a frame size, as the family adapter reads it off the model: what TokenFlow keeps of
    it per frame is ``image_tokens`` rows of ``width`` channels (its attention output; its source tokens; PnP's
    source q/k or k/v), and its joint keys/values span ``text_tokens + image_tokens`` per keyframe."""

    block: BlockKey
    image_tokens: int
    width: int  # heads x head dim of the attention output
    text_tokens: int = 0  # tokens besides the image's in the same attention (a DiT's text; 0 in a UNet's attn1)


@dataclass(frozen=True)
class ModelLayout:
    family: str  # the adapter's name, for messages, products and defaults
    prediction: str  # "eps" | "v" | "flow"
    transformer_blocks: tuple[BlockKey, ...]  # every attention TokenFlow patches
    default_pnp_attention: tuple[BlockKey, ...]
    default_pnp_residual: tuple[str, ...]  # module paths of ResBlocks inside diffusion_model (UNets only)
    sampling: str = DDPM
    # The adapter that described the model; DiT patches ask it how tokens are laid out.
    adapter: Any = field(default=None, compare=False, repr=False)


class FamilyAdapter(Protocol):
    """One model family. ``claims`` must be cheap and never raise; ``describe`` raises a ValueError
    naming the input and the fix when a claimed model cannot be used."""

    name: str

    def claims(self, model_patcher) -> bool: ...

    def describe(self, model_patcher) -> ModelLayout: ...

    def attention_sizes(self, diffusion_model, latent_shape: tuple[int, ...], text_tokens: int
                        ) -> tuple[AttentionSize, ...]:
        """Every patched attention's sizes for frames of ``latent_shape`` (the planner's byte counts)."""
        ...


def _is_video_model(model_patcher) -> bool:
    """A video model's latents have a time axis (Wan, HunyuanVideo, LTXV, Mochi, Cosmos: latent_dimensions 3)."""
    latent_format = getattr(model_patcher.model, "latent_format", None)
    return getattr(latent_format, "latent_dimensions", 2) == 3


def unsupported_model(model_patcher, why: str) -> ValueError:
    """The refusal of a model TokenFlow cannot edit with, saying ``why`` and which models it takes."""
    name = type(getattr(model_patcher.model, "diffusion_model", model_patcher.model)).__name__
    if _is_video_model(model_patcher):
        return ValueError(
            f"model: the connected model is {name}, a video model (its latents have a time axis); TokenFlow "
            "edits a video with an IMAGE model: load an SD1.x/SD2.x/SDXL or SD3.x checkpoint with Load Checkpoint, "
            "or a Flux model with Load Diffusion Model")
    return ValueError(
        f"model: TokenFlow cannot edit with the connected model {name}: {why}. Load an SD1.x/SD2.x/SDXL or SD3.x "
        "checkpoint with Load Checkpoint, or a Flux model with Load Diffusion Model; video models (SVD, Wan, "
        "HunyuanVideo, ...) are not image models."
    )
