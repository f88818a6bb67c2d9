"""Tiny random-weight models built from ComfyUI's own classes (no mocks).

Every model here is the real ComfyUI object a checkpoint loader would give (a
``comfy.model_patcher.ModelPatcher`` around a ``comfy.model_base`` model, a ``comfy.sd.VAE``,
a ``comfy.sd.CLIP``, a ``comfy.controlnet.ControlNet``), with the real block layout of
SD1.x / SD2.x / SDXL but tiny widths, float32 on the CPU, and weights drawn from a
``torch.Generator`` seeded by the caller, so results are reproducible run to run.

ComfyUI creates its layers with ``comfy.ops.disable_weight_init`` which leaves the weights
uninitialised (``torch.empty``), so :func:`init_weights` fills EVERY parameter:
fan-in scaled normal weights (outputs stay O(1) and depend on the inputs), zero biases,
unit norm weights.

``comfy.cli_args.args.cpu`` must be set before ``comfy.model_management`` is first imported
(``tests/conftest.py`` does it).
"""
from __future__ import annotations

import logging
from typing import Any, Union

import torch

import comfy.cldm.cldm
import comfy.controlnet
import comfy.model_base
import comfy.model_patcher
import comfy.ops
import comfy.sd
import comfy.sd1_clip
import comfy.supported_models
import comfy.supported_models_base
from comfy.ldm.models.autoencoder import AutoencoderKL

log = logging.getLogger(__name__)

CPU = torch.device("cpu")
FAMILIES = ("sd15", "sd2v", "sdxl")

# SDXL's encode_adm appends 6 sinusoidal size embeddings of 256 channels to the pooled output.
SDXL_SIZE_EMBED_CHANNELS = 6 * 256
SDXL_POOLED_DIM = 32

_COMMON: dict[str, Any] = {
    "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4,
    "use_spatial_transformer": True, "legacy": False, "use_temporal_attention": False,
    "use_temporal_resblock": False, "dtype": torch.float32,
}
# The real layouts of model_detection.unet_config_from_diffusers_unet with tiny widths.
# SD1.x/SD2.x: one transformer block at input 1,2,4,5,7,8, middle, output 3..11 (16 in all).
_SD_LAYOUT: dict[str, Any] = {
    "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 2, 2], "adm_in_channels": None,
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_middle": 1,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
}
_UNET_CONFIGS: dict[str, dict[str, Any]] = {
    # SD1.x: fixed head COUNT (real: 8 heads), conv proj_in/out.
    "sd15": {**_SD_LAYOUT, "use_linear_in_transformer": False, "num_heads": 4, "num_head_channels": -1},
    # SD2.x: fixed head WIDTH (real: 64), linear proj_in/out.
    "sd2v": {**_SD_LAYOUT, "use_linear_in_transformer": True, "num_heads": -1, "num_head_channels": 16},
    # SDXL: input 4,5 (depth 2), 7,8 (depth 10), middle 10, output 0-2 (10), 3-5 (2): 70 blocks.
    "sdxl": {
        "num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 2], "num_classes": "sequential",
        "transformer_depth": [0, 0, 2, 2, 10, 10], "transformer_depth_middle": 10,
        "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
        "use_linear_in_transformer": True, "num_heads": -1, "num_head_channels": 16,
        "adm_in_channels": SDXL_POOLED_DIM + SDXL_SIZE_EMBED_CHANNELS,
    },
}
_CONTEXT_DIMS = {"sd15": 32, "sd2v": 32, "sdxl": 64}
_MODEL_CONFIG_CLASSES = {
    "sd15": comfy.supported_models.SD15,
    "sd2v": comfy.supported_models.SD20,
    "sdxl": comfy.supported_models.SDXL,
}

ModelLike = Union[str, comfy.model_patcher.ModelPatcher, comfy.model_base.BaseModel]


def init_weights(module: torch.nn.Module, seed: int, gain: float = 1.0, skip: tuple[str, ...] = ()) -> torch.nn.Module:
    """Deterministically fill every parameter of ``module`` (in place) from a seeded CPU generator.

    Linear/conv weights ~ N(0, gain^2 / fan_in); biases 0; GroupNorm/LayerNorm weight 1, bias 0;
    embeddings and any other parameter ~ N(0, 0.5^2). Parameters whose name ends with an entry of
    ``skip`` are left untouched.
    """
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    with torch.no_grad():
        for module_name, sub in module.named_modules():
            for name, param in sub.named_parameters(recurse=False):
                full = f"{module_name}.{name}" if module_name else name
                if any(full.endswith(s) for s in skip):
                    continue
                if isinstance(sub, norms):
                    value = torch.ones(param.shape) if name == "weight" else torch.zeros(param.shape)
                elif name == "bias":
                    value = torch.zeros(param.shape)
                elif isinstance(sub, torch.nn.Embedding) or param.ndim < 2:
                    value = torch.randn(param.shape, generator=generator) * 0.5
                else:
                    fan_in = param[0].numel()
                    value = torch.randn(param.shape, generator=generator) * (gain / fan_in ** 0.5)
                param.copy_(value.to(dtype=param.dtype, device=param.device))
    return module


def unet_config(family: str, model_channels: int = 32, context_dim: int | None = None) -> dict[str, Any]:
    """Full ``UNetModel`` kwargs of a tiny ``family`` UNet (real block layout, tiny widths)."""
    if family not in _UNET_CONFIGS:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    return {**_COMMON, **_UNET_CONFIGS[family], "model_channels": model_channels,
            "context_dim": context_dim if context_dim is not None else _CONTEXT_DIMS[family]}


def _model_config(family: str, config: dict[str, Any]) -> comfy.supported_models_base.BASE:
    model_config = _MODEL_CONFIG_CLASSES[family](config)
    # BASE.__init__ applies the class's unet_extra_config (real head counts/widths): undo that.
    model_config.unet_config.update({k: config[k] for k in ("num_heads", "num_head_channels")})
    model_config.set_inference_dtype(torch.float32, None)
    return model_config


def make_unet_model(family: str, seed: int = 0, model_channels: int = 32,
                    context_dim: int | None = None, gain: float = 1.0) -> comfy.model_patcher.ModelPatcher:
    """A tiny random-weight diffusion model of ``family`` ("sd15", "sd2v" or "sdxl") as a ModelPatcher.

    "sd15" is an eps model (``supported_models.SD15``), "sd2v" a v-prediction SD2.x model
    (``supported_models.SD20`` + ``ModelType.V_PREDICTION``), "sdxl" an eps ``model_base.SDXL``.
    """
    config = unet_config(family, model_channels, context_dim)
    model_config = _model_config(family, config)
    if family == "sd2v":
        # SD20.model_type() guesses v-prediction from checkpoint weights; say it outright.
        model = comfy.model_base.BaseModel(model_config, model_type=comfy.model_base.ModelType.V_PREDICTION, device=CPU)
    else:
        model = model_config.get_model({}, device=CPU)
    init_weights(model.diffusion_model, seed, gain=gain)
    model.eval()
    log.debug("tiny %s unet: %d parameters", family, sum(p.numel() for p in model.parameters()))
    return comfy.model_patcher.ModelPatcher(model, load_device=CPU, offload_device=CPU)


def _family_dims(model_or_family: ModelLike) -> tuple[int, int | None]:
    """(context_dim, pooled_dim or None) of a family name, ModelPatcher or BaseModel."""
    if isinstance(model_or_family, str):
        config = unet_config(model_or_family)
    else:
        model = getattr(model_or_family, "model", model_or_family)
        config = model.model_config.unet_config
    adm = config.get("adm_in_channels")
    pooled = adm - SDXL_SIZE_EMBED_CHANNELS if adm else None
    return config["context_dim"], pooled


def make_conditioning(model_or_family: ModelLike, seed: int = 0, n_tokens: int = 77, batch: int = 1,
                      width: int = 64, height: int = 64) -> list[list[Any]]:
    """A ComfyUI CONDITIONING ``[[cond (batch, n_tokens, context_dim), {"pooled_output": ...}]]``.

    For SDXL the dict also carries ``width``/``height`` (image pixels), which ``SDXL.encode_adm``
    turns into size embeddings together with ``pooled_output`` (batch, adm_in_channels - 1536).
    Other families get a ``pooled_output`` of width ``context_dim`` as CLIPTextEncode would give.
    """
    context_dim, pooled_dim = _family_dims(model_or_family)
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    cond = torch.randn(batch, n_tokens, context_dim, generator=generator)
    extra: dict[str, Any] = {"pooled_output": torch.randn(batch, pooled_dim or context_dim, generator=generator)}
    if pooled_dim is not None:
        extra.update(width=width, height=height, crop_w=0, crop_h=0, target_width=width, target_height=height)
    return [[cond, extra]]


def vae_config(ch: int = 32) -> dict[str, Any]:
    """AutoencoderKL ``ddconfig``: 4 latent channels, 3 downsamples (8x), no mid-level attention."""
    return {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": ch,
            "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}


def make_vae(seed: int = 0, ch: int = 32) -> comfy.sd.VAE:
    """A tiny real ``comfy.sd.VAE`` (SD-style AutoencoderKL, 8x downscale, 4 latent channels).

    The weights are drawn into a standalone AutoencoderKL whose state dict is then loaded by
    ``comfy.sd.VAE`` exactly as a checkpoint's would be (through its ``config`` path).
    """
    config = {"params": {"ddconfig": vae_config(ch), "embed_dim": 4}}
    source = AutoencoderKL(**config["params"])
    init_weights(source, seed)
    return comfy.sd.VAE(sd=source.state_dict(), device=CPU, config=config, dtype=torch.float32)


def clip_config(width: int = 32) -> dict[str, Any]:
    """Overrides of ``sd1_clip_config.json`` (CLIP-L) for a tiny text encoder of output width ``width``."""
    return {"hidden_size": width, "intermediate_size": 2 * width, "num_attention_heads": 2,
            "num_hidden_layers": 2, "projection_dim": width}


def make_clip(seed: int = 0, width: int = 32) -> comfy.sd.CLIP:
    """A tiny real SD1-style ``comfy.sd.CLIP`` (real CLIP tokenizer, 2-layer text model).

    Its cond width equals the tiny sd15 ``context_dim`` (32) so its CLIPTextEncode output feeds
    :func:`make_unet_model` ("sd15") directly.
    """
    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    options = {"clip_l_model_config": clip_config(width), "dtype": torch.float32,
               "load_device": CPU, "offload_device": CPU, "initial_device": CPU}
    clip = comfy.sd.CLIP(target, model_options=options)
    init_weights(clip.cond_stage_model, seed, skip=("logit_scale",))
    return clip


def make_controlnet(family: str = "sd15", seed: int = 0, model_channels: int = 32,
                    context_dim: int | None = None) -> comfy.controlnet.ControlNet:
    """A tiny real cldm ControlNet matching :func:`make_unet_model` (same family/widths), hint_channels 3.

    Its zero-convs get NON-zero weights so the hint changes the UNet output. Use it like a loaded
    CONTROL_NET (e.g. with the core ``ControlNetApplyAdvanced`` node).
    """
    config = dict(_model_config(family, unet_config(family, model_channels, context_dim)).unet_config)
    config.pop("out_channels")
    config.update(hint_channels=3, operations=comfy.ops.disable_weight_init, device=CPU)
    control_model = comfy.cldm.cldm.ControlNet(**config)
    init_weights(control_model, seed)
    control_model.eval()
    return comfy.controlnet.ControlNet(control_model, load_device=CPU)


def make_gligen(model_patcher, seed: int = 0, text_width: int = 32, key_dim: int = 32):
    """A tiny real GLIGEN (``comfy.gligen.Gligen``: a gated self-attention fuser per transformer block of
    ``model_patcher``'s UNet, in the host's ``transformer_index`` order, and the box position net) as the
    ModelPatcher GLIGENLoader gives, for the core ``GLIGENTextBoxApply`` node; ``text_width``: the pooled width of
    the CLIP whose text it grounds (:func:`make_clip`'s 32).

    Its gates (``alpha_attn``, ``alpha_dense``, zero in a fresh GLIGEN) get non-zero values, so the boxes change the
    UNet's output.
    """
    import comfy.gligen
    from comfy.ldm.modules.attention import BasicTransformerBlock

    widths = [block.attn1.to_q.in_features for block in model_patcher.model.diffusion_model.modules()
              if isinstance(block, BasicTransformerBlock)]
    fusers = [comfy.gligen.GatedSelfAttentionDense(width, key_dim, 2, width // 2) for width in widths]
    gligen = comfy.gligen.Gligen(fusers, comfy.gligen.PositionNet(text_width, key_dim), key_dim)
    init_weights(gligen, seed)
    gligen.eval()
    return comfy.model_patcher.ModelPatcher(gligen, load_device=CPU, offload_device=CPU)


def random_latent(n: int, size: int = 8, seed: int = 0, channels: int = 4) -> dict:
    """A LATENT of ``n`` random frames (seeded)."""
    g = torch.Generator().manual_seed(seed)
    return {"samples": torch.randn(n, channels, size, size, generator=g)}


def rope_for_float64() -> bool:
    """Let the host's Flux rope take the float64 test worlds; True when it had to be changed.

    Hosts with comfy-kitchen (v0.8.0) apply RoPE through its kernels, which take float16 / bfloat16 / float32
    only, so a float64 tiny Flux cannot run there. For float64 inputs only, the rope becomes the formula the
    host itself uses without comfy-kitchen (the one v0.3.64 always uses: the rotation in the float32 of the
    position table, cast back); every other dtype still goes through comfy-kitchen. Test worlds only: the pack
    never touches the host's functions.
    """
    import comfy.ldm.flux.math as flux_math

    kitchen_rope, kitchen_rope1 = flux_math.apply_rope, flux_math.apply_rope1
    if getattr(kitchen_rope, "takes_float64", False) or not kitchen_rope.__module__.startswith("comfy_kitchen"):
        return False

    def apply_rope1(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float64:
            return kitchen_rope1(x, freqs_cis)
        x_ = x.to(dtype=freqs_cis.dtype).reshape(*x.shape[:-1], -1, 1, 2)
        x_out = freqs_cis[..., 0] * x_[..., 0]
        x_out.addcmul_(freqs_cis[..., 1], x_[..., 1])
        return x_out.reshape(*x.shape).type_as(x)

    def apply_rope(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor):
        if xq.dtype != torch.float64:
            return kitchen_rope(xq, xk, freqs_cis)
        return apply_rope1(xq, freqs_cis), apply_rope1(xk, freqs_cis)

    apply_rope.takes_float64 = True  # type: ignore[attr-defined]
    flux_math.apply_rope, flux_math.apply_rope1 = apply_rope, apply_rope1
    log.info("float64 test worlds: the host's non-kitchen rope formula for float64 Flux inputs")
    return True


def float64_copy(model_patcher):
    """A float64 copy of a tiny UNet or DiT ModelPatcher (the original is untouched).

    The tiny random UNets' 1x1-pixel GroupNorms amplify float32 rounding enormously, so results of
    two call layouts (which frames and branches share a UNet call) differ visibly in float32
    though the arithmetic is the same; in float64 they agree.
    """
    import copy

    rope_for_float64()
    model = model_patcher.clone()
    # The copy shares the model config: newer hosts' configs answer every missing attribute with None
    # (a warning), __setstate__ included, so deep-copying one fails; nothing here changes the config.
    config = model_patcher.model.model_config
    model.model = copy.deepcopy(model_patcher.model, memo={id(config): config})
    model.model.diffusion_model.to(torch.float64)
    model.model.diffusion_model.dtype = torch.float64
    return model


def double(conditioning):
    """A CONDITIONING with float64 tensors."""
    return [[c.double(), extra] for c, extra in conditioning]

