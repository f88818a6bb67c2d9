"""Training data of the toy-world diffusion models: rendered train-split scenes encoded once by the autoencoder.

The toy world (``devkit/toy_world.py``) renders a scene and its caption from a seed; the autoencoder
(a TAESD-layout ``comfy.sd.VAE``) encodes it. Latents are standardised to zero mean and unit spread in the
diffusion model's own latent space by the VAE's ``vae_scale`` / ``vae_shift`` (TAESD encodes
``enc(x) / vae_scale + vae_shift``), chosen so that the model's stock latent format (SD1.x: x 0.18215; Flux:
(x - 0.1159) x 0.3611) maps the dataset to mean 0, standard deviation 1: the checkpoint's VAE carries them,
so ComfyUI's own VAEEncode / VAEDecode and the model agree with training.
"""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import comfy.sd

import toy_world  # devkit/, beside this file

log = logging.getLogger(__name__)

TWO_OBJECT_FRACTION = 0.4  # the first training phase's share of two-object scenes; the rest have one object


@dataclass
class LatentSet:
    latents: torch.Tensor  # (N, C, h, w) in the diffusion model's latent space: mean 0, std 1
    captions: list[str]  # N captions
    raw_mean: float  # of the AE's raw latents (its own vae_scale / vae_shift), before standardising
    raw_std: float
    encode_cpu_seconds: float  # rendering and encoding the scenes, this process's CPU time


def scene_seeds(n: int, seed: int) -> list[int]:
    """``n`` distinct seeds of the world's train range, drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    low, high = toy_world.TRAIN_SEEDS.start, toy_world.TRAIN_SEEDS.stop
    return [int(s) for s in rng.choice(np.arange(low, high), size=n, replace=False)]


def render_train_scenes(n: int, size: int, seed: int, two_object_fraction: float = TWO_OBJECT_FRACTION
                        ) -> tuple[torch.Tensor, list[str]]:
    """``n`` train-split scenes (``two_object_fraction`` of them with two objects): images (N, H, W, 3), captions."""
    images, captions = [], []
    for i, scene_seed in enumerate(scene_seeds(n, seed)):
        n_objects = 2 if (i % 10) < round(10 * two_object_fraction) else 1
        scene = toy_world.render_scene(scene_seed, size, n_objects=n_objects, split="train")
        images.append(scene.image)
        captions.append(scene.caption)
    return torch.stack(images), captions


@torch.no_grad()
def encode_images(vae: comfy.sd.VAE, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """The VAE's raw latents of ``images`` (N, H, W, 3) in [0, 1], through ``comfy.sd.VAE.encode``."""
    return torch.cat([vae.encode(images[i:i + batch]).float().cpu() for i in range(0, len(images), batch)])


def affine_of(process_in) -> tuple[float, float]:
    """(scale, shift) with ``process_in(x) == (x - shift) * scale`` for a latent format's affine ``process_in``."""
    zero = float(process_in(torch.zeros(1)))
    scale = float(process_in(torch.ones(1))) - zero
    return scale, -zero / scale


def standardise_vae(vae: comfy.sd.VAE, raw_mean: float, raw_std: float, process_in) -> None:
    """Set the TAESD's ``vae_scale`` / ``vae_shift`` (in place) so that ``process_in(vae.encode(x))`` has the
    dataset's mean 0 and std 1 where the raw latents had ``raw_mean`` / ``raw_std`` with the current values."""
    taesd = vae.first_stage_model
    s0, h0 = taesd.vae_scale.item(), taesd.vae_shift.item()
    scale, shift = affine_of(process_in)
    with torch.no_grad():
        taesd.vae_scale.fill_(s0 * raw_std * scale)
        taesd.vae_shift.fill_(shift + (h0 - raw_mean) / (raw_std * scale))


def file_key(vae_file: str) -> str:
    """A short content hash of the AE file (its name when it is no file), naming cached data made with it."""
    return hashlib.sha256(Path(vae_file).read_bytes()).hexdigest()[:16] if Path(vae_file).is_file() else vae_file


def latent_set(vae: comfy.sd.VAE, vae_file: str, n: int, size: int, seed: int, cache_dir: Path,
               two_object_fraction: float = TWO_OBJECT_FRACTION) -> LatentSet:
    """The standardised latents of ``n`` train scenes, cached in ``cache_dir`` by the AE file's hash."""
    mix = "" if two_object_fraction == TWO_OBJECT_FRACTION else f"_two{two_object_fraction:g}"
    cache = cache_dir / f"latents_{file_key(vae_file)}_{n}_{size}_{seed}{mix}.pt"
    if cache.is_file():
        stored = torch.load(cache)
        return LatentSet(stored["latents"], stored["captions"], stored["raw_mean"], stored["raw_std"],
                         stored["encode_cpu_seconds"])
    started = time.process_time()
    images, captions = render_train_scenes(n, size, seed, two_object_fraction)
    raw = encode_images(vae, images)
    mean, std = float(raw.mean()), float(raw.std())
    data = LatentSet((raw - mean) / std, captions, mean, std, time.process_time() - started)
    cache_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"latents": data.latents, "captions": captions, "raw_mean": mean, "raw_std": std,
                "encode_cpu_seconds": data.encode_cpu_seconds}, cache)
    log.info("encoded %d scenes of %d px in %.1f CPU minutes: latents %s, raw mean %.4f std %.4f", n, size,
             data.encode_cpu_seconds / 60, tuple(raw.shape[1:]), mean, std)
    return data


@torch.no_grad()
def encode_prompt(clip: comfy.sd.CLIP, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIPTextEncode's (cond (1, tokens, width), pooled_output (1, width)) for ``text``."""
    cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
    return cond.float(), pooled.float()


def conditioning(clip: comfy.sd.CLIP, text: str) -> list:
    """A ComfyUI CONDITIONING of ``text`` as CLIPTextEncode gives it."""
    cond, pooled = encode_prompt(clip, text)
    return [[cond, {"pooled_output": pooled}]]


@dataclass
class CaptionTable:
    conds: torch.Tensor  # (K + 1, tokens, width); row 0: the empty prompt (caption dropout, cfg's negative)
    pooled: torch.Tensor  # (K + 1, width)
    index: torch.Tensor  # (N,) row of each scene's caption


def caption_table(clip: comfy.sd.CLIP, captions: list[str]) -> CaptionTable:
    """Every distinct caption encoded once by the frozen text encoder."""
    distinct = [""] + sorted(set(captions))
    row = {text: i for i, text in enumerate(distinct)}
    encoded = [encode_prompt(clip, text) for text in distinct]
    return CaptionTable(torch.cat([c for c, _ in encoded]), torch.cat([p for _, p in encoded]),
                        torch.tensor([row[text] for text in captions]))
