"""The patch layer: TokenFlow inside ComfyUI's transformer blocks through public patch points.

A model clone gets three things (see :func:`install_tokenflow_patches`):

- an ``attn1_patch`` that sees every block's ``norm1`` tokens: it records the source keyframes'
  tokens and computes (or looks up) the nearest-neighbour fields of the frames being propagated;
- an ``attn1_replace`` for every transformer block: ordinary, extended (joint keyframe) or
  propagated self-attention depending on the pass, with PnP query/key injection;
- a keyed ``DIFFUSION_MODEL`` wrapper that, only for the duration of one UNet call, hooks the
  residual branch of the PnP ResBlocks to record (source) or inject (edit) their features.

Nothing happens unless the call's ``transformer_options`` carry a :class:`PassContext` (set per
call by the TokenFlow guiders) or the joint-edit flag, so the clone behaves like the plain
model elsewhere. All per-step state lives in a :class:`StepBank` owned by the guider and
cleared in ``finally``.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable

import torch

import comfy.ldm.modules.attention as comfy_attention
import comfy.patcher_extension

from ..tokenflow_ops.attention import extended_attention
from ..tokenflow_ops.correspondence import DEFAULT_MAX_ELEMENTS, frame_fields
from ..tokenflow_ops.keyframes import FramePairing
from ..tokenflow_ops.propagation import propagate
from .model_support import BlockKey, ModelLayout

log = logging.getLogger(__name__)

PASS_KEY = "tokenflow_pass"
JOINT_KEY = "tokenflow_joint_attention"
WRAPPER_KEY = "tokenflow"


class Phase(str, Enum):
    SOURCE_KEYFRAMES = "source_keyframes"  # source branch on keyframes: record tokens, outputs, PnP q/k, residuals
    EDIT_KEYFRAMES = "edit_keyframes"  # edit branches on keyframes: extended attention (+ PnP), record outputs
    SOURCE_FRAMES = "source_frames"  # source branch on a batch: fields + propagated source outputs
    EDIT_FRAMES = "edit_frames"  # edit branches on a batch: propagated outputs (+ PnP residuals)
    EXTRACT_KEYFRAMES = "extract_keyframes"  # clean source pass on keyframes: record tokens
    EXTRACT_FRAMES = "extract_frames"  # clean source pass on a batch: fields to the sink


SOURCE_PHASES = (Phase.SOURCE_KEYFRAMES, Phase.SOURCE_FRAMES)
PROPAGATION_PHASES = (Phase.SOURCE_FRAMES, Phase.EDIT_FRAMES)
EDIT_PHASES = (Phase.EDIT_KEYFRAMES, Phase.EDIT_FRAMES)

FieldProvider = Callable[[BlockKey, torch.Tensor], torch.Tensor]  # (block, frame ids) -> (F, 2, N) fields
FieldSink = Callable[[BlockKey, torch.Tensor, torch.Tensor], None]  # (block, frame ids, fields)


@dataclass
class StepBank:
    """What one step's keyframe pass records and its propagation passes read."""

    keyframe_tokens: dict[BlockKey, torch.Tensor] = field(default_factory=dict)
    keyframe_outputs: dict[tuple[BlockKey, Any], torch.Tensor] = field(default_factory=dict)
    pnp_qk: dict[BlockKey, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    fields: dict[BlockKey, torch.Tensor] = field(default_factory=dict)
    residuals: dict[str, torch.Tensor] = field(default_factory=dict)
    trace: list | None = None  # when a list, PnP injections are logged into it as (kind, where, phase)

    def clear(self) -> None:
        for store in (self.keyframe_tokens, self.keyframe_outputs, self.pnp_qk, self.fields, self.residuals):
            store.clear()

    def is_empty(self) -> bool:
        return not any((self.keyframe_tokens, self.keyframe_outputs, self.pnp_qk, self.fields, self.residuals))


@dataclass
class PassContext:
    """Per-UNet-call instructions, carried in ``transformer_options[PASS_KEY]``."""

    phase: Phase
    bank: StepBank
    frames: torch.Tensor  # global indices (CPU long) of the frames in this call
    pairing: FramePairing | None = None
    pnp_attention: frozenset = frozenset()
    pnp_residual: tuple[str, ...] = ()
    field_provider: FieldProvider | None = None  # extracted fields; None: on the fly from source tokens
    field_sink: FieldSink | None = None
    max_elements: int = DEFAULT_MAX_ELEMENTS
    # Extracted correspondences + PnP: a propagated source pass is only needed up to the last
    # PnP ResBlock, so the rest of the UNet is skipped.
    stop_after_residuals: bool = False

    def fields_for(self, block: BlockKey) -> torch.Tensor:
        fields = self.bank.fields.get(block)
        if fields is None:
            if self.field_provider is None:
                raise RuntimeError(f"TokenFlow: no correspondences for block {block}; the source pass did not run")
            fields = self.field_provider(block, self.frames)
        return fields


def _block_key(extra: dict) -> BlockKey:
    block = extra["block"]
    return (block[0], int(block[1]), int(extra.get("block_index", 0)))


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra: dict) -> torch.Tensor:
    # Looked up at call time so that the host's choice of kernel (SDPA, xformers, sage, ...) is used.
    return comfy_attention.optimized_attention(q, k, v, extra["n_heads"], attn_precision=extra.get("attn_precision"))


def _chunks(t: torch.Tensor, extra: dict) -> list[torch.Tensor]:
    return list(t.chunk(len(extra.get("cond_or_uncond", [0]))))


def tokenflow_attn1_patch(n: torch.Tensor, context: torch.Tensor, value: torch.Tensor, extra: dict):
    """Records / matches ``norm1`` tokens; never changes them."""
    ctx: PassContext | None = extra.get(PASS_KEY)
    if ctx is None:
        return n, context, value
    block = _block_key(extra)
    if ctx.phase in (Phase.SOURCE_KEYFRAMES, Phase.EXTRACT_KEYFRAMES):
        ctx.bank.keyframe_tokens[block] = n
    elif ctx.phase is Phase.SOURCE_FRAMES:
        if ctx.field_provider is not None:
            ctx.bank.fields[block] = ctx.field_provider(block, ctx.frames)
        else:
            ctx.bank.fields[block] = frame_fields(n, ctx.frames, ctx.bank.keyframe_tokens[block], ctx.pairing, ctx.max_elements)
    elif ctx.phase is Phase.EXTRACT_FRAMES:
        fields = frame_fields(n, ctx.frames, ctx.bank.keyframe_tokens[block], ctx.pairing, ctx.max_elements)
        ctx.field_sink(block, ctx.frames, fields)
    if ctx.phase in PROPAGATION_PHASES:
        # Propagated frames never compute self-attention: hand the q/k/v projections a single token
        # each so that their cost vanishes too (the replacement below rebuilds the full token count).
        one = n[:, :1]
        return one, one, one
    return n, context, value


def tokenflow_attn1_replace(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra: dict) -> torch.Tensor:
    """Self-attention of one transformer block, as the current pass requires (output before to_out)."""
    ctx: PassContext | None = extra.get(PASS_KEY)
    if ctx is None:
        if extra.get(JOINT_KEY):
            attend = functools.partial(_attention, extra=extra)
            heads = extra["n_heads"]
            return torch.cat([extended_attention(qc, kc, vc, heads, lambda a, b, c, h: attend(a, b, c))
                              for qc, kc, vc in zip(_chunks(q, extra), _chunks(k, extra), _chunks(v, extra))])
        return _attention(q, k, v, extra)
    block = _block_key(extra)
    bank = ctx.bank
    uuids = extra.get("uuids", [None])
    if ctx.phase in (Phase.EXTRACT_KEYFRAMES, Phase.EXTRACT_FRAMES):
        return _attention(q, k, v, extra)
    if ctx.phase is Phase.SOURCE_KEYFRAMES:
        if block in ctx.pnp_attention:
            bank.pnp_qk[block] = (q, k)
        out = _attention(q, k, v, extra)
        bank.keyframe_outputs[(block, uuids[0])] = out
        return out
    if ctx.phase is Phase.EDIT_KEYFRAMES:
        outs = []
        for uuid, qc, kc, vc in zip(uuids, _chunks(q, extra), _chunks(k, extra), _chunks(v, extra)):
            if block in ctx.pnp_attention:
                qc, kc = bank.pnp_qk[block]
                if bank.trace is not None:
                    bank.trace.append(("attention", block, ctx.phase.value))
            out = extended_attention(qc, kc, vc, extra["n_heads"], lambda a, b, c, h: _attention(a, b, c, extra))
            bank.keyframe_outputs[(block, uuid)] = out
            outs.append(out)
        return torch.cat(outs)
    # Propagation: self-attention is not computed; keyframe outputs are gathered through the fields.
    fields = None
    slots = ctx.pairing.slots[ctx.frames]
    weights = ctx.pairing.weights[ctx.frames]
    outs = []
    for uuid in uuids:
        values = bank.keyframe_outputs.get((block, uuid))
        if values is None:
            raise RuntimeError(f"TokenFlow: block {block} has no keyframe output for this conditioning; "
                               "area/mask conditioning that differs between passes is not supported")
        if fields is None:  # moved to the device once per block, not once per branch
            fields = ctx.fields_for(block).to(values.device)
        if values.shape[1] != fields.shape[-1]:
            raise RuntimeError(f"TokenFlow: token count changed between passes at block {block} "
                               f"({values.shape[1]} vs {fields.shape[-1]}); area conditioning is not supported")
        outs.append(propagate(values, fields, slots, weights))
    return torch.cat(outs)


class _SourceFeaturesRecorded(Exception):
    """Stops a source pass early: it only ran for PnP residual features, and all are recorded."""


def _residual_hook(ctx: PassContext, path: str, chunks: int, module, inputs, output):
    if ctx.phase in SOURCE_PHASES:
        ctx.bank.residuals[path] = output
        if ctx.stop_after_residuals and all(p in ctx.bank.residuals for p in ctx.pnp_residual):
            raise _SourceFeaturesRecorded
        return None
    source = ctx.bank.residuals[path]
    if ctx.bank.trace is not None:
        ctx.bank.trace.append(("residual", path, ctx.phase.value))
    return torch.cat([source] * chunks) if chunks > 1 else source


def residual_injection_wrapper(executor, *args, **kwargs):
    """DIFFUSION_MODEL wrapper: hooks the PnP ResBlocks' residual branch for this one call only."""
    # UNetModel.forward passes (x, timesteps, context, y, control, transformer_options) positionally.
    options = kwargs.get("transformer_options", args[5] if len(args) > 5 else None) or {}
    ctx: PassContext | None = options.get(PASS_KEY)
    if ctx is None or not ctx.pnp_residual or ctx.phase not in SOURCE_PHASES + EDIT_PHASES:
        return executor(*args, **kwargs)
    unet = executor.class_obj
    chunks = len(options.get("cond_or_uncond", [0]))
    handles = []
    try:
        for path in ctx.pnp_residual:
            last_layer = unet.get_submodule(path).out_layers[-1]  # after the second conv, before the skip add
            handles.append(last_layer.register_forward_hook(functools.partial(_residual_hook, ctx, path, chunks)))
        try:
            return executor(*args, **kwargs)
        except _SourceFeaturesRecorded:
            return torch.zeros_like(args[0])  # this source prediction is never used
    finally:
        for handle in handles:
            handle.remove()


def install_tokenflow_patches(model_patcher, layout: ModelLayout) -> None:
    """Add TokenFlow's patches to a model CLONE (idempotent)."""
    patches = model_patcher.model_options.get("transformer_options", {}).get("patches", {})
    if tokenflow_attn1_patch not in patches.get("attn1_patch", []):
        model_patcher.set_model_attn1_patch(tokenflow_attn1_patch)
    for kind, block_id, index in layout.transformer_blocks:
        model_patcher.set_model_attn1_replace(tokenflow_attn1_replace, kind, block_id, index)
    model_patcher.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY)
    model_patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY,
                                       residual_injection_wrapper)
