"""The patch layer: TokenFlow inside ComfyUI's transformer blocks through public patch points.

A model clone gets four things (installed by :func:`.call_wrappers.install_tokenflow_patches`):

- an ``attn1_patch`` that sees every block's ``norm1`` tokens: it records the source keyframes'
  tokens and computes (or looks up) the nearest-neighbour fields of the frames being propagated;
- an ``attn1_replace`` for every transformer block: ordinary, extended (joint keyframe) or
  propagated self-attention depending on the pass and the branch, with PnP query/key injection;
- a keyed ``DIFFUSION_MODEL`` wrapper (:func:`.call_wrappers.call_key_wrapper`) that reads the call key
  inside the UNet;
- a keyed ``APPLY_MODEL`` wrapper (:func:`.call_wrappers.tokenflow_call_wrapper`), outside ``diffusion_model``:
  it gives the source branch its own input (the inverted source latents) when it shares a UNet
  call with the edit branches, prepares the call's device tensors, hooks the residual branch of
  the PnP ResBlocks for that one call (record on the source, inject into the edit branches) and
  passes the call's branch key to the UNet.

torch.compile (the host's ``TorchCompileModel`` compiles ``diffusion_model`` only): inside the UNet
the patches do tensor work only, with no host read, hook registration or exception, so a
compiled UNet has no graph break. What they branch on in Python (phase, branch roles, PnP blocks,
sizes) is the same for every call with the same :meth:`PassContext.call_key`; that key reaches the
UNet as a keyword argument outside ``transformer_options``, so a compiled UNet keeps one graph
per key even under a ``guard_filter_fn`` that drops the guards on ``transformer_options``.

One UNet call may hold several branches (ComfyUI's ``cond_or_uncond`` chunks): the source branch
is the chunk whose cond index is ``PassContext.source_index``, every other chunk is an edit
branch. Nothing happens unless the call's ``transformer_options`` carry a :class:`PassContext`
(set per call by the TokenFlow guiders) or the joint-edit flag, so the clone behaves like the
plain model elsewhere. All per-step state lives in a :class:`StepBank` owned by the guider and
cleared in ``finally``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable

import torch

import comfy.ldm.modules.attention as comfy_attention

from ..tokenflow_ops.attention import extended_attention
from ..tokenflow_ops.correspondence import DEFAULT_MAX_ELEMENTS, PairPlan, frame_fields, pair_plan, unit_tokens
from ..tokenflow_ops.keyframes import FramePairing
from ..tokenflow_ops.propagation import blend_weights, gather_base, propagate
from .model_support import BlockKey


PASS_KEY = "tokenflow_pass"
JOINT_KEY = "tokenflow_joint_attention"
WRAPPER_KEY = "tokenflow"


class Phase(str, Enum):
    KEYFRAMES = "keyframes"  # source: ordinary attention, recorded; edit: extended attention (+ PnP q/k)
    FRAMES = "frames"  # propagation: keyframe outputs gathered through the fields (+ PnP residuals)
    EXTRACT_KEYFRAMES = "extract_keyframes"  # clean source pass on keyframes: record tokens
    EXTRACT_FRAMES = "extract_frames"  # clean source pass on frames: fields to the sink


EXTRACT_PHASES = (Phase.EXTRACT_KEYFRAMES, Phase.EXTRACT_FRAMES)

FieldProvider = Callable[[BlockKey, torch.Tensor], torch.Tensor]  # (block, frame ids) -> (F, 2, N) fields
FieldSink = Callable[[BlockKey, torch.Tensor, torch.Tensor], None]  # (block, frame ids, fields)


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

    def clear(self) -> None:
        for store in (self.keyframe_tokens, self.keyframe_outputs, self.pnp_qk, self.fields, self.residuals):
            store.clear()

    def is_empty(self) -> bool:
        return not any((self.keyframe_tokens, self.keyframe_outputs, self.pnp_qk, self.fields, self.residuals))

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
    """Per-UNet-call instructions, carried in ``transformer_options[PASS_KEY]``."""

    phase: Phase
    bank: StepBank
    frames: torch.Tensor  # global indices (CPU long) of the frames in this call
    source_index: int | None = None  # cond index of the source branch in this pass (None: no source branch)
    source_input: torch.Tensor | None = None  # model-space source latents of ``frames`` for shared calls
    pairing: FramePairing | None = None
    pnp_attention: frozenset = frozenset()
    pnp_residual: tuple[str, ...] = ()
    field_provider: FieldProvider | None = None  # extracted fields; None: on the fly from source tokens
    field_sink: FieldSink | None = None
    max_elements: int = DEFAULT_MAX_ELEMENTS
    # Extracted correspondences + PnP: a propagated source-only call is only needed up to the
    # last PnP ResBlock, so the rest of the UNet is skipped.
    stop_after_residuals: bool = False
    keyframes: int = 0  # keyframes of this step (rows per branch in the keyframe outputs)
    field_blocks: tuple = ()  # the blocks whose extracted fields are prefetched per call (with field_provider)
    key: str | None = None  # this call's call_key, set by tokenflow_call_wrapper
    _device_cache: dict = field(default_factory=dict, repr=False)

    def roles(self, extra: dict) -> tuple[int | None, list[int]]:
        """(position of the source branch among this call's chunks or None, positions of the edit chunks)."""
        order = list(extra.get("cond_or_uncond", [0]))
        if self.source_index is None or self.source_index not in order:
            return None, list(range(len(order)))
        return order.index(self.source_index), [i for i, c in enumerate(order) if c != self.source_index]

    def _cached(self, key: tuple, make: Callable[[], torch.Tensor]):
        if key not in self._device_cache:
            self._device_cache[key] = make()
        return self._device_cache[key]

    def prepare(self, device: torch.device) -> None:
        """Everything host-side this call's patches need, on ``device``, BEFORE the UNet runs.

        Called by :func:`tokenflow_call_wrapper` outside the (possibly compiled) diffusion model:
        pair plans (their size depends on the keyframe plan), frame weights and slots, extracted
        fields. Inside the UNet only tensor ops on these remain, so torch.compile traces no host
        read and keeps no per-step Python value.
        """
        if self.pairing is None or self.phase in (Phase.KEYFRAMES, Phase.EXTRACT_KEYFRAMES):
            return
        slots = self.pairing.slots[self.frames]
        self._cached(("slots", device), lambda: slots.to(device, non_blocking=True))
        self._cached(("weights", device), lambda: blend_weights(self.pairing.weights[self.frames], torch.float32)
                     .to(device, non_blocking=True))
        if self.field_provider is not None:
            for block in self.field_blocks:
                if block not in self.bank.fields:
                    self.bank.fields[block] = self.field_provider(block, self.frames).to(device, non_blocking=True)
        else:
            self._cached(("pairs", device), lambda: pair_plan(slots).to(device))

    def frame_weights(self, values: torch.Tensor) -> torch.Tensor:
        """This call's blend weights for :func:`propagate`, in the values' dtype (prepared per call)."""
        return self._cached(("weights", values.device), lambda: blend_weights(
            self.pairing.weights[self.frames], torch.float32).to(values.device, non_blocking=True)).to(values.dtype)

    def gather_rows(self, branch_rows: tuple[int, ...], tokens: int, device: torch.device) -> torch.Tensor:
        """Flat keyframe rows for :func:`propagate` (once per call, chunk layout and token count)."""
        slots = self._cached(("slots", device), lambda: self.pairing.slots[self.frames].to(device, non_blocking=True))
        return self._cached(("rows", branch_rows, tokens, device), lambda: gather_base(
            torch.tensor(branch_rows).to(device, non_blocking=True), slots, tokens))  # no stream sync

    def pair_plan(self, device: torch.device) -> PairPlan:
        """Which (frame, keyframe) searches this call's frames need (prepared per call)."""
        return self._cached(("pairs", device), lambda: pair_plan(self.pairing.slots[self.frames]).to(device))

    def fields_for(self, block: BlockKey, device: torch.device) -> torch.Tensor:
        fields = self.bank.fields.get(block)
        if fields is None:
            if self.field_provider is None:
                raise RuntimeError(f"TokenFlow: no correspondences for block {block}; the source branch did not run")
            fields = self.bank.fields[block] = self.field_provider(block, self.frames).to(device, non_blocking=True)
        return fields

    def call_key(self, options: dict) -> str:
        """Every Python value the patches branch on in this call, as one string.

        Passed to the diffusion model as a keyword argument (outside ``transformer_options``), so
        a compiled UNet guards on it even when the host's ``guard_filter_fn`` drops the guards on
        ``transformer_options``: calls that take other branches never replay a stale graph. Per-step
        data (frames, keyframe plan, weights, fields) are tensors and not part of it.
        """
        order = tuple(options.get("cond_or_uncond", [0]))
        pairs = self._device_cache.get(next((k for k in self._device_cache if k[0] == "pairs"), None))
        rows = self.bank.owner_rows(list(options.get("uuids", [None])), self.keyframes) \
            if self.phase is Phase.FRAMES else ()
        return "|".join(str(v) for v in (
            self.phase.value, order, self.source_index, sorted(self.pnp_attention), self.pnp_residual,
            self.stop_after_residuals, self.field_provider is not None, self.field_sink is not None, self.keyframes,
            len(self.frames), None if pairs is None else pairs.rows.shape[0], rows, self.bank.trace is not None))


def _block_key(extra: dict) -> BlockKey:
    block = extra["block"]
    return (block[0], int(block[1]), int(extra.get("block_index", 0)))


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra: dict) -> torch.Tensor:
    # Looked up at call time so that the host's choice of kernel (SDPA, xformers, sage, ...) is used; the block's
    # options go along, so an ``optimized_attention_override`` on the model (a kernel-swapping node) sees these
    # calls as it sees the host's own.
    return comfy_attention.optimized_attention(q, k, v, extra["n_heads"], attn_precision=extra.get("attn_precision"),
                                               transformer_options=extra)


def _chunk_count(extra: dict) -> int:
    return len(extra.get("cond_or_uncond", [0]))


def _trace(bank: StepBank, kind: str, where: Any, phase: Phase, times: int) -> None:
    if bank.trace is not None:
        bank.trace.extend([(kind, where, f"edit_{phase.value}")] * times)


def _branches(t: torch.Tensor, chunks: int) -> tuple[torch.Tensor, ...]:
    """The branch chunks of a batched call (the host batches conds of equal size), as views.

    Not ``chunk``: under torch.compile's dynamic batch size its last chunk is ``s - 2 * ceil(s / 3)``,
    and every shape derived from it nests that expression until sympy spends minutes per graph;
    here every chunk is ``s // chunks``.
    """
    return t.unflatten(0, (chunks, -1)).unbind(0)


def tokenflow_attn1_patch(n: torch.Tensor, context: torch.Tensor, value: torch.Tensor, extra: dict):
    """Records / matches the source branch's ``norm1`` tokens; never changes them."""
    ctx: PassContext | None = extra.get(PASS_KEY)
    if ctx is None:
        return n, context, value
    block = _block_key(extra)
    src, _ = ctx.roles(extra)
    source_tokens = _branches(n, _chunk_count(extra))[src] if src is not None else None
    if ctx.phase in (Phase.KEYFRAMES, Phase.EXTRACT_KEYFRAMES):
        if source_tokens is not None and ctx.field_provider is None:  # only the nearest-neighbour search reads them
            ctx.bank.keyframe_tokens[block] = unit_tokens(source_tokens)
        return n, context, value
    # Extracted fields were prefetched before the call (PassContext.prepare); here only tensor ops.
    if block not in ctx.bank.fields and ctx.field_provider is None and source_tokens is not None:
        ctx.bank.fields[block] = frame_fields(source_tokens, ctx.frames, ctx.bank.keyframe_tokens[block],
                                              ctx.pairing, ctx.max_elements, plan=ctx.pair_plan(n.device),
                                              keys_are_unit=True)
    if ctx.phase is Phase.EXTRACT_FRAMES:  # handed to the sink after the call (tokenflow_call_wrapper)
        return n, context, value
    # Propagated frames never compute self-attention: hand the q/k/v projections a single token
    # each so that their cost vanishes too (the replacement below rebuilds the full token count).
    one = n[:, :1]
    return one, one, one


def _keyframe_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra: dict, ctx: PassContext,
                        block: BlockKey) -> torch.Tensor:
    """Keyframe pass: ordinary attention for the source chunk, one extended attention for all edit chunks."""
    chunks = _chunk_count(extra)
    src, edit = ctx.roles(extra)
    bank = ctx.bank
    qs, ks, vs = _branches(q, chunks), _branches(k, chunks), _branches(v, chunks)
    outs: list[torch.Tensor | None] = [None] * chunks
    if src is not None and block in ctx.pnp_attention:
        bank.pnp_qk[block] = (qs[src], ks[src])
    for i in range(chunks):
        if i not in edit:  # the source branch: ordinary per-frame self-attention
            outs[i] = _attention(qs[i], ks[i], vs[i], extra)
    if edit:
        def stacked(parts):
            return torch.stack([parts[i] for i in edit])

        if block in ctx.pnp_attention:
            q_src, k_src = bank.pnp_qk[block]
            q_e, k_e = q_src.expand(len(edit), *q_src.shape), k_src.expand(len(edit), *k_src.shape)
            _trace(bank, "attention", block, ctx.phase, len(edit))
        else:
            q_e, k_e = stacked(qs), stacked(ks)
        out_e = extended_attention(q_e, k_e, stacked(vs), extra["n_heads"], lambda a, b, c, h: _attention(a, b, c, extra))
        for row, i in enumerate(edit):
            outs[i] = out_e[row]
    out = torch.cat(outs)
    bank.keyframe_outputs.setdefault(block, []).append((out, list(extra.get("uuids", [None]))))
    return out


def tokenflow_attn1_replace(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra: dict) -> torch.Tensor:
    """Self-attention of one transformer block, as the current pass requires (output before to_out)."""
    ctx: PassContext | None = extra.get(PASS_KEY)
    if ctx is None:
        if extra.get(JOINT_KEY):
            chunks = _chunk_count(extra)
            split = [t.view(chunks, -1, *t.shape[1:]) for t in (q, k, v)]
            out = extended_attention(*split, extra["n_heads"], lambda a, b, c, h: _attention(a, b, c, extra))
            return out.reshape(q.shape[0], -1, out.shape[-1])
        return _attention(q, k, v, extra)
    if ctx.phase in EXTRACT_PHASES:
        return _attention(q, k, v, extra)
    block = _block_key(extra)
    if ctx.phase is Phase.KEYFRAMES:
        return _keyframe_attention(q, k, v, extra, ctx, block)
    # Propagation: self-attention is not computed; keyframe outputs are gathered through the fields.
    uuids = list(extra.get("uuids", [None]))
    values, rows = ctx.bank.keyframe_values(block, uuids, ctx.keyframes)
    fields = ctx.fields_for(block, values.device)
    if values.shape[1] != fields.shape[-1]:
        raise RuntimeError(f"TokenFlow: token count changed between passes at block {block} "
                           f"({values.shape[1]} vs {fields.shape[-1]}); area conditioning is not supported")
    out = propagate(values, fields, ctx.gather_rows(rows, values.shape[1], values.device), ctx.frame_weights(values))
    return out.reshape(-1, *out.shape[2:])


def _pass_of(options: dict | None) -> PassContext | None:
    return (options or {}).get(PASS_KEY)
