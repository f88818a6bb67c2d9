"""TokenFlowSampler: the TokenFlow edit through ComfyUI's own sampling path."""
from __future__ import annotations

from comfy_api.latest import io

import latent_preview

from ..tokenflow_ops.keyframes import BLEND_MODES, KEYFRAME_MODES
from ..tokenflow_ops.schedule import MAX_STEPS, step_grid_rule
from ..engine.edit_plan import EDITORS, EditSettings
from ..engine.editors import editor_inputs
from ..data.products import CorrespondencesType, InversionType
from ..engine.tokenflow_runner import run_edit
from .common import CATEGORY



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
                                      "unrealistic, unaesthetic')."),
                InversionType.Input("inversion", tooltip="Output of TokenFlow DDIM Inversion for the source video."),
                io.Combo.Input("editor", options=list(EDITORS), default="pnp", tooltip="pnp: Plug-and-Play feature "
                               "injection from the source (the paper's default, best structure). sdedit: start from "
                               "the partly noised source, no injection. controlnet: no injection, full steps; the "
                               "structure comes from ControlNet hints in the conditioning."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01, tooltip="Classifier-free "
                               "guidance scale (official 7.5)."),
                io.Float.Input("pnp_attn_t", default=0.5, min=0.0, max=1.0, step=0.05, tooltip="PnP: fraction of the "
                               "steps with self-attention query/key injection. Higher keeps more source layout, lower "
                               "lets the prompt change more."),
                io.Float.Input("pnp_f_t", default=0.8, min=0.0, max=1.0, step=0.05, tooltip="PnP: fraction of the "
                               "steps with residual-block feature injection. Higher keeps more structure."),
                io.Float.Input("sdedit_start", default=0.9, min=0.01, max=1.0, step=0.01, tooltip="SDEdit: how much "
                               "noise to start from (0.9 keeps 44 of 50 steps). Higher edits more, keeps less."),
                io.Int.Input("batch_size", default=8, min=1, max=512, tooltip="B: one keyframe is drawn per batch of B "
                             "frames and a frame blends its batch's keyframe with the previous batch's (official 8). "
                             "It does not set how many frames share a UNet call (that follows the device's memory). "
                             "A clip shorter than B is one batch. With correspondences connected the keyframe plan "
                             "(batch_size, keyframes, seed, blend, max_keyframes) comes from the extraction and these "
                             "are not used; the log says which plan ran."),
                io.Combo.Input("keyframes", options=list(KEYFRAME_MODES), default="random", tooltip="random: new "
                               "keyframes every step (the paper); fixed: each batch's middle frame (ablation)."),
                io.Int.Input("seed", default=1, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                             tooltip="Seed of the keyframe plan (the official runs use 1)."),
                CorrespondencesType.Input("correspondences", optional=True, tooltip="Optional extracted correspondences "
                                          "(TokenFlow Extract Correspondences). Without them they are computed on the "
                                          "fly exactly as the official code does; with them SDEdit/ControlNet edits "
                                          "skip the source branch entirely."),
                io.Combo.Input("blend", options=list(BLEND_MODES), default="official", optional=True, tooltip="How a frame "
                               "blends its two keyframes (see the README). Ignored with correspondences."),
                io.Int.Input("max_keyframes", default=0, min=-1, max=4096, optional=True, tooltip="Cap on keyframes per "
                             "step. 0 = automatic: none up to 64 frames (the official plan), 16 for longer clips; -1 = "
                             "never (one per batch); N = at most N, spread evenly. Fewer keyframes bound memory and time "
                             "(extended attention grows with the square of the count) but put frames farther from their "
                             "keyframes. Ignored with correspondences."),
                io.Int.Input("steps", default=0, min=0, max=MAX_STEPS, optional=True, tooltip="Editing steps; 0 uses the "
                             f"inversion's count (1 to {MAX_STEPS} otherwise). Other counts must fit the inversion's "
                             "steps: " + step_grid_rule("steps", "the inversion's steps") + "."),
                io.String.Input("pnp_attention_blocks", default="auto", optional=True, tooltip="PnP query/key injection "
                                "blocks, e.g. 'output:4-11'. auto: all decoder transformer blocks but the first "
                                "(SD1/SD2: output 4-11; SDXL: output 1-5). none disables."),
                io.String.Input("pnp_residual_blocks", default="auto", optional=True, tooltip="PnP residual-feature "
                                "injection ResBlocks, e.g. 'output_blocks.4.0' (auto: the decoder's second level, "
                                "second block, for every family). none disables."),
                *editor_inputs(),  # inputs registered editors declare: always appended, never inserted
            ],
            outputs=[io.Latent.Output(display_name="latent", tooltip="The edited frames; decode with VAE Decode.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, inversion, editor, cfg, pnp_attn_t, pnp_f_t, sdedit_start, batch_size,
                keyframes, seed, correspondences=None, blend="official", max_keyframes=0, steps=0,
                pnp_attention_blocks="auto", pnp_residual_blocks="auto", **editor_options) -> io.NodeOutput:
        settings = EditSettings(editor=editor, cfg=cfg, pnp_attn_t=pnp_attn_t, pnp_f_t=pnp_f_t,
                                sdedit_start=sdedit_start, batch_size=batch_size, keyframes=keyframes, seed=seed,
                                blend=blend, max_keyframes=max_keyframes, steps=steps,
                                pnp_attention_blocks=pnp_attention_blocks, pnp_residual_blocks=pnp_residual_blocks,
                                editor_options=editor_options)
        n_steps = len(inversion.timesteps) if not steps else steps
        callback = latent_preview.prepare_callback(model, n_steps)
        return io.NodeOutput(run_edit(model, positive, negative, inversion, settings, correspondences, callback))


NODES = [TokenFlowSampler]
