"""Random-weight SD1.5-architecture models for the benchmarks (real ComfyUI classes, no checkpoints).

Three sizes, all with the real SD1.x block layout (``tests/tiny_models.py``: transformer blocks at
input 1,2,4,5,7,8, middle, output 3-11; channel_mult 1,2,2,2 for tiny as in the tests, the real
1,2,4,4 for mid and full):

- ``tiny``: model_channels 32, 4 heads, context 32 (the test suite's tiny sd15);
- ``mid``:  model_channels 64, 8 heads, context 768 (CLIP-L width), channel_mult 1,2,4,4: the real
  SD1.5 layout at 1/5 of the width, so that attention/conv/token-count proportions resemble the
  real model while a CPU step stays in seconds;
- ``full``: the SD1.5 UNet itself (model_channels 320, 8 heads, context 768, channel_mult 1,2,4,4;
  ~860M parameters), for GPU runs. Weights are random: timings and memory are those of the real
  architecture, images are noise.

On CUDA the weight dtype is ComfyUI's own choice (``model_management.unet_dtype``: fp16 on most GPUs,
bf16/fp32 where fp16 is not supported) and the ModelPatcher loads to the GPU when sampling starts.
"""
from __future__ import annotations

from typing import Any

import torch

import comfy.cldm.cldm
import comfy.controlnet
import comfy.model_management
import comfy.model_patcher
import comfy.ops
import comfy.supported_models

import tiny_models

MODELS: dict[str, dict[str, Any]] = {
    "tiny": {"model_channels": 32, "num_heads": 4, "context_dim": 32, "channel_mult": [1, 2, 2, 2]},
    "mid": {"model_channels": 64, "num_heads": 8, "context_dim": 768, "channel_mult": [1, 2, 4, 4]},
    "full": {"model_channels": 320, "num_heads": 8, "context_dim": 768, "channel_mult": [1, 2, 4, 4]},
}

APPROX_PARAMS = {"tiny": 2_000_000, "mid": 36_000_000, "full": 860_000_000}  # for ComfyUI's dtype choice only


def unet_config(size: str) -> dict[str, Any]:
    if size not in MODELS:
        raise ValueError(f"model must be one of {tuple(MODELS)}, got {size!r}")
    spec = MODELS[size]
    config = tiny_models.unet_config("sd15", spec["model_channels"], spec["context_dim"])
    config.update(num_heads=spec["num_heads"], num_head_channels=-1, channel_mult=list(spec["channel_mult"]))
    return config


def _model_config(size: str, dtype: torch.dtype, manual_cast: torch.dtype | None):
    config = unet_config(size)
    model_config = comfy.supported_models.SD15(config)
    # BASE.__init__ applies SD15's unet_extra_config (8 heads, -1 head channels): set ours outright.
    model_config.unet_config.update({k: config[k] for k in ("num_heads", "num_head_channels")})
    model_config.set_inference_dtype(dtype, manual_cast)
    return model_config


def load_device(device: str) -> torch.device:
    return torch.device("cpu") if device == "cpu" else comfy.model_management.get_torch_device()


def make_unet(size: str, device: str = "cpu", seed: int = 0) -> comfy.model_patcher.ModelPatcher:
    """A random-weight SD1.5-layout eps model as a ModelPatcher (float32 on CPU, ComfyUI's dtype on CUDA)."""
    load = load_device(device)
    if load.type == "cpu":
        dtype, manual_cast = torch.float32, None
    else:
        supported = comfy.supported_models.SD15.supported_inference_dtypes
        dtype = comfy.model_management.unet_dtype(model_params=APPROX_PARAMS[size], supported_dtypes=supported,
                                                  device=load)
        manual_cast = comfy.model_management.unet_manual_cast(dtype, load, supported)
    model_config = _model_config(size, dtype, manual_cast)
    model = model_config.get_model({}, device=torch.device("cpu"))
    tiny_models.init_weights(model.diffusion_model, seed)
    model.eval()
    offload = torch.device("cpu") if load.type == "cpu" else comfy.model_management.unet_offload_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=load, offload_device=offload)


def make_controlnet(size: str, device: str = "cpu", seed: int = 1) -> comfy.controlnet.ControlNet:
    """A random-weight cldm ControlNet matching :func:`make_unet` (hint: IMAGE 8x the latent), non-zero zero-convs."""
    load = load_device(device)
    config = dict(_model_config(size, torch.float32, None).unet_config)
    config.pop("out_channels")
    config.update(hint_channels=3, operations=comfy.ops.disable_weight_init, device=torch.device("cpu"))
    control_model = comfy.cldm.cldm.ControlNet(**config)
    tiny_models.init_weights(control_model, seed)
    control_model.eval()
    if load.type != "cpu":
        dtype = comfy.model_management.unet_dtype(model_params=APPROX_PARAMS[size], device=load)
        control_model = control_model.to(dtype)
        return comfy.controlnet.ControlNet(control_model, load_device=load, manual_cast_dtype=None)
    return comfy.controlnet.ControlNet(control_model, load_device=load)


def parameter_count(model: comfy.model_patcher.ModelPatcher) -> int:
    return sum(p.numel() for p in model.model.diffusion_model.parameters())
