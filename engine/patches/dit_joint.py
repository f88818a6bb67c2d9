"""The Keyframe Joint Edit on a flow-matching transformer (Flux, SD3.x): extended attention across the batch.

The clone the TokenFlow Keyframe Joint Edit node returns is sampled by the core samplers (KSampler,
SamplerCustom) on a batch of frames; each of its calls is a :attr:`~.contract.Phase.JOINT` pass. In every
attention the family adapter declares, each frame's IMAGE queries attend to its own text keys/values plus
the image keys/values of every frame of the batch (:func:`~.dit_kernel.extended_image_attention`, the
TokenFlow keyframe pass's joint attention); text queries attend as in plain sampling. Each cond/uncond chunk
of a call is its own batch of frames. Identical frames give the single-frame sample (the own text is
repeated once per frame, which keeps plain attention's text/image balance).
"""
from __future__ import annotations

import torch

from .contract import PassContext, chunk_count
from .dit_kernel import Kernel, extended_image_attention, merge_heads, to_heads


def joint_attention(func, q, k, v, heads: int, kwargs: dict, ctx: PassContext, declared: bool) -> torch.Tensor:
    """One attention call of a joint pass: image queries of a declared call see every frame's image tokens."""
    if not declared:
        return func(q, k, v, heads, **kwargs)
    if kwargs.get("mask") is not None or kwargs.get("skip_output_reshape"):
        raise RuntimeError("TokenFlow Keyframe Joint Edit: attention masks (ConditioningSetMask / attention_mask) "
                           "are not supported on DiT models; remove the mask from the conditioning")
    skip = bool(kwargs.get("skip_reshape", False))
    kernel = Kernel(func, heads, kwargs)
    n_img = int(ctx.image_tokens)
    chunks = chunk_count(kwargs.get("transformer_options") or {})  # cond / uncond: each chunk is a batch of frames
    parts = [to_heads(t, heads, skip).unflatten(0, (chunks, -1)).unbind(0) for t in (q, k, v)]
    # Each chunk is one branch of K frames attending to its own frames' image tokens (nothing injected).
    return merge_heads(torch.cat([extended_image_attention(qc, kc, vc, None, "", kernel, n_img, 1)
                                  for qc, kc, vc in zip(*parts)]))
