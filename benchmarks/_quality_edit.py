"""The four ways the quality benchmark edits a clip, through the pack's node classes (a toy world trained here).

Everything runs the nodes' ``execute`` in-process, as ``devkit/golden_run.py`` does, never the engine:

- ``perframe``: per-frame editing, the TokenFlow Sampler on each frame as a one-frame clip (each frame inverted
  on its own with TokenFlow DDIM Inversion), so nothing is shared between frames;
- ``joint``: extended attention alone, the Sampler with every frame a keyframe (``batch_size`` 1,
  ``max_keyframes`` -1): all frames edited jointly, nothing propagated;
- ``tokenflow``: the Sampler as users run it, keyframes of ``batch_size`` frames edited jointly and their
  tokens propagated through correspondences computed on the fly;
- ``tokenflow_extracted``: the same with correspondences from TokenFlow Extract Correspondences.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

METHODS = ("perframe", "joint", "tokenflow", "tokenflow_extracted")
METHOD_LABELS = {"perframe": "per-frame editing", "joint": "extended attention alone",
                 "tokenflow": "TokenFlow (on the fly)", "tokenflow_extracted": "TokenFlow (extracted)"}
EDITORS = ("pnp", "sdedit")


@dataclass(frozen=True)
class EditRecipe:
    """What one edit runs with: the inversion's grid and method, the sampler's cfg and keyframe batch, the
    editor's options (empty: the editor's declared defaults)."""

    steps: int = 20
    inversion_steps: int = 100
    inversion_method: str = "auto"
    cfg: float = 5.0
    batch_size: int = 4
    seed: int = 1
    options: dict = field(default_factory=dict)

    def with_options(self, **options: Any) -> "EditRecipe":
        return replace(self, options={**self.options, **options})


def encode_text(clip, text: str):
    """The conditioning of ``text`` through the core CLIP Text Encode node."""
    import nodes as comfy_nodes

    return comfy_nodes.CLIPTextEncode().encode(clip, text)[0]


def encode_frames(vae, frames: torch.Tensor) -> dict:
    """VAE Encode of (N, H, W, 3) frames: a LATENT with one latent per frame."""
    import nodes as comfy_nodes

    return comfy_nodes.VAEEncode().encode(vae, frames[..., :3])[0]


def decode_frames(vae, latent: dict) -> torch.Tensor:
    """VAE Decode: (N, H, W, 3) float32 in [0, 1]."""
    import nodes as comfy_nodes

    images = comfy_nodes.VAEDecode().decode(vae, latent)[0]
    return images.reshape(-1, *images.shape[-3:]).detach().float().clamp(0, 1)


def invert(model, latent: dict, conditioning, recipe: EditRecipe):
    """TokenFlow DDIM Inversion of ``latent`` (all its frames)."""
    from comfyui_tokenflow.nodes.inversion_nodes import TokenFlowInvert

    inversion, _ = TokenFlowInvert.execute(model, latent, conditioning, recipe.steps, recipe.inversion_steps, 0,
                                           recipe.inversion_method).result
    return inversion


def sample(model, positive, negative, inversion, editor: str, recipe: EditRecipe, batch_size: int,
           max_keyframes: int = 0, correspondences=None) -> dict:
    """The TokenFlow Sampler's edited LATENT."""
    from comfyui_tokenflow.nodes.sampler_nodes import TokenFlowSampler

    (latent,) = TokenFlowSampler.execute(model, positive, negative, inversion, editor, recipe.cfg, batch_size,
                                         "random", recipe.seed, correspondences, max_keyframes=max_keyframes,
                                         **recipe.options).result
    return latent


def extract(model, inversion, recipe: EditRecipe):
    """TokenFlow Extract Correspondences with the recipe's keyframe plan."""
    from comfyui_tokenflow.nodes.correspondence_nodes import TokenFlowExtractCorrespondences

    correspondences, _ = TokenFlowExtractCorrespondences.execute(model, inversion, recipe.batch_size, "random",
                                                                 recipe.seed).result
    return correspondences


class ClipEditor:
    """One source clip on one model: its inversions (the clip's and each frame's) are made once, on first use,
    and shared by every editor and method."""

    def __init__(self, model, vae, source_latent: dict, source_cond, edit_cond, negative, recipe: EditRecipe):
        self.model, self.vae, self.latent = model, vae, source_latent
        self.source_cond, self.edit_cond, self.negative = source_cond, edit_cond, negative
        self.recipe = recipe
        self._inversions: dict[Any, Any] = {}

    def inversion(self, frame: int | None = None):
        """The whole clip's inversion (``frame`` None) or one frame's as a one-frame clip."""
        if frame not in self._inversions:
            samples = self.latent["samples"]
            latent = self.latent if frame is None else {"samples": samples[frame:frame + 1].clone()}
            self._inversions[frame] = invert(self.model, latent, self.source_cond, self.recipe)
        return self._inversions[frame]

    def edit(self, method: str, editor: str, recipe: EditRecipe | None = None) -> torch.Tensor:
        """The edited frames (N, H, W, 3) of ``method`` with ``editor``; ``recipe`` may change the sampler's
        settings, never the inversion's (that is made once with the recipe given at construction)."""
        recipe = recipe or self.recipe
        args = (self.model, self.edit_cond, self.negative)
        if method == "perframe":
            n_frames = self.latent["samples"].shape[0]
            edited = [sample(*args, self.inversion(i), editor, recipe, batch_size=1)["samples"] for i in range(n_frames)]
            return decode_frames(self.vae, {"samples": torch.cat(edited)})
        if method == "joint":
            latent = sample(*args, self.inversion(), editor, recipe, batch_size=1, max_keyframes=-1)
        elif method == "tokenflow":
            latent = sample(*args, self.inversion(), editor, recipe, batch_size=recipe.batch_size)
        elif method == "tokenflow_extracted":
            correspondences = extract(self.model, self.inversion(), recipe)
            latent = sample(*args, self.inversion(), editor, recipe, batch_size=recipe.batch_size,
                            correspondences=correspondences)
        else:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        return decode_frames(self.vae, latent)
