"""TokenFlowInvert: DDIM-invert every frame and keep the latent trajectory."""
from __future__ import annotations

from comfy_api.latest import io

from ..tokenflow_ops.fixed_point import (DEFAULT_INVERSION_METHOD, DEFAULT_MAX_ITERATIONS, DEFAULT_TOLERANCE,
                                         MAX_ITERATIONS_LIMIT, METHODS, TOLERANCE_LIMIT)
from ..tokenflow_ops.schedule import MAX_STEPS, step_grid_rule
from ..engine.sampling_paths import path_for
from ..data.products import InversionType
from .common import CATEGORY



class TokenFlowInvert(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TokenFlowInvert",
            display_name="TokenFlow DDIM Inversion",  # the name saved workflows and docs know, also for fixed_point
            category=CATEGORY,
            description="DDIM-inverts every frame of the source video (deterministic, no CFG) and keeps the latent "
                        "trajectory at every editing timestep (method ddim: the official code's inversion, Euler steps "
                        "on Flux / SD3.x; fixed_point: exact inversion on the editing grid; auto: fixed_point on "
                        "Flux / SD3.x, ddim on SD UNets). Its output feeds correspondence extraction and the "
                        "TokenFlow sampler.",
            inputs=[
                io.Model.Input("model", tooltip="The SD1.x / SD2.x / SDXL, Flux or SD3.x model to invert with. "
                               "Use the same checkpoint for editing."),
                io.Latent.Input("latent", tooltip="The source video frames encoded with VAE Encode (one latent per frame)."),
                io.Conditioning.Input("conditioning", tooltip="The inversion prompt, describing the source video "
                                      "(e.g. 'a wolf'); an empty prompt also works. The source branch reuses it."),
                io.Int.Input("steps", default=50, min=1, max=MAX_STEPS, tooltip="Editing steps the trajectory is kept for "
                             f"(official 50; 1 to {MAX_STEPS}). The sampler's steps must fit this "
                             "count the same way (its 0 uses it)."),
                io.Int.Input("inversion_steps", default=500, min=1, max=MAX_STEPS, tooltip="DDIM inversion steps, 1 to "
                             f"{MAX_STEPS}: 1000 would end its grid at t = 1000, past the model's schedule "
                             f"({MAX_STEPS} is the finest grid, the paper's 1000). Rule: {step_grid_rule()}. "
                             "More steps invert more exactly (official 500) but take longer; 50 is a fast preview. Method "
                             "ddim only: fixed_point inverts on the grid of steps and does not use it."),
                io.Int.Input("frame_batch", default=0, min=0, max=4096, optional=True, tooltip="Most frames per UNet "
                             "call during inversion; 0: as many as the device's memory allows (all frames in one "
                             "call when they fit). It does not change the result beyond float rounding."),
                # Appended inputs (saved workflows store widget values by position; older ones get the defaults).
                io.Combo.Input("method", options=list(METHODS), default=DEFAULT_INVERSION_METHOD, optional=True,
                               tooltip="ddim: the official code's DDIM inversion on the grid of inversion_steps (on "
                               "Flux / SD3.x: inversion_steps Euler steps). fixed_point: exact inversion directly on "
                               "the editing grid of steps (inversion_steps is NOT used): each editing step (DDIM, or "
                               "Euler on Flux / SD3.x) is solved by fixed-point iteration, so the editing sampler maps "
                               "the saved latents back to the source; a few model evaluations per editing step instead "
                               "of inversion_steps / steps. Its inversion serves edits with the same steps (or a grid "
                               "they cover). auto: fixed_point on Flux / SD3.x (measured more faithful than 500 Euler "
                               "steps at a fraction of the cost), ddim on SD UNets (fixed_point is not more faithful "
                               "there on every model)."),
                io.Int.Input("max_iterations", default=DEFAULT_MAX_ITERATIONS, min=1, max=MAX_ITERATIONS_LIMIT,
                             optional=True, tooltip="fixed_point (and auto on Flux / SD3.x) only: the most model "
                             f"evaluations per editing step (1 to {MAX_ITERATIONS_LIMIT}; 1 is plain DDIM / Euler "
                             "inversion on the editing grid). A step stops earlier when its residual reaches "
                             "tolerance."),
                io.Float.Input("tolerance", default=DEFAULT_TOLERANCE, min=0.0, max=0.999, step=0.0001,
                               round=0.00001, optional=True, tooltip="fixed_point (and auto on Flux / SD3.x) "
                               "only: a step's iteration stops when the relative change of its latents "
                               "(|x_k - x_k-1| / |x_k| over a frame_batch "
                               f"chunk) is at most this (0 to below {TOLERANCE_LIMIT:g}; 0 always runs "
                               "max_iterations). The first evaluation of a step has no residual, so each step "
                               "takes at least 2 evaluations when max_iterations is 2 or more."),
            ],
            outputs=[
                InversionType.Output(display_name="inversion", tooltip="The inverted video: trajectory, schedule, "
                                     "inversion prompt and fingerprints of model and frames (kept in system RAM)."),
                io.Latent.Output(display_name="inverted_latent", tooltip="The fully inverted latent x_T (with leftover "
                                 "noise, as from KSampler Advanced)."),
            ],
        )

    @classmethod
    def execute(cls, model, latent, conditioning, steps, inversion_steps, frame_batch=0,
                method=DEFAULT_INVERSION_METHOD, max_iterations=DEFAULT_MAX_ITERATIONS,
                tolerance=DEFAULT_TOLERANCE) -> io.NodeOutput:
        path = path_for(model)  # DDIM for SD UNets, flow inversion for Flux / SD3.x
        inversion = path.invert(model, latent, conditioning, steps, inversion_steps, frame_batch, method,
                                max_iterations, tolerance)
        return io.NodeOutput(inversion, path.inverted_latent(model, inversion))


NODES = [TokenFlowInvert]
