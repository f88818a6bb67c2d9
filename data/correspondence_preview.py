"""The "correspondences at work" picture (paper figure 2): a frame rebuilt from its keyframe's pixels."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from .products import TokenFlowCorrespondences, TokenFlowInversion


def latent_to_rgb(latents: torch.Tensor, latent_format) -> torch.Tensor:
    """Cheap RGB approximation of latents (ComfyUI's preview factors), (n, 3, h, w) in 0..1."""
    factors = getattr(latent_format, "latent_rgb_factors", None)
    if factors is None:
        rgb = latents[:, :3]
    else:
        weight = torch.tensor(factors, dtype=latents.dtype)  # (C, 3)
        bias = torch.tensor(getattr(latent_format, "latent_rgb_factors_bias", None) or [0.0] * 3, dtype=latents.dtype)
        rgb = torch.einsum("nchw,cr->nrhw", latents, weight) + bias[None, :, None, None]
    return ((rgb + 1) / 2).clamp(0, 1)


def preview_image(corr: TokenFlowCorrespondences, inversion: TokenFlowInversion, latent_format, frame: int,
                  source_images: torch.Tensor | None = None) -> torch.Tensor:
    """IMAGE (1, H, 3W, 3): [real frame | frame rebuilt from its keyframe through the field | keyframe].

    Uses the last (least noisy) step and the finest transformer block; pixels come from
    ``source_images`` when given, else from an RGB approximation of the source latents.
    """
    n = inversion.n_frames
    frame = frame if 0 <= frame < n else n // 2
    block = max(corr.fields, key=lambda b: (corr.fields[b].shape[-1], b[0] == "output", b[1], b[2]))
    step = len(corr.timesteps) - 1
    pairing = corr.schedule.pairing(step, n)
    slot = int(pairing.slots[frame, 0])
    keyframe = int(corr.keyframes[step, slot])
    field = corr.fields[block][step, frame, 0].long()
    if source_images is not None:  # checked against the inversion by the node (engine.checks)
        pixels = source_images.movedim(-1, 1).float()
    else:
        pixels = latent_to_rgb(inversion.x0.float(), latent_format)
        pixels = F.interpolate(pixels, scale_factor=8, mode="nearest")
    _, _, height, width = pixels.shape
    lh, lw = inversion.latent_shape[-2:]
    tokens = field.numel()
    scale = round((lh * lw / tokens) ** 0.5)
    gh, gw = max(1, lh // scale), max(1, lw // scale)
    if gh * gw != tokens:
        raise ValueError(f"cannot lay out {tokens} tokens on the {lh}x{lw} latent grid")
    ph, pw = height // gh, width // gw
    crop = pixels[:, :, :gh * ph, :gw * pw]
    # One patch per token (row-major over the token grid), then the keyframe patches each token matched.
    patches = rearrange(crop[keyframe], "c (gh ph) (gw pw) -> (gh gw) c ph pw", gh=gh, gw=gw)
    rebuilt = rearrange(patches[field], "(gh gw) c ph pw -> c (gh ph) (gw pw)", gh=gh, gw=gw)
    row = torch.cat([crop[frame], rebuilt, crop[keyframe]], dim=-1)
    return row.movedim(0, -1).unsqueeze(0).clamp(0, 1)
