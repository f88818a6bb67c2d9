"""TokenFlow's own memory at an edit step, per family, and where the keyframe bank lives.

ComfyUI's ``memory_required`` counts a call's activations; TokenFlow holds more on the device across a step's calls:

- the keyframe bank: every patched attention's keyframe outputs, for every branch of the keyframe pass (UNet: the
  ``attn1`` outputs; DiT: the image rows of each declared attention's output), held from the keyframe pass to the
  end of the propagation pass;
- the source tokens the nearest-neighbour search reads (on the fly only), held as long;
- the PnP store: the source's image q/k (UNet) or k/v (DiT) of each injection block, held through the keyframe pass;
- the joint keys/values of the extended keyframe attention, one block at a time (UNet: the edit branches' q/k/v
  stacked, (C, K, N, d) each; DiT: (2, C·K, H, K·T, D) with the text tokens repeated per keyframe);
- the correspondence fields of the frames of a propagation call (long (F, 2, N) per attention).

The family adapter reads every attention's tokens and width off the model (``attention_sizes``); this module only
multiplies. The planner then picks, per step, where the bank lives (on the device when it fits beside the calls'
activations, else in host memory, brought to the device block by block: :mod:`..patches.bank_transfer`), whether
the keyframe pass's source branch shares the edit branches' call, and how many frames a propagation call holds.
None of it changes the keyframes or the arithmetic: the budget only splits calls and moves the bank.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field

import torch

from ..families.base import FLOW, AttentionSize, ModelLayout
from .call_sizing import (available_bytes, budget_total, call_bytes, largest_fitting_frame, most_that_fit,
                          overriding, resolution_advice)
from .edit_plan import EditPlan

log = logging.getLogger(__name__)

DEVICE, HOST = "device", "host"
STAGING_SLOTS = 3  # device buffers of a host bank: the block in use, the next one prefetched, one mispredicted
FIELD_BYTES = 8  # fields are long indices
FORCE_PLACEMENT: str | None = None  # DEVICE or HOST: overrides the planner's choice (tests, the dry run)


def bank_placement(placement: str | None):
    """Force the keyframe bank on the device or in host memory within the block (None: the planner's choice)."""
    return overriding(sys.modules[__name__], "FORCE_PLACEMENT", placement)


@dataclass(frozen=True)
class StepShape:
    """What a step of the edit holds: K keyframes, C edit branches, the source branch in the keyframe pass or not."""

    keyframes: int
    edit_branches: int
    source: bool  # the source branch runs in the keyframe pass (records its outputs, tokens and the PnP store)
    on_the_fly: bool  # the source tokens are kept for the nearest-neighbour search
    pnp_blocks: frozenset = frozenset()


def widest_step(plan: EditPlan, edit_branches: int) -> StepShape:
    """A shape holding the most of every step of ``plan``: the most keyframes, the source wherever any step has it,
    every PnP block."""
    on_the_fly = plan.on_the_fly
    return StepShape(max((len(k) for k in plan.schedule.keyframes), default=1), edit_branches,
                     any(n.source_in_keyframe_pass(on_the_fly) for n in plan.needs), on_the_fly,
                     frozenset().union(*(n.attention_injection for n in plan.needs)))


@dataclass(frozen=True)
class TokenFlowBytes:
    outputs: int  # the keyframe outputs of every attention and branch
    source_tokens: int  # the source tokens for the nearest-neighbour search
    pnp_store: int  # the source's q/k or k/v of the PnP blocks (the keyframe pass)
    joint_kv: int  # the largest attention's extended keys/values (transient, the keyframe pass)
    fields_per_frame: int  # the fields of one propagated frame, every attention (held for a call)
    largest_record: int  # the largest single record (one attention's outputs or tokens): a host bank's slot

    @property
    def bank(self) -> int:
        """What the bank holds from the keyframe pass to the end of the step."""
        return self.outputs + self.source_tokens

    @property
    def staging(self) -> int:
        """The device bytes of a host bank: its rotating per-block buffers."""
        return STAGING_SLOTS * self.largest_record


def compute_dtype(model) -> torch.dtype:
    """The dtype the model computes in (the bank's): a manual cast's, else the weights'."""
    return getattr(model, "manual_cast_dtype", None) or model.get_dtype()


def tokenflow_bytes(sizes: tuple[AttentionSize, ...], shape: StepShape, sampling: str, element_size: int
                    ) -> TokenFlowBytes:
    """TokenFlow's bytes at a step with ``shape``, from the attentions' sizes (``sampling``: which patch runs)."""
    k, c, s = shape.keyframes, shape.edit_branches, int(shape.source)
    outputs = tokens = pnp = joint = fields = largest = 0
    for a in sizes:
        row = a.image_tokens * a.width * element_size  # one frame's rows of one attention
        recorded = (c + s) * k * row
        outputs += recorded
        kept_tokens = k * row if s and shape.on_the_fly else 0
        tokens += kept_tokens
        largest = max(largest, recorded, kept_tokens)
        if s and a.block in shape.pnp_blocks:
            pnp += 2 * k * row
        if sampling == FLOW:  # own k/v stacked, then the joint (2, C*K, H, K*T, D) with the text repeated K times
            seq = (a.text_tokens + a.image_tokens) * a.width * element_size
            joint = max(joint, 2 * c * k * seq * (k + 1))
        else:  # the edit branches' q, k, v stacked for one fused call over K*N keys
            joint = max(joint, 3 * c * k * row)
        fields += 2 * a.image_tokens * FIELD_BYTES
    return TokenFlowBytes(outputs, tokens, pnp, joint, fields, largest)


def attention_sizes(model_patcher, layout: ModelLayout, latent_shape: tuple[int, ...], text_tokens: int
                    ) -> tuple[AttentionSize, ...]:
    return layout.adapter.attention_sizes(model_patcher.model.diffusion_model, latent_shape, text_tokens)


def text_tokens_of(*conditionings) -> int:
    """The longest text among ComfyUI conditionings ([[tensor, dict], ...]): a DiT's joint attention spans it."""
    lengths = [int(c[0].shape[1]) for cond in conditionings if cond for c in cond
               if isinstance(c[0], torch.Tensor) and c[0].ndim == 3]
    return max(lengths, default=0)


@dataclass(frozen=True)
class StepMemoryPlan:
    placement: str  # DEVICE | HOST
    shared_keyframe_call: bool  # the source branch in the keyframe pass's call (else calls of its own, first)
    frames_per_call: int
    bytes: TokenFlowBytes


def plan_step(model, tf: TokenFlowBytes, shape: StepShape, latent_shape: tuple[int, ...], device: torch.device,
              n_frames: int, frame_images: int) -> StepMemoryPlan:
    """Where the bank lives and how the step's calls are split (``frame_images``: images per propagated frame in one
    call). The bank goes on the device when the keyframe pass (source apart if need be) and a one-frame propagation
    call fit beside it; the propagation calls then hold as many frames as fit beside the bank or its staging."""
    budget = available_bytes(device)
    k, c = shape.keyframes, shape.edit_branches
    keyframe_edit = call_bytes(model, c * k, latent_shape) + tf.joint_kv + tf.pnp_store
    keyframe_shared = call_bytes(model, (c + shape.source) * k, latent_shape) + tf.joint_kv + tf.pnp_store

    def frames_need(frames: int, held: int) -> float:
        return call_bytes(model, frames * frame_images, latent_shape) + frames * tf.fields_per_frame + held

    placement = FORCE_PLACEMENT
    if placement is None:
        placement = DEVICE if keyframe_edit + tf.bank <= budget and frames_need(1, tf.bank) <= budget else HOST
    held = tf.bank if placement == DEVICE else tf.staging
    shared = keyframe_shared + held <= budget
    fit = most_that_fit(lambda frames: frames_need(frames, held), budget,
                        min(n_frames, int(budget // max(frames_need(1, 0), 1.0))))
    return StepMemoryPlan(placement, shared, fit, tf)


def extra_load_images(model, tf: TokenFlowBytes, latent_shape: tuple[int, ...]) -> int:
    """TokenFlow's device bytes of the keyframe pass beside its activations (bank on the host: its staging), as
    images of the host's estimate, rounded to the nearest: the load then leaves room for them."""
    per_image = float(model.memory_required([1, *latent_shape]))
    return int(round((tf.joint_kv + tf.pnp_store + tf.staging) / max(per_image, 1.0)))


def check_keyframes_fit(model_patcher, layout: ModelLayout, latent_shape: tuple[int, ...], shape: StepShape,
                        text_tokens: int, extracted: bool) -> None:
    """Refuse a keyframe count whose keyframe pass cannot run even with the bank in host memory: one edit branch of
    every keyframe in one call (extended attention spans them), its joint keys/values, the PnP store and the bank's
    staging, beside ComfyUI's minimum inference memory. Naming max_keyframes and the largest count that fits."""
    model = model_patcher.model
    sizes = attention_sizes(model_patcher, layout, latent_shape, text_tokens)
    element = torch.empty((), dtype=compute_dtype(model)).element_size()
    total, reserve = budget_total()

    def need(keyframes: int, shape_at: tuple[int, ...] = latent_shape) -> float:
        one = StepShape(keyframes, 1, shape.source, shape.on_the_fly, shape.pnp_blocks)
        at = sizes if shape_at == latent_shape else attention_sizes(model_patcher, layout, shape_at, text_tokens)
        tf = tokenflow_bytes(at, one, layout.sampling, element)
        return call_bytes(model, keyframes, shape_at) + tf.joint_kv + tf.pnp_store + tf.staging + reserve

    if need(shape.keyframes) <= total:
        return
    fitting = next((k for k in range(shape.keyframes - 1, 0, -1) if need(k) <= total), None)
    h, w = latent_shape[-2:]
    what = (f"{shape.keyframes} keyframes per step need about {need(shape.keyframes) / 2**30:.2f} GiB on the device "
            f"in the keyframe pass (every keyframe attends to every other in one call; the bank already in host "
            f"memory), more than this device has ({total / 2**30:.2f} GiB)")
    if fitting is None:
        frame = largest_fitting_frame(h, w, lambda lh, lw: need(1, (*latent_shape[:-2], lh, lw)) <= total)
        raise ValueError(f"inversion: at {w * 8}x{h * 8} px even 1 keyframe per step needs about "
                         f"{need(1) / 2**30:.2f} GiB on the device in the keyframe pass, more than it has "
                         f"({total / 2**30:.2f} GiB); {resolution_advice(frame, 'one keyframe')}")
    where = ("extract the correspondences again with max_keyframes" if extracted else "set max_keyframes to")
    raise ValueError(f"max_keyframes: {what}; {where} {fitting} or less")


def check_edit_fits(model_patcher, layout: ModelLayout, plan: EditPlan, latent_shape: tuple[int, ...],
                    *conditionings) -> None:
    """The edit's keyframe pass fits the device with the bank in host memory (:func:`check_keyframes_fit`)."""
    check_keyframes_fit(model_patcher, layout, latent_shape, widest_step(plan, 1), text_tokens_of(*conditionings),
                        extracted=not plan.on_the_fly)


@dataclass
class MemoryRecord:
    """What an edit's planner chose and what it moved: the per-run record (``latest_record``)."""

    placements: list[str] = field(default_factory=list)  # per step
    bank_bytes: list[int] = field(default_factory=list)  # per step: what the bank held
    transfer_bytes: list[int] = field(default_factory=list)  # per step: bank bytes moved between host and device

    def log(self) -> None:
        if HOST in self.placements:
            steps = self.placements.count(HOST)
            log.info("TokenFlow: the keyframe bank lived in host memory for %d of %d steps (up to %.2f GiB), %.2f GiB "
                     "moved per step on average", steps, len(self.placements), max(self.bank_bytes) / 2**30,
                     sum(self.transfer_bytes) / max(steps, 1) / 2**30)


_LATEST: list[MemoryRecord] = []


def publish_record(record: MemoryRecord) -> None:
    _LATEST[:] = [record]


def latest_record() -> MemoryRecord | None:
    """The record of the last edit that ran in this process (for benchmarks and the dry run)."""
    return _LATEST[0] if _LATEST else None
