"""Nearest-neighbour fields between frame tokens and keyframe tokens (spec 3.3).

``gamma[p] = argmax_q cos(phi_frame[p], phi_key[q])``. The search is chunked over query
tokens so that no similarity block larger than ``max_elements`` entries ever exists, whatever
the number of frames or the token count.
"""
from __future__ import annotations

import torch

from .keyframes import FramePairing

DEFAULT_MAX_ELEMENTS = 1 << 24  # 16M similarities (64 MiB in float32) per chunk


def _unit(x: torch.Tensor) -> torch.Tensor:
    # Same normalisation as the official batch_cosine_sim (no epsilon clamp).
    return x / x.norm(dim=-1, keepdim=True)


def nearest_neighbours(queries: torch.Tensor, keys: torch.Tensor, max_elements: int = DEFAULT_MAX_ELEMENTS) -> torch.Tensor:
    """Index of the most cosine-similar key for every query row.

    queries: (..., Q, d); keys: (M, d). Returns (..., Q) long. At most ``max_elements``
    similarities are held at once.
    """
    shape = queries.shape[:-1]
    q = _unit(queries.reshape(-1, queries.shape[-1]))
    k_t = _unit(keys).transpose(0, 1)
    rows = max(1, max_elements // max(1, keys.shape[0]))
    out = torch.empty(q.shape[0], dtype=torch.long, device=queries.device)
    for start in range(0, q.shape[0], rows):
        out[start:start + rows] = (q[start:start + rows] @ k_t).argmax(dim=-1)
    return out.reshape(shape)


def field_dtype(tokens_per_frame: int) -> torch.dtype:
    """Compact storage type for token indices."""
    return torch.int16 if tokens_per_frame <= torch.iinfo(torch.int16).max else torch.int32


def frame_fields(frame_tokens: torch.Tensor, frame_ids: torch.Tensor, keyframe_tokens: torch.Tensor,
                 pairing: FramePairing, max_elements: int = DEFAULT_MAX_ELEMENTS) -> torch.Tensor:
    """Nearest-neighbour fields of some frames against their paired keyframes.

    frame_tokens: (F, N, d) tokens of the frames ``frame_ids`` (global indices);
    keyframe_tokens: (K, M, d) tokens of the step's keyframes (slot order).
    Returns (F, 2, N) long: for each frame and each of its two slots, the matched token of that
    slot's keyframe. A frame with a single keyframe gets the same field in both slots.
    """
    slots = pairing.slots[frame_ids.cpu()].to(frame_tokens.device)  # (F, 2)
    out = torch.empty(frame_tokens.shape[0], 2, frame_tokens.shape[1], dtype=torch.long, device=frame_tokens.device)
    for slot in torch.unique(slots).tolist():
        for column in (0, 1):
            rows = (slots[:, column] == slot).nonzero().flatten()
            if rows.numel() == 0:
                continue
            if column == 1:
                same = slots[rows, 0] == slot  # already computed in column 0
                out[rows[same], 1] = out[rows[same], 0]
                rows = rows[~same]
                if rows.numel() == 0:
                    continue
            out[rows, column] = nearest_neighbours(frame_tokens[rows], keyframe_tokens[slot], max_elements)
    return out
