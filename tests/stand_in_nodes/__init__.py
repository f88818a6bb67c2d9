"""TEST-ONLY ComfyUI custom node pack: lets the REAL core loaders load tiny random-weight model files.

Never shipped, never part of the product: ``tests/server_harness.py`` links this folder into the
``custom_nodes/`` of a throw-away ComfyUI base directory next to the real pack, and the headless
runner test loads it with ``scripts/tokenflow_edit.py --extra-nodes tests/stand_in_nodes``.

Why it exists: ComfyUI's ``CheckpointLoaderSimple`` detects the model family from the state dict
and matches it against ``comfy.supported_models.models``, whose entries pin real widths
(``SD15`` requires ``context_dim`` 768 and ``model_channels`` 320). A checkpoint with the tiny
widths of ``devkit/tiny_models.py`` therefore loads as "could not detect model type". Importing this
pack registers :class:`TinySD15`, a ``supported_models.SD15`` subclass that matches only the tiny
widths (``context_dim`` 32, ``model_channels`` 32) and builds a matching tiny CLIP text encoder.
Nothing else is patched: the file is read, detected, built and loaded by ComfyUI's own code
(``comfy.sd.load_checkpoint_guess_config``), the VAE is detected as TAESD from its keys, and
``ControlNetLoader`` loads the tiny cldm ControlNet file through ``comfy.controlnet``.

It also registers :class:`TinyFlux`, a ``supported_models.Flux`` subclass for the tiny all-in-one Flux
checkpoint (``devkit/tiny_dit_models.py`` widths). ComfyUI's Flux detection
(``comfy.model_detection.detect_unet_config``) reads only ``in_channels``, ``vec_in_dim``, the block
counts and ``guidance_embed`` from the weights and writes the real widths (hidden 3072, context 4096,
24 heads, axes 16/56/56) into the detected config; :class:`TinyFlux` matches only the tiny
``vec_in_dim`` and block counts and sets the tiny widths through ``unet_extra_config``, the hook the
host applies after matching. Its text encoder is ComfyUI's ``FluxClipModel`` (CLIP-L + T5) at tiny
widths, so CLIPTextEncode gives Flux-shaped conditioning (T5 tokens, CLIP-L pooled output).
:class:`TinySD3` does the same for the tiny all-in-one SD3 checkpoint (its widths are all read from the
weights; it matches only depth 2 and builds ComfyUI's SD3 text encoder with a tiny T5 only).

It registers the toy-world configs too (``devkit/toy_model_configs.py``: ``ToySD15``, ``ToyFluxSchnell``), so
the checkpoints trained here (``devkit/toy_weights/toy_*.safetensors``; ``devkit/toy_weights/extra_model_paths.yaml``
names their folder) load in a server, the runner and the example graphs as in ``devkit/toy_models.py``.

The files themselves are written by :mod:`tiny_files` (``write_tiny_model_files``), run with
``python tests/stand_in_nodes/tiny_files.py <models dir>`` to make them by hand.

It defines no nodes (an empty ``NODE_CLASS_MAPPINGS`` keeps ComfyUI's loader happy).
"""
from __future__ import annotations

import logging
import os
import sys

_HERE = os.path.dirname(os.path.realpath(__file__))
_DEVKIT = os.path.join(os.path.dirname(os.path.dirname(_HERE)), "devkit")
if _DEVKIT not in sys.path:  # for `import tiny_models`, `import tiny_dit_models` (devkit/)
    sys.path.append(_DEVKIT)

import comfy.supported_models  # noqa: E402
import comfy.supported_models_base  # noqa: E402
import comfy.text_encoders.flux  # noqa: E402
import comfy.text_encoders.sd3_clip  # noqa: E402
from comfy import sd1_clip  # noqa: E402

import tiny_dit_models  # noqa: E402
import tiny_models  # noqa: E402
import toy_model_configs  # noqa: E402

from .tiny_files import TINY_SD3_T5_CONFIG, TINY_T5_CONFIG  # noqa: E402  (the writer's tiny T5 widths)

log = logging.getLogger(__name__)

TINY_WIDTH = 32  # model_channels and context_dim of the tiny sd15 UNet, width of its CLIP


class TinySD1ClipModel(sd1_clip.SD1ClipModel):
    """ComfyUI's SD1 CLIP text encoder with the tiny ``tiny_models.clip_config`` widths."""

    def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):  # noqa: B006 (ComfyUI's signature)
        config = {**tiny_models.clip_config(TINY_WIDTH), **model_options.get("clip_l_model_config", {})}
        super().__init__(device=device, dtype=dtype, model_options={**model_options, "clip_l_model_config": config},
                         **kwargs)


class TinySD15(comfy.supported_models.SD15):
    """SD1.x with the tiny widths of ``tiny_models.make_unet_model("sd15")``; matches nothing real."""

    unet_config = {
        "context_dim": TINY_WIDTH,
        "model_channels": TINY_WIDTH,
        "use_linear_in_transformer": False,
        "adm_in_channels": None,
        "use_temporal_attention": False,
    }
    unet_extra_config = {  # tiny_models' sd15 head layout (the real SD1.x has 8 heads)
        "num_heads": tiny_models.unet_config("sd15")["num_heads"],
        "num_head_channels": -1,
    }

    def clip_target(self, state_dict={}):  # noqa: B006 (ComfyUI's signature)
        return comfy.supported_models_base.ClipTarget(sd1_clip.SD1Tokenizer, TinySD1ClipModel)



class TinyFluxClipModel(comfy.text_encoders.flux.FluxClipModel):
    """ComfyUI's Flux text encoder (CLIP-L pooled + T5 tokens) with a tiny CLIP-L and a one-layer tiny T5."""

    def __init__(self, device="cpu", dtype=None, model_options={}):  # noqa: B006 (ComfyUI's signature)
        options = {**model_options,
                   "clip_l_model_config": {**tiny_models.clip_config(tiny_dit_models.FLUX_POOLED),
                                           **model_options.get("clip_l_model_config", {})},
                   "t5xxl_model_config": {**TINY_T5_CONFIG, **model_options.get("t5xxl_model_config", {})}}
        super().__init__(device=device, dtype=dtype, model_options=options)


class TinyFlux(comfy.supported_models.Flux):
    """Flux-dev with the tiny widths of ``tiny_dit_models.make_flux_model``; matches nothing real (Flux has
    ``vec_in_dim`` 768 and 19 + 38 blocks)."""

    unet_config = {
        "image_model": "flux",
        "guidance_embed": True,
        "vec_in_dim": tiny_dit_models.FLUX_CONFIG["vec_in_dim"],
        "depth": tiny_dit_models.FLUX_CONFIG["depth"],
        "depth_single_blocks": tiny_dit_models.FLUX_CONFIG["depth_single_blocks"],
    }
    unet_extra_config = {k: tiny_dit_models.FLUX_CONFIG[k]
                         for k in ("hidden_size", "context_in_dim", "num_heads", "mlp_ratio", "axes_dim")}

    def clip_target(self, state_dict={}):  # noqa: B006 (ComfyUI's signature)
        return comfy.supported_models_base.ClipTarget(comfy.text_encoders.flux.FluxTokenizer, TinyFluxClipModel)


class TinySD3ClipModel(comfy.text_encoders.sd3_clip.SD3ClipModel):
    """ComfyUI's SD3 text encoder with only a one-layer tiny T5 (the tiny SD3 checkpoint holds no CLIP-L/G)."""

    def __init__(self, device="cpu", dtype=None, model_options={}):  # noqa: B006 (ComfyUI's signature)
        options = {**model_options,
                   "t5xxl_model_config": {**TINY_SD3_T5_CONFIG, **model_options.get("t5xxl_model_config", {})}}
        super().__init__(clip_l=False, clip_g=False, t5=True, device=device, dtype=dtype, model_options=options)


class TinySD3(comfy.supported_models.SD3):
    """SD3.x with the tiny MMDiT of ``tiny_dit_models.make_sd3_model`` (depth 2; SD3 medium has 24, SD3.5 large 38).
    ComfyUI reads every SD3 width from the weights: only the text encoder needs the stand-in."""

    unet_config = {"in_channels": 16, "pos_embed_scaling_factor": None, "depth": tiny_dit_models.SD3_CONFIG["depth"]}

    def clip_target(self, state_dict={}):  # noqa: B006 (ComfyUI's signature)
        return comfy.supported_models_base.ClipTarget(comfy.text_encoders.sd3_clip.SD3Tokenizer, TinySD3ClipModel)


STAND_INS = (TinySD15, TinyFlux, TinySD3)


def register() -> None:
    """Put the stand-in configs and the toy-world configs first in ComfyUI's model list (idempotent)."""
    toy_model_configs.register(STAND_INS + toy_model_configs.TOY_CONFIGS)


register()

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
