"""The contract every TokenFlow patch shares, UNet and DiT alike: the keys, the pass of a call and its bank.

One name, :data:`KEY`, carries all of TokenFlow's state, as core's EasyCache keeps one holder under one key:

- ``model_options[KEY]``: the clone's :class:`CloneSettings` (its layout; whether it is the Keyframe Joint
  Edit's model), set once when the clone is patched;
- ``transformer_options[KEY]``: the :class:`PassContext` of the model calls of one batch of conds (what they are
  for, their frames and branches, the step's :class:`StepBank`, and the per-call and per-block facts the
  wrappers and block patches write), made by the TokenFlow guiders, or by the joint edit model's
  ``CALC_COND_BATCH`` wrapper;
- the key of every wrapper TokenFlow adds to the clone.

Nothing happens unless a call carries a pass, so a patched clone behaves like the plain model elsewhere.

One model call may hold several branches (ComfyUI's ``cond_or_uncond`` chunks of equal size): the source
branch is the chunk whose cond index is :attr:`PassContext.source_index`, every other chunk is an edit branch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, TypedDict

import torch

import comfy.model_management

from ...tokenflow_ops.correspondence import DEFAULT_MAX_ELEMENTS, PairPlan, pair_plan
from ...tokenflow_ops.keyframes import FramePairing
from ...tokenflow_ops.propagation import blend_weights, gather_base
from ..families.base import BlockKey, ModelLayout

KEY = "tokenflow"


class Phase(str, Enum):
    KEYFRAMES = "keyframes"  # source: ordinary attention, recorded; edit: extended attention (+ PnP injection)
    FRAMES = "frames"  # propagation: keyframe outputs gathered through the fields (+ PnP residuals)
    EXTRACT_KEYFRAMES = "extract_keyframes"  # source pass on keyframes: record tokens
    EXTRACT_FRAMES = "extract_frames"  # source pass on frames: fields to the sink
    JOINT = "joint"  # the Keyframe Joint Edit's model under any sampler: each branch's frames attend to each other


EXTRACT_PHASES = (Phase.EXTRACT_KEYFRAMES, Phase.EXTRACT_FRAMES)

FieldProvider = Callable[[BlockKey, torch.Tensor], torch.Tensor]  # (block, frame ids) -> (F, 2, N) fields
FieldSink = Callable[[BlockKey, torch.Tensor, torch.Tensor], None]  # (block, frame ids, fields)


class SourceBranchMissing(RuntimeError):
    """An edit branch needed what the source branch records (tokens, fields, the PnP store) before the source branch
    of the same frames ran: the host split a shared call and ran the edit part first. The guider then runs the
    source branch in calls of its own and the pass again."""


class DiTBlockTag(TypedDict):
    """The DiT block running now (a plain dict: traced code reads and counts it cheaply)."""

    block: tuple[str, int]  # the host's (block kind, block id)
    calls: int  # attention calls of this block so far
    declared: frozenset[int]  # the calls the family adapter declares in it
    reached: bool  # whether any attention call of the block reached TokenFlow's override


@dataclass(frozen=True)
class CloneSettings:
    """What a TokenFlow-patched clone is, in ``model_options[KEY]``: its layout, and whether it is the Keyframe
    Joint Edit's model (every call of any sampler is then a :attr:`Phase.JOINT` pass)."""

    layout: ModelLayout
    joint: bool = False


@dataclass
class StepBank:
    """What one step's keyframe pass records and its propagation passes read."""

    keyframe_tokens: dict[BlockKey, torch.Tensor] = field(default_factory=dict)
    # per block: segments (outputs of one call, (chunks*K, N, d)) with the uuid of each chunk
    keyframe_outputs: dict[BlockKey, list[tuple[torch.Tensor, list]]] = field(default_factory=dict)
    pnp_qk: dict[BlockKey, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    fields: dict[BlockKey, torch.Tensor] = field(default_factory=dict)
    residuals: dict[str, torch.Tensor] = field(default_factory=dict)
    trace: list | None = None  # when a list, PnP injections are logged into it as (kind, where, phase)
    # A patches.bank_transfer.HostBank when the planner put the bank in host memory: the keyframe outputs and source
    # tokens are kept there and come back to the device block by block.
    host: Any = None

    def clear(self) -> None:
        for store in (self.keyframe_tokens, self.keyframe_outputs, self.pnp_qk, self.fields, self.residuals):
            store.clear()

    def is_empty(self) -> bool:
        return not any((self.keyframe_tokens, self.keyframe_outputs, self.pnp_qk, self.fields, self.residuals))

    def record_injection(self, kind: str, where: Any, phase: Phase, times: int) -> None:
        """Log ``times`` PnP injections of ``kind`` at ``where`` when the bank traces them."""
        if self.trace is not None:
            self.trace.extend([(kind, where, f"edit_{phase.value}")] * times)

    def record_output(self, block: BlockKey, out: torch.Tensor, uuids: list) -> None:
        """Keep one call's keyframe outputs of ``block`` (in host memory for a host bank)."""
        self.keyframe_outputs.setdefault(block, []).append((out if self.host is None else self.host.keep(out), uuids))

    def record_tokens(self, block: BlockKey, tokens: torch.Tensor) -> None:
        """Keep the source keyframes' tokens of ``block`` for the nearest-neighbour search."""
        self.keyframe_tokens[block] = tokens if self.host is None else self.host.keep(tokens)

    def source_tokens(self, block: BlockKey) -> torch.Tensor:
        """The source keyframes' tokens of ``block`` on the device."""
        tokens = self.keyframe_tokens.get(block)
        if tokens is None:
            raise SourceBranchMissing(f"TokenFlow: no source keyframe tokens for block {block}; the keyframe pass's "
                                      "source branch did not run")
        return tokens if self.host is None else self.host.fetch(("tokens", block), [tokens], self._host_parts)

    def pnp_store(self, block: BlockKey) -> tuple[torch.Tensor, torch.Tensor]:
        """The source's PnP tensors of ``block``, recorded earlier in this keyframe pass."""
        stored = self.pnp_qk.get(block)
        if stored is None:
            raise SourceBranchMissing(f"TokenFlow: no source attention for PnP at block {block}; the source branch "
                                      "did not run before the edit branches")
        return stored

    def _host_parts(self, key: tuple) -> list | None:
        kind, block = key
        if kind == "tokens":
            tokens = self.keyframe_tokens.get(block)
            return None if tokens is None else [tokens]
        segments = self.keyframe_outputs.get(block)
        return [s[0] for s in segments] if segments else None

    def owner_rows(self, uuids: list, keyframes: int) -> tuple[int, ...]:
        """First row of each of ``uuids`` in the recorded keyframe outputs (the same for every block); () if none."""
        segments = next(iter(self.keyframe_outputs.values()), None)
        if not segments:
            return ()
        owners = [u for s in segments for u in s[1]]
        return tuple(owners.index(u) * keyframes if u in owners else -1 for u in uuids)

    def keyframe_values(self, block: BlockKey, uuids: list, keyframes: int) -> tuple[torch.Tensor, tuple[int, ...]]:
        """All recorded keyframe outputs of ``block`` and the first row of each of ``uuids`` in them."""
        segments = self.keyframe_outputs.get(block)
        if not segments:
            raise RuntimeError(f"TokenFlow: block {block} has no keyframe output; the keyframe pass did not run")
        if self.host is not None:  # joined on the device, in one of the host bank's buffers
            values = self.host.fetch(("outputs", block), [s[0] for s in segments], self._host_parts)
            owners = [u for s in segments for u in s[1]]
        else:
            if len(segments) > 1:  # the keyframe pass was split by branch: merge once per block and step
                segments[:] = [(torch.cat([s[0] for s in segments]), [u for s in segments for u in s[1]])]
            values, owners = segments[0]
        missing = [u for u in uuids if u not in owners]
        if missing:
            raise RuntimeError(f"TokenFlow: block {block} has no keyframe output for this conditioning; "
                               "area/mask conditioning that differs between passes is not supported")
        return values, tuple(owners.index(u) * keyframes for u in uuids)


@dataclass
class PassContext:
    """The pass of the model calls of one batch of conds, carried in ``transformer_options[KEY]``: the per-run
    state of the patches. ComfyUI may split the batch into several model calls; the per-call facts (the call
    key, a DiT's image tokens) are rewritten before each."""

    phase: Phase
    bank: StepBank
    frames: torch.Tensor  # global indices (CPU long) of the frames in this call
    source_index: int | None = None  # cond index of the source branch in this pass (None: no source branch)
    source_input: torch.Tensor | None = None  # model-space source latents of ``frames`` for shared calls
    pairing: FramePairing | None = None
    pnp_attention: frozenset = frozenset()
    pnp_tensors: dict = field(default_factory=dict)  # DiT: block -> "v" | "kv" (unlisted: the family's default)
    pnp_residual: tuple[str, ...] = ()
    field_provider: FieldProvider | None = None  # extracted fields; None: on the fly from source tokens
    field_sink: FieldSink | None = None
    max_elements: int = DEFAULT_MAX_ELEMENTS
    # Extracted correspondences + PnP: a propagated source-only call is only needed up to the
    # last PnP ResBlock, so the rest of the UNet is skipped.
    stop_after_residuals: bool = False
    keyframes: int = 0  # keyframes of this step (rows per branch in the keyframe outputs)
    field_blocks: tuple = ()  # the blocks whose extracted fields are prefetched per call (with field_provider)
    clone_settings: CloneSettings | None = None  # the patched clone's settings (model_options[KEY])
    # A UNet's attn1 replacements in the options the pass was made with. One that a call adds on top (the perturbed
    # pass of a guidance node such as PerturbedAttentionGuidance) runs its block instead of TokenFlow's, as it would
    # run instead of the plain model's self-attention.
    base_attn1: dict = field(default_factory=dict, repr=False)
    # Per call, set by the APPLY_MODEL wrapper: the call key, and on a DiT the image tokens of its latents.
    key: str | None = None
    image_tokens: int | None = None
    foreign_attn1: dict = field(default_factory=dict)  # per UNet call: the blocks another attn1 replacement runs
    dit_block: DiTBlockTag | None = None  # per DiT block, set by its block patch while it runs
    device_cache: dict = field(default_factory=dict, repr=False)  # this call's device tensors, made once

    def roles(self, extra: dict) -> tuple[int | None, list[int]]:
        """(position of the source branch among this call's chunks or None, positions of the edit chunks)."""
        order = list(extra.get("cond_or_uncond", [0]))
        if self.source_index is None or self.source_index not in order:
            return None, list(range(len(order)))
        return order.index(self.source_index), [i for i, c in enumerate(order) if c != self.source_index]

    def cached(self, key: tuple, make: Callable[[], Any]):
        """``make()`` once per call and ``key``."""
        if key not in self.device_cache:
            self.device_cache[key] = make()
        return self.device_cache[key]

    def prepare(self, device: torch.device) -> None:
        """Everything host-side this call's patches need, on ``device``, BEFORE the model runs.

        Called by the APPLY_MODEL wrapper outside the (possibly compiled) diffusion model: pair plans (their
        size depends on the keyframe plan), frame weights and slots, extracted fields. Inside the model only
        tensor ops on these remain, so torch.compile traces no host read and keeps no per-step Python value.
        """
        if self.pairing is None or self.phase in (Phase.KEYFRAMES, Phase.EXTRACT_KEYFRAMES):
            return
        slots = self.pairing.slots[self.frames]
        self.cached(("slots", device), lambda: to_device(slots, device))
        self.cached(("weights", device), lambda: to_device(blend_weights(self.pairing.weights[self.frames],
                                                                          torch.float32), device))
        if self.field_provider is not None:
            for block in self.field_blocks:
                if block not in self.bank.fields:
                    self.bank.fields[block] = to_device(self.field_provider(block, self.frames), device)
        else:
            self.cached(("pairs", device), lambda: pair_plan(slots).to(device, copies_async(device)))

    def frame_weights(self, values: torch.Tensor) -> torch.Tensor:
        """This call's blend weights for ``propagate``, in the values' dtype (prepared per call)."""
        return self.cached(("weights", values.device), lambda: to_device(blend_weights(
            self.pairing.weights[self.frames], torch.float32), values.device)).to(values.dtype)

    def gather_rows(self, branch_rows: tuple[int, ...], tokens: int, device: torch.device) -> torch.Tensor:
        """Flat keyframe rows for ``propagate`` (once per call, chunk layout and token count)."""
        slots = self.cached(("slots", device), lambda: to_device(self.pairing.slots[self.frames], device))
        return self.cached(("rows", branch_rows, tokens, device), lambda: gather_base(
            to_device(torch.tensor(branch_rows), device), slots, tokens))  # no stream sync

    def pair_plan(self, device: torch.device) -> PairPlan:
        """Which (frame, keyframe) searches this call's frames need (prepared per call)."""
        return self.cached(("pairs", device),
                           lambda: pair_plan(self.pairing.slots[self.frames]).to(device, copies_async(device)))

    def fields_for(self, block: BlockKey, device: torch.device) -> torch.Tensor:
        fields = self.bank.fields.get(block)
        if fields is None:
            if self.field_provider is None:
                raise SourceBranchMissing(f"TokenFlow: no correspondences for block {block}; the source branch did not run")
            fields = self.bank.fields[block] = to_device(self.field_provider(block, self.frames), device)
        return fields

    def call_key(self, options: dict) -> str:
        """Every Python value the patches branch on in this call, as one string.

        Passed to the diffusion model as a keyword argument (outside ``transformer_options``), so
        a compiled model guards on it even when the host's ``guard_filter_fn`` drops the guards on
        ``transformer_options``: calls that take other branches never replay a stale graph. Per-step
        data (frames, keyframe plan, weights, fields) are tensors and not part of it.
        """
        order = tuple(options.get("cond_or_uncond", [0]))
        pairs = self.device_cache.get(next((k for k in self.device_cache if k[0] == "pairs"), None))
        rows = self.bank.owner_rows(list(options.get("uuids", [None])), self.keyframes) \
            if self.phase is Phase.FRAMES else ()
        return "|".join(str(v) for v in (
            self.phase.value, order, self.source_index, sorted(self.pnp_attention), sorted(self.pnp_tensors.items()),
            self.pnp_residual,
            self.stop_after_residuals, self.field_provider is not None, self.field_sink is not None, self.keyframes,
            len(self.frames), None if pairs is None else pairs.rows.shape[0], rows, self.bank.trace is not None,
            sorted(map(str, self.foreign_attn1))))


def pass_of(options: dict | None) -> PassContext | None:
    """The pass of a call's ``transformer_options`` (None: a call TokenFlow does not act on)."""
    return (options or {}).get(KEY)


def chunk_count(options: dict) -> int:
    """How many branches (cond / uncond / source chunks) the call holds."""
    return len(options.get("cond_or_uncond", [0]))


def branches(t: torch.Tensor, chunks: int) -> tuple[torch.Tensor, ...]:
    """The branch chunks of a batched call (the host batches conds of equal size), as views.

    Not ``chunk``: under torch.compile's dynamic batch size its last chunk is ``s - 2 * ceil(s / 3)``,
    and every shape derived from it nests that expression until sympy spends minutes per graph;
    here every chunk is ``s // chunks``.
    """
    return t.unflatten(0, (chunks, -1)).unbind(0)


def split_roles(t: torch.Tensor, chunks: int, src: int | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(the source chunk, the edit chunks as one batch) of ``t``: one split where the roles are contiguous."""
    if src is None:
        return None, t
    if chunks == 1:
        return t, None
    rows = t.shape[0] // chunks
    if src == 0:
        return tuple(t.split([rows, t.shape[0] - rows]))
    if src == chunks - 1:
        edit, source = t.split([t.shape[0] - rows, rows])
        return source, edit
    parts = branches(t, chunks)
    return parts[src], torch.cat([p for i, p in enumerate(parts) if i != src])


def join_roles(source: torch.Tensor | None, edit: torch.Tensor | None, chunks: int, src: int | None) -> torch.Tensor:
    """The inverse of :func:`split_roles`."""
    if source is None or edit is None:
        return edit if source is None else source
    if src == 0:
        return torch.cat([source, edit])
    if src == chunks - 1:
        return torch.cat([edit, source])
    parts = list(branches(edit, chunks - 1))
    return torch.cat(parts[:src] + [source] + parts[src:])


def copies_async(device: torch.device | str) -> bool:
    """Whether a host-to-device copy may skip the stream synchronisation (``non_blocking``): the host's rule
    (``device_supports_non_blocking``: not on MPS, Intel XPU, DirectML or under ``--deterministic``)."""
    if not isinstance(device, torch.device):
        device = torch.device(device)
    return bool(comfy.model_management.device_supports_non_blocking(device))


def to_device(tensor: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``tensor.to(device, dtype)`` on the hot path (host-built indices, fields, source latents once per call),
    without a stream synchronisation where the device allows it."""
    return tensor.to(device=device, dtype=dtype, non_blocking=copies_async(device))
