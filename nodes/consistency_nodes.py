"""TokenFlowTemporalConsistency: the warp error of an edited video, as the TokenFlow paper reports it.

Optical flow is estimated on the SOURCE frames (see :mod:`.flow_estimation`), the edited frame
i+1 is warped back onto frame i, occluded and out-of-frame pixels are masked, and the masked
MSE on [0, 1] RGB is averaged over frame pairs (see :mod:`..tokenflow_ops.warp_error`).
"""
from __future__ import annotations

import logging
import math
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import comfy.model_management
import comfy.utils
from comfy_api.latest import io, ui

from ..tokenflow_ops import warp_error as we
from ..data import flow_estimation
from .common import CATEGORY

log = logging.getLogger(__name__)

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


def _validate(edited: torch.Tensor, source: torch.Tensor) -> None:
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
                        on_pair: Callable[[int], None] | None = None) -> we.WarpErrorResult:
    """Warp error of ``edited`` (N, H, W, 3) measured with the flows of ``source`` (N, H, W, 3).

    Streams over frame pairs (flow of one pair, then its error) so memory stays at one pair's flows;
    ``on_pair(i)`` runs after each pair.
    """
    _validate(edited, source)
    estimator = flow_estimation.make_estimator(method, device=comfy.model_management.get_torch_device())
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


class TokenFlowTemporalConsistency(io.ComfyNode):
    """Warp error (x1e-3) of an edited video, with flows from its source video."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TokenFlowTemporalConsistency",
            display_name="TokenFlow Temporal Consistency (warp error)",
            category=CATEGORY,
            is_output_node=True,  # shows its result as text even when nothing is connected
            description=(
                "Measures how temporally consistent an edited video is, as in the TokenFlow paper: optical flow is "
                "estimated on the SOURCE video (OpenCV DIS, weight-free; the paper used RAFT), each edited frame i+1 is "
                "warped back onto frame i, occluded pixels (forward-backward check) and pixels leaving the frame are "
                "masked, and the mean squared RGB error in [0, 1] is averaged over frame pairs. Lower is more "
                "consistent; the paper reports x1e-3 values of 3.0 for TokenFlow, 11.3 for per-frame editing and 2.0 "
                "for a plain VAE round trip."
            ),
            inputs=[
                io.Image.Input("edited_frames", tooltip="The edited video frames (IMAGE batch, one image per frame, in order)."),
                io.Image.Input("source_frames", tooltip=(
                    "The source video the edit was made from, same frame count and size; optical flow is computed on it.")),
                io.Combo.Input(
                    "flow_preset", options=flow_estimation.available_methods(), default=flow_estimation.DEFAULT_METHOD,
                    optional=True,
                    tooltip=("Optical-flow estimator: OpenCV DIS preset (ultrafast/fast/medium: faster to more accurate), "
                             "or a RAFT model when its torchvision checkpoint is cached locally. Compare videos only "
                             "with numbers measured using the same estimator.")),
            ],
            outputs=[
                io.Float.Output("warp_error", display_name="warp_error", tooltip=(
                    "Mean masked warp error over consecutive frame pairs, in units of 1e-3 (the paper's unit). Lower is "
                    "more temporally consistent.")),
                io.Float.Output("occluded_fraction", display_name="occluded_fraction", tooltip=(
                    "Average share (0..1) of pixels left out of the error because they are occluded "
                    "(forward-backward flow check) or move out of the frame.")),
                io.Image.Output("plot", display_name="plot", tooltip=(
                    "Chart of the warp error (x1e-3) of every frame pair, with the mean as a dashed line and in the title.")),
            ],
        )

    @classmethod
    def execute(cls, edited_frames: torch.Tensor, source_frames: torch.Tensor,
                flow_preset: str = flow_estimation.DEFAULT_METHOD) -> io.NodeOutput:
        _validate(edited_frames, source_frames)
        pairs = edited_frames.shape[0] - 1
        progress = comfy.utils.ProgressBar(pairs)

        def on_pair(_: int) -> None:
            comfy.model_management.throw_exception_if_processing_interrupted()
            progress.update(1)

        comfy.model_management.throw_exception_if_processing_interrupted()
        result = compute_consistency(edited_frames, source_frames, flow_preset, on_pair=on_pair)
        per_pair = (result.per_pair.double() * we.PAPER_SCALE).tolist()
        plot = render_plot(per_pair, result.scaled, result.mean_excluded)
        text = (f"warp error {result.scaled:.3f} x1e-3 over {pairs} frame pairs "
                f"({100 * result.mean_excluded:.1f}% of pixels masked, flow: {flow_preset})")
        log.info("TokenFlowTemporalConsistency: %s", text)
        return io.NodeOutput(result.scaled, result.mean_excluded, plot, ui=ui.PreviewText(text))


NODES = [TokenFlowTemporalConsistency]
