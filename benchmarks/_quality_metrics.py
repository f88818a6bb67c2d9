"""The quality benchmark's metrics on a toy-world clip (a toy world trained here, never real-weight quality).

Every function takes frames as ``(N, H, W, 3)`` float tensors in [0, 1] (ComfyUI's IMAGE layout) and the
rendered clip's exact products (flows, occlusion and object masks), and returns plain floats:

- :func:`temporal_warp_error`: the paper's warp error (x1e-3) through ``metric/warp_error.py`` with the
  clip's exact flows AND its exact occlusion masks (the forward-backward check is not needed when the
  occlusion is known);
- :func:`attribute_fidelity`: the share of frames in which the world's attribute classifier reads the edited
  attribute's target value on the object region (the SOURCE object's mask: the edits keep the layout, so
  the object stays where the source has it; a frame without object pixels reads over the whole frame);
- :func:`changed_region` + :func:`mask_iou`: structure. The world renders the clip a perfect edit would give
  (same seed, so the same motion and background, with the edited object); the region an edit changed is
  segmented from the edited frames alone, as the pixels whose colour moved away from the source's (after
  the autoencoder round trip) by more than :data:`CHANGE_THRESHOLD`, and compared by IoU with the region the
  perfect edit changes, segmented the same way. No mask of the world is used to find either region. An
  edit that leaves the object's shape and place and the background alone scores 1; one that changes the
  background, moves or reshapes the object, or does not change it, scores less (fidelity says which);
- :func:`background_psnr`: PSNR against the source frames outside the source object's mask dilated by
  :data:`BACKGROUND_MARGIN` pixels (what the edit should leave alone).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

# A pixel counts as changed when its RGB distance to the source round trip exceeds this: well above what the
# autoencoder round trip of the perfect edit leaves on the background, well below the distance between any
# two of the world's object colours.
CHANGE_THRESHOLD = 0.2
BACKGROUND_MARGIN = 2  # pixels around the object (its anti-aliased rim, the autoencoder's blur) left out


def as_nchw(images: torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) -> (N, 3, H, W) float32."""
    return images[..., :3].movedim(-1, 1).float()


def temporal_warp_error(frames: torch.Tensor, flow_fwd: torch.Tensor, flow_bwd: torch.Tensor,
                        occlusion: torch.Tensor) -> float:
    """Warp error (x1e-3) of ``frames`` with the source's exact flows and exact occlusion masks."""
    from comfyui_tokenflow.metric import warp_error as we

    result = we.warp_error(as_nchw(frames).clamp(0, 1), flow_fwd.float(), flow_bwd.float(),
                           occlusion=occlusion.bool())
    return result.scaled


def attribute_fidelity(classify: Callable[..., Any], frames: torch.Tensor, masks: torch.Tensor, attribute: str,
                       target: str) -> float:
    """Share of frames whose ``attribute`` reads ``target`` on the object region ``masks`` (N, H, W)."""
    labels = classified_labels(classify, frames, masks, attribute)
    return sum(label == target for label in labels) / len(labels)


def classified_labels(classify: Callable[..., Any], frames: torch.Tensor, masks: torch.Tensor,
                      attribute: str) -> list[str]:
    """The classifier's label of ``attribute`` per frame (a frame with an empty mask is read whole)."""
    masks = masks.bool().clone()
    empty = ~masks.flatten(1).any(dim=1)
    masks[empty] = True
    result = classify(frames.float().clamp(0, 1), masks=masks)
    labels = result[attribute] if isinstance(result, dict) else getattr(result, attribute)
    if isinstance(labels, dict):  # {"labels": [...], "probabilities": ...}
        labels = labels["labels"]
    return [str(label) for label in labels]


def changed_region(frames: torch.Tensor, source: torch.Tensor, threshold: float = CHANGE_THRESHOLD) -> torch.Tensor:
    """(N, H, W) bool: pixels of ``frames`` farther than ``threshold`` (RGB distance) from ``source``, cleaned by
    a 3x3 closing (a pattern's unchanged ink stays inside the region) then a 3x3 opening (isolated pixels an
    edit flipped on the background are not the object)."""
    distance = (frames[..., :3].float() - source[..., :3].float()).square().sum(dim=-1).sqrt()
    raw = (distance > threshold).float().unsqueeze(1)
    closed = -F.max_pool2d(-F.max_pool2d(raw, 3, 1, 1), 3, 1, 1)  # dilate, then erode
    opened = F.max_pool2d(-F.max_pool2d(-closed, 3, 1, 1), 3, 1, 1)  # erode, then dilate
    return opened.squeeze(1) > 0.5


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    """Intersection over union of two (N, H, W) bool masks over the whole clip (1 when both are empty)."""
    union = (a | b).sum().item()
    return 1.0 if union == 0 else (a & b).sum().item() / union


def dilate(masks: torch.Tensor, pixels: int) -> torch.Tensor:
    """(N, H, W) bool masks grown by ``pixels`` in every direction."""
    if pixels <= 0:
        return masks.bool()
    return F.max_pool2d(masks.float().unsqueeze(1), 2 * pixels + 1, 1, pixels).squeeze(1) > 0.5


def background_psnr(frames: torch.Tensor, source: torch.Tensor, object_masks: torch.Tensor,
                    margin: int = BACKGROUND_MARGIN) -> float:
    """PSNR (dB, peak 1) of ``frames`` against ``source`` on the pixels outside the dilated object masks."""
    keep = ~dilate(object_masks, margin)
    squared = (frames[..., :3].float() - source[..., :3].float()).square().mean(dim=-1)
    mse = squared[keep].mean().item() if bool(keep.any()) else float("nan")
    return float("inf") if mse == 0 else -10.0 * math.log10(mse)


def mean_and_spread(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value) of the finite values."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return float("nan"), float("nan")
    mean = sum(finite) / len(finite)
    if len(finite) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1))
