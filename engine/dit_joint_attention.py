"""The Keyframe Joint Edit on a flow-matching transformer (Flux, SD3.x): extended attention across the batch.

The clone the TokenFlow Keyframe Joint Edit node returns for a DiT is sampled by the core samplers
(KSampler, SamplerCustom) on a batch of frames. In every attention the family adapter declares,
each frame's IMAGE queries attend to its own text keys/values plus the image keys/values of every
frame of the batch (:func:`~.dit_attention._extended`, the TokenFlow keyframe pass's joint
attention); text queries attend as in plain sampling. Each cond/uncond chunk of a call is its own
batch of frames. Identical frames give the single-frame sample (the own text is repeated once per
frame, which keeps plain attention's text/image balance).

Patch points (the model is a clone, see :func:`install_dit_joint_patches`): a
``patches_replace["dit"]`` entry per declared block that tags its ``transformer_options``, the
``optimized_attention_override`` that acts on tagged calls only, and a keyed ``APPLY_MODEL``
wrapper that tells the override the image-token count of the call's latents.
"""
from __future__ import annotations

import logging

import torch

import comfy.patcher_extension

from .attention_patches import JOINT_KEY
from .dit_attention import _extended, _Kernel, _merge, _to_heads, host_attention, set_attention_override
from .model_support import ModelLayout

log = logging.getLogger(__name__)

JOINT_BLOCK_TAG = "tokenflow_dit_joint_block"
JOINT_IMAGE_TOKENS = "tokenflow_dit_joint_image_tokens"
JOINT_ADAPTER = "tokenflow_dit_joint_adapter"
JOINT_WRAPPER_KEY = "tokenflow_dit_joint"


class JointBlockReplace:
    """``patches_replace["dit"][(kind, id)]``: tag the block's options with its declared attention calls."""

    def __init__(self, kind: str, block_id: int, calls: frozenset[int]) -> None:
        self.block, self.calls = (kind, block_id), calls

    def __call__(self, args: dict, extra: dict) -> dict:
        options = args.get("transformer_options") or {}
        if not options.get(JOINT_KEY) or JOINT_IMAGE_TOKENS not in options:
            return extra["original_block"](args)
        tagged = {**options, JOINT_BLOCK_TAG: {"declared": self.calls, "calls": 0}}
        return extra["original_block"]({**args, "transformer_options": tagged})


def joint_attention_override(func, q, k, v, heads, *args, **kwargs):
    """``optimized_attention_override``: image queries of a tagged call see every frame's image tokens."""
    options = kwargs.get("transformer_options") or {}
    tag = options.get(JOINT_BLOCK_TAG)
    func = host_attention(func, options, joint_attention_override)
    if tag is None or args:
        return func(q, k, v, heads, *args, **kwargs)
    call = tag["calls"]
    tag["calls"] += 1
    if call not in tag["declared"]:
        return func(q, k, v, heads, *args, **kwargs)
    if kwargs.get("mask") is not None or kwargs.get("skip_output_reshape"):
        raise RuntimeError("TokenFlow Keyframe Joint Edit: attention masks (ConditioningSetMask / attention_mask) "
                           "are not supported on DiT models; remove the mask from the conditioning")
    skip = bool(kwargs.get("skip_reshape", False))
    kernel = _Kernel(func, heads, kwargs)
    n_img = int(options[JOINT_IMAGE_TOKENS])
    chunks = len(options.get("cond_or_uncond", [0]))  # cond / uncond: each chunk is one batch of frames
    parts = [_to_heads(t, heads, skip).unflatten(0, (chunks, -1)).unbind(0) for t in (q, k, v)]
    # Each chunk is one branch of K frames attending to its own frames' image tokens (nothing injected).
    return _merge(torch.cat([_extended(qc, kc, vc, None, "", kernel, n_img, 1) for qc, kc, vc in zip(*parts)]))


def joint_image_tokens_wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None,
                               transformer_options={}, **kwargs):
    """APPLY_MODEL wrapper: the image-token count of this call's latents, for the override."""
    adapter = transformer_options.get(JOINT_ADAPTER)
    if adapter is not None and transformer_options.get(JOINT_KEY):
        if kwargs.get("ref_latents") is not None:  # their tokens follow the image tokens: not the adapter's layout
            raise ValueError("positive/negative: the conditioning carries reference latents (Flux Kontext / "
                             "ReferenceLatent), whose tokens TokenFlow Keyframe Joint Edit cannot tell from the "
                             "frames' image tokens; remove the ReferenceLatent node or sample with the plain model")
        dm = executor.class_obj.diffusion_model
        transformer_options = {**transformer_options,
                               JOINT_IMAGE_TOKENS: adapter.image_tokens(dm, int(x.shape[-2]), int(x.shape[-1]))}
    return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)


def install_dit_joint_patches(model_patcher, layout: ModelLayout) -> None:
    """Add the joint attention to a DiT model CLONE (idempotent)."""
    calls: dict[tuple[str, int], set[int]] = {}
    for kind, block_id, call in layout.transformer_blocks:
        calls.setdefault((kind, block_id), set()).add(call)
    for (kind, block_id), block_calls in calls.items():
        model_patcher.set_model_patch_replace(JointBlockReplace(kind, block_id, frozenset(block_calls)), "dit", kind,
                                              block_id)
    options = model_patcher.model_options.setdefault("transformer_options", {})
    set_attention_override(options, joint_attention_override)
    options[JOINT_ADAPTER] = layout.adapter
    options[JOINT_KEY] = True
    wrapper_type = comfy.patcher_extension.WrappersMP.APPLY_MODEL
    model_patcher.remove_wrappers_with_key(wrapper_type, JOINT_WRAPPER_KEY)
    model_patcher.add_wrapper_with_key(wrapper_type, JOINT_WRAPPER_KEY, joint_image_tokens_wrapper)


__all__ = ["install_dit_joint_patches", "joint_attention_override", "JointBlockReplace"]
