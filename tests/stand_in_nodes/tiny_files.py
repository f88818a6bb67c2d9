"""Write tiny random-weight model FILES that ComfyUI's real loaders read (test only).

* ``checkpoints/tokenflow_tiny_sd15.safetensors``: a full SD1.x-layout checkpoint in the original
  (LDM) key layout, written by ComfyUI's own ``comfy.sd.save_checkpoint``: the tiny sd15 UNet of
  ``devkit/tiny_models.py`` (``model.diffusion_model.*``), its tiny CLIP
  (``cond_stage_model.transformer.text_model.*``) and a random-weight TAESD as the VAE
  (``first_stage_model.taesd_*``, which ComfyUI's VAE detection recognises by its keys; the tiny
  AutoencoderKL would be detected with the full SD VAE widths). About 30 MB, float32.
* ``controlnet/tokenflow_tiny_controlnet.safetensors``: the tiny cldm ControlNet of
  ``tiny_models.make_controlnet("sd15")`` (non-zero zero-convs), plain cldm keys.
* ``extra_model_paths.yaml``: points ComfyUI's ``checkpoints`` and ``controlnet`` folders at them,
  for ``main.py --extra-model-paths-config``.
* ``checkpoints/tokenflow_tiny_flux.safetensors`` (:func:`write_tiny_flux_files`): an all-in-one Flux-dev
  checkpoint, written by ``comfy.sd.save_checkpoint`` in the layout of ComfyUI's own Flux checkpoints
  (``model.diffusion_model.*``, ``text_encoders.clip_l.*`` / ``text_encoders.t5xxl.*``, ``vae.*``): the tiny
  Flux of ``devkit/tiny_dit_models.py``, ComfyUI's Flux text encoder (CLIP-L + T5) at tiny widths
  (:data:`TINY_T5_CONFIG`) and a random 16-channel TAESD as the VAE. About 20 MB, float32.
* ``checkpoints/tokenflow_tiny_sd3.safetensors`` (:func:`write_tiny_sd3_files`): an all-in-one SD3.5-style
  checkpoint the same way: the tiny MMDiT of ``tiny_dit_models.make_sd3_model`` with ``adm_in_channels``
  2048 and ComfyUI's SD3 text encoder with only a tiny T5 (:data:`TINY_SD3_T5_CONFIG`; without CLIP-L/G
  ``SD3ClipModel`` gives the T5 tokens and a zero 768 + 1280 pooled output, as for a T5-only SD3 file).

``CheckpointLoaderSimple`` can detect the checkpoint only in a process where the stand-in pack
(``tests/stand_in_nodes/__init__.py``) was imported: it registers the tiny model config.
This module itself registers nothing, so the test process can import it freely.

    python tests/stand_in_nodes/tiny_files.py /tmp/tiny-models     # host from $COMFYUI_PATH
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

CHECKPOINT_NAME = "tokenflow_tiny_sd15.safetensors"
CONTROLNET_NAME = "tokenflow_tiny_controlnet.safetensors"
FLUX_CHECKPOINT_NAME = "tokenflow_tiny_flux.safetensors"
EXTRA_PATHS_NAME = "extra_model_paths.yaml"
# The one-layer T5 of the tiny Flux text encoder (its output width is the tiny Flux context_in_dim, 32);
# the stand-in pack builds the same encoder when it loads the checkpoint.
TINY_T5_CONFIG = {"d_model": 32, "d_ff": 64, "d_kv": 16, "num_heads": 2, "num_layers": 1}
SD3_CHECKPOINT_NAME = "tokenflow_tiny_sd3.safetensors"
# The tiny SD3's T5 (width = tiny_dit_models.SD3_CONTEXT, 48) and pooled width (SD3ClipModel's zeros without CLIP).
TINY_SD3_T5_CONFIG = {"d_model": 48, "d_ff": 96, "d_kv": 16, "num_heads": 2, "num_layers": 1}
SD3_POOLED_WITHOUT_CLIP = 768 + 1280

_DEVKIT = Path(__file__).resolve().parents[2] / "devkit"


def _ensure_importable() -> None:
    if str(_DEVKIT) not in sys.path:  # devkit/tiny_models.py
        sys.path.append(str(_DEVKIT))


def write_checkpoint(path: str | os.PathLike, seed: int = 0) -> Path:
    """The tiny SD1.x checkpoint (UNet + CLIP + TAESD VAE) at ``path``."""
    _ensure_importable()
    import comfy.sd
    import tiny_models

    model = tiny_models.make_unet_model("sd15", seed=seed)
    clip = tiny_models.make_clip(seed=seed + 1)
    vae = _random_taesd(4, seed + 2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    comfy.sd.save_checkpoint(str(path), model, clip, vae, metadata={"tokenflow_test": "tiny random weights"})
    return path


def _random_taesd(latent_channels: int, seed: int):
    """A random-weight TAESD (unit scale, zero shift) as ``comfy.sd.VAE``; detected again from its keys."""
    import torch

    import comfy.sd
    import comfy.taesd.taesd
    import tiny_models

    taesd = comfy.taesd.taesd.TAESD(latent_channels=latent_channels)
    tiny_models.init_weights(taesd, seed, skip=("vae_scale", "vae_shift"))
    with torch.no_grad():
        taesd.vae_scale.fill_(1.0)
        taesd.vae_shift.fill_(0.0)
    return comfy.sd.VAE(sd=taesd.state_dict())


def tiny_flux_clip(seed: int = 0):
    """ComfyUI's Flux text encoder (``comfy.text_encoders.flux``: CLIP-L pooled output + T5 tokens) at the tiny
    widths of ``tiny_dit_models`` (CLIP-L 32 wide, a one-layer 32-wide T5), random weights, as ``comfy.sd.CLIP``."""
    _ensure_importable()
    import torch

    import comfy.sd
    import comfy.supported_models_base
    import comfy.text_encoders.flux
    import tiny_dit_models
    import tiny_models

    target = comfy.supported_models_base.ClipTarget(comfy.text_encoders.flux.FluxTokenizer,
                                                    comfy.text_encoders.flux.flux_clip())
    options = {"clip_l_model_config": tiny_models.clip_config(tiny_dit_models.FLUX_POOLED),
               "t5xxl_model_config": dict(TINY_T5_CONFIG), "dtype": torch.float32,
               "load_device": torch.device("cpu"), "offload_device": torch.device("cpu"),
               "initial_device": torch.device("cpu")}
    clip = comfy.sd.CLIP(target, model_options=options)
    tiny_models.init_weights(clip.cond_stage_model, seed, skip=("logit_scale",))
    return clip


def write_flux_checkpoint(path: str | os.PathLike, seed: int = 0) -> Path:
    """The tiny all-in-one Flux-dev checkpoint (diffusion model + CLIP-L/T5 + 16-channel TAESD) at ``path``."""
    _ensure_importable()
    import comfy.sd
    import tiny_dit_models

    model = tiny_dit_models.make_flux_model(seed=seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    comfy.sd.save_checkpoint(str(path), model, tiny_flux_clip(seed + 1), _random_taesd(16, seed + 2),
                             metadata={"tokenflow_test": "tiny random weights"})
    return path


def tiny_sd3_clip(seed: int = 0):
    """ComfyUI's SD3 text encoder (``comfy.text_encoders.sd3_clip``) with only a tiny T5, as ``comfy.sd.CLIP``."""
    _ensure_importable()
    import torch

    import comfy.sd
    import comfy.supported_models_base
    import comfy.text_encoders.sd3_clip
    import tiny_models

    target = comfy.supported_models_base.ClipTarget(
        comfy.text_encoders.sd3_clip.SD3Tokenizer,
        comfy.text_encoders.sd3_clip.sd3_clip(clip_l=False, clip_g=False, t5=True))
    cpu = torch.device("cpu")
    options = {"t5xxl_model_config": dict(TINY_SD3_T5_CONFIG), "dtype": torch.float32, "load_device": cpu,
               "offload_device": cpu, "initial_device": cpu}
    clip = comfy.sd.CLIP(target, model_options=options)
    tiny_models.init_weights(clip.cond_stage_model, seed)
    return clip


def write_tiny_sd3_files(models_dir: str | os.PathLike, seed: int = 0) -> dict[str, Path]:
    """The tiny all-in-one SD3 checkpoint (MMDiT + T5 + 16-channel TAESD) in ``models_dir/checkpoints``."""
    _ensure_importable()
    import comfy.sd
    import tiny_dit_models

    model = tiny_dit_models.make_sd3_model(seed=seed, adm_in_channels=SD3_POOLED_WITHOUT_CLIP)
    path = Path(models_dir).resolve() / "checkpoints" / SD3_CHECKPOINT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    comfy.sd.save_checkpoint(str(path), model, tiny_sd3_clip(seed + 1), _random_taesd(16, seed + 2),
                             metadata={"tokenflow_test": "tiny random weights"})
    return {"checkpoint": path}


def write_tiny_flux_files(models_dir: str | os.PathLike) -> dict[str, Path]:
    """The tiny Flux checkpoint and an extra_model_paths.yaml (``checkpoints``) for it under ``models_dir``."""
    models_dir = Path(models_dir).resolve()
    checkpoint = write_flux_checkpoint(models_dir / "checkpoints" / FLUX_CHECKPOINT_NAME, seed=0)
    extra = models_dir / EXTRA_PATHS_NAME
    extra.write_text(
        "# The tiny random-weight Flux checkpoint for the ComfyUI-TokenFlow server tests (test only).\n"
        "tokenflow_test_models:\n"
        f"    base_path: {models_dir.as_posix()}\n"
        "    checkpoints: checkpoints\n",
        encoding="utf-8")
    return {"checkpoint": checkpoint, "extra_model_paths": extra}


def write_controlnet(path: str | os.PathLike, seed: int = 0) -> Path:
    """The tiny cldm ControlNet (hint: RGB IMAGE) for the tiny checkpoint, at ``path``."""
    _ensure_importable()
    import safetensors.torch

    import tiny_models

    controlnet = tiny_models.make_controlnet("sd15", seed=seed)
    state = {k: v.detach().contiguous() for k, v in controlnet.control_model.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(state, str(path))
    return path


def write_tiny_model_files(models_dir: str | os.PathLike) -> dict[str, Path]:
    """Checkpoint, ControlNet and an extra_model_paths.yaml for them under ``models_dir``."""
    models_dir = Path(models_dir).resolve()
    checkpoint = write_checkpoint(models_dir / "checkpoints" / CHECKPOINT_NAME, seed=0)
    controlnet = write_controlnet(models_dir / "controlnet" / CONTROLNET_NAME, seed=3)
    extra = models_dir / EXTRA_PATHS_NAME
    extra.write_text(
        "# Tiny random-weight models for the ComfyUI-TokenFlow server tests (test only).\n"
        "tokenflow_test_models:\n"
        f"    base_path: {models_dir.as_posix()}\n"
        "    checkpoints: checkpoints\n"
        "    controlnet: controlnet\n",
        encoding="utf-8")
    return {"checkpoint": checkpoint, "controlnet": controlnet, "extra_model_paths": extra}


def _main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(f"usage: python {Path(__file__).name} MODELS_DIR", file=sys.stderr)
        return 2
    host = Path(os.environ.get("COMFYUI_PATH") or Path.home() / "comfy" / "ComfyUI").expanduser()
    sys.path.insert(0, str(host))
    from comfy.cli_args import args

    args.cpu = True
    written = write_tiny_model_files(argv[0])
    for kind, path in written.items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
