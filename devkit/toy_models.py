"""The toy-world diffusion models trained here: load, sample, invert and reconstruct through ComfyUI's own code.

A toy world trained here (``devkit/train_toy_models.py``), never real-weight quality. The checkpoints
``devkit/toy_weights/toy_unet.safetensors`` (SD1.x-layout UNet, epsilon, 4-channel toy TAESD) and
``toy_flux.safetensors`` (Flux-schnell layout, rectified flow, 16-channel toy TAESD) are all-in-one files that
``comfy.sd.load_checkpoint_guess_config`` (what ``CheckpointLoaderSimple`` calls) detects as the toy configs of
``devkit/toy_model_configs.py`` once they are registered (:func:`load_toy_model` does; in a ComfyUI server the
stand-in pack ``tests/stand_in_nodes`` does).

Sampling (:func:`sample_images`) is ``comfy.sample.sample``, the KSampler node's path; inversion and
reconstruction (:func:`reconstruct_frames`) are the pack's own TokenFlow inversion (``engine/ddpm/invert.py``,
``engine/flow/invert.py``: DDIM / Euler inversion of the frames under their caption, then the editing sampler
back to sigma 0 at cfg 1).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import comfy.model_base
import comfy.sample
import comfy.sd
import comfy.utils

import toy_latents  # devkit/, beside this file
import toy_model_configs

log = logging.getLogger(__name__)

WEIGHTS = Path(__file__).resolve().parent / "toy_weights"
TOY_MODELS = ("unet", "flux")


@dataclass(frozen=True)
class SamplingSettings:
    sampler: str
    scheduler: str
    steps: int
    cfg: float


# The KSampler settings the checks use: ComfyUI's defaults for each family's schedule, cfg in the 3-5 range.
SAMPLING = {"unet": SamplingSettings("euler", "normal", 20, 4.0),
            "flux": SamplingSettings("euler", "simple", 20, 4.0)}


def toy_checkpoint(name: str) -> Path:
    """The checkpoint file of toy model ``name`` ("unet" or "flux")."""
    if name not in TOY_MODELS:
        raise ValueError(f"toy model must be one of {TOY_MODELS}, got {name!r}")
    return WEIGHTS / f"toy_{name}.safetensors"


def training_info(name: str) -> dict[str, Any]:
    """What the training script recorded in the checkpoint's metadata (steps, CPU minutes, frame size...)."""
    _, metadata = comfy.utils.load_torch_file(str(toy_checkpoint(name)), return_metadata=True)
    return json.loads((metadata or {}).get("training", "{}"))


def load_toy_model(name: str):
    """(ModelPatcher, CLIP, VAE) of toy model ``name``, loaded as CheckpointLoaderSimple loads a checkpoint."""
    path = toy_checkpoint(name)
    if not path.is_file():
        raise FileNotFoundError(f"toy model file {path} is missing: train it with devkit/train_toy_models.py {name}")
    toy_model_configs.register()
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True,
                                                             embedding_directory=None)[:3]
    return model, clip, vae


@torch.no_grad()
def sample_latents(model, clip, caption: str, seed: int, size: int, batch: int = 1,
                   settings: SamplingSettings | None = None, negative: str = "") -> torch.Tensor:
    """``batch`` samples of ``caption`` (KSampler path: ``comfy.sample.sample``), LATENT-space (N, C, h, w)."""
    settings = settings or SAMPLING[family_of(model)]
    channels = model.model.latent_format.latent_channels
    latent = torch.zeros(batch, channels, size // 8, size // 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, settings.steps, settings.cfg, settings.sampler, settings.scheduler,
                               toy_latents.conditioning(clip, caption), toy_latents.conditioning(clip, negative),
                               latent, seed=seed, disable_pbar=True)


@torch.no_grad()
def sample_images(model, clip, vae, caption: str, seed: int, size: int, batch: int = 1,
                  settings: SamplingSettings | None = None) -> torch.Tensor:
    """Decoded samples of ``caption``: IMAGE (N, size, size, 3) in [0, 1]."""
    return vae.decode(sample_latents(model, clip, caption, seed, size, batch, settings)).float().cpu()


def family_of(model) -> str:
    """"flux" for a ``model_base.Flux``, else "unet"."""
    return "flux" if isinstance(model.model, comfy.model_base.Flux) else "unet"


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two images in [0, 1]."""
    mse = float(((a.float() - b.float()) ** 2).mean())
    return 10.0 * torch.log10(torch.tensor(1.0 / max(mse, 1e-12))).item()


@torch.no_grad()
def reconstruct_frames(model, clip, vae, images: torch.Tensor, caption: str, steps: int = 25,
                       inversion_steps: int = 50, method: str = "ddim") -> tuple[torch.Tensor, torch.Tensor]:
    """Invert ``images`` (N, H, W, 3) with the pack's TokenFlow inversion under ``caption`` and sample them back
    (the editing sampler at cfg 1, no edit): (reconstruction, the autoencoder's own round trip), both IMAGEs."""
    import host_bootstrap

    package = host_bootstrap.register_package()
    if family_of(model) == "flux":
        invert = __import__(f"{package.__name__}.engine.flow.invert", fromlist=["invert"])
    else:
        invert = __import__(f"{package.__name__}.engine.ddpm.invert", fromlist=["invert"])
    latent = vae.encode(images).float()
    inversion = invert.run_inversion(model, {"samples": latent}, toy_latents.conditioning(clip, caption), steps,
                                     inversion_steps, method=method)
    back = model.model.process_latent_out(invert.reconstruct(model, inversion))
    return vae.decode(back).float().cpu(), vae.decode(latent).float().cpu()


def heldout_captions(n: int, split: str = "train", first_seed: int | None = None) -> list[tuple[int, list, str]]:
    """``n`` one-object (seed, objects, caption) drawn from held-out seeds: ``split`` "train" gives attribute
    combinations seen in training, "heldout" the world's unseen ``HELDOUT_COMBOS``."""
    import numpy as np

    import toy_world

    first = toy_world.HELDOUT_SEEDS.start if first_seed is None else first_seed
    drawn = []
    for seed in range(first, first + n):
        rng = np.random.default_rng(seed)
        objects = toy_world.sample_objects(rng, 1, split)
        background = toy_world.BACKGROUNDS[int(rng.integers(len(toy_world.BACKGROUNDS)))]
        drawn.append((seed, objects, toy_world.caption(objects, background)))
    return drawn


def attribute_accuracy(model, clip, vae, n: int, size: int, split: str = "train",
                       settings: SamplingSettings | None = None) -> dict[str, float]:
    """Per attribute (shape, colour, pattern, background), the fraction of ``n`` plain samples of one-object
    captions (noise seeds never used in training) in which the toy classifier finds the captioned value."""
    import toy_classifier

    classifier = toy_classifier.load_classifier()
    hits: dict[str, int] = {}
    for seed, objects, text in heldout_captions(n, split):
        found = toy_classifier.classify(sample_images(model, clip, vae, text, seed, size, 1, settings),
                                        model=classifier)
        wanted = {"shape": objects[0].shape, "colour": objects[0].colour, "pattern": objects[0].pattern,
                  "background": text.rsplit(" on ", 1)[1]}
        for attribute, value in wanted.items():
            hits[attribute] = hits.get(attribute, 0) + int(found[attribute][0] == value)
    return {attribute: count / n for attribute, count in hits.items()}


def reconstruction_psnr(model, clip, vae, n_clips: int, size: int, n_frames: int = 4, steps: int = 25,
                        inversion_steps: int = 50) -> tuple[float, float]:
    """Mean PSNR (dB) over the frames of ``n_clips`` held-out clips of (inversion then sampling back, the
    autoencoder's own round trip) against the rendered frames."""
    import toy_world

    rec, ae = [], []
    for seed in range(toy_world.HELDOUT_SEEDS.start, toy_world.HELDOUT_SEEDS.start + n_clips):
        clip_ = toy_world.render_clip(seed, n_frames, size)
        back, round_trip = reconstruct_frames(model, clip, vae, clip_.frames, clip_.caption, steps, inversion_steps)
        rec.append(psnr(back, clip_.frames))
        ae.append(psnr(round_trip, clip_.frames))
    return sum(rec) / len(rec), sum(ae) / len(ae)

