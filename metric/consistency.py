"""The warp error of an edited video, as the TokenFlow paper reports it: the frame checks, the per-pair loop and the
chart (no ComfyUI: the node ``nodes/consistency_nodes.py`` is a thin wrapper around :func:`compute_consistency` and
:func:`render_plot`).

Optical flow is estimated on the SOURCE frames (:mod:`.flow_estimation`), the edited frame i+1 is warped back onto
frame i, occluded and out-of-frame pixels are masked, and the masked MSE on [0, 1] RGB is averaged over frame pairs
(:mod:`.warp_error`).
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from . import flow_estimation
from . import warp_error as we

__all__ = ["check_frames", "compute_consistency", "render_plot"]

PLOT_WIDTH, PLOT_HEIGHT = 512, 256


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _nice_max(value: float) -> float:
    """Smallest 1/2/2.5/5 x 10^k not below ``value`` (axis top)."""
    if not math.isfinite(value) or value <= 0:
        return 1.0
    exponent = math.floor(math.log10(value))
    for step in (1.0, 2.0, 2.5, 5.0, 10.0):
        top = step * 10.0 ** exponent
        if top >= value * (1 - 1e-9):
            return top
    return 10.0 ** (exponent + 1)


def render_plot(per_pair_scaled: list[float], mean_scaled: float, excluded: float,
                width: int = PLOT_WIDTH, height: int = PLOT_HEIGHT) -> torch.Tensor:
    """A line chart (bars for short videos) of per-pair warp errors x1e-3, as a (1, H, W, 3) IMAGE."""
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font, small = _font(12), _font(10)
    left, right, top, bottom = 58, 12, 26, 36
    x0, x1, y0, y1 = left, width - right, top, height - bottom  # plot area, y0 at the top
    values = [v if math.isfinite(v) else float("nan") for v in per_pair_scaled]
    finite = [v for v in values if math.isfinite(v)]
    y_max = _nice_max(max(finite + [mean_scaled]) if finite else 1.0)

    def to_y(value: float) -> float:
        return y1 - (y1 - y0) * min(max(value / y_max, 0.0), 1.0)

    n = len(values)

    def to_x(index: float) -> float:
        return x0 + (x1 - x0) * (index + 0.5) / max(n, 1)

    # grid, y ticks
    for k in range(5):
        value = y_max * k / 4
        y = to_y(value)
        draw.line([(x0, y), (x1, y)], fill=(230, 230, 230))
        label = f"{value:.3g}"
        tw, th = _text_size(draw, label, small)
        draw.text((x0 - 6 - tw, y - th / 2 - 1), label, fill=(60, 60, 60), font=small)
    draw.line([(x0, y0), (x0, y1), (x1, y1)], fill=(0, 0, 0), width=1)

    # data
    if n <= 24:
        half = max(1.0, (x1 - x0) / max(n, 1) * 0.35)
        for i, v in enumerate(values):
            if math.isfinite(v):
                draw.rectangle([(to_x(i) - half, to_y(v)), (to_x(i) + half, y1)], fill=(70, 120, 200))
    else:
        points = [(to_x(i), to_y(v)) for i, v in enumerate(values) if math.isfinite(v)]
        if len(points) > 1:
            draw.line(points, fill=(70, 120, 200), width=2)
        for px, py in points:
            draw.ellipse([(px - 1.5, py - 1.5), (px + 1.5, py + 1.5)], fill=(40, 80, 160))

    # mean line (dashed)
    y_mean = to_y(mean_scaled)
    for xs in range(int(x0), int(x1), 10):
        draw.line([(xs, y_mean), (min(xs + 5, x1), y_mean)], fill=(210, 50, 50), width=2)

    # x ticks: first, middle, last pair
    for i in sorted({0, (n - 1) // 2, n - 1}):
        label = str(i)
        tw, _ = _text_size(draw, label, small)
        draw.line([(to_x(i), y1), (to_x(i), y1 + 3)], fill=(0, 0, 0))
        draw.text((to_x(i) - tw / 2, y1 + 5), label, fill=(60, 60, 60), font=small)

    # labels and title
    x_label = "frame pair i -> i+1"
    tw, _ = _text_size(draw, x_label, font)
    draw.text(((x0 + x1) / 2 - tw / 2, height - 16), x_label, fill=(0, 0, 0), font=font)
    y_label = "warp error (x1e-3)"
    tw, th = _text_size(draw, y_label, font)
    label_img = Image.new("RGB", (tw + 4, th + 6), (255, 255, 255))
    ImageDraw.Draw(label_img).text((2, 0), y_label, fill=(0, 0, 0), font=font)
    label_img = label_img.rotate(90, expand=True)
    image.paste(label_img, (2, int((y0 + y1) / 2 - label_img.height / 2)))
    title = f"mean warp error {mean_scaled:.3f} x1e-3   masked {100 * excluded:.1f}%"
    draw.text((x0, 6), title, fill=(210, 50, 50), font=font)

    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).unsqueeze(0)


def check_frames(edited: torch.Tensor, source: torch.Tensor) -> None:
    """The metric's refusals: two IMAGE batches of the same count (at least 2) and size, finite values."""
    for name, frames in (("edited_frames", edited), ("source_frames", source)):
        if frames.dim() != 4 or frames.shape[-1] < 3:
            raise ValueError(f"{name} must be an IMAGE batch (frames, height, width, 3), got shape {tuple(frames.shape)}")
    if edited.shape[0] != source.shape[0]:
        raise ValueError(
            f"edited_frames has {edited.shape[0]} frames but source_frames has {source.shape[0]}: connect the edited "
            "video and the source video it was made from, loaded with the same frame range/step settings")
    if edited.shape[0] < 2:
        raise ValueError(f"the warp error compares consecutive frames: edited_frames/source_frames need at least 2 "
                         f"frames, got {edited.shape[0]}")
    if edited.shape[1:3] != source.shape[1:3]:
        raise ValueError(
            f"edited_frames are {edited.shape[2]}x{edited.shape[1]} but source_frames are {source.shape[2]}x{source.shape[1]}: "
            "load the source with the same TokenFlowLoadVideo size settings used for the edit, or resize one of them "
            "with the core ImageScale node so both match")
    for name, frames in (("edited_frames", edited), ("source_frames", source)):
        if not bool(torch.isfinite(frames).all()):
            raise ValueError(f"{name} contains NaN or infinite values; check the decode/VAE step that produced them")


def compute_consistency(edited: torch.Tensor, source: torch.Tensor, method: str = flow_estimation.DEFAULT_METHOD,
                        on_pair: Callable[[int], None] | None = None,
                        device: torch.device | str = "cpu") -> we.WarpErrorResult:
    """Warp error of ``edited`` (N, H, W, 3) measured with the flows of ``source`` (N, H, W, 3).

    Streams over frame pairs (flow of one pair, then its error) so memory stays at one pair's flows;
    ``on_pair(i)`` runs after each pair; ``device`` is where a RAFT estimator runs (DIS runs on the CPU).
    """
    check_frames(edited, source)
    estimator = flow_estimation.make_estimator(method, device=device)
    edited = edited[..., :3].detach().to("cpu", torch.float32)
    source = source[..., :3].detach().to("cpu", torch.float32)
    errors, excluded = [], []
    for i in range(edited.shape[0] - 1):
        fwd, bwd = estimator.pair(source[i], source[i + 1])
        mse, exc = we.pair_errors(edited[i:i + 1].movedim(-1, 1), edited[i + 1:i + 2].movedim(-1, 1),
                                  fwd.unsqueeze(0), bwd.unsqueeze(0))
        errors.append(mse)
        excluded.append(exc)
        if on_pair is not None:
            on_pair(i)
    return we.summarize(torch.cat(errors), torch.cat(excluded))
