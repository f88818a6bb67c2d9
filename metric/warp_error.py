"""Temporal consistency of an edited video: the warp error.

This is the metric the TokenFlow paper (Geyer et al., ICLR 2024, arXiv 2307.10373) reports
(x1e-3: TokenFlow 3.0, per-frame PnP 11.3, VAE reconstruction alone 2.0), in the form of the
usual warp-error code (Lai et al. 2018, "Learning Blind Video Temporal Consistency"), given
optical flows of the SOURCE video.

For every pair of consecutive frames ``i, i+1`` with source flows ``F_fwd`` (frame i -> i+1,
defined on the pixels of frame i) and ``F_bwd`` (frame i+1 -> i, defined on frame i+1):

1. Backward warping: ``W(p) = E[i+1](p + F_fwd(p))``, sampled bilinearly (kornia's ``remap``
   with ``align_corners=True``, so pixel ``x`` lies at integer coordinate ``x``).
2. Out-of-frame mask: a pixel whose target ``p + F_fwd(p)`` lies outside
   ``[0, W-1] x [0, H-1]`` is dropped.
3. Forward-backward occlusion check (Sundaram et al. 2010): with ``b = F_bwd(p + F_fwd(p))``
   (bilinear), the pixel is occluded when
   ``|F_fwd(p) + b|^2 > 0.01 (|F_fwd(p)|^2 + |b|^2) + 0.5``.
4. Pair error: ``sum_{valid p, c} (W_c(p) - E[i]_c(p))^2 / (C * #valid)`` on RGB in [0, 1].

The video's warp error is the mean of the pair errors (pairs without a single valid pixel are
left out); multiply by 1000 to compare with the paper. ``excluded_fraction`` is the share of
pixels dropped by steps 2 and 3 together.

Step 1's kornia ``remap`` (which the official code's util.py imports) replaced a
hand-written ``grid_sample`` call with the same corner-aligned convention: the masks are unchanged
and the numbers move only by float32 rounding of the normalised sample grid. On these clips (synthetic shifts
of one frame, the wolf frames), in the paper's unit (x1e-3), grid_sample -> remap:

===========================================  ==============  ==============  =========
clip                                         grid_sample     remap           change
===========================================  ==============  ==============  =========
synthetic shift (2, 1), true flow            8.0e-13         2.1e-12         +1.3e-12
synthetic shift (1.5, -0.75), true flow      0.01158238      0.01158238      +6.0e-09
synthetic shift (2, 1), DIS flow             0.00137956      0.00137956      -1.9e-09
synthetic shift (1.5, -0.75), DIS flow       0.01210373      0.01210373      -6.5e-09
synthetic shift (2, 1), shuffled frames      27.4319294      27.4319295      +1.3e-07
synthetic shift (1.5, -0.75), shuffled       20.8682928      20.8682923      -5.3e-07
wolf frames against themselves (DIS)         0.37379667      0.37379663      -3.5e-08
wolf frames shuffled                         14.0148309      14.0148310      +6.7e-08
wolf, per-frame JPEG q60                     0.60134136      0.60134131      -5.4e-08
===========================================  ==============  ==============  =========

The integer-shift true-flow score is float32 noise around 0; every other score moves by at most
1.7e-6 of itself, and the wolf clip in float64 is equal to 1e-16.

Everything works on channels-first tensors: frames ``(N, C, H, W)``, flows ``(N, 2, H, W)`` in
pixels with channel 0 = x (width) displacement and channel 1 = y (height) displacement, the
layout OpenCV and RAFT produce after ``movedim(-1, 0)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange
from kornia.geometry.transform import remap

OCCLUSION_ALPHA1 = 0.01
OCCLUSION_ALPHA2 = 0.5
PAPER_SCALE = 1e3  # the paper reports warp errors in units of 1e-3


@dataclass(frozen=True)
class WarpErrorResult:
    """Per-pair and summary warp errors of a video.

    per_pair: (N-1,) MSE of each consecutive pair (NaN where no pixel was valid);
    excluded_fraction: (N-1,) share of pixels masked out (occluded or warped out of frame);
    mean: mean of the finite pair errors (plain MSE, multiply by 1000 for the paper's unit);
    mean_excluded: mean of ``excluded_fraction``.
    """

    per_pair: torch.Tensor
    excluded_fraction: torch.Tensor
    mean: float
    mean_excluded: float

    @property
    def scaled(self) -> float:
        """The mean warp error in the paper's unit (x1e-3)."""
        return self.mean * PAPER_SCALE


def pixel_grid(height: int, width: int, device: torch.device | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(2, H, W) pixel coordinates, channel 0 = x, channel 1 = y."""
    ys, xs = torch.meshgrid(torch.arange(height, device=device, dtype=dtype),
                            torch.arange(width, device=device, dtype=dtype), indexing="ij")
    return torch.stack((xs, ys))


def _check_flow(image: torch.Tensor, flow: torch.Tensor) -> None:
    if image.dim() != 4 or flow.dim() != 4 or flow.shape[1] != 2:
        raise ValueError(f"expected image (B, C, H, W) and flow (B, 2, H, W), got {tuple(image.shape)} and {tuple(flow.shape)}")
    if image.shape[0] != flow.shape[0] or image.shape[-2:] != flow.shape[-2:]:
        raise ValueError(f"image {tuple(image.shape)} and flow {tuple(flow.shape)} disagree in batch or size")


def backward_warp(image: torch.Tensor, flow: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``image`` at ``p + flow(p)`` bilinearly (kornia's ``remap``, as the official code imports it).

    image: (B, C, H, W); flow: (B, 2, H, W) in pixels. Returns the warped image (B, C, H, W) and
    the (B, H, W) bool mask of pixels whose sample point lies inside the frame (samples outside
    are zero-padded and must be ignored). ``remap`` takes pixel maps and normalises them with the
    corner-aligned convention, which ``align_corners=True`` must match (pixel ``x`` at coordinate
    ``x``); on the CPU it samples half-precision input in float32.
    """
    _check_flow(image, flow)
    height, width = image.shape[-2:]
    x, y = rearrange(pixel_grid(height, width, flow.device, flow.dtype) + flow, "b xy h w -> xy b h w")
    inside = (x >= 0) & (x <= width - 1) & (y >= 0) & (y <= height - 1)
    warped = remap(image.to(flow.dtype), x, y, mode="bilinear", padding_mode="zeros", align_corners=True)
    return warped, inside


def _occluded(flow_fwd: torch.Tensor, bwd_at_target: torch.Tensor, inside: torch.Tensor,
              alpha1: float, alpha2: float) -> torch.Tensor:
    mismatch = (flow_fwd + bwd_at_target).square().sum(dim=1)
    magnitude = flow_fwd.square().sum(dim=1) + bwd_at_target.square().sum(dim=1)
    return (mismatch > alpha1 * magnitude + alpha2) & inside


def occlusion_mask(flow_fwd: torch.Tensor, flow_bwd: torch.Tensor,
                   alpha1: float = OCCLUSION_ALPHA1, alpha2: float = OCCLUSION_ALPHA2) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward-backward consistency check on the pixels of the first frame.

    flow_fwd: (B, 2, H, W) first -> second frame; flow_bwd: (B, 2, H, W) second -> first frame.
    Returns ``(occluded, inside)``, both (B, H, W) bool: ``occluded`` where
    ``|f + b|^2 > alpha1 (|f|^2 + |b|^2) + alpha2`` with ``b = flow_bwd(p + f(p))``, ``inside``
    where ``p + f(p)`` stays in the frame. Pixels warped out of the frame are not flagged as
    occluded (their ``b`` is meaningless); combine the two masks for the valid set.
    """
    if flow_fwd.shape != flow_bwd.shape:
        raise ValueError(f"forward flow {tuple(flow_fwd.shape)} and backward flow {tuple(flow_bwd.shape)} differ")
    bwd_at_target, inside = backward_warp(flow_bwd, flow_fwd)
    return _occluded(flow_fwd, bwd_at_target, inside, alpha1, alpha2), inside


def pair_errors(frames: torch.Tensor, next_frames: torch.Tensor, flow_fwd: torch.Tensor,
                flow_bwd: torch.Tensor, occluded: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Warp error of a batch of frame pairs.

    frames, next_frames: (B, C, H, W) edited frames i and i+1 in [0, 1]; flow_fwd / flow_bwd:
    (B, 2, H, W) SOURCE flows i -> i+1 and i+1 -> i. ``occluded``: optional (B, H, W) bool, the
    pixels of frame i hidden in frame i+1 when they are known exactly (a rendered clip); it then
    replaces step 3's forward-backward check. Returns the (B,) masked MSE (NaN where no pixel is
    valid) and the (B,) excluded fraction.
    """
    if frames.shape != next_frames.shape:
        raise ValueError(f"frame batches differ in shape: {tuple(frames.shape)} vs {tuple(next_frames.shape)}")
    if flow_fwd.shape != flow_bwd.shape:
        raise ValueError(f"forward flow {tuple(flow_fwd.shape)} and backward flow {tuple(flow_bwd.shape)} differ")
    dtype, channels = flow_fwd.dtype, frames.shape[1]
    # one sampling pass for the next frame and the backward flow (same sample points)
    stacked, inside = backward_warp(torch.cat((next_frames.to(dtype), flow_bwd), dim=1), flow_fwd)
    warped, bwd_at_target = stacked[:, :channels], stacked[:, channels:]
    if occluded is None:
        occluded = _occluded(flow_fwd, bwd_at_target, inside, OCCLUSION_ALPHA1, OCCLUSION_ALPHA2)
    elif occluded.shape != inside.shape:
        raise ValueError(f"occlusion masks {tuple(occluded.shape)} do not match the pairs {tuple(inside.shape)}")
    valid = (inside & ~occluded).to(dtype)  # (B, H, W)
    count = valid.sum(dim=(1, 2))
    squared = (warped - frames.to(dtype)).square().sum(dim=1)  # summed over channels
    total = (squared * valid).sum(dim=(1, 2))
    mse = torch.where(count > 0, total / (count * channels).clamp_min(1),
                      torch.full_like(total, float("nan")))
    excluded = 1.0 - count / (frames.shape[-1] * frames.shape[-2])
    return mse, excluded


def summarize(per_pair: torch.Tensor, excluded_fraction: torch.Tensor) -> WarpErrorResult:
    """Reduce per-pair errors to a :class:`WarpErrorResult` (mean over pairs with valid pixels)."""
    finite = torch.isfinite(per_pair)
    if not bool(finite.any()):
        raise ValueError("no frame pair has a single non-occluded pixel inside the frame: the warp error is undefined")
    return WarpErrorResult(
        per_pair=per_pair,
        excluded_fraction=excluded_fraction,
        mean=float(per_pair[finite].double().mean()),
        mean_excluded=float(excluded_fraction.double().mean()),
    )


def warp_error(frames: torch.Tensor, flows_fwd: torch.Tensor, flows_bwd: torch.Tensor,
               chunk: int = 8, occlusion: torch.Tensor | None = None) -> WarpErrorResult:
    """Warp error of a whole edited video given the source video's flows.

    frames: (N, C, H, W) edited frames in [0, 1]; flows_fwd[i]: source flow i -> i+1 and
    flows_bwd[i]: source flow i+1 -> i, both (N-1, 2, H, W). ``occlusion``: optional exact (N-1, H, W)
    bool masks of the pixels of frame i hidden in frame i+1 (a rendered clip's), used instead of the
    forward-backward check. Pairs are processed ``chunk`` at a time to bound memory.
    """
    n = frames.shape[0]
    if n < 2:
        raise ValueError(f"the warp error needs at least 2 frames, got {n}")
    if flows_fwd.shape[0] != n - 1 or flows_bwd.shape[0] != n - 1:
        raise ValueError(f"{n} frames need {n - 1} forward and backward flows, got {flows_fwd.shape[0]} and {flows_bwd.shape[0]}")
    errors, excluded = [], []
    for start in range(0, n - 1, chunk):
        stop = min(start + chunk, n - 1)
        mse, exc = pair_errors(frames[start:stop], frames[start + 1:stop + 1], flows_fwd[start:stop], flows_bwd[start:stop],
                               None if occlusion is None else occlusion[start:stop])
        errors.append(mse)
        excluded.append(exc)
    return summarize(torch.cat(errors), torch.cat(excluded))
