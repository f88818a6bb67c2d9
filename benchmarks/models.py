"""Random-weight SD1.5-architecture models for the benchmarks (real ComfyUI classes, no checkpoints).

Three sizes, all with the real SD1.x block layout (``devkit/tiny_models.py``: transformer blocks at
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
``dtype`` (``bench_tokenflow.py --dtype``) forces one, also on a CPU, where it checks the reduced-
precision code path (the ControlNet's ``dtype`` attribute must follow its weights, see
:func:`make_controlnet`).
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


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(size: str, device: str, dtype: str = "auto") -> tuple[torch.dtype, torch.dtype | None]:
    """(weight dtype, ComfyUI's manual-cast compute dtype or None) for a model on ``device``.

    ``auto``: float32 on a CPU, ComfyUI's own choice on CUDA (``model_management.unet_dtype``: fp16
    on most GPUs). A named dtype is used as is (on a CPU without manual cast: a CPU check of the
    fp16/bf16 code path), with ComfyUI's manual cast on CUDA where the device needs it.
    """
    load = load_device(device)
    supported = comfy.supported_models.SD15.supported_inference_dtypes
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"dtype must be auto or one of {tuple(DTYPES)}, got {dtype!r}")
    if load.type == "cpu":
        return (torch.float32 if dtype == "auto" else DTYPES[dtype]), None
    if dtype == "auto":
        weight = comfy.model_management.unet_dtype(model_params=APPROX_PARAMS[size], supported_dtypes=supported,
                                                   device=load)
    else:
        weight = DTYPES[dtype]
    return weight, comfy.model_management.unet_manual_cast(weight, load, supported)


def make_unet(size: str, device: str = "cpu", seed: int = 0, dtype: str = "auto") -> comfy.model_patcher.ModelPatcher:
    """A random-weight SD1.5-layout eps model as a ModelPatcher (float32 on CPU, ComfyUI's dtype on CUDA)."""
    load = load_device(device)
    weight_dtype, manual_cast = resolve_dtype(size, device, dtype)
    model_config = _model_config(size, weight_dtype, manual_cast)
    model = model_config.get_model({}, device=torch.device("cpu"))
    tiny_models.init_weights(model.diffusion_model, seed)
    model.eval()
    offload = torch.device("cpu") if load.type == "cpu" else comfy.model_management.unet_offload_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=load, offload_device=offload)


def make_controlnet(size: str, device: str = "cpu", seed: int = 1, dtype: str = "auto") -> comfy.controlnet.ControlNet:
    """A random-weight cldm ControlNet matching :func:`make_unet` (hint: IMAGE 8x the latent), non-zero zero-convs.

    Built as ``comfy.controlnet.load_controlnet`` builds one: the model's ``dtype`` attribute (which
    ComfyUI casts the ControlNet's inputs to) is its weight dtype, its operations are ComfyUI's
    choice for that dtype, and the manual-cast dtype goes to the ``ControlNet`` wrapper.
    """
    load = load_device(device)
    weight_dtype, manual_cast = resolve_dtype(size, device, dtype)
    config = dict(_model_config(size, weight_dtype, manual_cast).unet_config)  # its "dtype" is weight_dtype
    config.pop("out_channels")
    operations = comfy.ops.pick_operations(weight_dtype, manual_cast, disable_fast_fp8=True)
    config.update(hint_channels=3, operations=operations, device=torch.device("cpu"))
    control_model = comfy.cldm.cldm.ControlNet(**config)
    tiny_models.init_weights(control_model, seed)
    control_model.eval()
    check_controlnet_dtype(control_model)
    return comfy.controlnet.ControlNet(control_model, load_device=load, manual_cast_dtype=manual_cast)


def check_controlnet_dtype(control_model: torch.nn.Module) -> None:
    """ComfyUI feeds a ControlNet inputs of its ``dtype`` attribute: it must be its weights' dtype."""
    weights = {p.dtype for p in control_model.parameters()}
    if weights != {control_model.dtype}:
        raise RuntimeError(f"ControlNet dtype attribute {control_model.dtype} but weights {sorted(map(str, weights))}")


def parameter_count(model: comfy.model_patcher.ModelPatcher) -> int:
    return sum(p.numel() for p in model.model.diffusion_model.parameters())
