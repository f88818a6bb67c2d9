"""The refusals of the TokenFlow stages' inputs, before any model call: each raises a clear error naming the
input and the fix.

Every stage of every sampling rule opens the same way: :func:`run_checks` runs the rule's ordered list of
checks (built from the steps below: ``EDIT_CHECKS`` of ``ddpm/edit.py`` and ``flow/edit.py``, the lists in each
rule's ``run_inversion``, :data:`RUN_ON_INVERSION` for extraction) on a :class:`Stage`, which collects what they
establish on the way (the model's layout, its fingerprint, the frames).
:data:`RUN_ON_INVERSION` is the opening every run on an inversion shares (extraction, edit).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ..data.frame_size import MAX_SIZE, MIN_SIDE
from ..data.products import TokenFlowCorrespondences, TokenFlowInversion, extracted_from
from .editors import get_editor
from .families.base import ModelLayout
from .families.fingerprints import model_fingerprint
from .families.registry import check_supported
from .patches.contract import KEY
from .patches.install import check_attention_patches
from .plan.call_sizing import check_frame_size_fits

MAX_LATENT_SIDE, MIN_LATENT_SIDE = MAX_SIZE // 8, MIN_SIDE // 8  # the loader's and the runner's px limits, in latents


def check_finite(values: torch.Tensor, what: str, fix: str) -> None:
    """Refuse NaN or infinite values: ``what`` names the input ("latent: the latent"), ``fix`` says what to do."""
    if not torch.isfinite(values).all():
        raise ValueError(f"{what} contains NaN or infinite values; {fix}")


def check_latent_frames(latent: dict, input_name: str = "latent", channels: int | None = None) -> torch.Tensor:
    """Validate a LATENT holding a video (one frame per batch item) and return its samples."""
    if not isinstance(latent, dict) or not isinstance(latent.get("samples"), torch.Tensor):
        raise ValueError(f"{input_name}: expected a LATENT from VAE Encode of the video frames")
    samples = latent["samples"]
    if samples.ndim != 4:
        raise ValueError(f"{input_name}: expected image latents (frames, channels, height, width), got shape "
                         f"{tuple(samples.shape)}; video-model latents are not supported: encode the frames with "
                         "VAE Encode of an SD1.x/SD2.x/SDXL checkpoint")
    if samples.shape[0] == 0:
        raise ValueError(f"{input_name}: the latent has 0 frames; check the video loader's frame_load_cap/skip settings")
    if channels is not None and samples.shape[1] != channels:
        raise ValueError(f"{input_name}: the latent has {samples.shape[1]} channels but the model expects {channels}; "
                         "encode the frames with the VAE that belongs to this checkpoint")
    h, w = samples.shape[-2:]
    lo, hi = MIN_LATENT_SIDE * 8, MAX_LATENT_SIDE * 8
    sides = [f"the {side} ({px} px) is {'below' if px < lo else 'above'} {lo if px < lo else hi} px"
             for side, px in (("width", w * 8), ("height", h * 8)) if not lo <= px <= hi]
    if sides:
        raise ValueError(f"{input_name}: frames of {w * 8}x{h * 8} px are outside the sizes TokenFlow supports "
                         f"({'; '.join(sides)}); use sizes between {lo} and {hi} px (set width/height in "
                         "TokenFlow Load Video)")
    check_finite(samples, f"{input_name}: the latent", "re-encode the frames (a VAE in fp16 can overflow: try "
                 "--fp32-vae)")
    if latent.get("noise_mask") is not None:
        raise ValueError(f"{input_name}: masked latents (Set Latent Noise Mask) are not supported by TokenFlow; "
                         "connect the VAE Encode output directly (remove the mask node)")
    return samples


def check_correspondences(corr: TokenFlowCorrespondences, inversion: TokenFlowInversion) -> None:
    """Refuse correspondences that were extracted from another inversion or model."""
    if not extracted_from(corr.inversion_fingerprint, corr.model_fingerprint, inversion):
        raise ValueError("correspondences: they were extracted from a different inversion (another video, model or "
                         "step count) than the one connected to 'inversion'; connect the same TokenFlow Invert output "
                         "to TokenFlow Extract Correspondences and to this sampler")


def check_inversion_model(inversion: TokenFlowInversion, model_fp: str, input_name: str = "inversion") -> None:
    if inversion.model_fingerprint != model_fp:
        raise ValueError(f"{input_name}: it was made with a different model (fingerprint {inversion.model_fingerprint}, "
                         f"this model {model_fp}); invert the video with the same checkpoint you edit with "
                         "(LoRAs may differ: only the base weights are compared)")


def check_conditioning(conditioning, model, input_name: str) -> None:
    """Refuse a CONDITIONING that this UNet cannot use (empty, another model's text encoder, NaN)."""
    if not isinstance(conditioning, (list, tuple)) or not conditioning:
        raise ValueError(f"{input_name}: expected a CONDITIONING (e.g. from CLIP Text Encode), got an empty or "
                         "unknown value; connect a text encoder's output")
    expected = getattr(getattr(model.model, "model_config", None), "unet_config", {}).get("context_dim")
    for entry in conditioning:
        cond = entry[0] if isinstance(entry, (list, tuple)) and len(entry) == 2 else None
        if not isinstance(cond, torch.Tensor) or cond.ndim != 3:
            raise ValueError(f"{input_name}: expected a CONDITIONING (e.g. from CLIP Text Encode), got an entry that "
                             "is not [tensor, options]; connect a text encoder's output")
        if isinstance(expected, int) and cond.shape[-1] != expected:
            raise ValueError(f"{input_name}: the conditioning has width {cond.shape[-1]} but this model expects "
                             f"{expected}; encode the prompt with the CLIP of the same checkpoint (an SDXL prompt "
                             "cannot drive an SD1.x model and vice versa)")
        check_finite(cond, f"{input_name}: the conditioning", "encode the prompt again (a text encoder in fp16 can "
                     "overflow: try --fp32-text-enc)")


def check_no_area(conditioning, input_name: str) -> None:
    """Refuse area conditioning, whatever its size: for every cond with an area (Conditioning Set Area, its
    percentage form, or Conditioning Set Mask with set_cond_area "mask bounds") ComfyUI crops the model input to
    the area and copies the cond, id and all, into every other prompt, the source branch's included. TokenFlow's
    correspondences cover whole frames and its keyframe records are kept per cond id: it can follow neither.

    A mask without bounds only weights a prompt's prediction over whole frames, which TokenFlow honours.
    """
    for options in _options_of(conditioning):
        if options.get("mask") is not None and options.get("set_area_to_bounds"):
            raise ValueError(f"{input_name}: Conditioning Set Mask with set_cond_area 'mask bounds' crops the frames "
                             "to the mask's box, which TokenFlow does not support: its correspondences and propagated "
                             "attention cover whole frames. Set set_cond_area to 'default' (the mask then weights the "
                             "prompt over whole frames)")
        if options.get("area") is not None:
            raise ValueError(f"{input_name}: area conditioning (Conditioning Set Area) is not supported by TokenFlow, "
                             "even over the whole frame: ComfyUI crops the frames to the area and copies the prompt "
                             "into the other prompts, and TokenFlow's correspondences and propagated attention cover "
                             "whole frames. Remove the Set Area node (or combine full-frame prompts with Conditioning "
                             "Combine)")


def check_every_step(conditioning, input_name: str, fix: str) -> None:
    """Refuse an inversion prompt whose timestep ranges (Conditioning Set Timestep Range) leave steps without any
    of its entries: the source branch runs it at every step (the steps' PnP features and correspondences come from
    it), and a step without it would have no source branch. Ranges that together cover every step are accepted."""
    spans = sorted((max(o.get("start_percent", 0.0), o.get("clip_start_percent", 0.0)),
                    min(o.get("end_percent", 1.0), o.get("clip_end_percent", 1.0))) for o in _options_of(conditioning))
    covered = 0.0
    for start, end in spans:
        if start > covered:
            break
        covered = max(covered, end)
    if covered < 1.0:
        raise ValueError(f"{input_name}: the inversion prompt's timestep range (Conditioning Set Timestep Range) "
                         f"leaves the steps from {covered:.0%} of sampling on without a prompt, but TokenFlow's source "
                         f"branch runs the inversion prompt at every step; {fix}")


def _options_of(conditioning) -> list[dict]:
    """The options dict of every [cond, options] entry of a CONDITIONING (malformed entries give {})."""
    return [entry[1] if isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[1], dict) else {}
            for entry in conditioning or ()]


def check_not_joint_edit_model(model, input_name: str = "model") -> None:
    """The Keyframe Joint Edit output is for plain samplers; the TokenFlow stages patch attention themselves."""
    clone = model.model_options.get(KEY)
    if clone is not None and clone.joint:
        raise ValueError(f"{input_name}: this model comes from TokenFlow Keyframe Joint Edit, whose attention patch is "
                         "for ordinary samplers (KSampler). Connect the model from Load Checkpoint (or your LoRA "
                         "loaders) directly: TokenFlow Invert, Extract Correspondences and Sampler patch it themselves")


# What other nodes install on a model that TokenFlow's stages cannot run, keyed on what each installs (never on a
# foreign wrapper in general: TorchCompileModel's, core context windows' and other packs' keep working).
CACHE_KEY = "easycache"  # transformer_options key of core's EasyCache and LazyCache holders (and their wrappers' keys)
ADE_KEY = "ADE"  # AnimateDiff-Evolved's key (ModelPatcherHelper.ADE): its wrappers, motion models and injections
ADE_PARAMS = "ADE_params"  # the attachment Use Evolved Sampling / Apply AnimateDiff Model always set


def _keyed(model, key: str) -> bool:
    """Whether ``model`` (a ModelPatcher) has wrappers, injections or additional models under ``key``."""
    wrappers = getattr(model, "wrappers", {}) or {}
    return (any(key in by_key for by_key in wrappers.values())
            or key in (getattr(model, "injections", {}) or {}) or key in (getattr(model, "additional_models", {}) or {}))


def check_runs_on_frame_subsets(model, input_name: str = "model") -> None:
    """Refuse nodes whose state spans whole sampler steps or the whole batch: TokenFlow evaluates each step as a
    keyframe pass and propagation passes on subsets of the frames (EasyCache, LazyCache, AnimateDiff-Evolved)."""
    holder = model.model_options.get("transformer_options", {}).get(CACHE_KEY)
    if holder is not None or _keyed(model, CACHE_KEY) or _keyed(model, "lazycache"):
        name = "LazyCache" if type(holder).__name__ == "LazyCacheHolder" or _keyed(model, "lazycache") else "EasyCache"
        raise ValueError(f"{input_name}: {name} is applied to it; {name} reuses a step's model outputs by comparing "
                         "whole steps, but TokenFlow evaluates each step as keyframe and propagation calls on subsets "
                         f"of the frames, so it cannot cache them. Remove the {name} node (connect the model before it)")
    attachments = getattr(model, "attachments", {}) or {}
    if ADE_PARAMS in attachments or _keyed(model, ADE_KEY):
        raise ValueError(f"{input_name}: AnimateDiff-Evolved is applied to it (Use Evolved Sampling / Apply AnimateDiff "
                         "Model); its motion modules and sampling wrappers expect the whole clip in every model call, "
                         "but TokenFlow evaluates each step on subsets of the frames (and keeps them consistent "
                         "itself). Connect the model without the AnimateDiff-Evolved nodes")


def _cfg_function_of(fn, module: str, owner: str) -> bool:
    """Whether ``fn`` is the CFG function that node class ``owner`` of core module ``module`` sets (ComfyUI loads
    comfy_extras by file path in the server: its module name is then the path)."""
    name = str(getattr(fn, "__module__", "") or "").replace("\\", "/").rsplit("/", 1)[-1].rsplit(".", 1)[-1]
    return name == module and str(getattr(fn, "__qualname__", "")).startswith(f"{owner}.")


def _captured(fn, name: str, missing=None):
    """The value ``fn`` closes over under ``name`` (``missing`` when it closes over no such name)."""
    names = getattr(getattr(fn, "__code__", None), "co_freevars", ())
    return fn.__closure__[names.index(name)].cell_contents if name in names else missing


def check_guidance(model, input_name: str = "model") -> None:
    """Refuse guidance whose extra pass TokenFlow cannot run: Self-Attention Guidance blurs by the uncond branch's
    middle-block self-attention map, which TokenFlow's propagated frames never compute. APG's momentum keeps one
    running guidance for the whole batch it saw last, so TokenFlow's per-subset calls would mix frames."""
    for fn in model.model_options.get("sampler_pre_cfg_function", []):
        if _cfg_function_of(fn, "nodes_apg", "APG") and _captured(fn, "momentum", 0.0) != 0:
            raise ValueError(f"{input_name}: Adaptive Projected Guidance is applied to it with momentum "
                             f"{_captured(fn, 'momentum')}; its running average is one tensor for the frames of the "
                             "last call, but TokenFlow evaluates each step on subsets of the frames, so it would mix "
                             "frames. Set APG's momentum to 0 (eta and norm_threshold work with TokenFlow)")
    for fn in model.model_options.get("sampler_post_cfg_function", []):
        if _cfg_function_of(fn, "nodes_sag", "SelfAttentionGuidance"):
            raise ValueError(f"{input_name}: Self-Attention Guidance is applied to it; its extra pass needs the "
                             "uncond branch's self-attention map of the middle block, which TokenFlow replaces (the "
                             "frames take their self-attention from the keyframes). Remove the Self-Attention Guidance "
                             "node (PerturbedAttentionGuidance and SkipLayerGuidance work with TokenFlow)")


def check_source_images(images, inversion: TokenFlowInversion, input_name: str = "source_images") -> None:
    """Optional source frames (IMAGE) must be the inverted frames: same count and the latent's pixel size."""
    if images is None:
        return
    c, h, w = inversion.latent_shape
    if images.ndim != 4 or images.shape[0] != inversion.n_frames or tuple(images.shape[1:3]) != (h * 8, w * 8):
        got = "x".join(str(v) for v in images.shape)
        raise ValueError(f"{input_name}: {got} images do not match the inversion ({inversion.n_frames} frames of "
                         f"{w * 8}x{h * 8} px); connect the frames that were encoded for TokenFlow DDIM Inversion "
                         "(the Load Video output), or leave it unconnected for the latent preview")


def check_hint_count(hint, n_frames: int, input_name: str) -> None:
    """A ControlNet needs one hint per frame or a single hint."""
    if isinstance(hint, torch.Tensor) and hint.shape[0] not in (1, n_frames):
        raise ValueError(f"{input_name}: a ControlNet applied to it has {hint.shape[0]} hint images but the video has "
                         f"{n_frames} frames; feed the ControlNet one hint per frame (run the preprocessor on the same "
                         "frames) or a single image")


def check_control_hints(conditioning, n_frames: int, input_name: str) -> None:
    """Every ControlNet in the conditioning needs one hint per frame or a single hint (checked before sampling)."""
    for options in _options_of(conditioning):
        control = options.get("control")
        while control is not None:
            check_hint_count(getattr(control, "cond_hint_original", None), n_frames, input_name)
            control = getattr(control, "previous_controlnet", None)


def check_flow_conditioning(conditioning: list, model, name: str) -> None:
    """Refuse conditioning a flow DiT cannot read: reference latents (Kontext), an attention mask (TokenFlow's
    attention on DiTs applies none), or a token width that is not the model's text width (e.g. SD text embeddings
    into Flux)."""
    dm = model.model.diffusion_model
    width = getattr(getattr(dm, "params", None), "context_in_dim", None)
    embed = getattr(dm, "context_embedder", None)
    if width is None and isinstance(embed, torch.nn.Linear):
        width = embed.in_features
    for cond, extra in conditioning:
        if isinstance(extra, dict) and extra.get("reference_latents") is not None:
            raise ValueError(f"{name}: it carries reference latents (Flux Kontext / ReferenceLatent), whose tokens "
                             "TokenFlow cannot tell from the frame's image tokens; remove the ReferenceLatent node")
        if isinstance(extra, dict) and extra.get("attention_mask") is not None:
            raise ValueError(f"{name}: it carries an attention mask (attention_mask: from a text encoder that returns "
                             "one, or Apply Style Model with strength_type attn_bias), which TokenFlow's attention "
                             "on DiT models (Flux, SD3.x) does not apply; encode the prompt without the mask (Apply "
                             "Style Model: strength_type multiply)")
        if width is not None and cond.shape[-1] != width:
            raise ValueError(f"{name}: its text embeddings are {cond.shape[-1]} wide but this model reads {width}-wide "
                             "ones; encode the prompt with the text encoders of this model (DualCLIPLoader / the "
                             "checkpoint's CLIP) in CLIPTextEncode")


# -- the skeleton: each rule's ordered list of these steps, run on one Stage ----------------------------------------

@dataclass
class Stage:
    """The inputs one stage's refusals read, and what the steps establish on the way."""

    model: Any
    sampling: str  # the rule the stage implements (families.base.DDPM / FLOW)
    prompts: tuple[tuple[str, Any], ...] = ()  # (input name, CONDITIONING) in the order they are checked
    latent: dict | None = None
    inversion: TokenFlowInversion | None = None
    correspondences: Any = None
    editor: str | None = None
    editor_options: dict | None = None
    layout: ModelLayout | None = None  # by supported_model
    fingerprint: str | None = None  # by model_identity (inversion_model takes it too)
    samples: torch.Tensor | None = None  # by latent_frames

    @property
    def n_frames(self) -> int:
        return self.samples.shape[0] if self.samples is not None else self.inversion.n_frames


Check = Callable[[Stage], None]
PromptCheck = Callable[[Stage, str, Any], None]


def run_checks(stage: Stage, checks: Sequence[Check]) -> Stage:
    """Every check of a rule's stage, in its order; the first refusal raises."""
    for check in checks:
        check(stage)
    return stage


def supported_model(stage: Stage) -> None:
    stage.layout = check_supported(stage.model, sampling=stage.sampling)


def latent_frames(stage: Stage) -> None:
    stage.samples = check_latent_frames(stage.latent, "latent", stage.model.model.latent_format.latent_channels)


def not_joint_edit_model(stage: Stage) -> None:
    check_not_joint_edit_model(stage.model)


def attention_patches(stage: Stage) -> None:
    check_attention_patches(stage.model, stage.layout)


def runs_on_frame_subsets(stage: Stage) -> None:
    check_runs_on_frame_subsets(stage.model)


def guidance(stage: Stage) -> None:
    check_guidance(stage.model)


def model_identity(stage: Stage) -> None:
    """The model's fingerprint, taken before any model call: a product must name the base weights, and while a
    prompt's weight hooks (comfy.hooks) are applied during sampling the weights in place are not those."""
    stage.fingerprint = model_fingerprint(stage.model)


def inversion_model(stage: Stage) -> None:
    model_identity(stage)
    check_inversion_model(stage.inversion, stage.fingerprint)


def latent_fits(stage: Stage) -> None:
    check_frame_size_fits(stage.model, tuple(stage.samples.shape[1:]), "latent")


def inversion_fits(stage: Stage) -> None:
    check_frame_size_fits(stage.model, stage.inversion.latent_shape, "inversion")


def correspondences_product(stage: Stage) -> None:
    if stage.correspondences is not None and not isinstance(stage.correspondences, TokenFlowCorrespondences):
        raise ValueError("correspondences: expected the output of TokenFlow Extract Correspondences (or Load "
                         f"Correspondences), got {type(stage.correspondences).__name__}; connect that node's output")


def correspondences_match(stage: Stage) -> None:
    """Correspondences of another model, video or step count are refused by their fingerprints."""
    if stage.correspondences is not None:
        check_correspondences(stage.correspondences, stage.inversion)


def editor_conditioning(stage: Stage) -> None:
    prompts = dict(stage.prompts)
    get_editor(stage.editor).check_conditioning(prompts["positive"], prompts["negative"])


def usable_conditioning(stage: Stage, name: str, conditioning) -> None:
    check_conditioning(conditioning, stage.model, name)


def flow_conditioning(stage: Stage, name: str, conditioning) -> None:
    check_flow_conditioning(conditioning, stage.model, name)


def no_area(stage: Stage, name: str, conditioning) -> None:
    check_no_area(conditioning, name)


def every_step(stage: Stage, name: str, conditioning) -> None:
    check_every_step(conditioning, name, "remove the Set Timestep Range node from it (or combine ranges that "
                     "cover 0 to 1)")


def inversion_prompt(stage: Stage) -> None:
    """The source branch's prompt is the inversion's: refused as the inversion's own prompt would have been (an
    inversion saved by an older version may carry an area or a partial timestep range)."""
    fix = "invert the video again with a prompt without it"
    check_no_area(stage.inversion.conditioning, "inversion")
    check_every_step(stage.inversion.conditioning, "inversion", fix)


def control_hints(stage: Stage, name: str, conditioning) -> None:
    check_control_hints(conditioning, stage.n_frames, name)


def each_prompt(*checks: PromptCheck) -> Check:
    """One step: for every prompt in turn, ``checks`` in order."""
    def step(stage: Stage) -> None:
        for name, conditioning in stage.prompts:
            for check in checks:
                check(stage, name, conditioning)
    return step


# The opening of every run on an inversion: a model of the stage's rule that is not the Joint Edit's nor a per-step
# cache's or AnimateDiff's, no guidance TokenFlow cannot propagate (named before the attention patch it installs),
# other attention patches TokenFlow's can be chained with, the inversion's own model, frames that fit the device,
# the inversion's prompt usable by the source branch at every step.
RUN_ON_INVERSION: tuple[Check, ...] = (supported_model, not_joint_edit_model, runs_on_frame_subsets, guidance,
                                       attention_patches, inversion_model, inversion_fits, inversion_prompt)
