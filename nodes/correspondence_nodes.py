"""TokenFlowExtractCorrespondences: nearest-neighbour fields from a clean source pass."""
from __future__ import annotations

import logging

from comfy_api.latest import io

from ..tokenflow_ops.keyframes import BLEND_MODES, KEYFRAME_MODES
from ..data.correspondence_preview import blank_preview, preview_image
from ..engine.sampling_paths import run_extraction
from ..data.products import CorrespondencesType, InversionType
from ..engine.checks import check_source_images
from .common import CATEGORY

log = logging.getLogger(__name__)


class TokenFlowExtractCorrespondences(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TokenFlowExtractCorrespondences",
            display_name="TokenFlow Extract Correspondences",
            category=CATEGORY,
            description="Runs the clean source pass at every editing step and stores, for every transformer block, "
                        "each frame's nearest-neighbour token in its keyframes (compact integer fields). Reusable "
                        "across prompts and editors; lets the sampler skip the source branch for SDEdit/ControlNet.",
            inputs=[
                io.Model.Input("model", tooltip="The model the inversion was made with."),
                InversionType.Input("inversion", tooltip="Output of TokenFlow DDIM Inversion."),
                io.Int.Input("batch_size", default=8, min=1, max=512, tooltip="Frames per batch; one keyframe is drawn "
                             "in every batch at every step (official 8). Larger batches: fewer keyframes, faster, "
                             "less faithful propagation."),
                io.Combo.Input("keyframes", options=list(KEYFRAME_MODES), default="random", tooltip="random: a new "
                               "keyframe per batch at every step (the paper); fixed: each batch's middle frame (ablation)."),
                io.Int.Input("seed", default=1, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                             tooltip="Seed of the keyframe plan (the official runs use 1)."),
                io.Combo.Input("blend", options=list(BLEND_MODES), default="official", optional=True, tooltip="official: "
                               "a frame blends its batch's keyframe and the previous batch's with sigmoid weights (the "
                               "official code); paper: the nearest keyframes before and after, weighted by distance."),
                io.Int.Input("max_keyframes", default=0, min=-1, max=4096, optional=True, tooltip="Cap on keyframes per "
                             "step. 0 = automatic: none up to 64 frames (the official plan), 16 for longer clips; -1 = "
                             "never (one per batch); N = at most N, spread evenly. Fewer keyframes bound memory and time "
                             "(extended attention grows with the square of the count) but put frames farther from their "
                             "keyframes."),
                io.Int.Input("preview_frame", default=-1, min=-1, max=100000, optional=True, tooltip="Frame shown in the "
                             "preview image (-1: the middle frame)."),
                io.Image.Input("source_images", optional=True, tooltip="The source frames, for a full-resolution preview; "
                               "without them the preview uses a colour approximation of the latents."),
            ],
            outputs=[
                CorrespondencesType.Output(display_name="correspondences", tooltip="Keyframe plan and nearest-neighbour "
                                           "fields for every block and step (kept in system RAM)."),
                io.Image.Output(display_name="preview", tooltip="Left: the real frame. Middle: the same frame rebuilt "
                                "from its keyframe's pixels through the finest block's field at the last step. Right: "
                                "the keyframe. A good field makes the middle look like the left. Black when no "
                                "preview could be made (a warning in the log says why; the correspondences are "
                                "complete)."),
            ],
        )

    @classmethod
    def execute(cls, model, inversion, batch_size, keyframes, seed, blend="official", max_keyframes=0,
                preview_frame=-1, source_images=None) -> io.NodeOutput:
        check_source_images(source_images, inversion)
        corr = run_extraction(model, inversion, batch_size, keyframes, seed, blend, max_keyframes)
        try:
            preview = preview_image(corr, inversion, model.model.latent_format, preview_frame, source_images)
        except Exception as exc:  # the product took the whole extraction; a picture of it must never lose it
            log.warning("TokenFlow Extract Correspondences: no preview (%s: %s); the correspondences are complete, the "
                        "preview output is black", type(exc).__name__, exc)
            preview = blank_preview(inversion)
        return io.NodeOutput(corr, preview)


NODES = [TokenFlowExtractCorrespondences]
