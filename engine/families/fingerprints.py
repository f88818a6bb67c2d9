"""Identity of a model's base weights and of source frames: what binds a product to its model and video."""
from __future__ import annotations

import hashlib

import torch


def model_fingerprint(model_patcher) -> str:
    """Identity of the base weights (LoRA/patches excluded): architecture, schedule and sampled weights."""
    unet = model_patcher.model.diffusion_model
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
