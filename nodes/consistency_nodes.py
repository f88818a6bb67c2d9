"""TokenFlowTemporalConsistency: the warp error of an edited video, as the TokenFlow paper reports it.

A thin node around the metric wing (``metric/``): :func:`~..metric.consistency.compute_consistency` measures,
:func:`~..metric.consistency.render_plot` draws the chart; the node adds ComfyUI's device, progress and interrupts.
"""
from __future__ import annotations

import logging

import torch

import comfy.model_management
import comfy.utils
from comfy_api.latest import io, ui

from ..metric import flow_estimation
from ..metric import warp_error as we
from ..metric.consistency import check_frames, compute_consistency, render_plot
from .common import CATEGORY

log = logging.getLogger(__name__)


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
        check_frames(edited_frames, source_frames)
        pairs = edited_frames.shape[0] - 1
        progress = comfy.utils.ProgressBar(pairs)

        def on_pair(_: int) -> None:
            comfy.model_management.throw_exception_if_processing_interrupted()
            progress.update(1)

        comfy.model_management.throw_exception_if_processing_interrupted()
        result = compute_consistency(edited_frames, source_frames, flow_preset, on_pair=on_pair,
                                     device=comfy.model_management.get_torch_device())
        per_pair = (result.per_pair.double() * we.PAPER_SCALE).tolist()
        plot = render_plot(per_pair, result.scaled, result.mean_excluded)
        text = (f"warp error {result.scaled:.3f} x1e-3 over {pairs} frame pairs "
                f"({100 * result.mean_excluded:.1f}% of pixels masked, flow: {flow_preset})")
        log.info("TokenFlowTemporalConsistency: %s", text)
        return io.NodeOutput(result.scaled, result.mean_excluded, plot, ui=ui.PreviewText(text))


NODES = [TokenFlowTemporalConsistency]
