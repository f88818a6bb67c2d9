"""Giving every frame its keyframes' outputs through the nearest-neighbour fields (spec 3.3)."""
from __future__ import annotations

import torch


def propagate(keyframe_values: torch.Tensor, fields: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Blend of gathered keyframe values for a set of frames.

    keyframe_values: (K, M, d) per-keyframe token values (e.g. self-attention outputs);
    fields: (F, 2, N) matched token index in each slot's keyframe; slots: (F, 2) keyframe slot
    indices; weights: (F, 2). Returns (F, N, d) = w0 * values[slot0][field0] + w1 * values[slot1][field1],
    with the second gather skipped for frames whose second weight is zero.
    """
    k, m, d = keyframe_values.shape
    flat = keyframe_values.reshape(k * m, d)
    rows = (weights[:, 1] != 0).nonzero().flatten()  # decided on the (CPU) weights: no device sync
    slots = slots.to(fields.device)
    first = flat.index_select(0, (slots[:, 0:1] * m + fields[:, 0].long()).flatten()).view(fields.shape[0], -1, d)
    if rows.numel() == 0:
        return first
    w = weights.to(device=keyframe_values.device, dtype=keyframe_values.dtype)
    rows = rows.to(keyframe_values.device)
    second = flat.index_select(0, (slots[rows, 1:2] * m + fields[rows, 1].long()).flatten()).view(rows.numel(), -1, d)
    out = first.clone()
    out[rows] = w[rows, 0, None, None] * first[rows] + w[rows, 1, None, None] * second
    return out
