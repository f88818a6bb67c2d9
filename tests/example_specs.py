"""The shipped example workflows (``example_workflows/*.json`` and ``*.jpg``), specified as nodes, links and notes.

Each example reads left to right in the groups **Load**, **Invert**, **Edit**, **Output** (rendered
by ``tests/workflow_builder.py``); every link runs forward, so wires stay short. The "Read me" note,
left of the groups, says what the wiring does: ``tokenflow_pnp`` and the TokenFlow row of
``baselines`` compute correspondences on the fly (the official setting: the sampler's
``correspondences`` input is NOT connected); ``tokenflow_sdedit`` and ``tokenflow_controlnet``
connect extracted ones; ``tokenflow_flux`` is the PnP example on Flux-dev through the core
loaders (UNETLoader, DualCLIPLoader, VAELoader), FluxGuidance and ModelSamplingFlux, at cfg 1; ``tokenflow_sd3``
is the PnP example on SD3.5 Large through one CheckpointLoaderSimple, at cfg 4. 500 inversion steps are the
official code's value (the paper used 1000).

    bash -c 'source scripts/host_env.sh && "$PYTHON" tests/example_specs.py'    # or: ... tokenflow_flux

starts a temporary ComfyUI (``tests/server_harness.py``) for ``/object_info`` and writes the files
with :func:`write_examples`.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "devkit"))  # also when run as a script
import model_links  # noqa: E402  (devkit/model_links.py: the model files' names, URLs and folders)
from input_files import VIDEO_DIR  # noqa: E402
from workflow_builder import Example, N, build_ui_workflow, write_thumbnail  # noqa: E402
from workflow_format import check_ui_workflow  # noqa: E402

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "example_workflows"

SD21_BASE, SD21_BASE_URL = model_links.SD21_BASE.name, model_links.SD21_BASE.url
SD15, SD15_URL = model_links.SD15.name, model_links.SD15.url
CANNY_CN, CANNY_CN_URL = model_links.CANNY_CN.name, model_links.CANNY_CN.url
FLUX_DEV, FLUX_DEV_URL = model_links.FLUX_DEV.name, model_links.FLUX_DEV.url
FLUX_AE, FLUX_AE_URL = model_links.FLUX_AE.name, model_links.FLUX_AE.url
CLIP_L, CLIP_L_URL = model_links.CLIP_L.name, model_links.CLIP_L.url
T5XXL, T5XXL_URL = model_links.T5XXL.name, model_links.T5XXL.url
FLUX_GUIDANCE = 3.5  # FluxGuidance's default, Flux-dev's usual distilled guidance
# pnp_attn_t on Flux: the published fraction of its default injection preset, rf_solver (RF-Solver-Edit's demo: 5 of 25
# steps; engine/families/injection_presets.py RF_SOLVER.fraction).
FLUX_PNP_ATTN_T = 0.2
SD35_LARGE, SD35_LARGE_URL = model_links.SD35_LARGE.name, model_links.SD35_LARGE.url
SD35_CFG = 4.0
MODEL_LINKS = {link.name: (link.url, link.folder) for link in model_links.ALL}
WOLF_URL = "https://github.com/omerbt/TokenFlow/blob/master/data/wolf.mp4"

EDIT_PROMPT = "a shiny silver robotic wolf"
INVERSION_PROMPT = "a wolf"
NEGATIVE_PROMPT = "ugly, blurry, low res, unrealistic, unaesthetic"
# The inversion method of the examples: DDIM (official) stays, because the fixed-point inversion was not measured
# at least as faithful as 500-step DDIM on every family (benchmarks/README.md, issue 16).
INVERSION_METHOD = {"method": "ddim", "max_iterations": 3, "tolerance": 0.001}
# The flow examples (Flux, SD3.5) name the exact inversion on the editing grid ("auto" resolves to it there): measured
# more faithful than 500 Euler steps at under a third of the evaluations (benchmarks/README.md).
FLOW_INVERSION_METHOD = {"method": "fixed_point", "max_iterations": 3, "tolerance": 0.001}
# Flux-dev inverts at guidance 1 (RF-Solver, FireFlow and Stable Flow do); the edit keeps FluxGuidance's default.
FLUX_INVERSION_GUIDANCE = 1.0
VIDEO = "wolf.mp4"


def _source(ckpt: str, frames: int = 40, method: dict = INVERSION_METHOD) -> tuple[list[N], list[tuple]]:
    """Load (checkpoint 1, video 2), Invert (VAE Encode 3, inversion prompt 4, inversion 7), Edit prompts 5, 6."""
    nodes = [
        N(1, "CheckpointLoaderSimple", "Load", widgets={"ckpt_name": ckpt}),
        N(2, "TokenFlowLoadVideo", "Load", widgets={"video": VIDEO, "frame_load_cap": frames, "skip_first_frames": 0,
                                                    "select_every_nth": 1, "width": 512, "height": 512,
                                                    "size_multiple": 64, "path": ""}),
        N(3, "VAEEncode", "Invert"),
        N(4, "CLIPTextEncode", "Invert", widgets={"text": INVERSION_PROMPT},
          title="Inversion prompt (describes the source)"),
        N(7, "TokenFlowInvert", "Invert", 1, widgets={"steps": 50, "inversion_steps": 500, "frame_batch": 0,
                                                            **method}),
        N(5, "CLIPTextEncode", "Edit", widgets={"text": EDIT_PROMPT}, title="Edit prompt"),
        N(6, "CLIPTextEncode", "Edit", widgets={"text": NEGATIVE_PROMPT}, title="Negative prompt"),
    ]
    links = [
        (2, 0, 3, "pixels"), (1, "VAE", 3, "vae"),
        (1, "CLIP", 4, "clip"), (1, "CLIP", 5, "clip"), (1, "CLIP", 6, "clip"),
        (1, "MODEL", 7, "model"), (3, 0, 7, "latent"), (4, 0, 7, "conditioning"),
    ]
    return nodes, links


def _output(first_id: int, sampler_id: int, prefix: str, band: int = 0, frames_from: int = 2,
            consistency: bool = True, vae_from: tuple[int, str] = (1, "VAE")) -> tuple[list[N], list[tuple]]:
    """Output: VAE Decode -> Create Video (fps from the loader) -> Save Video (+ warp error, its plot, and its two
    numbers in core Preview Any nodes: the frontend shows a text result only on that node)."""
    decode, create, save, warp, plot, error_text, occluded_text = range(first_id, first_id + 7)
    nodes = [N(decode, "VAEDecode", "Output", 0, band), N(create, "CreateVideo", "Output", 1, band,
                                                          widgets={"fps": 20.0}),
             N(save, "SaveVideo", "Output", 2, band, widgets={"filename_prefix": prefix, "format": "auto",
                                                               "codec": "auto"})]
    links = [(sampler_id, 0, decode, "samples"), (*vae_from, decode, "vae"),
             (decode, 0, create, "images"), (frames_from, "fps", create, "fps"), (create, 0, save, "video")]
    if consistency:
        nodes += [N(warp, "TokenFlowTemporalConsistency", "Output", 1, band, widgets={"flow_preset": "medium"}),
                  N(plot, "PreviewImage", "Output", 2, band, title="Warp error per frame pair"),
                  N(error_text, "PreviewAny", "Output", 3, band, title="Warp error (x1e-3)"),
                  N(occluded_text, "PreviewAny", "Output", 3, band, title="Occluded fraction (0..1)")]
        links += [(decode, 0, warp, "edited_frames"), (frames_from, "IMAGE", warp, "source_frames"),
                  (warp, "plot", plot, "images"), (warp, "warp_error", error_text, "source"),
                  (warp, "occluded_fraction", occluded_text, "source")]
    return nodes, links


def _sampler(node_id: int, editor: str, col: int = 1, band: int = 0, **extra) -> N:
    widgets = {"editor": editor, "cfg": 7.5, "pnp_attn_t": 0.5, "pnp_f_t": 0.8, "sdedit_start": 0.9,
               "batch_size": 8, "keyframes": "random", "seed": 1, "blend": "official", "max_keyframes": 0,
               "steps": 0, "pnp_attention_blocks": "auto", "pnp_residual_blocks": "auto"}
    widgets.update(extra)
    return N(node_id, "TokenFlowSampler", "Edit", col, band, widgets=widgets)


def _extraction() -> tuple[list[N], list[tuple]]:
    """Invert: Extract Correspondences (8) from the inversion, with its correspondence check (9)."""
    nodes = [N(8, "TokenFlowExtractCorrespondences", "Invert", 2,
               widgets={"batch_size": 8, "keyframes": "random", "seed": 1, "blend": "official", "max_keyframes": 0,
                        "preview_frame": -1}),
             N(9, "PreviewImage", "Invert", 3, title="Correspondence check (frame | rebuilt | keyframe)")]
    links = [(1, "MODEL", 8, "model"), (7, "inversion", 8, "inversion"), (2, "IMAGE", 8, "source_images"),
             (8, "preview", 9, "images")]
    return nodes, links


def _note(text: str, size: tuple[int, int]) -> N:
    return N(20, "MarkdownNote", "", text=text, title="Read me", size=size)


NOTE_CLIP = (f"Put **wolf.mp4** (the paper's clip, from the `data/` folder of the official repository: {WOLF_URL}) "
             "or your clip in `ComfyUI/input/`, or use *choose file to upload* on **TokenFlow Load Video**.")
NOTE_VIDEO = (NOTE_CLIP + "\n\n40 frames at 512x512, 50 steps and 500 inversion steps are the official code's "
              "settings (the paper used 1000 inversion steps; the pack's largest, 999, is that grid without the t = "
              "1000 past the schedule's end). For a quick look use `inversion_steps` 50 and fewer frames.")
# The flow examples invert by fixed point on the editing grid: inversion_steps is not used there.
NOTE_FLOW_VIDEO = NOTE_CLIP + "\n\n40 frames at 512x512 and 50 steps; for a quick look use fewer frames and steps."
TINY_ONLY = ("support is checked on tiny random-weight models only; the edit quality on the real weights has not "
             "been measured. ")
NOTE_GROUPS = ("The groups read left to right: **Load**, **Invert**, **Edit**, **Output**. After a run, *Output* "
               "shows the warp error (x1e-3, lower = more consistent; the paper measured 3.0 for TokenFlow, 11.3 for "
               "per-frame editing) and the share of pixels it leaves out as occluded.")
ON_THE_FLY = ("Correspondences are computed **on the fly**, exactly as the official code does: the sampler's "
              "*correspondences* input is left unconnected on purpose.")
EXTRACTED = ("Correspondences are **extracted** once (TokenFlow Extract Correspondences, in *Invert*: the paper's "
             "preprocessing product, reusable across prompts and editors) and connected to the sampler, which then "
             "skips the source branch. The correspondence check rebuilds a frame from its keyframe through them "
             "(paper fig. 2). Disconnect them for the official on-the-fly numbers.")


def _pnp() -> Example:
    nodes, links = _source(SD21_BASE)
    nodes += [_sampler(10, "pnp")]
    links += [(1, "MODEL", 10, "model"), (5, 0, 10, "positive"), (6, 0, 10, "negative"),
              (7, "inversion", 10, "inversion")]
    out, out_links = _output(11, 10, "video/tokenflow_pnp")
    nodes += out + [_note("### TokenFlow + Plug-and-Play (the official setting)\n\n" + NOTE_VIDEO + "\n\n"
                          + ON_THE_FLY + "\n\nSD 2.1-base (`" + SD21_BASE + "`) in `models/checkpoints/`. "
                          + NOTE_GROUPS, (480, 280))]
    return Example("tokenflow_pnp", nodes, links + out_links,
                   thumbnail=("1. TokenFlow + PnP", "the paper's video edit; needs SD 2.1-base"))


def _sdedit() -> Example:
    nodes, links = _source(SD21_BASE)
    extraction, extraction_links = _extraction()
    nodes += extraction + [_sampler(10, "sdedit")]
    links += extraction_links + [(1, "MODEL", 10, "model"), (5, 0, 10, "positive"), (6, 0, 10, "negative"),
                                 (7, "inversion", 10, "inversion"), (8, "correspondences", 10, "correspondences")]
    out, out_links = _output(11, 10, "video/tokenflow_sdedit")
    nodes += out + [_note("### TokenFlow + SDEdit\n\n" + NOTE_VIDEO + "\n\n" + EXTRACTED + "\n\n`sdedit_start` sets "
                          "how much noise the edit starts from (0.9: 44 of 50 steps). Higher changes more, keeps less "
                          "of the source. " + NOTE_GROUPS, (480, 300))]
    return Example("tokenflow_sdedit", nodes, links + out_links,
                   thumbnail=("2. TokenFlow + SDEdit", "edit from partial noise; needs SD 2.1-base"))


def _controlnet() -> Example:
    nodes, links = _source(SD15)
    extraction, extraction_links = _extraction()
    nodes += extraction + [
        N(21, "Canny", "Edit", widgets={"low_threshold": 0.4, "high_threshold": 0.8}),
        N(22, "ControlNetLoader", "Edit", widgets={"control_net_name": CANNY_CN}),
        N(23, "ControlNetApplyAdvanced", "Edit", 1, widgets={"strength": 1.0, "start_percent": 0.0,
                                                             "end_percent": 1.0}),
        _sampler(10, "controlnet", col=2)]
    links += extraction_links + [
        (2, "IMAGE", 21, "image"), (5, 0, 23, "positive"), (6, 0, 23, "negative"), (22, 0, 23, "control_net"),
        (21, 0, 23, "image"),
        (1, "MODEL", 10, "model"), (23, "positive", 10, "positive"), (23, "negative", 10, "negative"),
        (7, "inversion", 10, "inversion"), (8, "correspondences", 10, "correspondences")]
    out, out_links = _output(11, 10, "video/tokenflow_controlnet")
    nodes += out + [_note("### TokenFlow + ControlNet (canny)\n\n" + NOTE_VIDEO + "\n\n" + EXTRACTED + "\n\nSD 1.5 (`"
                          + SD15 + "`) in `models/checkpoints/`, `" + CANNY_CN + "` in `models/controlnet/`. Every "
                          "frame gets its own canny hint, also in the keyframe pass. " + NOTE_GROUPS, (480, 320))]
    return Example("tokenflow_controlnet", nodes, links + out_links,
                   thumbnail=("3. TokenFlow + ControlNet", "edit along canny edges; SD 1.5 + canny CN"))


def _baselines() -> Example:
    # band 0: TokenFlow (PnP, correspondences on the fly)
    nodes, links = _source(SD21_BASE)
    nodes += [_sampler(10, "pnp")]
    links += [(1, "MODEL", 10, "model"), (5, 0, 10, "positive"), (6, 0, 10, "negative"),
              (7, "inversion", 10, "inversion")]
    out, out_links = _output(11, 10, "video/baseline_tokenflow")
    nodes += out
    links += out_links
    # band 1: per-frame editing (each frame edited alone from its own inverted noise)
    ksampler = {"add_noise": "disable", "noise_seed": 1, "steps": 50, "cfg": 7.5, "sampler_name": "ddim",
                "scheduler": "ddim_uniform", "start_at_step": 0, "end_at_step": 10000,
                "return_with_leftover_noise": "disable"}
    nodes += [N(30, "KSamplerAdvanced", "Edit", 1, band=1, widgets=dict(ksampler), title="Per-frame edit (no TokenFlow)")]
    links += [(1, "MODEL", 30, "model"), (5, 0, 30, "positive"), (6, 0, 30, "negative"),
              (7, "inverted_latent", 30, "latent_image")]
    out, out_links = _output(31, 30, "video/baseline_per_frame", band=1)
    nodes += out
    links += out_links
    # band 2: joint edit of keyframes only (every 5th frame, no propagation)
    nodes += [N(40, "TokenFlowLoadVideo", "Load", band=2, title="Keyframes: every 5th frame",
                widgets={"video": VIDEO, "frame_load_cap": 8, "skip_first_frames": 0, "select_every_nth": 5,
                         "width": 512, "height": 512, "size_multiple": 64, "path": ""}),
              N(41, "VAEEncode", "Invert", band=2),
              N(42, "TokenFlowInvert", "Invert", 1, band=2, widgets={"steps": 50, "inversion_steps": 500,
                                                                     "frame_batch": 0, **INVERSION_METHOD}),
              N(43, "TokenFlowKeyframeJointEdit", "Edit", band=2),
              N(44, "KSamplerAdvanced", "Edit", 1, band=2, widgets=dict(ksampler), title="Joint edit of the keyframes")]
    links += [(40, 0, 41, "pixels"), (1, "VAE", 41, "vae"),
              (1, "MODEL", 42, "model"), (41, 0, 42, "latent"), (4, 0, 42, "conditioning"),
              (1, "MODEL", 43, "model"),
              (43, 0, 44, "model"), (5, 0, 44, "positive"), (6, 0, 44, "negative"),
              (42, "inverted_latent", 44, "latent_image")]
    out, out_links = _output(45, 44, "video/baseline_keyframes_joint", band=2, frames_from=40)
    nodes += out
    links += out_links
    nodes.append(_note(
        "### Baselines, side by side\n\n" + NOTE_VIDEO + "\n\nOne row per method:\n\n1. **TokenFlow** (PnP; "
        "correspondences on the fly, as the official code: the sampler's *correspondences* input is left "
        "unconnected).\n2. **Per-frame editing**: each frame edited alone from its own inverted noise "
        "(flickers).\n3. **Keyframes only**: every 5th frame edited jointly with extended attention (consistent, "
        "but only 8 frames; cost grows with the square of the frame count).\n\nCompare the warp errors (lower = "
        "more consistent). " + NOTE_GROUPS, (480, 330)))
    return Example("baselines", nodes, links,
                   bands=["TokenFlow (PnP)", "per-frame editing", "keyframe joint edit only"],
                   titles={("Load", 0): "Load", ("Invert", 0): "Invert (used by the first two rows)"},
                   thumbnail=("4. Baselines side by side", "vs per-frame, keyframes only; SD 2.1-base"))


FLUX_SIZE = 512  # the loader's frame size; ModelSamplingFlux's width / height follow the loaded frames


def _flux() -> Example:
    """TokenFlow + PnP on Flux-dev through the core loaders: UNETLoader (1), DualCLIPLoader (24), VAELoader (25),
    ModelSamplingFlux (26) at the loaded frames' size (Get Image Size, 29), FluxGuidance on the inversion (27) and
    edit (28) prompts, cfg 1."""
    nodes = [
        N(2, "TokenFlowLoadVideo", "Load", widgets={"video": VIDEO, "frame_load_cap": 40, "skip_first_frames": 0,
                                                    "select_every_nth": 1, "width": FLUX_SIZE, "height": FLUX_SIZE,
                                                    "size_multiple": 64, "path": ""}),
        N(25, "VAELoader", "Load", widgets={"vae_name": FLUX_AE}),
        N(1, "UNETLoader", "Load", 1, widgets={"unet_name": FLUX_DEV, "weight_dtype": "default"}),
        N(24, "DualCLIPLoader", "Load", 1, widgets={"clip_name1": CLIP_L, "clip_name2": T5XXL, "type": "flux"}),
        N(29, "GetImageSize", "Load", 1, title="Frame size"),
        N(26, "ModelSamplingFlux", "Load", 2, widgets={"max_shift": 1.15, "base_shift": 0.5, "width": FLUX_SIZE,
                                                       "height": FLUX_SIZE}),
        N(3, "VAEEncode", "Invert"),
        N(4, "CLIPTextEncode", "Invert", widgets={"text": INVERSION_PROMPT},
          title="Inversion prompt (describes the source)"),
        N(27, "FluxGuidance", "Invert", 1, widgets={"guidance": FLUX_INVERSION_GUIDANCE},
          title="FluxGuidance 1 (inversion)"),
        N(7, "TokenFlowInvert", "Invert", 2, widgets={"steps": 50, "inversion_steps": 500, "frame_batch": 0,
                                                      **FLOW_INVERSION_METHOD}),
        N(5, "CLIPTextEncode", "Edit", widgets={"text": EDIT_PROMPT}, title="Edit prompt"),
        N(6, "CLIPTextEncode", "Edit", widgets={"text": NEGATIVE_PROMPT}, title="Negative prompt (unused at cfg 1)"),
        N(28, "FluxGuidance", "Edit", 1, widgets={"guidance": FLUX_GUIDANCE}),
        _sampler(10, "pnp", col=2, cfg=1.0, pnp_attn_t=FLUX_PNP_ATTN_T),
    ]
    links = [
        (1, "MODEL", 26, "model"), (2, 0, 29, "image"), (29, 0, 26, "width"), (29, 1, 26, "height"),
        (2, 0, 3, "pixels"), (25, "VAE", 3, "vae"),
        (24, "CLIP", 4, "clip"), (24, "CLIP", 5, "clip"), (24, "CLIP", 6, "clip"),
        (4, 0, 27, "conditioning"), (26, "MODEL", 7, "model"), (3, 0, 7, "latent"), (27, 0, 7, "conditioning"),
        (5, 0, 28, "conditioning"),
        (26, "MODEL", 10, "model"), (28, 0, 10, "positive"), (6, 0, 10, "negative"), (7, "inversion", 10, "inversion"),
    ]
    out, out_links = _output(11, 10, "video/tokenflow_flux", vae_from=(25, "VAE"))
    note = (
        "### TokenFlow + Plug-and-Play on Flux-dev\n\n" + NOTE_FLOW_VIDEO + "\n\n" + ON_THE_FLY + " (TokenFlow "
        "Extract Correspondences works on Flux too: wire it as in the SDEdit example.)\n\n**Model files** (the names ComfyUI's Flux templates use):\n\n"
        f"* `{FLUX_DEV}` in `models/diffusion_models/` (FLUX.1-dev, gated: accept the license on "
        "https://huggingface.co/black-forest-labs/FLUX.1-dev first)\n"
        f"* `{CLIP_L}` and `{T5XXL}` in `models/text_encoders/` (https://huggingface.co/comfyanonymous/"
        "flux_text_encoders)\n"
        f"* `{FLUX_AE}` in `models/vae/` (from the FLUX.1-dev repository)\n\n"
        "Flux-dev is guidance-distilled: **cfg 1** on the sampler, the guidance comes from **FluxGuidance**: "
        f"{FLUX_INVERSION_GUIDANCE:g} on the inversion prompt (RF-Solver, FireFlow and Stable Flow invert at guidance "
        f"1), {FLUX_GUIDANCE} on the edit prompt. At cfg 1 the sampler skips the negative prompt; it is "
        "wired so that a cfg above 1 works. The inversion is **fixed_point**: exact on the 50 editing steps, at most "
        "3 evaluations per step (inversion_steps is not used).\n\n**ModelSamplingFlux** shifts the noise schedule by "
        "the frame size, as Flux-dev's own sampler does (without it ComfyUI uses the 1024x1024 shift at every size): "
        "its width / height are wired from the loaded frames (**Frame size**), so they follow the loader's.\n\n"
        "**PnP on Flux**: *pnp_attention_blocks* auto is the `rf_solver` preset (RF-Solver-Edit: image values in "
        f"single blocks 20-37 of 38) and *pnp_attn_t* is its published fraction, **{FLUX_PNP_ATTN_T:g}**; `stable_flow` "
        "(Stable Flow: image keys and values in its vital layers) injects in every step in its paper: set *pnp_attn_t* "
        "1 with it.\n\nFlux " + TINY_ONLY + NOTE_GROUPS)
    nodes += out + [_note(note, (640, 540))]
    return Example("tokenflow_flux", nodes, links + out_links,
                   thumbnail=("5. TokenFlow + PnP on Flux-dev", "Flux-dev files; checked on tiny models only"))


def _sd3() -> Example:
    """TokenFlow + PnP on SD3.5 Large through one CheckpointLoaderSimple (the model's own shift, no sampling node),
    cfg 4 with the negative prompt."""
    nodes, links = _source(SD35_LARGE, method=FLOW_INVERSION_METHOD)
    nodes.append(_sampler(10, "pnp", cfg=SD35_CFG))
    links += [(1, "MODEL", 10, "model"), (5, 0, 10, "positive"), (6, 0, 10, "negative"),
              (7, "inversion", 10, "inversion")]
    out, out_links = _output(11, 10, "video/tokenflow_sd3")
    note = (
        "### TokenFlow + Plug-and-Play on SD3.5\n\n" + NOTE_FLOW_VIDEO + "\n\n" + ON_THE_FLY + "\n\n**Model file** (the "
        "one ComfyUI's SD3.5 template loads):\n\n"
        f"* `{SD35_LARGE}` in `models/checkpoints/` (MMDiT, CLIP-L/G, T5-XXL and VAE in one file; {SD35_LARGE_URL})"
        "\n\nOther SD3 / SD3.5 all-in-one checkpoints load the same way (SD3.5 Medium's second image attention is "
        f"extended and propagated too). **cfg {SD35_CFG:g}** with the negative prompt; the inversion (fixed_point) "
        "solves the edit's own Euler steps on the model's shifted schedule exactly, at most 3 evaluations per step. "
        "PnP on SD3.x swaps the source's image keys and values (Stable Flow's injection) in the second quarter of the "
        "joint blocks by default, a heuristic (no published vital layers for SD3.x; scripts/find_vital_layers.py "
        "finds a model's own): *pnp_attention_blocks* takes e.g. "
        "`double_block:9-17` (SD3.5 Large's default). SD3.5 is trained at 1024x1024: raise the loader's width / "
        "height for sharper frames (memory grows with the pixel count).\n\nSD3.x " + TINY_ONLY + NOTE_GROUPS)
    nodes += out + [_note(note, (560, 400))]
    return Example("tokenflow_sd3", nodes, links + out_links,
                   thumbnail=("6. TokenFlow + PnP on SD3.5", "SD3.5 Large; checked on tiny models only"))


def example_specs() -> list[Example]:
    return [_pnp(), _sdedit(), _controlnet(), _baselines(), _flux(), _sd3()]


def build_examples(object_info: dict) -> dict[str, dict]:
    return {ex.name: build_ui_workflow(ex, object_info, MODEL_LINKS) for ex in example_specs()}


def write_examples(object_info: dict, out_dir: Path = EXAMPLES_DIR, video: str | None = None,
                   names: list[str] | None = None) -> list[Path]:
    """Writes the examples (``names``: only these) and their thumbnails to ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    video = video or str(VIDEO_DIR / "wolf.mp4")
    workflows = build_examples(object_info)
    for example in example_specs():
        if names and example.name not in names:
            continue
        workflow = workflows[example.name]
        problems = check_ui_workflow(workflow, object_info)
        if problems:
            raise ValueError(f"{example.name}: " + "; ".join(problems))
        path = out_dir / f"{example.name}.json"
        path.write_text(json.dumps(workflow, indent=2) + "\n", encoding="utf-8")
        kind = next((k for k in ("controlnet", "sdedit", "baselines") if k in example.name), "")
        write_thumbnail(out_dir / f"{example.name}.jpg", *example.thumbnail, video=video, kind=kind)
        written += [path, out_dir / f"{example.name}.jpg"]
    return written


def _main(argv: list[str]) -> int:
    known = [example.name for example in example_specs()]
    if any(name not in known for name in argv):
        print("usage: python tests/example_specs.py [NAME...]   (starts a temporary ComfyUI to read /object_info, "
              f"then writes example_workflows/NAME.json and .jpg, all of {known} by default)", file=sys.stderr)
        return 2
    from server_harness import ComfyServer, make_base_dir

    with tempfile.TemporaryDirectory(prefix="tokenflow-examples-") as tmp:
        server = ComfyServer(make_base_dir(Path(tmp), stand_ins=False))
        with server:
            object_info = server.object_info()
    for path in write_examples(object_info, names=argv or None):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
