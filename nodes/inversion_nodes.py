"""TokenFlowInvert: DDIM-invert every frame and keep the latent trajectory."""
from __future__ import annotations

from comfy_api.latest import io

from ..tokenflow_ops.schedule import MAX_STEPS, step_grid_rule
from ..engine.sampling_paths import path_for
from ..data.products import InversionType
from .common import CATEGORY



class TokenFlowInvert(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TokenFlowInvert",
            display_name="TokenFlow DDIM Inversion",
            category=CATEGORY,
            description="DDIM-inverts every frame of the source video (deterministic, no CFG) and keeps the latent "
                        "trajectory at every editing timestep. Its output feeds correspondence extraction and the "
                        "TokenFlow sampler.",
            inputs=[
                io.Model.Input("model", tooltip="The SD1.x / SD2.x / SDXL model to invert with. Use the same "
                               "checkpoint for editing."),
                io.Latent.Input("latent", tooltip="The source video frames encoded with VAE Encode (one latent per frame)."),
                io.Conditioning.Input("conditioning", tooltip="The inversion prompt, describing the source video "
                                      "(e.g. 'a wolf'); an empty prompt also works. The source branch reuses it."),
                io.Int.Input("steps", default=50, min=1, max=MAX_STEPS, tooltip="Editing steps the trajectory is kept for "
                             f"(official 50; 1 to {MAX_STEPS}). The sampler's steps must fit this "
                             "count the same way (its 0 uses it)."),
                io.Int.Input("inversion_steps", default=500, min=1, max=MAX_STEPS, tooltip="DDIM inversion steps, 1 to "
                             f"{MAX_STEPS}: 1000 would end its grid at t = 1000, past the model's schedule "
                             f"({MAX_STEPS} is the finest grid, the paper's 1000). Rule: {step_grid_rule()}. "
                             "More steps invert more exactly (official 500) but take longer; 50 is a fast preview."),
                io.Int.Input("frame_batch", default=0, min=0, max=4096, optional=True, tooltip="Most frames per UNet "
                             "call during inversion; 0: as many as the device's memory allows (all frames in one "
                             "call when they fit). It does not change the result beyond float rounding."),
            ],
            outputs=[
                InversionType.Output(display_name="inversion", tooltip="The inverted video: trajectory, schedule, "
                                     "inversion prompt and fingerprints of model and frames (kept in system RAM)."),
                io.Latent.Output(display_name="inverted_latent", tooltip="The fully inverted latent x_T (with leftover "
                                 "noise, as from KSampler Advanced)."),
            ],
        )

    @classmethod
    def execute(cls, model, latent, conditioning, steps, inversion_steps, frame_batch=0) -> io.NodeOutput:
        path = path_for(model)  # DDIM for SD UNets, flow inversion for Flux / SD3.x
        inversion = path.invert(model, latent, conditioning, steps, inversion_steps, frame_batch)
        return io.NodeOutput(inversion, path.inverted_latent(model, inversion))


NODES = [TokenFlowInvert]
