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
if _DEVKIT not in sys.path:  # for `import tiny_models` (devkit/tiny_models.py)
    sys.path.append(_DEVKIT)

import comfy.supported_models  # noqa: E402
import comfy.supported_models_base  # noqa: E402
from comfy import sd1_clip  # noqa: E402

import tiny_models  # noqa: E402

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


def register() -> None:
    """Put :class:`TinySD15` first in ComfyUI's model list (idempotent)."""
    models = comfy.supported_models.models
    if not any(getattr(m, "__name__", "") == TinySD15.__name__ and m.unet_config == TinySD15.unet_config
               for m in models):
        models.insert(0, TinySD15)
        log.info("TokenFlow test stand-ins: registered the tiny SD1.x model config (test only)")


register()

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
