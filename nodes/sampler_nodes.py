"""TokenFlowSampler: the TokenFlow edit through ComfyUI's own sampling path."""
from __future__ import annotations

from comfy_api.latest import io

import latent_preview

from ..tokenflow_ops.keyframes import BLEND_MODES, KEYFRAME_MODES
from ..tokenflow_ops.schedule import MAX_STEPS, step_grid_rule
from ..engine.plan.settings import EditSettings
from ..engine.editors import EditorSetting, appended_inputs, editor_names, editor_tooltip, stable_inputs
from ..data.products import CorrespondencesType, InversionType
from ..engine.sampling_paths import path_for
from .common import CATEGORY

DEFAULTS = EditSettings()  # the sampler's own defaults; each editor's live in its declarations


def editor_input(declared) -> io.Input:
    """The ComfyUI input of an editor's declaration (a plug-in's ``io`` input is used as it is)."""
    if not isinstance(declared, EditorSetting):
        return declared
    common = dict(default=declared.default, optional=not declared.required, tooltip=declared.tooltip)
    if declared.kind is str:
        return io.String.Input(declared.name, **common)
    bounds = {key: value for key, value in (("min", declared.minimum), ("max", declared.maximum),
                                            ("step", declared.step)) if value is not None}
    kind = io.Int if declared.kind is int else io.Float
    return kind.Input(declared.name, **common, **bounds)


class TokenFlowSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TokenFlowSampler",
            display_name="TokenFlow Sampler",
            category=CATEGORY,
            description="Edits the inverted video with TokenFlow: at every step random keyframes are edited jointly, "
                        "then every frame receives the keyframes' self-attention outputs through nearest-neighbour "
                        "correspondences of the source video. Combine with Plug-and-Play (default), SDEdit or a "
                        "ControlNet carried by the conditioning.",
            inputs=[
                io.Model.Input("model", tooltip="The model used for the inversion (LoRAs may be added)."),
                io.Conditioning.Input("positive", tooltip="The edit prompt, e.g. 'a shiny silver robotic wolf'. "
                                      "ControlNets applied to it (Apply ControlNet) get one hint per frame."),
                io.Conditioning.Input("negative", tooltip="Negative prompt (official: 'ugly, blurry, low res, "
                                      "unrealistic, unaesthetic'). Unused at cfg 1, where ComfyUI skips the "
                                      "negative branch (Flux-dev: guidance-distilled, cfg 1 with FluxGuidance)."),
                InversionType.Input("inversion", tooltip="Output of TokenFlow DDIM Inversion for the source video."),
                io.Combo.Input("editor", options=editor_names(), default=DEFAULTS.editor, tooltip=editor_tooltip()),
                io.Float.Input("cfg", default=DEFAULTS.cfg, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale (official 7.5; Flux-dev: 1, "
                                       "its guidance comes from FluxGuidance)."),
                # The pack's editors' required inputs (pnp_attn_t, pnp_f_t, sdedit_start): where saved workflows
                # expect them.
                *(editor_input(d) for d in stable_inputs()),
                io.Int.Input("batch_size", default=DEFAULTS.batch_size, min=1, max=512, tooltip="B: one keyframe is "
                             "drawn per batch of B frames and a frame blends its batch's keyframe with the previous "
                             "batch's (official 8). It does not set how many frames share a UNet call (that follows "
                             "the device's memory). A clip shorter than B is one batch. With correspondences connected "
                             "the keyframe plan (batch_size, keyframes, seed, blend, max_keyframes) comes from the "
                             "extraction and these are not used; the log says which plan ran."),
                io.Combo.Input("keyframes", options=list(KEYFRAME_MODES), default=DEFAULTS.keyframes,
                               tooltip="random: new keyframes every step (the paper); fixed: each batch's middle frame "
                               "(ablation)."),
                io.Int.Input("seed", default=DEFAULTS.seed, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                             tooltip="Seed of the keyframe plan (the official runs use 1)."),
                CorrespondencesType.Input("correspondences", optional=True, tooltip="Optional extracted correspondences "
                                          "(TokenFlow Extract Correspondences). Without them they are computed on the "
                                          "fly exactly as the official code does; with them SDEdit/ControlNet edits "
                                          "skip the source branch entirely."),
                io.Combo.Input("blend", options=list(BLEND_MODES), default=DEFAULTS.blend, optional=True,
                               tooltip="How a frame blends its two keyframes (see the README). Ignored with "
                               "correspondences."),
                io.Int.Input("max_keyframes", default=DEFAULTS.max_keyframes, min=-1, max=4096, optional=True,
                             tooltip="Cap on keyframes per step. 0 = automatic: none up to 64 frames (the official "
                             "plan), 16 for longer clips; -1 = never (one per batch); N = at most N, spread evenly. "
                             "Fewer keyframes bound memory and time (extended attention grows with the square of the "
                             "count) but put frames farther from their keyframes. Ignored with correspondences."),
                io.Int.Input("steps", default=DEFAULTS.steps, min=0, max=MAX_STEPS, optional=True,
                             tooltip=f"Editing steps; 0 uses the inversion's count (1 to {MAX_STEPS} otherwise). "
                             "Other counts must fit the inversion's steps: "
                             + step_grid_rule("steps", "the inversion's steps") + "."),
                # Optional inputs of the registered editors (PnP's block lists, then plug-ins'): appended, never
                # inserted.
                *(editor_input(d) for d in appended_inputs()),
            ],
            outputs=[io.Latent.Output(display_name="latent", tooltip="The edited frames; decode with VAE Decode.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, inversion, editor, cfg, batch_size, keyframes, seed,
                correspondences=None, blend=DEFAULTS.blend, max_keyframes=DEFAULTS.max_keyframes, steps=DEFAULTS.steps,
                **editor_options) -> io.NodeOutput:
        settings = EditSettings(editor=editor, cfg=cfg, batch_size=batch_size, keyframes=keyframes, seed=seed,
                                blend=blend, max_keyframes=max_keyframes, steps=steps, editor_options=editor_options)
        n_steps = len(inversion.timesteps) if not steps else steps
        callback = latent_preview.prepare_callback(model, n_steps)
        edit = path_for(model).edit  # the DDIM edit for SD UNets, the flow edit for Flux / SD3.x
        return io.NodeOutput(edit(model, positive, negative, inversion, settings, correspondences, callback))


NODES = [TokenFlowSampler]
