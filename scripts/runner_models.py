"""The headless runner's model files: an all-in-one checkpoint or Flux's separate files, and their loader nodes.

Two routes, as ComfyUI's own loaders take them:

* ``--checkpoint``: one file with the diffusion model, text encoder(s) and VAE (SD1.x / SD2.x / SDXL, an
  all-in-one Flux or SD3.x checkpoint), loaded by ``CheckpointLoaderSimple``;
* ``--unet --clip-l --t5 --vae``: Flux's separate files, loaded by ``UNETLoader``, ``DualCLIPLoader`` (type
  flux) and ``VAELoader``, each a path or a file name in ComfyUI's models folder of that loader.

The family is what ComfyUI detects (:func:`detect_family`: ``comfy.model_detection`` on the tensor shapes of
the .safetensors header, nothing loaded). On Flux-dev (guidance-distilled) the graph adds FluxGuidance on the
inversion prompt (1: RF-Solver, FireFlow and Stable Flow invert at guidance 1) and on the edit prompt
(``--guidance``, default 3.5) and ModelSamplingFlux at the frame size, the same graph as
``example_workflows/tokenflow_flux.json``; cfg defaults to 1 on every Flux model and to 4 on SD3.x (as
``example_workflows/tokenflow_sd3.json``). ``--inversion-method auto`` becomes the method it stands for on the
detected family (fixed_point on Flux / SD3.x, ddim on SD UNets), so the graph names it.
Imported by ``scripts/tokenflow_edit.py`` from its own folder; ComfyUI modules inside the functions.
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass

import model_links  # devkit/model_links.py (the runner puts devkit/ on sys.path)

FLUX_GUIDANCE = 3.5  # FluxGuidance's default
# The inversion prompt's distilled guidance: RF-Solver, FireFlow and Stable Flow invert Flux-dev at guidance 1.
INVERSION_GUIDANCE = 1.0
# The runner's flags for the inversion's inputs, as its messages name them.
INVERSION_FLAGS = dict(steps_name="--steps", inversion_name="--inversion-steps", method_name="--inversion-method",
                       iterations_name="--max-iterations", tolerance_name="--tolerance")
# The cfg ComfyUI's own SD3.5 template samples with (4.01); the official TokenFlow cfg (7.5) is an SD 1.x/2.x setting.
SD3_CFG = 4.0
# Editor settings whose default follows the family: unset on the command line (None) until resolve_family_settings.
FAMILY_EDITOR_DEFAULTS = ("pnp_attn_t",)


@dataclass(frozen=True)
class ModelFile:
    """One of Flux's separate files: its option, the usual file (name, URL, ComfyUI's models folder), what it is."""

    attr: str
    flag: str
    link: model_links.ModelLink
    what: str

    @property
    def folder(self) -> str:
        return self.link.folder

    @property
    def example(self) -> str:
        return self.link.name


FLUX_FILES = (
    ModelFile("unet", "--unet", model_links.FLUX_DEV, "the Flux diffusion model"),
    ModelFile("clip_l", "--clip-l", model_links.CLIP_L, "the CLIP-L text encoder"),
    ModelFile("t5", "--t5", model_links.T5XXL, "the T5-XXL text encoder"),
    ModelFile("vae", "--vae", model_links.FLUX_AE, "the Flux VAE"),
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    for f in FLUX_FILES:
        p.add_argument(f.flag, dest=f.attr, help=f"Flux, instead of --checkpoint: {f.what}, e.g. {f.example} "
                       f"(a path, or a file name in ComfyUI/models/{f.folder}/)")
    p.add_argument("--guidance", type=float, default=None, help="Flux-dev's distilled guidance of the edit "
                   f"(FluxGuidance on the edit prompt; default {FLUX_GUIDANCE}; the inversion prompt gets "
                   f"{INVERSION_GUIDANCE:g}, as RF-Solver, FireFlow and Stable Flow invert); Flux runs at --cfg 1 "
                   "unless told otherwise")


def check_model_args(args: argparse.Namespace) -> str | None:
    """A message when the model options do not fit together (nothing is read yet): one line per missing Flux
    option, or None."""
    given = [f for f in FLUX_FILES if getattr(args, f.attr)]
    if args.checkpoint and given:
        return (f"error: --checkpoint and {given[0].flag} given: pass either one all-in-one checkpoint "
                "(--checkpoint) or Flux's separate files (--unet, --clip-l, --t5, --vae), not both.")
    if given and len(given) < len(FLUX_FILES):
        return "\n".join(f"error: {given[0].flag} given but {f.flag} missing: pass {f.flag} {f.example} ({f.what}, a "
                         f"path or a file name in ComfyUI/models/{f.folder}/; download: {f.link.url})."
                         for f in FLUX_FILES if f not in given)
    if args.guidance is not None and args.guidance < 0:
        return "error: --guidance must be >= 0 (Flux-dev's usual value is 3.5)."
    return None


def flux_files_given(args: argparse.Namespace) -> bool:
    return all(getattr(args, f.attr) for f in FLUX_FILES)


_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
           "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn",
           "F8_E5M2": "float8_e5m2"}


def _meta_state_dict(path: str) -> dict:
    """The tensors of a .safetensors file as meta tensors of their shapes and dtypes (only the header is read)."""
    import torch
    from safetensors import safe_open

    out = {}
    with safe_open(path, framework="pt") as f:
        for key in f.keys():
            tensor = f.get_slice(key)
            dtype = getattr(torch, _DTYPES.get(tensor.get_dtype(), "float32"))
            out[key] = torch.empty(tensor.get_shape(), dtype=dtype, device="meta")
    return out


@dataclass(frozen=True)
class Family:
    """What ComfyUI detects in a model file: its supported_models config name, whether it is a flow-matching DiT
    (Flux, SD3.x: inverted by Euler steps), Flux, and guidance-distilled (Flux-dev)."""

    config_name: str
    flow: bool = False
    flux: bool = False
    guidance_distilled: bool = False

    @property
    def words(self) -> str:
        return f"Flux ({self.config_name})" if self.flux else self.config_name


def detect_family(path: str | None, whole_checkpoint: bool) -> Family | None:
    """ComfyUI's own detection (``comfy.model_detection.model_config_from_unet``) on the file's header, as
    ``CheckpointLoaderSimple`` (``whole_checkpoint``) or ``UNETLoader`` would run it; None when not a
    .safetensors file or not detected (the loader then says why)."""
    if not path or not path.lower().endswith(".safetensors"):
        return None
    import comfy.model_detection
    import comfy.supported_models
    import comfy.utils

    try:
        state = _meta_state_dict(path)
        prefix = comfy.model_detection.unet_prefix_from_state_dict(state)
        if not whole_checkpoint:  # as comfy.sd.load_diffusion_model_state_dict: the bare diffusion model keys
            bare = comfy.utils.state_dict_prefix_replace(state, {prefix: ""}, filter_keys=True)
            state, prefix = (bare or state), ""
        config = comfy.model_detection.model_config_from_unet(state, prefix)
    except Exception:  # noqa: BLE001 - detection is advisory; the loader reports a bad file itself
        logging.debug("model detection of %s failed", path, exc_info=True)
        return None
    if config is None:
        return None
    flux = isinstance(config, comfy.supported_models.Flux)
    flow = flux or isinstance(config, comfy.supported_models.SD3)
    return Family(type(config).__name__, flow, flux, flux and bool(config.unet_config.get("guidance_embed")))


def loader_nodes(ckpt_name: str | None, flux_names: dict[str, str] | None) -> tuple[dict, list, list, list]:
    """The loader nodes and the (model, clip, vae) links the rest of the graph takes."""
    if flux_names is None:
        return ({"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}}},
                ["1", 0], ["1", 1], ["1", 2])
    nodes = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": flux_names["unet"], "weight_dtype": "default"}},
        "15": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": flux_names["clip_l"],
                                                          "clip_name2": flux_names["t5"], "type": "flux"}},
        "16": {"class_type": "VAELoader", "inputs": {"vae_name": flux_names["vae"]}},
    }
    return nodes, ["1", 0], ["15", 0], ["16", 0]


def add_flux_dev_nodes(prompt: dict, guidance: float, frame_size: tuple[int, int] | None) -> None:
    """FluxGuidance on the inversion (node 4: :data:`INVERSION_GUIDANCE`) and edit (node 5: ``guidance``) prompts;
    ModelSamplingFlux at ``frame_size`` (the schedule shift Flux-dev's own sampler uses for that many image tokens)
    feeding the inversion and the sampler."""
    for node_id, text_id, value in (("18", "4", INVERSION_GUIDANCE), ("19", "5", guidance)):
        prompt[node_id] = {"class_type": "FluxGuidance", "inputs": {"conditioning": [text_id, 0], "guidance": value}}
    prompt["7"]["inputs"]["conditioning"] = ["18", 0]
    for node in prompt.values():
        if node["inputs"].get("positive") == ["5", 0]:
            node["inputs"]["positive"] = ["19", 0]
    if frame_size is not None:
        width, height = frame_size
        prompt["17"] = {"class_type": "ModelSamplingFlux", "inputs": {
            "model": prompt["7"]["inputs"]["model"], "max_shift": 1.15, "base_shift": 0.5,
            "width": width, "height": height}}
        prompt["7"]["inputs"]["model"] = prompt["8"]["inputs"]["model"] = ["17", 0]


def resolve_family_settings(args: argparse.Namespace, family: Family | None, default_cfg: float) -> str | None:
    """--cfg, --guidance and --pnp-attn-t for the detected family (Flux: cfg 1, pnp_attn_t 0.2; Flux-dev: guidance
    3.5; SD3.x: cfg 4); a message if misused."""
    flux = family is not None and family.flux
    words = family.words if family is not None else "not detected as Flux"
    if args.flux_route and not flux:
        return (f"error: --unet {args.unet}: ComfyUI does not detect a Flux diffusion model in it ({words}); "
                "--unet/--clip-l/--t5/--vae are for Flux, other models go through --checkpoint.")
    if args.guidance is not None and not (family is not None and family.guidance_distilled):
        return (f"error: --guidance is Flux-dev's distilled guidance and this model ({words}) has none: "
                "drop --guidance (use --cfg).")
    if args.cfg is None:
        sd3 = family is not None and family.flow and not flux
        args.cfg = 1.0 if flux else SD3_CFG if sd3 else default_cfg
    if args.guidance is None:
        args.guidance = FLUX_GUIDANCE
    if getattr(args, "pnp_attn_t", 0.0) is None:
        args.pnp_attn_t = pnp_fraction(flux)
    return resolve_inversion_method(args, family is not None and family.flow)


def resolve_inversion_method(args: argparse.Namespace, flow: bool) -> str | None:
    """``--inversion-method auto`` as the method it stands for on the model's family (the graph names that one), with
    the settings checked for it (ddim: --steps on the grid of --inversion-steps); a message if they do not fit."""
    from comfyui_tokenflow.tokenflow_ops import schedule

    args.inversion_method = schedule.resolve_method(args.inversion_method, flow)
    try:
        schedule.check_inversion_settings(args.steps, args.inversion_steps, args.inversion_method,
                                          args.max_iterations, args.tolerance, flow, **INVERSION_FLAGS)
    except ValueError as e:
        return f"error: {e}."
    return None


def pnp_fraction(flux: bool) -> float:
    """--pnp-attn-t left unset: on Flux the published fraction of its default injection preset (rf_solver: RF-Solver-
    Edit's demo injects in 5 of 25 steps, 0.2), else the PnP editor's declared default."""
    from comfyui_tokenflow.engine.editors.pnp import PlugAndPlayEditor
    from comfyui_tokenflow.engine.families.injection_presets import RF_SOLVER

    declared = next(s.default for s in PlugAndPlayEditor.inputs if s.name == "pnp_attn_t")
    return RF_SOLVER.fraction if flux else declared

