"""Nearest-neighbour fields between frame tokens and keyframe tokens.

The TokenFlow correspondences of the paper (Geyer et al., ICLR 2024); the official
tokenflow_utils.py ``make_tokenflow_attention_block`` computes them with util.py
``batch_cosine_sim`` and an argmax.

``gamma[p] = argmax_q cos(phi_frame[p], phi_key[q])``. The search is chunked so that no
similarity block larger than ``max_elements`` entries ever exists, whatever the number of
frames or the token count; each chunk covers as many (frame, keyframe) pairs as fit, so a
whole clip is searched in a few large batched matmuls.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .keyframes import FramePairing

DEFAULT_MAX_ELEMENTS = 1 << 26  # 64M similarities (256 MiB: computed in at least float32) per chunk


def unit_tokens(x: torch.Tensor) -> torch.Tensor:
    """Tokens scaled to unit length (cosine similarity becomes a dot product)."""
    # Same normalisation as the official batch_cosine_sim (no epsilon clamp).
    return x / x.norm(dim=-1, keepdim=True)


def field_dtype(tokens_per_frame: int) -> torch.dtype:
    """Compact storage type for token indices."""
    return torch.int16 if tokens_per_frame <= torch.iinfo(torch.int16).max else torch.int32


@dataclass(frozen=True)
class PairPlan:
    """The (frame row, keyframe slot) searches a set of frames needs, decided on the CPU.

    A frame whose two slots are the same keyframe needs one search, not two. ``rows``/``slots``:
    the frame row and keyframe slot of each distinct pair (P,); ``where``: for every (frame,
    column) the pair that answers it (F, 2). Built once per call and moved to the device once.
    """

    rows: torch.Tensor
    slots: torch.Tensor
    where: torch.Tensor

    def to(self, device: torch.device, non_blocking: bool = True) -> "PairPlan":
        # Host-built indices go over without a stream synchronisation where the device allows it.
        return PairPlan(*(t.to(device, non_blocking=non_blocking) for t in (self.rows, self.slots, self.where)))


def pair_plan(slots: torch.Tensor) -> PairPlan:
    """:class:`PairPlan` of frames whose keyframe slots are ``slots`` (F, 2)."""
    first, other = slots.cpu().long().unbind(1)
    rows = torch.arange(first.shape[0])
    second = other != first
    # The second searches come after the F first ones, in frame order (no host read of their count).
    where = torch.stack([rows, torch.where(second, second.cumsum(0) + (first.shape[0] - 1), rows)], 1)
    return PairPlan(torch.cat([rows, rows[second]]), torch.cat([first, other[second]]), where)


def pair_nearest_neighbours(frame_units: torch.Tensor, key_units: torch.Tensor, plan: PairPlan,
                            max_elements: int = DEFAULT_MAX_ELEMENTS) -> torch.Tensor:
    """Nearest neighbours of every token of frame ``plan.rows[p]`` in keyframe ``plan.slots[p]``.

    frame_units: (F, N, d) and key_units: (K, M, d), both unit-normalised; ``plan`` on their
    device. Returns (P, N) long. Pairs are searched in batches of as many as fit in
    ``max_elements`` similarities; a single pair larger than that is split over its tokens.
    """
    n, m = frame_units.shape[1], key_units.shape[1]
    pairs = plan.rows.shape[0]
    keys_t = key_units.transpose(1, 2)  # (K, d, M)

    def select(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        # Similarities in at least float32: a bf16 dot product keeps 8 mantissa bits, so the nearest
        # neighbour would often be a tie broken by rounding. Stored tokens keep their dtype; only the
        # selected batch is promoted.
        return similarity_operand(tokens.index_select(0, index))

    per_chunk = max_elements // max(1, n * m)
    if per_chunk >= pairs:  # the common case: one batched matmul for the whole call
        return torch.bmm(select(frame_units, plan.rows), select(keys_t, plan.slots)).argmax(dim=-1)
    out = torch.empty(pairs, n, dtype=torch.long, device=frame_units.device)
    if per_chunk >= 1:
        for start in range(0, pairs, per_chunk):
            stop = start + per_chunk
            queries = select(frame_units, plan.rows[start:stop])
            out[start:stop] = torch.bmm(queries, select(keys_t, plan.slots[start:stop])).argmax(dim=-1)
        return out
    tokens = max(1, max_elements // max(1, m))  # one pair does not fit: split its tokens
    for p in range(pairs):  # index_select with device indices: no host read
        query = select(frame_units, plan.rows[p:p + 1])[0]
        key = select(keys_t, plan.slots[p:p + 1])[0]
        for start in range(0, n, tokens):
            out[p, start:start + tokens] = (query[start:start + tokens] @ key).argmax(dim=-1)
    return out


def similarity_operand(tokens: torch.Tensor) -> torch.Tensor:
    """``tokens`` in a dtype of at least float32's precision (float32 and float64 pass unchanged)."""
    return tokens if tokens.dtype in (torch.float32, torch.float64) else tokens.float()


def frame_fields(frame_tokens: torch.Tensor, frame_ids: torch.Tensor, keyframe_tokens: torch.Tensor,
                 pairing: FramePairing, max_elements: int = DEFAULT_MAX_ELEMENTS, plan: PairPlan | None = None,
                 keys_are_unit: bool = False) -> torch.Tensor:
    """Nearest-neighbour fields of some frames against their paired keyframes.

    frame_tokens: (F, N, d) tokens of the frames ``frame_ids`` (global indices, CPU);
    keyframe_tokens: (K, M, d) tokens of the step's keyframes (slot order), already unit length
    when ``keys_are_unit``. ``plan``: the frames' :class:`PairPlan` on the tokens' device (built
    here when not given). Returns (F, 2, N) long: for each frame and each of its two slots, the
    matched token of that slot's keyframe; a frame with a single keyframe gets the same field twice.
    """
    if plan is None:
        plan = pair_plan(pairing.slots[frame_ids.cpu()]).to(frame_tokens.device)
    keys = keyframe_tokens if keys_are_unit else unit_tokens(keyframe_tokens)
    return pair_nearest_neighbours(unit_tokens(frame_tokens), keys, plan, max_elements)[plan.where]
