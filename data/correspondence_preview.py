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


def token_grid(latent_hw: tuple[int, int], tokens: int) -> tuple[int, int, int]:
    """(rows, columns, latent pixels per token side) of a field over ``tokens`` tokens of a frame.

    A token covers ``scale`` x ``scale`` latent pixels, and a side that is not a multiple of it is padded up: a DiT's
    patchify pads the latent to its patch size, a UNet's stride-2 convolutions round up the same way. So the grid
    is ceil(h / scale) x ceil(w / scale) (a 9x10 latent in 2x2 patches: 5x5 tokens).
    """
    lh, lw = latent_hw
    scale = 1
    while scale <= max(lh, lw):
        gh, gw = -(-lh // scale), -(-lw // scale)
        if gh * gw == tokens:
            return gh, gw, scale
        scale *= 2
    raise ValueError(f"cannot lay out {tokens} tokens on the {lh}x{lw} latent grid (no token side 1, 2, 4, ... "
                     "gives that many)")


def blank_preview(inversion: TokenFlowInversion) -> torch.Tensor:
    """A black IMAGE of the preview's size, (1, H, 3W, 3): what the preview output holds when no picture was made."""
    lh, lw = inversion.latent_shape[-2:]
    return torch.zeros(1, lh * 8, 3 * lw * 8, 3)


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
    gh, gw, scale = token_grid((lh, lw), field.numel())
    # Pixels per token side; the padded grid reaches past the frame where a side is not a multiple of the token's.
    ph, pw = scale * height // lh, scale * width // lw
    padded = F.pad(pixels, (0, gw * pw - width, 0, gh * ph - height))
    # One patch per token (row-major over the token grid), then the keyframe patches each token matched.
    patches = rearrange(padded[keyframe], "c (gh ph) (gw pw) -> (gh gw) c ph pw", gh=gh, gw=gw)
    rebuilt = rearrange(patches[field], "(gh gw) c ph pw -> c (gh ph) (gw pw)", gh=gh, gw=gw)
    row = torch.cat([part[:, :height, :width] for part in (padded[frame], rebuilt, padded[keyframe])], dim=-1)
    return row.movedim(0, -1).unsqueeze(0).clamp(0, 1)
