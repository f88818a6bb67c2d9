"""The data that flows between TokenFlow nodes: the inversion and the correspondences.

Both live on the CPU (the GPU only ever holds the frames of the current pass) and carry
fingerprints so that a sampler can refuse products made from another video or model.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..tokenflow_ops.keyframes import KeyframeSchedule

from comfy_api.latest import io

InversionType = io.Custom("TOKENFLOW_INVERSION")
CorrespondencesType = io.Custom("TOKENFLOW_CORRESPONDENCES")


@dataclass
class TokenFlowInversion:
    """The DDIM-inverted source video: its latent trajectory at every editing timestep."""

    steps: int
    inversion_steps: int
    timesteps: list[int]  # editing timesteps, largest first
    sigmas: torch.Tensor  # the model's sigma at each editing timestep, plus sigma[0] (final level)
    trajectory: torch.Tensor  # (steps, n, C, H, W) DDPM-space scaled latents x_t, CPU float32
    x0: torch.Tensor  # (n, C, H, W) scaled clean latents
    inverted: torch.Tensor  # (n, C, H, W) the fully inverted latent at ``inverted_timestep``
    inverted_timestep: int
    conditioning: list  # the inversion prompt (CPU), used by the source branch
    model_fingerprint: str
    frames_fingerprint: str
    family: str
    # How it was inverted (files saved before these fields existed load with the defaults: DDIM).
    method: str = "ddim"  # "ddim" (official, on the inversion_steps grid) or "fixed_point" (on the editing grid)
    max_iterations: int = 0  # fixed point: the cap on evaluations per step (0 for ddim)
    tolerance: float = 0.0  # fixed point: the residual that stops a step's iteration (0 for ddim)
    evaluations: list[float] = field(default_factory=list)  # fixed point: evaluations per frame, each step (t ascending)
    residuals: list = field(default_factory=list)  # fixed point: largest final residual at each step (None: 1 eval)

    @property
    def n_frames(self) -> int:
        return int(self.x0.shape[0])

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.x0.shape[1:])

    def step_of(self, timestep: int) -> int:
        try:
            return self.timesteps.index(timestep)
        except ValueError:
            raise ValueError(f"timestep {timestep} is not on this inversion's grid ({self.steps} steps)") from None

    def describe(self) -> str:
        c, h, w = self.latent_shape
        how = (f"fixed point on the editing grid, at most {self.max_iterations} evaluations per step"
               if self.method == "fixed_point" else f"inverted with {self.inversion_steps} DDIM steps")
        return (f"{self.n_frames} frames, latent {c}x{h}x{w}, {self.steps} steps "
                f"({how}), model {self.model_fingerprint}, frames {self.frames_fingerprint}")


@dataclass
class TokenFlowCorrespondences:
    """Keyframe plan plus nearest-neighbour fields for every transformer block at every step.

    ``fields[block]`` is (steps, n_frames, 2, tokens) in a compact integer type: for each frame,
    the index of the matched token in each of its two paired keyframes (see FramePairing).
    """

    timesteps: list[int]
    keyframes: torch.Tensor  # (steps, n_keyframes) long
    group_size: int
    blend: str
    fields: dict[tuple[str, int, int], torch.Tensor] = field(default_factory=dict)
    inversion_fingerprint: str = ""
    model_fingerprint: str = ""

    @property
    def schedule(self) -> KeyframeSchedule:
        return KeyframeSchedule(self.keyframes, self.group_size, self.blend)

    def fields_at(self, step: int, block: tuple[str, int, int], frames: torch.Tensor) -> torch.Tensor:
        return self.fields[block][step, frames].long()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.fields.values())


def inversion_fingerprint(inversion: TokenFlowInversion) -> str:
    """Model, frames and steps (and the method when it is not DDIM: fingerprints of DDIM inversions are unchanged)."""
    method = "" if inversion.method == "ddim" else f":{inversion.method}"
    return f"{inversion.model_fingerprint}:{inversion.frames_fingerprint}:{inversion.steps}{method}"


def extracted_from(inversion_fp: str | None, model_fp: str | None, inversion: TokenFlowInversion) -> bool:
    """Whether correspondences with these fingerprints were extracted from ``inversion`` (same model, frames, steps)."""
    return inversion_fp == inversion_fingerprint(inversion) and model_fp == inversion.model_fingerprint
