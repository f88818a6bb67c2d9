"""Plug-and-Play injection presets of the flow-matching transformers, named after the method they follow.

A preset is a value of the PnP editor's ``pnp_attention_blocks`` input: which attentions the source's
image-token features replace the edit's in (``blocks``, chosen from the model's own block list, so a
model with fewer or more blocks than the one the method was published on gets the same relative depths)
and which of them (``injects``: ``"v"`` the image-token values, ``"kv"`` the image-token keys and
values). ``fraction`` is the share of the editing steps the method injects in, as its code runs it:
the value of ``pnp_attn_t`` that reproduces it (the preset does not set it: ``pnp_attn_t`` does).

Plain data, no ComfyUI import: the PnP editor's tooltips are built from it where the host is absent.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .base import BlockKey

# What a DiT block list may inject, as its suffix spells it ("single_block:20-37:v").
INJECTS = {"v": "the source's image-token values", "kv": "the source's image-token keys and values"}


@dataclass(frozen=True)
class InjectionPreset:
    name: str  # the value of pnp_attention_blocks
    blocks: Callable[[tuple[BlockKey, ...]], tuple[BlockKey, ...]]  # from the model's attentions
    injects: str  # a key of INJECTS
    fraction: float | None  # the published share of injected steps (None: no published basis)
    summary: str  # blocks, what is injected and the published fraction, with the source, in a sentence


def _of_kind(blocks: tuple[BlockKey, ...], kind: str) -> list[BlockKey]:
    return [b for b in blocks if b[0] == kind]


# RF-Solver-Edit's Flux-dev setting (wangjiangshan0725/RF-Solver-Edit, FLUX_Image_Edit/src/flux/modules/layers.py
# SingleStreamBlock.forward: ``if info['inject'] and info['id'] > 19``, ``id`` counting the single blocks from 0):
# single blocks 20..37 of Flux-dev's 38.
RF_SOLVER_FIRST_SINGLE_BLOCK, FLUX_DEV_DOUBLE_BLOCKS, FLUX_DEV_SINGLE_BLOCKS = 20, 19, 38


def rf_solver_blocks(blocks: tuple[BlockKey, ...]) -> tuple[BlockKey, ...]:
    """RF-Solver-Edit (Wang et al., "Taming Rectified Flow for Inversion and Editing", 2024): in the first
    ``inject`` denoising steps, the attention values V of the single-stream blocks 20..37 (of 38; none in the
    double-stream blocks) are the ones its inversion recorded at the same timestep. Scaled to the model: the
    single blocks from 20/38 of their count on (Flux-dev and Flux-schnell: exactly 20..37), at least the last one.

    What is injected differs in one point: RF-Solver-Edit replaces the whole V of a single block, the text
    tokens' values (the source prompt's) included; the pack injects the image tokens' values only (``"v"``
    of the image tokens), the edit's text tokens keep their own."""
    single = _of_kind(blocks, "single_block")
    if not single:
        return ()
    first = min(round(len(single) * RF_SOLVER_FIRST_SINGLE_BLOCK / FLUX_DEV_SINGLE_BLOCKS), len(single) - 1)
    return tuple(single[first:])


# Stable Flow's vital layers of Flux-dev (snap-research/stable-flow, run_stable_flow.py: MULTIMODAL_VITAL_LAYERS
# = [0, 1, 17, 18]; SINGLE_MODAL_VITAL_LAYERS = [28, 53, 54, 56, 25] - 19, numbered over all 57 blocks there, so
# single blocks 9, 34, 35, 37, 6 counted within the single blocks).
STABLE_FLOW_DOUBLE, STABLE_FLOW_SINGLE = (0, 1, 17, 18), (6, 9, 34, 35, 37)


def _at_relative_depth(kind_blocks: list[BlockKey], published: tuple[int, ...], published_count: int) -> list[BlockKey]:
    """The blocks at the published indices' relative depths: index i of ``published_count`` blocks is block
    floor(i * n / published_count) of this model's n (the published indices themselves when n is the same)."""
    ids = list(dict.fromkeys(b[1] for b in kind_blocks))
    wanted = {ids[i * len(ids) // published_count] for i in published} if ids else set()
    return [b for b in kind_blocks if b[1] in wanted]


def stable_flow_blocks(blocks: tuple[BlockKey, ...]) -> tuple[BlockKey, ...]:
    """Stable Flow (Avrahami et al., "Stable Flow: Vital Layers for Training-Free Image Editing", CVPR 2025):
    in every denoising step, the source's IMAGE-token keys and values replace the edit's in its vital layers
    (Flux-dev: double blocks 0, 1, 17, 18 and single blocks 6, 9, 34, 35, 37; its attention processors copy
    ``key[:, 512:]`` / ``value[:, 512:]`` of the single blocks, the image tokens after its 512 text tokens,
    and the image stream's keys and values of the double blocks), taken before the q/k norm and RoPE, which
    the source and the edit share, so the pack's post-norm, post-RoPE image keys are the same swap. Scaled
    to the model by relative depth per block kind (:func:`_at_relative_depth`)."""
    double = _at_relative_depth(_of_kind(blocks, "double_block"), STABLE_FLOW_DOUBLE, FLUX_DEV_DOUBLE_BLOCKS)
    single = _at_relative_depth(_of_kind(blocks, "single_block"), STABLE_FLOW_SINGLE, FLUX_DEV_SINGLE_BLOCKS)
    chosen = set(double) | set(single)
    return tuple(b for b in blocks if b in chosen)


def second_quarter_blocks(blocks: tuple[BlockKey, ...]) -> tuple[BlockKey, ...]:
    """The joint attention of the second quarter of the joint blocks: a heuristic. Stable Flow's code defines
    vital layers for Flux-dev only; for SD3.x the pack swaps image keys and values (Stable Flow's injection) in
    these middle blocks, with no published basis (scripts/find_vital_layers.py finds a model's own)."""
    joint = [b for b in blocks if b[2] == 0]
    quarter = max(1, len(joint) // 4)
    return tuple(joint[quarter:2 * quarter])


RF_SOLVER = InjectionPreset(
    "rf_solver", rf_solver_blocks, "v", 0.2,
    "rf_solver: image values V in single blocks 20-37 of 38 (scaled to the model), injected in RF-Solver-Edit's "
    "demo for 5 of 25 steps (pnp_attn_t 0.2; wangjiangshan0725/RF-Solver-Edit gradio_demo.py; its scripts 2-5 of "
    "15-25)")
STABLE_FLOW = InjectionPreset(
    "stable_flow", stable_flow_blocks, "kv", 1.0,
    "stable_flow: image keys and values K, V in Flux-dev's vital layers double 0, 1, 17, 18 and single 6, 9, 34, "
    "35, 37 (scaled by relative depth), in every step (pnp_attn_t 1.0; snap-research/stable-flow "
    "run_stable_flow.py)")
SD3_HEURISTIC = InjectionPreset(
    "auto", second_quarter_blocks, "kv", None,
    "auto on SD3.x: image keys and values in the joint blocks of the second quarter, a heuristic (no published "
    "vital layers for SD3.x; scripts/find_vital_layers.py finds a model's own)")
