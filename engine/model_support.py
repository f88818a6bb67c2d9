"""What the pack needs to know about a ComfyUI model: family, transformer blocks, PnP layers, identity.

Everything is derived from the model object itself (no hard-coded SD1.5 shapes). :data:`FAMILIES`
is the one registry of family adapters (see ``engine.families.base.FamilyAdapter``): the UNet
families (SD1.x, SD2.x eps/v, SDXL) and the flow-matching DiT families (Flux, SD3.x, in
``engine.families.dit``). Anything no adapter claims is refused with a message naming the fix.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Union

import torch

import comfy.model_sampling
from comfy.ldm.modules.attention import SpatialTransformer
from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock, UNetModel

# UNet block keys: ("input" | "middle" | "output", block id, index inside the SpatialTransformer).
from .families.base import DDPM, FLOW, BlockKey, ModelLayout  # noqa: F401  (re-exported)
from .families.dit import DIT_FAMILIES, DiTFamily


def diffusion_model_of(model_patcher) -> torch.nn.Module:
    return model_patcher.model.diffusion_model


def _is_video_model(model_patcher) -> bool:
    """A video model's latents have a time axis (Wan, HunyuanVideo, LTXV, Mochi, Cosmos: latent_dimensions 3)."""
    latent_format = getattr(model_patcher.model, "latent_format", None)
    return getattr(latent_format, "latent_dimensions", 2) == 3


def _unsupported(model_patcher, why: str) -> ValueError:
    name = type(getattr(model_patcher.model, "diffusion_model", model_patcher.model)).__name__
    if _is_video_model(model_patcher):
        return ValueError(
            f"model: the connected model is {name}, a video model (its latents have a time axis); TokenFlow "
            "edits a video with an IMAGE model: load an SD1.x/SD2.x/SDXL or SD3.x checkpoint with Load Checkpoint, "
            "or a Flux model with Load Diffusion Model")
    return ValueError(
        f"model: TokenFlow cannot edit with the connected model {name}: {why}. Load an SD1.x/SD2.x/SDXL or SD3.x "
        "checkpoint with Load Checkpoint, or a Flux model with Load Diffusion Model; video models (SVD, Wan, "
        "HunyuanVideo, ...) are not image models."
    )


def sampling_rule(model_patcher) -> str:
    """The sampling rule the claiming family adapter declares for the model (:data:`DDPM` or :data:`FLOW`).

    When no adapter claims the model, or its description fails, :data:`DDPM`: the DDIM path's start-of-run
    check then raises the named refusal before any model call.
    """
    family = next((f for f in FAMILIES if f.claims(model_patcher)), None)
    if family is None:
        return DDPM
    try:
        return family.describe(model_patcher).sampling
    except ValueError:
        return DDPM


def check_supported(model_patcher, sampling: str = DDPM) -> ModelLayout:
    """The layout of the connected model from the first family adapter that claims it, or a clear error.

    ``sampling`` is the sampling rule the caller implements (:data:`DDPM` for the DDIM nodes,
    :data:`FLOW` for the flow path); a model of another rule is refused naming its family.
    """
    family = next((f for f in FAMILIES if f.claims(model_patcher)), None)
    if family is None:
        names = ", ".join(dict.fromkeys(f.name for f in FAMILIES))
        raise _unsupported(model_patcher, f"no TokenFlow family adapter claims it (supported: {names})")
    layout = family.describe(model_patcher)
    if layout.sampling != sampling:
        name = type(diffusion_model_of(model_patcher)).__name__
        raise ValueError(
            f"model: this TokenFlow step needs a Stable Diffusion UNet (SD1.x, SD2.x or SDXL) but the connected "
            f"model is {name}, a {layout.sampling} DiT of family {layout.family!r}. The TokenFlow nodes (DDIM "
            "Inversion, Extract Correspondences, Sampler, Keyframe Joint Edit, Load Inversion) take it through "
            "its flow path; this DDIM-only step does not: connect the model to those nodes, or Load an "
            "SD1.x/SD2.x/SDXL checkpoint with Load Checkpoint." if sampling == DDPM else
            f"model: this path needs a {sampling} model but the connected model ({name}, family "
            f"{layout.family!r}) follows the {layout.sampling} rule; use the TokenFlow DDIM nodes for it")
    return layout


def _describe_unet(model_patcher, family: "UNetFamily") -> ModelLayout:
    unet = model_patcher.model.diffusion_model
    sampling = model_patcher.get_model_object("model_sampling")
    if not isinstance(sampling, comfy.model_sampling.ModelSamplingDiscrete) or not hasattr(sampling, "sigmas"):
        raise _unsupported(model_patcher, "its noise schedule is not the discrete DDPM schedule")
    prediction, kind = _prediction_type(sampling)
    if prediction is None:
        raise ValueError(
            f"TokenFlow supports epsilon and v-prediction models, but the connected model predicts {kind} "
            "(a ModelSamplingDiscrete/LCM/EDM patch node, or a distilled checkpoint). Remove the sampling-patch node "
            "or use a regular SD1.x/SD2.x/SDXL checkpoint.")
    if len(sampling.sigmas) != 1000:
        raise _unsupported(model_patcher, f"its schedule has {len(sampling.sigmas)} timesteps, not 1000")
    if getattr(unet, "use_temporal_attention", False) or getattr(unet, "use_temporal_resblocks", False):
        raise _unsupported(model_patcher, "it is a video UNet (SVD)")
    blocks = transformer_blocks(unet)
    if not blocks:
        raise _unsupported(model_patcher, "it has no spatial transformer blocks")
    return ModelLayout(family.name, prediction, blocks, family.pnp_attention(unet, blocks), family.pnp_residual(unet),
                       sampling=DDPM, adapter=family)


def _prediction_type(sampling) -> tuple[str | None, str]:
    """("eps" | "v" | None, name of the prediction class) from the sampling object's MRO.

    The first class that defines its own ``calculate_denoised`` decides: EPS and V_PREDICTION are
    supported; X0, LCM, EDM, CONST (flow) and other parameterisations are not.
    """
    for cls in type(sampling).__mro__[1:]:
        if cls is comfy.model_sampling.V_PREDICTION:
            return "v", cls.__name__
        if cls is comfy.model_sampling.EPS:
            return "eps", cls.__name__
        if "calculate_denoised" in vars(cls):
            return None, cls.__name__
    return None, type(sampling).__name__


def transformer_blocks(unet: torch.nn.Module) -> tuple[BlockKey, ...]:
    """Every BasicTransformerBlock as ComfyUI's (block type, block id, index) patch key."""
    keys: list[BlockKey] = []
    groups = (("input", unet.input_blocks), ("middle", [unet.middle_block]), ("output", unet.output_blocks))
    for kind, seq in groups:
        for block_id, block in enumerate(seq):
            for layer in block:
                if isinstance(layer, SpatialTransformer):
                    keys += [(kind, block_id, i) for i in range(len(layer.transformer_blocks))]
    return tuple(keys)


def default_pnp_attention(unet: torch.nn.Module, blocks: tuple[BlockKey, ...]) -> tuple[BlockKey, ...]:
    """Decoder transformer blocks minus the first decoder attention block (SD: output 4-11; SDXL: output 1-5)."""
    decoder = [b for b in blocks if b[0] == "output"]
    if not decoder:
        return ()
    first_id = min(b[1] for b in decoder)
    return tuple(b for b in decoder if b[1] != first_id)


def default_pnp_residual(unet: torch.nn.Module) -> str:
    """Second ResBlock of the decoder's second resolution level (diffusers up_blocks[1].resnets[1])."""
    per_level = unet.num_res_blocks[-1] + 1 if isinstance(unet.num_res_blocks, (list, tuple)) else unet.num_res_blocks + 1
    return f"output_blocks.{per_level + 1}.0"


@dataclass(frozen=True)
class UNetFamily:
    """A family of DDPM UNets: how to recognise one and where Plug-and-Play injects into it.

    The transformer blocks and the prediction type are read off the model itself; a family only
    decides the defaults that are a matter of choice. Another UNet family is one more adapter in
    :data:`FAMILIES` (checked in order, the first match wins), not edits across the runners.
    """

    name: str
    matches: Callable[[UNetModel], bool]
    pnp_attention: Callable[[UNetModel, tuple[BlockKey, ...]], tuple[BlockKey, ...]] = default_pnp_attention
    pnp_residual: Callable[[UNetModel], tuple[str, ...]] = lambda unet: (default_pnp_residual(unet),)

    def claims(self, model_patcher) -> bool:
        unet = getattr(model_patcher.model, "diffusion_model", None)
        return isinstance(unet, UNetModel) and bool(self.matches(unet))

    def describe(self, model_patcher) -> ModelLayout:
        return _describe_unet(model_patcher, self)


FamilyEntry = Union[UNetFamily, DiTFamily]

FAMILIES: list[FamilyEntry] = [
    # SDXL: 2816-wide ADM input (or a sequential class embedding); PnP at the analogous decoder levels.
    UNetFamily("sdxl", lambda unet: getattr(unet, "adm_in_channels", None) == 2816 or unet.num_classes == "sequential"),
    # SD1.x / SD2.x (and any other UNetModel): the paper's layers, output 4-11 and output_blocks.4.0.
    UNetFamily("sd1/sd2", lambda unet: True),
    # Flux and SD3.x (flow matching, joint text-image attention).
    *DIT_FAMILIES,
]


def _block_list_example(default: tuple[BlockKey, ...]) -> str:
    """The model's default injection blocks of their first kind as a list entry ('output:4-11', 'single_block:20-37')."""
    if not default:
        return "output:4-11"
    kind = default[0][0]
    ids = [b[1] for b in default if b[0] == kind]
    return f"{kind}:{min(ids)}" + (f"-{max(ids)}" if max(ids) != min(ids) else "")


def parse_block_list(text: str, layout: ModelLayout, default: tuple[BlockKey, ...]) -> tuple[BlockKey, ...]:
    """Parse "auto" or a list like "output:4-11, input:7" (all indices of those blocks) into block keys."""
    text = text.strip().lower()
    if text in ("", "auto"):
        return default
    if text == "none":
        return ()
    chosen: set[BlockKey] = set()
    for part in text.replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            kind, ids = part.split(":")
            lo, _, hi = ids.partition("-")
            wanted = range(int(lo), int(hi or lo) + 1)
        except ValueError:
            raise ValueError(f"pnp_attention_blocks: cannot read {part!r}; write e.g. '{_block_list_example(default)}' "
                             "or 'auto'") from None
        matched = [b for b in layout.transformer_blocks if b[0] == kind.strip() and b[1] in wanted]
        if not matched:
            raise ValueError(f"pnp_attention_blocks: {part!r} names no transformer block of this model "
                             f"(it has {sorted({(b[0], b[1]) for b in layout.transformer_blocks})})")
        chosen.update(matched)
    return tuple(b for b in layout.transformer_blocks if b in chosen)


def parse_residual_list(text: str, unet: torch.nn.Module, default: tuple[str, ...]) -> tuple[str, ...]:
    """Parse "auto", "none" or module paths like "output_blocks.4.0" (must be ResBlocks)."""
    text = text.strip()
    if text.lower() in ("", "auto"):
        return default
    if text.lower() == "none":
        return ()
    paths = tuple(p.strip() for p in text.split(",") if p.strip())
    for path in paths:
        try:
            module = unet.get_submodule(path)
        except AttributeError:
            module = None
        if not isinstance(module, ResBlock):
            raise ValueError(f"pnp_residual_blocks: {path!r} is not a ResBlock of this UNet; write e.g. 'output_blocks.4.0'")
    return paths


def model_fingerprint(model_patcher) -> str:
    """Identity of the base weights (LoRA/patches excluded): architecture, schedule and sampled weights."""
    unet = diffusion_model_of(model_patcher)
    digest = hashlib.sha256(type(unet).__name__.encode())
    sampling = model_patcher.get_model_object("model_sampling")
    digest.update(type(sampling).__name__.encode())
    digest.update(sampling.sigmas.detach().float().cpu().numpy().tobytes())
    # A loaded clone may have patched (e.g. LoRA) weights in place; clones share the backup of the
    # original weights, so read those where present to fingerprint the BASE model.
    backup = getattr(model_patcher, "backup", {}) or {}
    for name, param in unet.state_dict().items():
        saved = backup.get(f"diffusion_model.{name}")
        if saved is not None:
            param = saved.weight
        digest.update(f"{name}{tuple(param.shape)}".encode())
        flat = param.detach().reshape(-1)
        sample = torch.cat([flat[:64], flat[-64:]]) if flat.numel() > 128 else flat
        digest.update(sample.float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def frames_fingerprint(model_patcher, samples: torch.Tensor) -> str:
    """The fingerprint of source frames: their latents as the model sees them (process_latent_in), hashed.

    TokenFlow DDIM Inversion stores it and TokenFlow Load Inversion checks it: one recipe for both.
    """
    return tensor_fingerprint(model_patcher.model.process_latent_in(samples.float()).cpu())


def tensor_fingerprint(tensor: torch.Tensor) -> str:
    """Content hash of a tensor (used for the source frames' latents)."""
    digest = hashlib.sha256(str(tuple(tensor.shape)).encode())
    digest.update(tensor.detach().float().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]
