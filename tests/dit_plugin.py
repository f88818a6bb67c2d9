"""A made-up tiny joint-attention DiT and its family adapter: what another DiT family has to write.

The model is no ComfyUI class: a few joint text+image blocks that call the host's attention with
``transformer_options`` and honour ``patches_replace["dit"][("double_block", i)]``, as Flux and
SD3 do. Its family adapter is one :class:`DiTFamily` entry; the engine is not changed for it.
"""
from __future__ import annotations

import torch
from torch import nn

import comfy.latent_formats
import comfy.model_base
import comfy.model_patcher
import comfy.supported_models_base
from comfy.ldm.modules.attention import optimized_attention
from comfyui_tokenflow.engine.families.dit import DiTFamily

CPU = torch.device("cpu")
CONTEXT = 16


class _Block(nn.Module):
    def __init__(self, hidden: int, heads: int, operations) -> None:
        super().__init__()
        self.heads = heads
        self.norm = operations.LayerNorm(hidden, elementwise_affine=False)
        self.qkv = operations.Linear(hidden, 3 * hidden)
        self.out = operations.Linear(hidden, hidden)
        self.mlp = nn.Sequential(operations.Linear(hidden, 2 * hidden), nn.GELU(), operations.Linear(2 * hidden, hidden))

    def forward(self, txt, img, vec, transformer_options={}):
        x = torch.cat([txt, img], 1) + vec[:, None]
        q, k, v = self.qkv(self.norm(x)).chunk(3, -1)
        x = x + self.out(optimized_attention(q, k, v, self.heads, transformer_options=transformer_options))
        x = x + self.mlp(self.norm(x))
        return x[:, :txt.shape[1]], x[:, txt.shape[1]:]


class TinyJointDiT(nn.Module):
    """Joint attention over cat(text, image) tokens, 1x1 patches, a velocity output."""

    def __init__(self, in_channels: int = 4, hidden: int = 32, heads: int = 2, depth: int = 2, dtype=None,
                 device=None, operations=None, **kwargs) -> None:
        super().__init__()
        self.dtype, self.patch_size = dtype, 1
        self.img_in = operations.Linear(in_channels, hidden)
        self.context_embedder = operations.Linear(CONTEXT, hidden)
        self.time_in = operations.Linear(1, hidden)
        self.double_blocks = nn.ModuleList([_Block(hidden, heads, operations) for _ in range(depth)])
        self.final = operations.Linear(hidden, in_channels)

    def forward(self, x, timesteps, context=None, transformer_options={}, **kwargs):
        b, c, h, w = x.shape
        img = self.img_in(x.flatten(2).transpose(1, 2))
        txt = self.context_embedder(context)
        vec = self.time_in(timesteps.to(img.dtype)[:, None] / 1000)
        replace = transformer_options.get("patches_replace", {}).get("dit", {})
        for i, block in enumerate(self.double_blocks):
            if ("double_block", i) in replace:
                def original(args, block=block):
                    txt_out, img_out = block(args["txt"], args["img"], args["vec"], args["transformer_options"])
                    return {"txt": txt_out, "img": img_out}
                out = replace[("double_block", i)]({"txt": txt, "img": img, "vec": vec,
                                                    "transformer_options": transformer_options},
                                                   {"original_block": original})
                txt, img = out["txt"], out["img"]
            else:
                txt, img = block(txt, img, vec, transformer_options)
        return self.final(img).transpose(1, 2).reshape(b, c, h, w)


class TinyDiTConfig(comfy.supported_models_base.BASE):
    unet_config: dict = {}
    latent_format = comfy.latent_formats.SD15
    sampling_settings = {"shift": 1.0}
    memory_usage_factor = 1.0
    supported_inference_dtypes = [torch.float32]


def make_tiny_dit(seed: int = 0, dtype: torch.dtype = torch.float64) -> comfy.model_patcher.ModelPatcher:
    config = TinyDiTConfig({})
    config.set_inference_dtype(torch.float32, None)
    model = comfy.model_base.BaseModel(config, model_type=comfy.model_base.ModelType.FLOW, device=CPU,
                                       unet_model=TinyJointDiT)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.diffusion_model.named_parameters():
            scale = 0.0 if name.endswith("bias") else 1.0 / param.shape[-1] ** 0.5
            param.copy_(torch.randn(param.shape, generator=generator) * scale)
    model.diffusion_model.to(dtype)
    model.diffusion_model.dtype = dtype
    return comfy.model_patcher.ModelPatcher(model, load_device=CPU, offload_device=CPU)


def conditioning(seed: int, dtype: torch.dtype = torch.float64) -> list:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 6, CONTEXT, generator=g).to(dtype), {}]]


# The whole family adapter: which class, which blocks, how many image tokens, where PnP injects.
TINY_DIT = DiTFamily(
    name="tinydit", model_class="dit_plugin.TinyJointDiT",
    blocks=lambda dm: tuple(("double_block", i, 0) for i in range(len(dm.double_blocks))),
    image_tokens=lambda dm, h, w: h * w, pnp_attention=lambda blocks: blocks[-1:], pnp_injects="kv",
    pnp_source="Stable Flow style key/value swap in the last block (a test family)",
    width=lambda dm: int(dm.img_in.out_features))
