"""The DDPM UNet families (SD1.x, SD2.x eps / v, SDXL): how one is recognised and described.

Everything is read off the model object itself (no hard-coded SD1.5 shapes): the transformer blocks,
the prediction type and the schedule. A :class:`UNetFamily` only decides what is a matter of choice:
how to recognise its models and where Plug-and-Play injects by default.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

import comfy.model_sampling
from comfy.ldm.modules.attention import SpatialTransformer
from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, Upsample, UNetModel

from .base import DDPM, AttentionSize, BlockKey, ModelLayout, unsupported_model


def _describe_unet(model_patcher, family: "UNetFamily") -> ModelLayout:
    unet = model_patcher.model.diffusion_model
    sampling = model_patcher.get_model_object("model_sampling")
    if not isinstance(sampling, comfy.model_sampling.ModelSamplingDiscrete) or not hasattr(sampling, "sigmas"):
        raise unsupported_model(model_patcher, "its noise schedule is not the discrete DDPM schedule")
    prediction, kind = _prediction_type(sampling)
    if prediction is None:
        raise ValueError(
            f"TokenFlow supports epsilon and v-prediction models, but the connected model predicts {kind} "
            "(a ModelSamplingDiscrete/LCM/EDM patch node, or a distilled checkpoint). Remove the sampling-patch node "
            "or use a regular SD1.x/SD2.x/SDXL checkpoint.")
    if len(sampling.sigmas) != 1000:
        raise unsupported_model(model_patcher, f"its schedule has {len(sampling.sigmas)} timesteps, not 1000")
    if getattr(unet, "use_temporal_attention", False) or getattr(unet, "use_temporal_resblocks", False):
        raise unsupported_model(model_patcher, "it is a video UNet (SVD)")
    blocks = transformer_blocks(unet)
    if not blocks:
        raise unsupported_model(model_patcher, "it has no spatial transformer blocks")
    return ModelLayout(family.name, prediction, blocks, family.pnp_attention(unet, blocks), family.pnp_residual(unet),
                       sampling=DDPM, adapter=family)


def _prediction_type(sampling) -> tuple[str | None, str]:
    """("eps" | "v" | None, name of the prediction class) from the sampling object's MRO.

    The first class that defines its own ``calculate_denoised`` decides: EPS and V_PREDICTION are
    supported; X0, LCM, EDM, CONST (flow) and other parameterisations are not.
    """
    for cls in type(sampling).__mro__[1:]:
        if cls is comfy.model_sampling.V_PREDICTION:
            return "v", cls.__name__
        if cls is comfy.model_sampling.EPS:
            return "eps", cls.__name__
        if "calculate_denoised" in vars(cls):
            return None, cls.__name__
    return None, type(sampling).__name__


def transformer_blocks(unet: torch.nn.Module) -> tuple[BlockKey, ...]:
    """Every BasicTransformerBlock as ComfyUI's (block type, block id, index) patch key."""
    keys: list[BlockKey] = []
    groups = (("input", unet.input_blocks), ("middle", [unet.middle_block]), ("output", unet.output_blocks))
    for kind, seq in groups:
        for block_id, block in enumerate(seq):
            for layer in block:
                if isinstance(layer, SpatialTransformer):
                    keys += [(kind, block_id, i) for i in range(len(layer.transformer_blocks))]
    return tuple(keys)


def attention_sizes(unet: torch.nn.Module, latent_shape: tuple[int, ...]) -> tuple[AttentionSize, ...]:
    """Every BasicTransformerBlock's self-attention at frames of ``latent_shape``: its tokens (the latent size at its
    level: each Downsample halves it, rounding up as a stride-2 convolution does; each Upsample returns to the level
    above) and its width (``attn1``'s heads x head dim), read off the model."""
    sizes = [(int(latent_shape[-2]), int(latent_shape[-1]))]
    level = 0
    found: list[AttentionSize] = []

    def visit(kind: str, block_id: int, block) -> None:
        h, w = sizes[level]
        for layer in block:
            if isinstance(layer, SpatialTransformer):
                found.extend(AttentionSize((kind, block_id, i), h * w, int(t.attn1.to_q.out_features))
                             for i, t in enumerate(layer.transformer_blocks))

    for block_id, block in enumerate(unet.input_blocks):
        visit("input", block_id, block)
        if any(isinstance(layer, Downsample) for layer in block):
            h, w = sizes[level]
            sizes.append((-(-h // 2), -(-w // 2)))
            level += 1
    visit("middle", 0, unet.middle_block)
    for block_id, block in enumerate(unet.output_blocks):
        visit("output", block_id, block)
        if any(isinstance(layer, Upsample) for layer in block):
            level -= 1
    return tuple(found)


def default_pnp_attention(unet: torch.nn.Module, blocks: tuple[BlockKey, ...]) -> tuple[BlockKey, ...]:
    """Decoder transformer blocks minus the first decoder attention block (SD: output 4-11; SDXL: output 1-5)."""
    decoder = [b for b in blocks if b[0] == "output"]
    if not decoder:
        return ()
    first_id = min(b[1] for b in decoder)
    return tuple(b for b in decoder if b[1] != first_id)


def default_pnp_residual(unet: torch.nn.Module) -> str:
    """Second ResBlock of the decoder's second resolution level (diffusers up_blocks[1].resnets[1])."""
    per_level = unet.num_res_blocks[-1] + 1 if isinstance(unet.num_res_blocks, (list, tuple)) else unet.num_res_blocks + 1
    return f"output_blocks.{per_level + 1}.0"


@dataclass(frozen=True)
class UNetFamily:
    """A family of DDPM UNets: how to recognise one and where Plug-and-Play injects into it.

    The transformer blocks and the prediction type are read off the model itself; a family only
    decides the defaults that are a matter of choice. Another UNet family is one more adapter in
    :data:`.registry.FAMILIES` (checked in order, the first match wins), not edits across the runners.
    """

    name: str
    matches: Callable[[UNetModel], bool]
    pnp_attention: Callable[[UNetModel, tuple[BlockKey, ...]], tuple[BlockKey, ...]] = default_pnp_attention
    pnp_residual: Callable[[UNetModel], tuple[str, ...]] = lambda unet: (default_pnp_residual(unet),)

    def claims(self, model_patcher) -> bool:
        unet = getattr(model_patcher.model, "diffusion_model", None)
        return isinstance(unet, UNetModel) and bool(self.matches(unet))

    def describe(self, model_patcher) -> ModelLayout:
        return _describe_unet(model_patcher, self)

    def attention_sizes(self, diffusion_model, latent_shape: tuple[int, ...], text_tokens: int = 0
                        ) -> tuple[AttentionSize, ...]:
        return attention_sizes(diffusion_model, latent_shape)  # attn1 attends over image tokens only


# SDXL: 2816-wide ADM input (or a sequential class embedding); PnP at the analogous decoder levels.
SDXL = UNetFamily("sdxl", lambda unet: getattr(unet, "adm_in_channels", None) == 2816 or unet.num_classes == "sequential")
# SD1.x / SD2.x (and any other UNetModel): the paper's layers, output 4-11 and output_blocks.4.0.
SD = UNetFamily("sd1/sd2", lambda unet: True)
UNET_FAMILIES: tuple[UNetFamily, ...] = (SDXL, SD)
