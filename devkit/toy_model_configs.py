"""The model configs of the toy-world diffusion models (a toy world trained here, not real weights).

Two ComfyUI model configs, subclasses of the host's own ``comfy.supported_models`` entries, that match only
the toy checkpoints' widths, so that ``CheckpointLoaderSimple`` (``comfy.sd.load_checkpoint_guess_config``)
detects, builds and loads ``devkit/toy_weights/*.safetensors`` with ComfyUI's own code once :func:`register`
has put them in ``comfy.supported_models.models`` (the stand-in pack ``tests/stand_in_nodes`` does it too):

* :class:`ToySD15`: the SD1.x UNet layout (``channel_mult`` 1,2,2,2, two res blocks a level, one transformer
  block at input 1,2,4,5,7,8, middle, output 3..11), epsilon prediction on the SD1.x discrete schedule,
  ``model_channels`` :data:`UNET_CHANNELS`; its text encoder is ComfyUI's SD1 CLIP at width
  :data:`CLIP_WIDTH` (frozen random weights). Its latents are 4-channel TAESD latents (SD1.x latent format).
* :class:`ToyFluxSchnell`: the Flux-schnell layout (double- then single-stream blocks, RoPE, 2x2 patches,
  no guidance embedding), rectified flow with Flux-schnell's sampling settings (``shift`` 1.0 of
  ``ModelSamplingFlux``); its text encoder is ComfyUI's Flux encoder (CLIP-L pooled + T5 tokens) at tiny
  widths, the T5 padded to :data:`T5_MIN_TOKENS` tokens (ComfyUI's Flux pads to 256, which would make the
  toy model's attention mostly padding). 16-channel TAESD latents (Flux latent format).

The training script builds fresh models from the same classes (:func:`new_unet`, :func:`new_flux`), so the
trained weights fit the configs exactly.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

import comfy.model_patcher
import comfy.sd
import comfy.supported_models
import comfy.supported_models_base
import comfy.text_encoders.flux
from comfy import sd1_clip

import tiny_dit_models  # devkit/, beside this file
import tiny_models

log = logging.getLogger(__name__)

CPU = torch.device("cpu")
CLIP_WIDTH = 48  # the SD1 CLIP's width = the toy UNet's context_dim; the Flux encoder's CLIP-L pooled width
UNET_CHANNELS = 32  # model_channels; the tests' random tiny SD1.x (context_dim 32) never matches it
UNET_HEADS = 4
T5_CONFIG: dict[str, Any] = {"d_model": 32, "d_ff": 64, "d_kv": 16, "num_heads": 2, "num_layers": 1}
T5_MIN_TOKENS = 32
FLUX_DIT: dict[str, Any] = {"hidden_size": 128, "num_heads": 4, "mlp_ratio": 2.0, "axes_dim": [8, 12, 12],
                            "context_in_dim": T5_CONFIG["d_model"], "vec_in_dim": CLIP_WIDTH,
                            "depth": 2, "depth_single_blocks": 4}


class ToySD1ClipModel(sd1_clip.SD1ClipModel):
    """ComfyUI's SD1 CLIP text encoder at the toy width."""

    def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):  # noqa: B006 (ComfyUI's signature)
        config = {**tiny_models.clip_config(CLIP_WIDTH), **model_options.get("clip_l_model_config", {})}
        super().__init__(device=device, dtype=dtype, model_options={**model_options, "clip_l_model_config": config},
                         **kwargs)


class ToySD15(comfy.supported_models.SD15):
    """SD1.x at the toy UNet's widths; matches nothing real (SD1.x has context_dim 768, model_channels 320)."""

    unet_config = {"context_dim": CLIP_WIDTH, "model_channels": UNET_CHANNELS, "use_linear_in_transformer": False,
                   "adm_in_channels": None, "use_temporal_attention": False}
    unet_extra_config = {"num_heads": UNET_HEADS, "num_head_channels": -1}

    def clip_target(self, state_dict={}):  # noqa: B006 (ComfyUI's signature)
        return comfy.supported_models_base.ClipTarget(sd1_clip.SD1Tokenizer, ToySD1ClipModel)


class ToyFluxTokenizer(comfy.text_encoders.flux.FluxTokenizer):
    """ComfyUI's Flux tokenizer with the T5 side padded to :data:`T5_MIN_TOKENS` instead of 256."""

    def __init__(self, embedding_directory=None, tokenizer_data={}):  # noqa: B006 (ComfyUI's signature)
        super().__init__(embedding_directory=embedding_directory,
                         tokenizer_data={**tokenizer_data, "t5xxl_min_length": T5_MIN_TOKENS})


class ToyFluxClipModel(comfy.text_encoders.flux.FluxClipModel):
    """ComfyUI's Flux text encoder (CLIP-L pooled + T5 tokens) at the toy widths."""

    def __init__(self, device="cpu", dtype=None, model_options={}):  # noqa: B006 (ComfyUI's signature)
        options = {**model_options,
                   "clip_l_model_config": {**tiny_models.clip_config(CLIP_WIDTH),
                                           **model_options.get("clip_l_model_config", {})},
                   "t5xxl_model_config": {**T5_CONFIG, **model_options.get("t5xxl_model_config", {})}}
        super().__init__(device=device, dtype=dtype, model_options=options)


class ToyFluxSchnell(comfy.supported_models.FluxSchnell):
    """Flux-schnell (no guidance embedding, shift 1.0) at the toy widths; matches nothing real (Flux has
    ``vec_in_dim`` 768 and 19 + 38 blocks)."""

    unet_config = {"image_model": "flux", "guidance_embed": False, "vec_in_dim": FLUX_DIT["vec_in_dim"],
                   "depth": FLUX_DIT["depth"], "depth_single_blocks": FLUX_DIT["depth_single_blocks"]}
    unet_extra_config = {k: FLUX_DIT[k] for k in ("hidden_size", "context_in_dim", "num_heads", "mlp_ratio",
                                                  "axes_dim")}

    def clip_target(self, state_dict={}):  # noqa: B006 (ComfyUI's signature)
        return comfy.supported_models_base.ClipTarget(ToyFluxTokenizer, ToyFluxClipModel)


TOY_CONFIGS = (ToySD15, ToyFluxSchnell)


def register(configs: tuple[type, ...] = TOY_CONFIGS) -> None:
    """Put ``configs`` first in ComfyUI's model list, in their order (idempotent)."""
    models = comfy.supported_models.models
    for config in reversed(configs):
        if not any(getattr(m, "__name__", "") == config.__name__ and m.unet_config == config.unet_config
                   for m in models):
            models.insert(0, config)
            log.info("registered the %s model config", config.__name__)


def _patcher(model: torch.nn.Module) -> comfy.model_patcher.ModelPatcher:
    return comfy.model_patcher.ModelPatcher(model, load_device=CPU, offload_device=CPU)


def new_unet(seed: int) -> comfy.model_patcher.ModelPatcher:
    """A fresh :class:`ToySD15` model to train: fan-in scaled weights, the output conv zero (as the LDM code
    initialises it), float32."""
    config = {**tiny_models.unet_config("sd15", UNET_CHANNELS, CLIP_WIDTH), "num_heads": UNET_HEADS}
    model_config = ToySD15(config)
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({}, device=CPU)
    tiny_models.init_weights(model.diffusion_model, seed)
    with torch.no_grad():
        model.diffusion_model.out[-1].weight.zero_()
    return _patcher(model)


def new_flux(seed: int) -> comfy.model_patcher.ModelPatcher:
    """A fresh :class:`ToyFluxSchnell` model to train (fan-in scaled weights, the final projection zero)."""
    config = tiny_dit_models.flux_config(**FLUX_DIT, guidance_embed=False)
    model_config = ToyFluxSchnell(config)
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({}, device=CPU)
    tiny_dit_models.init_dit_weights(model.diffusion_model, seed)
    with torch.no_grad():
        model.diffusion_model.final_layer.linear.weight.zero_()
    return _patcher(model)


def _clip(target: comfy.supported_models_base.ClipTarget, seed: int) -> comfy.sd.CLIP:
    options = {"dtype": torch.float32, "load_device": CPU, "offload_device": CPU, "initial_device": CPU}
    clip = comfy.sd.CLIP(target, model_options=options)
    tiny_models.init_weights(clip.cond_stage_model, seed, skip=("logit_scale",))
    return clip


def new_sd_clip(seed: int) -> comfy.sd.CLIP:
    """The toy UNet's frozen random text encoder (ComfyUI's SD1 CLIP at width :data:`CLIP_WIDTH`)."""
    return _clip(ToySD15.clip_target(None), seed)


def new_flux_clip(seed: int) -> comfy.sd.CLIP:
    """The toy Flux's frozen random text encoder (ComfyUI's CLIP-L + T5 at tiny widths)."""
    return _clip(ToyFluxSchnell.clip_target(None), seed)
