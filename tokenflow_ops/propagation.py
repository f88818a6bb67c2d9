"""Giving every frame its keyframes' outputs through the nearest-neighbour fields (spec 3.3)."""
from __future__ import annotations

import torch


def gather_base(branch_rows: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Row of each (branch, frame, slot) keyframe in a stack of keyframe values: (C, F, 2).

    branch_rows: (C,) the first keyframe row of each branch in the stack (``branch * K``);
    slots: (F, 2) keyframe slots. Prepared once per call; :func:`propagate` scales it by the
    block's token count.
    """
    return branch_rows[:, None, None] + slots[None]


def propagate(keyframe_values: torch.Tensor, fields: torch.Tensor, base: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Blend of gathered keyframe values for a set of frames in every branch at once.

    keyframe_values: (R, M, d) keyframe token values (e.g. self-attention outputs), R keyframe
    rows over all branches; fields: (F, 2, N) matched token index in each slot's keyframe;
    base: (C, F, 2) keyframe row per branch, frame and slot (:func:`gather_base`);
    weights: (F, 2). Returns (C, F, N, d) = w0 * values[row0][field0] + w1 * values[row1][field1]
    (a frame with one keyframe has w1 = 0 and the same row twice). Two gathers, no loop.
    """
    rows, m, d = keyframe_values.shape
    c, f = base.shape[:2]
    index = (base * m).unsqueeze(-1) + fields.unsqueeze(0)  # (C, F, 2, N)
    gathered = keyframe_values.reshape(rows * m, d).index_select(0, index.flatten()).view(c, f, 2, -1, d)
    w = weights.to(device=keyframe_values.device, dtype=keyframe_values.dtype, non_blocking=True).view(1, f, 2, 1, 1)
    return gathered[:, :, 0] * w[:, :, 0] + gathered[:, :, 1] * w[:, :, 1]
