"""The real models of the dry run: ComfyUI's own model classes and configs, weights on fake tensors.

UNet configs are ComfyUI's own: the ``SD15`` / ``SD21`` / ``SDXL`` dicts of
``comfy.model_detection.unet_config_from_diffusers_unet`` read from the host's source; DiT configs are what
``comfy.model_detection.detect_unet_config`` gives the released checkpoints (Flux.1-dev / schnell, SD3.5 Large /
Medium), completed for this host's ``FluxParams`` by ``devkit/tiny_dit_models.flux_config``. The model class is the
one ``comfy.model_detection.model_config_from_unet_config`` matches, its dtype ComfyUI's choice
(``unet_dtype`` / ``unet_manual_cast``) for the asked weight dtype; it is built on the meta device and every
parameter then becomes a fake host tensor (the weights a checkpoint loader leaves in RAM), counted as weights.
"""
from __future__ import annotations

import ast
import inspect
from typing import Any

import torch

import comfy.cldm.cldm
import comfy.controlnet
import comfy.model_detection
import comfy.model_management
import comfy.model_patcher
import comfy.ops
import tiny_dit_models

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}
MODELS = ("sd15", "sd21", "sdxl", "flux-dev", "flux-schnell", "sd35-large", "sd35-medium")
# Text conditioning as the checkpoints' text encoders give it: (tokens, width, pooled width, extra).
TEXT = {"sd15": (77, 768, None), "sd21": (77, 1024, None), "sdxl": (77, 2048, 1280),
        "flux-dev": (256, 4096, 768), "flux-schnell": (256, 4096, 768),
        "sd35-large": (154, 4096, 2048), "sd35-medium": (154, 4096, 2048)}
CFG = {"sd15": 7.5, "sd21": 7.5, "sdxl": 7.5, "flux-dev": 1.0, "flux-schnell": 1.0, "sd35-large": 4.0,
       "sd35-medium": 4.0}
LATENT_CHANNELS = {"sd15": 4, "sd21": 4, "sdxl": 4}  # DiTs: 16


def _diffusers_unet_configs() -> dict[str, dict[str, Any]]:
    """The UNet config dicts ComfyUI's model detection lists (SD15, SD21, SDXL), read from the host's source."""
    tree = ast.parse(inspect.getsource(comfy.model_detection.unet_config_from_diffusers_unet))
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
            name = getattr(node.targets[0], "id", None)
            if name in ("SD15", "SD21", "SDXL"):
                found[name] = ast.literal_eval(_names_as_none(node.value))
    return found


def _names_as_none(node: ast.expr) -> ast.expr:
    """The config literal with its variable references (``dtype``) as None, so ``ast.literal_eval`` reads it."""
    class Names(ast.NodeTransformer):
        def visit_Name(self, name: ast.Name) -> ast.AST:
            return ast.copy_location(ast.Constant(None), name)

    return ast.fix_missing_locations(Names().visit(node))


def unet_config(name: str) -> dict[str, Any]:
    if name in ("sd15", "sd21", "sdxl"):
        config = dict(_diffusers_unet_configs()[name.upper()])
        config.pop("dtype", None)
        return config
    if name.startswith("flux"):
        return tiny_dit_models.flux_config(vec_in_dim=768, context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0,
                                           num_heads=24, depth=19, depth_single_blocks=38, axes_dim=[16, 56, 56],
                                           guidance_embed=name == "flux-dev")
    depth, max_size, self_attn = (38, 192, []) if name == "sd35-large" else (24, 384, list(range(13)))
    return {"in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": depth, "num_patches": max_size ** 2,
            "pos_embed_max_size": max_size, "adm_in_channels": 2048, "pos_embed_scaling_factor": None,
            "context_embedder_config": {"target": "torch.nn.Linear",
                                        "params": {"in_features": 4096, "out_features": 64 * depth}},
            "qk_norm": "rms", "x_block_self_attn_layers": self_attn}


def _fake_parameters(module: torch.nn.Module, fake_mode, track) -> None:
    """Every meta parameter / buffer of ``module`` becomes a fake host tensor of its shape and dtype."""
    with fake_mode:
        for sub in module.modules():
            for store in (sub._parameters, sub._buffers):
                for key, value in list(store.items()):
                    if value is None or value.device.type != "meta":
                        continue
                    fake = torch.empty(value.shape, dtype=value.dtype, device="cpu")
                    track(fake)
                    store[key] = torch.nn.Parameter(fake, requires_grad=False) if isinstance(
                        value, torch.nn.Parameter) else fake


def build(name: str, dtype: str, fake_mode, track) -> comfy.model_patcher.ModelPatcher:
    """The ModelPatcher a checkpoint loader gives for ``name`` with ``dtype`` weights, weights fake on the host."""
    config = unet_config(name)
    model_config = comfy.model_detection.model_config_from_unet_config(config)
    if model_config is None:
        raise SystemExit(f"this host's model detection matches no model class for {name}")
    device = comfy.model_management.get_torch_device()
    weight = DTYPES[dtype]
    supported = list(model_config.supported_inference_dtypes)
    manual_cast = comfy.model_management.unet_manual_cast(weight, device, supported)
    model_config.set_inference_dtype(weight, manual_cast)
    model = model_config.get_model({}, device=torch.device("meta"))
    _fake_parameters(model, fake_mode, track)
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=device,
                                            offload_device=comfy.model_management.unet_offload_device())


def build_controlnet(name: str, patcher, fake_mode, track) -> comfy.controlnet.ControlNet:
    """One cldm ControlNet for a UNet model (the layout ``comfy.controlnet.load_controlnet`` builds), fake weights."""
    model_config = patcher.model.model_config
    config = dict(model_config.unet_config)
    config.pop("out_channels", None)
    weight, manual_cast = config.get("dtype"), model_config.manual_cast_dtype
    operations = comfy.ops.pick_operations(weight, manual_cast, disable_fast_fp8=True)
    with torch.device("meta"):
        control_model = comfy.cldm.cldm.ControlNet(hint_channels=3, operations=operations, device=torch.device("meta"),
                                                   **config)
    _fake_parameters(control_model, fake_mode, track)
    control_model.eval()
    return comfy.controlnet.ControlNet(control_model, load_device=patcher.load_device, manual_cast_dtype=manual_cast)


def conditioning(name: str, seed: int, size: int) -> list:
    """CLIPTextEncode's output for the model (FluxGuidance 3.5 on Flux-dev), real host tensors."""
    tokens, width, pooled = TEXT[name]
    g = torch.Generator().manual_seed(seed)
    extra: dict[str, Any] = {}
    if pooled:
        extra["pooled_output"] = torch.randn(1, pooled, generator=g)
    if name == "flux-dev":
        extra["guidance"] = 3.5
    if name == "sdxl":
        extra.update(width=size, height=size, target_width=size, target_height=size)
    return [[torch.randn(1, tokens, width, generator=g), extra]]
