"""Giving every frame its keyframes' outputs through the nearest-neighbour fields.

The edit propagation of the TokenFlow paper (Geyer et al., ICLR 2024); the official
tokenflow_utils.py ``make_tokenflow_attention_block`` does it with one ``gather`` per keyframe.
"""
from __future__ import annotations

import torch


def gather_base(branch_rows: torch.Tensor, slots: torch.Tensor, tokens: int) -> torch.Tensor:
    """First flat row of each (branch, frame, slot) keyframe in a stack of keyframe values: (C, F, 2, 1).

    branch_rows: (C,) the first keyframe of each branch in the stack (``branch * K``); slots:
    (F, 2) keyframe slots; tokens: the block's tokens per keyframe. Adding a field (F, 2, N)
    gives the flat rows :func:`propagate` gathers. Prepared once per call and token count.
    """
    return ((branch_rows[:, None, None] + slots[None]) * tokens).unsqueeze(-1)


def blend_weights(weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(F, 2) blend weights shaped (1, F, 2, 1, 1) for :func:`propagate`."""
    return weights.to(dtype).view(1, weights.shape[0], 2, 1, 1)


def propagate(keyframe_values: torch.Tensor, fields: torch.Tensor, base: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Blend of gathered keyframe values for a set of frames in every branch at once.

    keyframe_values: (R, M, d) keyframe token values (e.g. self-attention outputs), R keyframe
    rows over all branches; fields: (F, 2, N) matched token index in each slot's keyframe;
    base: (C, F, 2, 1) from :func:`gather_base`; weights: (1, F, 2, 1, 1) from
    :func:`blend_weights`. Returns (C, F, N, d) = w0 * values[row0][field0] + w1 * values[row1][field1]
    (a frame with one keyframe has w1 = 0 and the same row twice). One gather, no loop.
    """
    rows, m, d = keyframe_values.shape
    # embedding: the row gather of index_select with the (C, F, 2, N) index shape kept (one op, no flatten / view)
    gathered = torch.nn.functional.embedding(base + fields, keyframe_values.reshape(rows * m, d))
    return (gathered * weights).sum(2)
