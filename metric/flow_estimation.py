"""Optical flow of the SOURCE video for the warp-error metric the TokenFlow paper reports.

The paper measures its warp error with RAFT flow. The default here is weight-free: OpenCV's
DIS optical flow (Kroeger et al. 2016, ``cv2.DISOpticalFlow_create``) on grayscale uint8 frames
(ITU-R BT.601 luma of the [0, 1] RGB frames, rounded), one ``calc`` call per direction and frame
pair. DIS presets trade speed for accuracy: ``ultrafast`` < ``fast`` < ``medium`` (default).
Absolute numbers therefore differ a little from RAFT-based ones; comparisons between methods
measured with the same estimator are what the metric is for.

RAFT (torchvision's ``raft_small`` / ``raft_large``) is offered only when its pretrained
checkpoint is already in the torch hub cache (``<torch.hub.get_dir()>/checkpoints``): nothing is
downloaded.

This module has no ComfyUI imports: frames are ``(N, H, W, 3)`` float tensors in [0, 1] (ComfyUI's
IMAGE layout) and flows come back as ``(2, H, W)`` float32 tensors in pixels (x, y), flow
``a -> b`` defined on the pixels of frame ``a``.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Protocol

import numpy as np
import torch
from einops import rearrange

log = logging.getLogger(__name__)

DIS_PRESETS = {
    "ultrafast": "DISOPTICAL_FLOW_PRESET_ULTRAFAST",
    "fast": "DISOPTICAL_FLOW_PRESET_FAST",
    "medium": "DISOPTICAL_FLOW_PRESET_MEDIUM",
}
RAFT_MODELS = {"raft_small": ("raft_small", "Raft_Small_Weights"), "raft_large": ("raft_large", "Raft_Large_Weights")}
DEFAULT_METHOD = "medium"
MIN_DIS_SIZE = 16  # DIS refuses frames smaller than its 12-pixel patches; keep a margin
MIN_RAFT_SIZE = 128  # RAFT's 4-level correlation pyramid on 1/8-resolution features


class FlowEstimator(Protocol):
    """Computes the flow between two frames in both directions."""

    def pair(self, frame_a: torch.Tensor, frame_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(H, W, 3) frames in [0, 1] -> (flow a->b, flow b->a), each (2, H, W) float32."""
        ...


def _require_cv2():
    try:
        import cv2
    except ImportError as exc:
        raise ImportError(
            "TokenFlow's temporal-consistency metric needs OpenCV for DIS optical flow, which is not installed. "
            "Install it into ComfyUI's Python environment: `python -m pip install opencv-python-headless`."
        ) from exc
    if not hasattr(cv2, "DISOpticalFlow_create"):
        raise ImportError(f"this OpenCV build ({cv2.__version__}) lacks cv2.DISOpticalFlow_create; "
                          "install opencv-python-headless >= 4.0")
    return cv2


def to_gray_uint8(frame: torch.Tensor) -> np.ndarray:
    """(H, W, 3) float RGB in [0, 1] -> (H, W) uint8 BT.601 luma, contiguous."""
    rgb = frame.detach().to("cpu", torch.float32).clamp(0.0, 1.0)
    luma = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    return np.ascontiguousarray((luma * 255.0).round().to(torch.uint8).numpy())


class DISFlow:
    """OpenCV DIS optical flow; ``preset`` is one of :data:`DIS_PRESETS`."""

    def __init__(self, preset: str = DEFAULT_METHOD) -> None:
        if preset not in DIS_PRESETS:
            raise ValueError(f"unknown DIS preset {preset!r}; choose one of {sorted(DIS_PRESETS)}")
        cv2 = _require_cv2()
        self.preset = preset
        self._dis = cv2.DISOpticalFlow_create(getattr(cv2, DIS_PRESETS[preset]))

    def flow(self, gray_a: np.ndarray, gray_b: np.ndarray) -> torch.Tensor:
        """(H, W) uint8 frames -> (2, H, W) float32 flow a -> b."""
        if min(gray_a.shape) < MIN_DIS_SIZE:
            raise ValueError(f"frames of {gray_a.shape[1]}x{gray_a.shape[0]} are too small for DIS optical flow "
                             f"(need at least {MIN_DIS_SIZE} pixels per side)")
        out = self._dis.calc(gray_a, gray_b, None)
        return rearrange(torch.from_numpy(np.ascontiguousarray(out)), "h w xy -> xy h w").contiguous()

    def pair(self, frame_a: torch.Tensor, frame_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gray_a, gray_b = to_gray_uint8(frame_a), to_gray_uint8(frame_b)
        return self.flow(gray_a, gray_b), self.flow(gray_b, gray_a)


def _raft_weights(name: str):
    """The torchvision weights enum entry of a RAFT model, or None without torchvision."""
    try:
        from torchvision.models import optical_flow
    except ImportError:
        return None
    return getattr(optical_flow, RAFT_MODELS[name][1]).DEFAULT


def raft_checkpoint_path(name: str) -> str | None:
    """Where torchvision would cache the RAFT checkpoint ``name`` (None without torchvision)."""
    weights = _raft_weights(name)
    if weights is None:
        return None
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))


def raft_available(name: str) -> bool:
    """True when the checkpoint of ``name`` is already cached locally (nothing is downloaded)."""
    path = raft_checkpoint_path(name)
    return path is not None and os.path.isfile(path)


class RAFTFlow:
    """torchvision RAFT; both directions of a pair run as one batch of 2.

    ``pretrained=False`` builds a randomly initialised network (only useful for testing the code
    path). Frames are padded (replicate) to a multiple of 8 and at least :data:`MIN_RAFT_SIZE`
    per side (RAFT's correlation pyramid needs it), and the flow is cropped back.
    """

    def __init__(self, name: str = "raft_small", device: torch.device | str = "cpu", pretrained: bool = True,
                 iterations: int = 12) -> None:
        if name not in RAFT_MODELS:
            raise ValueError(f"unknown RAFT model {name!r}; choose one of {sorted(RAFT_MODELS)}")
        from torchvision.models import optical_flow

        weights = None
        if pretrained:
            if not raft_available(name):
                raise FileNotFoundError(f"RAFT checkpoint for {name} not found at {raft_checkpoint_path(name)}; "
                                        "use a DIS preset (ultrafast/fast/medium) instead")
            weights = _raft_weights(name)
        self.device = torch.device(device)
        self.iterations = iterations
        self.model = getattr(optical_flow, RAFT_MODELS[name][0])(weights=weights, progress=False).eval().to(self.device)

    @torch.no_grad()
    def pair(self, frame_a: torch.Tensor, frame_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        height, width = frame_a.shape[:2]
        pair = rearrange([frame_a[..., :3], frame_b[..., :3]], "pair h w c -> pair c h w")
        first = pair.to(self.device, torch.float32).contiguous() * 2.0 - 1.0  # (a, b): flow a -> b in row 0
        second = first.flip(0)  # (b, a): flow b -> a in row 0
        pad_h = max(MIN_RAFT_SIZE, height + (-height) % 8) - height
        pad_w = max(MIN_RAFT_SIZE, width + (-width) % 8) - width
        if pad_h or pad_w:
            pad = (0, pad_w, 0, pad_h)
            first = torch.nn.functional.pad(first, pad, mode="replicate")
            second = torch.nn.functional.pad(second, pad, mode="replicate")
        flows = self.model(first, second, num_flow_updates=self.iterations)[-1][..., :height, :width].float().cpu()
        return flows[0], flows[1]


def available_methods() -> list[str]:
    """DIS presets, then the RAFT models whose checkpoints are cached locally."""
    return list(DIS_PRESETS) + [name for name in RAFT_MODELS if raft_available(name)]


def make_estimator(method: str = DEFAULT_METHOD, device: torch.device | str = "cpu") -> FlowEstimator:
    """A flow estimator by name: a DIS preset or a locally available RAFT model."""
    if method in DIS_PRESETS:
        return DISFlow(method)
    if method in RAFT_MODELS:
        return RAFTFlow(method, device=device)
    raise ValueError(f"unknown flow method {method!r}; choose one of {available_methods()}")


def estimate_flows(frames: torch.Tensor, method: str | FlowEstimator = DEFAULT_METHOD,
                   on_pair: Callable[[int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Flows of all consecutive pairs of ``frames`` (N, H, W, 3) in [0, 1].

    Returns ``(forward, backward)``, each (N-1, 2, H, W) float32: ``forward[i]`` is i -> i+1,
    ``backward[i]`` is i+1 -> i. ``on_pair(i)`` is called after each pair (progress, interrupts).
    """
    if frames.shape[0] < 2:
        raise ValueError(f"optical flow needs at least 2 frames, got {frames.shape[0]}")
    estimator = make_estimator(method) if isinstance(method, str) else method
    forward, backward = [], []
    for i in range(frames.shape[0] - 1):
        fwd, bwd = estimator.pair(frames[i], frames[i + 1])
        forward.append(fwd)
        backward.append(bwd)
        if on_pair is not None:
            on_pair(i)
    log.debug("estimated %d flow pairs of %dx%d", len(forward), frames.shape[2], frames.shape[1])
    return torch.stack(forward), torch.stack(backward)
