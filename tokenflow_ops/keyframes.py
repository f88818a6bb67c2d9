"""Keyframe plans and keyframe pairing.

The keyframe sampling of the TokenFlow paper (Geyer et al., ICLR 2024): the official
run_tokenflow_pnp.py ``batched_denoise_step`` draws the keyframes, and tokenflow_utils.py
``make_tokenflow_attention_block`` pairs each frame with its batch's keyframe and the previous
batch's and blends the two.

The keyframe plan is the one piece of randomness in TokenFlow. It is a pure function of
``(n_frames, batch_size, steps, seed, mode)`` so a run can be reproduced and compared with
another implementation fed the same indices.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

KEYFRAME_MODES = ("random", "fixed")
BLEND_MODES = ("official", "paper")


def batch_ranges(n_frames: int, batch_size: int) -> list[range]:
    """Consecutive frame batches; the last one may be shorter (the official code would drop it)."""
    if n_frames < 1:
        raise ValueError("the video has 0 frames")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [range(s, min(s + batch_size, n_frames)) for s in range(0, n_frames, batch_size)]


def keyframe_plan(n_frames: int, batch_size: int, steps: int, seed: int, mode: str = "random") -> torch.Tensor:
    """Per-step keyframe indices, shape ``(steps, n_batches)``, one keyframe inside each batch.

    ``random`` draws ``key[b] = b*B + randint(B)`` afresh every step from a CPU generator seeded
    with ``seed``. For ``n_frames`` divisible by ``B`` this is exactly the sequence of the official
    code's ``torch.randint(B, (n // B,)) + torch.arange(0, n, B)`` after ``torch.manual_seed(seed)``.
    A shorter last batch of length L draws its keyframe with an extra ``randint(L)`` per step.
    ``fixed`` uses each batch's middle frame at every step (the paper's ablation).
    """
    if mode not in KEYFRAME_MODES:
        raise ValueError(f"keyframes must be one of {KEYFRAME_MODES}, got {mode!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    batches = batch_ranges(n_frames, batch_size)
    starts = torch.tensor([b.start for b in batches], dtype=torch.long)
    lengths = [len(b) for b in batches]
    if mode == "fixed":
        offsets = torch.tensor([length // 2 for length in lengths], dtype=torch.long)
        return (starts + offsets).unsqueeze(0).repeat(steps, 1)
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    n_full = sum(1 for length in lengths if length == batch_size)
    rows = []
    for _ in range(steps):
        offsets = torch.randint(batch_size, (n_full,), generator=generator)
        if n_full < len(lengths):
            offsets = torch.cat([offsets, torch.randint(lengths[-1], (1,), generator=generator)])
        rows.append(starts + offsets)
    return torch.stack(rows)


OFFICIAL_PLAN_FRAMES = 64  # clips up to this length always keep one keyframe per batch
AUTO_MAX_KEYFRAMES = 16  # the automatic cap for longer clips


def auto_max_keyframes(n_frames: int) -> int:
    """The automatic keyframe cap: none up to 64 frames (the official plan), 16 beyond.

    It depends on the frame count only, never on the device, so a clip gives the same result on
    every card. Extended attention over K keyframes costs K^2 (K keyframes x K*N keys) and the
    keyframe bank grows with K; past 16 keyframes a step is dominated by it. The price of the cap:
    groups grow to ceil(n / 16) frames, so a frame may be farther from its keyframes.
    """
    return 0 if n_frames <= OFFICIAL_PLAN_FRAMES else AUTO_MAX_KEYFRAMES


def spread_keyframe_groups(n_frames: int, batch_size: int, max_keyframes: int) -> int:
    """Keyframe group size: ``batch_size`` (one keyframe per batch) unless that exceeds the keyframe cap.

    ``max_keyframes`` > 0 is the cap, 0 the automatic one (:func:`auto_max_keyframes`), < 0 none.
    With a cap, groups grow to ``ceil(n / cap)`` frames so that at most that many keyframes are
    jointly edited per step, spread evenly over the clip.
    """
    cap = auto_max_keyframes(n_frames) if max_keyframes == 0 else max_keyframes
    if cap <= 0:
        return batch_size
    return max(batch_size, -(-n_frames // cap))


@dataclass(frozen=True)
class FramePairing:
    """For every frame: which two keyframe slots (indices into the step's keyframe list) and weights.

    ``slots[i] = (a, b)``, ``weights[i] = (w, 1 - w)``; frames with a single keyframe have ``b == a``
    and weight ``(1, 0)``.
    """

    slots: torch.Tensor  # (n_frames, 2) long
    weights: torch.Tensor  # (n_frames, 2) float32

    def single(self) -> torch.Tensor:
        """Boolean mask of frames that use one keyframe only."""
        return self.weights[:, 1] == 0


@functools.lru_cache(maxsize=16)
def official_pairing(n_frames: int, group_size: int) -> FramePairing:
    """Official pairing: frame i in group g blends keyframe g (weight w) and g-1 (weight 1-w).

    ``c_g = g*G + G//2``, ``d1 = |i - c_g|``, ``d2 = |i - c_{g-1}|``, ``w = sigmoid(d2 / (d1 + d2))``;
    group 0 uses its own keyframe only. The same for every step, so built once per (frames, group)
    and shared (read only: nothing writes into a pairing's tensors).
    """
    idx = torch.arange(n_frames)
    group = idx // group_size
    prev = (group - 1).clamp(min=0)
    d1 = (idx - (group * group_size + group_size // 2)).abs()
    d2 = (idx - (prev * group_size + group_size // 2)).abs()
    w = torch.sigmoid(d2 / (d1 + d2))
    w = torch.where(group == 0, torch.ones_like(w), w)
    return FramePairing(torch.stack([group, prev], 1), torch.stack([w, 1 - w], 1).float())


def paper_pairing(keyframes: torch.Tensor, n_frames: int) -> FramePairing:
    """Paper pairing: the nearest keyframes before and after each frame, weighted linearly by distance."""
    keys = keyframes.long()
    idx = torch.arange(n_frames)
    after = torch.searchsorted(keys, idx).clamp(max=len(keys) - 1)  # first key >= i (or last)
    before = (after - (keys[after] > idx).long()).clamp(min=0)  # last key <= i (or first)
    k0, k1 = keys[before].float(), keys[after].float()
    span = (k1 - k0)
    w0 = torch.where(span > 0, (k1 - idx) / span.clamp(min=1), torch.ones_like(span))
    w0 = w0.clamp(0, 1)
    w1 = 1 - w0
    slots = torch.stack([before, after], 1)
    same = before == after
    slots[same, 1] = slots[same, 0]
    weights = torch.stack([w0, torch.where(same, torch.zeros_like(w1), w1)], 1)
    weights[same, 0] = 1.0
    return FramePairing(slots, weights.float())


@dataclass(frozen=True)
class KeyframeSchedule:
    """The keyframes of every step and how frames blend them: the one source of a step's pairing."""

    keyframes: torch.Tensor  # (steps, n_keyframes) long
    group_size: int
    blend: str

    def pairing(self, step: int, n_frames: int) -> "FramePairing":
        return pairing_for_step(self.keyframes[step], n_frames, self.group_size, self.blend)


def pairing_for_step(keyframes: torch.Tensor, n_frames: int, group_size: int, blend: str = "official") -> FramePairing:
    """The pairing used at one step given that step's keyframe indices."""
    if blend == "official":
        return official_pairing(n_frames, group_size)
    if blend == "paper":
        return paper_pairing(keyframes, n_frames)
    raise ValueError(f"blend must be one of {BLEND_MODES}, got {blend!r}")
