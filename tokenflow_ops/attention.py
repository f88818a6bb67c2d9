"""Extended (joint keyframe) self-attention on top of a fused attention kernel.

The joint keyframe editing of the TokenFlow paper (Geyer et al., ICLR 2024), as the official
tokenflow_utils.py ``register_extended_attention`` / ``register_extended_attention_pnp`` do it.

Every keyframe's queries attend to the keys/values of ALL keyframes of the same branch. Since
all keyframes share one key set, the K keyframes are folded into a single sequence of K*N
tokens and one fused attention call does the work: no per-keyframe copy of keys or values is
ever made (the official code repeats them K times). Several branches go through the same
call as its batch.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

# attention_fn(q, k, v, heads) -> out, all (B, T, heads*dim_head): ComfyUI's optimized_attention signature.
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Reference multi-head attention with PyTorch's fused SDPA; (B, T, H*D) in and out."""
    b, _, inner = q.shape
    dim_head = inner // heads
    q, k, v = (t.view(b, -1, heads, dim_head).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(b, -1, inner)


def extended_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                       attention_fn: AttentionFn = sdpa_attention) -> torch.Tensor:
    """Joint attention of K frames: q, k, v ([C,] K, N, H*D) -> ([C,] K, N, H*D).

    Frame i's output is softmax(q_i [k_0 .. k_{K-1}]^T) [v_0 .. v_{K-1}], separately for each of
    the C branches of the leading dimension. With K = 1 this is ordinary self-attention.
    """
    *lead, frames, tokens, inner = q.shape
    batch = 1
    for size in lead:
        batch *= size
    out = attention_fn(q.reshape(batch, frames * tokens, inner), k.reshape(batch, -1, inner),
                       v.reshape(batch, -1, inner), heads)
    return out.reshape(q.shape)
