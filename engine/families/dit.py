"""Flow-matching transformer families (Flux, SD3.x) as adapters of the shared family registry.

A :class:`DiTFamily` declares, for one ComfyUI diffusion-model class:

- ``blocks``: every attention that carries image tokens, as ``(host block kind, block id, call)``
  keys. The first two name the host's ``patches_replace["dit"][(kind, id)]`` entry; ``call`` is
  the attention call inside that block (SD3.5's image-only second attention is call 1).
- ``image_tokens``: how many image tokens a latent of (h, w) gives. In every declared attention
  the image tokens are the LAST ones (Flux: ``cat(txt, img)``; SD3: ``cat(context, x)``; SD3.5's
  second attention holds image tokens only), so the split is the same rule for every family.
- ``pnp_attention``: the default blocks of Plug-and-Play-style source injection (``auto``), with the method
  cited (:attr:`pnp_source`) and what it injects (:attr:`pnp_injects`: "v" or "kv" of the image tokens);
  ``presets``: the named injection presets of :mod:`.injection_presets` (Flux: ``rf_solver``, the default,
  and ``stable_flow``), values of ``pnp_attention_blocks`` like ``auto``.
- the sampling rule: CONST (rectified flow) on the model's own sigmas.

Another DiT family is one more :class:`DiTFamily` in :data:`.registry.FAMILIES`.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch

import comfy.model_sampling

from .base import FLOW, AttentionSize, BlockKey, ModelLayout
from .injection_presets import RF_SOLVER, SD3_HEURISTIC, STABLE_FLOW, InjectionPreset

log = logging.getLogger(__name__)


def _class_named(path: str) -> type | None:
    module_name, _, name = path.rpartition(".")
    try:
        module = __import__(module_name, fromlist=[name])
    except ImportError:  # pragma: no cover - a host without this model family
        return None
    return getattr(module, name, None)


@dataclass(frozen=True)
class DiTFamily:
    name: str
    model_class: str  # dotted path of the ComfyUI diffusion model class this family claims
    blocks: Callable[[torch.nn.Module], tuple[BlockKey, ...]]
    image_tokens: Callable[[torch.nn.Module, int, int], int]
    pnp_attention: Callable[[tuple[BlockKey, ...]], tuple[BlockKey, ...]]
    pnp_injects: str  # "v": the source's image-token values; "kv": its image-token keys and values
    pnp_source: str  # the method the default injection follows
    # Named values of pnp_attention_blocks; ``auto`` is (pnp_attention, pnp_injects), listed here under its method's
    # name where it has one (Flux: rf_solver).
    presets: tuple[InjectionPreset, ...] = ()
    # Heads x head dim of every declared attention, read off the model (the planner's byte counts).
    width: Callable[[torch.nn.Module], int] = lambda dm: int(dm.hidden_size)

    def claims(self, model_patcher) -> bool:
        cls = _class_named(self.model_class)
        return cls is not None and isinstance(getattr(model_patcher.model, "diffusion_model", None), cls)

    def describe(self, model_patcher) -> ModelLayout:
        dm = model_patcher.model.diffusion_model
        sampling = model_patcher.get_model_object("model_sampling")
        if not isinstance(sampling, comfy.model_sampling.CONST):
            raise ValueError(f"model: this {self.name} model's sampling is {type(sampling).__name__}, not the "
                             "rectified-flow (CONST) sampling TokenFlow's flow path needs; remove the "
                             "sampling-patch node (ModelSamplingDiscrete/...) in front of the TokenFlow nodes")
        if getattr(dm, "params", None) is not None and getattr(dm.params, "in_channels", 16) != \
                getattr(dm.params, "out_channels", 16):
            raise ValueError(f"model: this {self.name} model takes extra input channels (an inpainting, Fill or "
                             "control-LoRA model); use the plain text-to-image checkpoint")
        blocks = self.blocks(dm)
        return ModelLayout(self.name, "flow", blocks, self.pnp_attention(blocks), (), sampling=FLOW, adapter=self)

    def attention_sizes(self, diffusion_model, latent_shape: tuple[int, ...], text_tokens: int
                        ) -> tuple[AttentionSize, ...]:
        """Every declared attention: the image tokens of a frame, the model's width, and ``text_tokens`` beside them
        in the joint attention (none in SD3.5's image-only second attention)."""
        h, w = latent_shape[-2:]
        n_img = self.image_tokens(diffusion_model, int(h), int(w))
        width = int(self.width(diffusion_model))
        return tuple(AttentionSize(block, n_img, width, text_tokens if block[2] == 0 else 0)
                     for block in self.blocks(diffusion_model))

    def image_token_count(self, model_patcher, latent_shape: tuple[int, ...]) -> int:
        h, w = latent_shape[-2:]
        return self.image_tokens(model_patcher.model.diffusion_model, int(h), int(w))


def _patched_tokens(dm: torch.nn.Module, h: int, w: int) -> int:
    p = int(dm.patch_size)
    return math.ceil(h / p) * math.ceil(w / p)


def _sd3_width(dm: torch.nn.Module) -> int:
    attn = dm.joint_blocks[0].x_block.attn
    return int(attn.num_heads * attn.head_dim)


def _flux_blocks(dm: torch.nn.Module) -> tuple[BlockKey, ...]:
    return (tuple(("double_block", i, 0) for i in range(len(dm.double_blocks)))
            + tuple(("single_block", i, 0) for i in range(len(dm.single_blocks))))


def _sd3_blocks(dm: torch.nn.Module) -> tuple[BlockKey, ...]:
    keys: list[BlockKey] = []
    for i, block in enumerate(dm.joint_blocks):
        keys.append(("double_block", i, 0))
        if getattr(block.x_block, "x_block_self_attn", False):
            keys.append(("double_block", i, 1))  # SD3.5's image-only second attention
    return tuple(keys)


FLUX = DiTFamily(
    name="flux", model_class="comfy.ldm.flux.model.Flux", blocks=_flux_blocks, image_tokens=_patched_tokens,
    pnp_attention=RF_SOLVER.blocks, pnp_injects=RF_SOLVER.injects,
    pnp_source="RF-Solver-Edit (Wang et al. 2024): share the source's attention values V in single blocks 20..37 of 38",
    presets=(RF_SOLVER, STABLE_FLOW))
SD3 = DiTFamily(
    name="sd3", model_class="comfy.ldm.modules.diffusionmodules.mmdit.OpenAISignatureMMDITWrapper",
    blocks=_sd3_blocks, image_tokens=_patched_tokens, pnp_attention=SD3_HEURISTIC.blocks, width=_sd3_width,
    pnp_injects=SD3_HEURISTIC.injects,
    pnp_source="a heuristic with Stable Flow's injection (Avrahami et al. 2025): swap image keys/values in the joint "
               "blocks of the second quarter (no published vital layers for SD3.x)")

DIT_FAMILIES: tuple[DiTFamily, ...] = (FLUX, SD3)
