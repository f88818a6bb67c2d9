"""Tiny random-weight Flux and SD3 models built from ComfyUI's own classes (no mocks).

``make_flux_model`` gives the ``comfy.model_patcher.ModelPatcher`` around ``comfy.model_base.Flux``
that UNETLoader would give for a Flux-dev checkpoint (guidance-distilled: ``guidance_embed``),
with the real block structure (double-stream then single-stream blocks, RoPE over
(index, h, w), 2x2 patches, 16 latent channels) at tiny widths; ``make_sd3_model`` the
``comfy.model_base.SD3`` (MMDiT joint blocks; ``x_block_self_attn`` layers as in SD3.5) that
CheckpointLoaderSimple would give. Conditioning is shaped as the text encoders give it: Flux's
T5 tokens plus a CLIP-L ``pooled_output`` (FluxGuidance adds ``guidance``); SD3's
CLIP-L/G + T5 tokens and the concatenated pooled outputs.

Weights come from a seeded CPU generator (fan-in scaled), so runs are reproducible. float64
models are made by building in float32 and converting the diffusion model (the host's
``supported_inference_dtypes`` list no float64).
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Any

import torch

import comfy.model_patcher
import comfy.supported_models
import tiny_models  # devkit/, beside this file

log = logging.getLogger(__name__)

CPU = torch.device("cpu")
FLUX_CONTEXT, FLUX_POOLED = 32, 32
SD3_CONTEXT, SD3_POOLED = 48, 32

FLUX_CONFIG: dict[str, Any] = {
    "image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": FLUX_POOLED,
    "context_in_dim": FLUX_CONTEXT, "hidden_size": 32, "mlp_ratio": 2.0, "num_heads": 2, "depth": 2,
    "depth_single_blocks": 2, "axes_dim": [4, 6, 6], "theta": 10000, "patch_size": 2, "qkv_bias": True,
    "guidance_embed": True,
}
# SD3's MMDiT fixes the width at 64 * depth with 64-wide heads: depth 2 gives hidden 128, 2 heads.
SD3_CONFIG: dict[str, Any] = {
    "in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 2, "num_patches": 64 * 64,
    "pos_embed_max_size": 64, "adm_in_channels": SD3_POOLED, "pos_embed_scaling_factor": None,
    "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": SD3_CONTEXT,
                                                                        "out_features": 128}},
    "qk_norm": "rms", "x_block_self_attn_layers": [0],
}


# What the host's model detection gives a Flux-1 checkpoint for the ``FluxParams`` fields that newer hosts
# added without a default (v0.8.0: ``txt_ids_dims``, [] for Flux-1: text tokens carry no position ids).
FLUX1_DETECTED_FIELDS: dict[str, Any] = {"txt_ids_dims": []}


def flux_config(**overrides: Any) -> dict[str, Any]:
    """The tiny Flux config as this host's ``FluxParams`` takes it: :data:`FLUX_CONFIG` plus ``overrides``, plus
    the Flux-1 value of every required field the host declares and the config lacks, so no constructor
    signature of one ComfyUI version is hard-coded."""
    import comfy.ldm.flux.model

    config = {**FLUX_CONFIG, **overrides}
    for field in dataclasses.fields(comfy.ldm.flux.model.FluxParams):
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        if not required or field.name in config:
            continue
        if field.name not in FLUX1_DETECTED_FIELDS:
            raise TypeError(f"this host's FluxParams requires '{field.name}', whose Flux-1 value the tiny builder does "
                            "not know: add it to tiny_dit_models.FLUX1_DETECTED_FIELDS (see the host's model_detection)")
        config[field.name] = copy.deepcopy(FLUX1_DETECTED_FIELDS[field.name])
    return config


def init_dit_weights(module: torch.nn.Module, seed: int, gain: float = 1.0) -> torch.nn.Module:
    """Fill every parameter from a seeded generator: weights ~ N(0, gain^2/fan_in), biases 0, norm scales 1."""
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    with torch.no_grad():
        for name, param in module.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "bias":
                value = torch.zeros(param.shape)
            elif leaf == "scale" or (param.ndim == 1 and "norm" in name):
                value = torch.ones(param.shape)
            elif param.ndim < 2:
                value = torch.randn(param.shape, generator=generator) * 0.5
            else:
                value = torch.randn(param.shape, generator=generator) * (gain / param[0].numel() ** 0.5)
            param.copy_(value.to(param.dtype))
        for name, buffer in module.named_buffers():
            if name.endswith("pos_embed"):  # SD3's fixed positional table: small random values
                buffer.copy_((torch.randn(buffer.shape, generator=generator) * 0.1).to(buffer.dtype))
    return module


def _patcher(model_config, seed: int, dtype: torch.dtype) -> comfy.model_patcher.ModelPatcher:
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({}, device=CPU)
    init_dit_weights(model.diffusion_model, seed)
    if dtype == torch.float64:
        tiny_models.rope_for_float64()
    if dtype != torch.float32:
        model.diffusion_model.to(dtype)
        model.diffusion_model.dtype = dtype
    model.eval()
    log.debug("tiny %s: %d parameters", type(model).__name__, sum(p.numel() for p in model.parameters()))
    return comfy.model_patcher.ModelPatcher(model, load_device=CPU, offload_device=CPU)


def make_flux_model(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any):
    """A tiny Flux-dev style ``model_base.Flux`` ModelPatcher (ModelSamplingFlux, shift 1.15)."""
    return _patcher(comfy.supported_models.Flux(flux_config(**overrides)), seed, dtype)


def make_sd3_model(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any):
    """A tiny SD3.5 style ``model_base.SD3`` ModelPatcher (ModelSamplingDiscreteFlow, shift 3)."""
    return _patcher(comfy.supported_models.SD3({**SD3_CONFIG, **overrides}), seed, dtype)


def float64_dit(model_patcher):
    """A float64 copy of a tiny DiT ModelPatcher (the original is untouched): ``tiny_models.float64_copy``."""
    return tiny_models.float64_copy(model_patcher)


def flux_conditioning(seed: int = 0, tokens: int = 8, guidance: float | None = 3.5,
                      dtype: torch.dtype = torch.float32) -> list[list[Any]]:
    """CLIPTextEncode + FluxGuidance output: T5 tokens (1, tokens, context) and the CLIP-L pooled output."""
    g = torch.Generator().manual_seed(int(seed))
    extra: dict[str, Any] = {"pooled_output": torch.randn(1, FLUX_POOLED, generator=g).to(dtype)}
    if guidance is not None:
        extra["guidance"] = guidance
    return [[torch.randn(1, tokens, FLUX_CONTEXT, generator=g).to(dtype), extra]]


def sd3_conditioning(seed: int = 0, tokens: int = 8, dtype: torch.dtype = torch.float32) -> list[list[Any]]:
    """CLIPTextEncode output for SD3: the joint CLIP-L/G + T5 tokens and the concatenated pooled outputs."""
    g = torch.Generator().manual_seed(int(seed))
    return [[torch.randn(1, tokens, SD3_CONTEXT, generator=g).to(dtype),
             {"pooled_output": torch.randn(1, SD3_POOLED, generator=g).to(dtype)}]]


def make_flux_controlnet(seed: int = 5, **overrides: Any):
    """A tiny core Flux ControlNet (``comfy.ldm.flux.controlnet.ControlNetFlux``, the XLabs layout: pixel hints
    through its conv hint block) matching :func:`make_flux_model`, as ``comfy.controlnet.ControlNet``."""
    import comfy.controlnet
    import comfy.ldm.flux.controlnet
    import comfy.ops

    config = {k: v for k, v in flux_config(**overrides).items() if k != "image_model"}
    control_model = comfy.ldm.flux.controlnet.ControlNetFlux(operations=comfy.ops.disable_weight_init,
                                                             dtype=torch.float32, device=CPU, **config)
    init_dit_weights(control_model, seed)
    control_model.eval()
    return comfy.controlnet.ControlNet(control_model, load_device=CPU, extra_conds=["y", "guidance"])


# Each family's model builder, conditioning builder and cfg (Flux is guidance-distilled: cfg 1; SD3 uses cfg).
DIT_FAMILIES = {
    "flux": (make_flux_model, flux_conditioning, 1.0),
    "sd3": (make_sd3_model, sd3_conditioning, 4.0),
}


def dit_world(family: str, n_frames: int) -> dict[str, Any]:
    """A float64 tiny ``family`` model, source / positive / negative prompts, its cfg and ``n_frames`` latents."""
    make, conditioning, cfg = DIT_FAMILIES[family]
    model = float64_dit(make(seed=0))
    src, pos, neg = (conditioning(seed=s, dtype=torch.float64) for s in (1, 2, 3))
    frames = torch.randn(n_frames, 16, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.5
    return dict(family=family, model=model, src=src, pos=pos, neg=neg, cfg=cfg, frames=frames)



WAN_CONFIG = {"image_model": "wan2.1", "model_type": "t2v", "dim": 32, "ffn_dim": 64, "freq_dim": 32, "text_dim": 32,
              "num_heads": 2, "num_layers": 1, "in_dim": 16, "out_dim": 16, "patch_size": (1, 2, 2), "text_len": 8}


def make_wan_model(seed: int = 0):
    """A tiny Wan 2.1 text-to-video ``model_base.WAN21`` ModelPatcher (a VIDEO model: latents (B, C, T, H, W)),
    for the refusals: TokenFlow edits with image models."""
    return _patcher(comfy.supported_models.WAN21_T2V(dict(WAN_CONFIG)), seed, torch.float32)
