"""TokenFlow inside a flow-matching transformer (Flux, SD3.x) through the host's public patch points.

A patched DiT clone has (installed by :mod:`.install`):

- a ``patches_replace["dit"]`` entry (:class:`DiTBlockReplace`) for every block the family adapter declares:
  while the block runs, the call's pass knows which block it is in and counts its attention calls;
- ``transformer_options["optimized_attention_override"]`` (:class:`AttentionOverride`): every attention call of
  a block comes here with q, k, v. The image tokens are the last ``n_img`` tokens of each call (the
  adapter's rule: text first in Flux and SD3 joint attention; SD3.5's second attention holds
  image tokens only), so TokenFlow acts on image tokens alone:

  * keyframe pass, source branch: ordinary attention; its image-token values are recorded for the
    nearest-neighbour search (the DiT analogue of the UNet's ``norm1`` tokens: a linear map of the
    block's normalised, modulated image tokens), and its image keys/values for PnP;
  * keyframe pass, edit branches: each keyframe's IMAGE queries attend to its own text keys/values
    (repeated once per keyframe, which keeps plain attention's text/image balance) plus the image
    keys/values of ALL keyframes (extended attention); text queries attend as in plain sampling. PnP
    (``pnp_attention`` blocks): the source's image values (``"v"``: RF-Solver-Edit) or keys and values
    (``"kv"``: Stable Flow) replace the edit's, as the pass's ``pnp_tensors`` say (the preset or block list),
    else as the adapter's ``pnp_injects`` (the family's default preset);
  * propagation pass, every branch: image-token outputs are the two-keyframe blend of keyframe
    outputs gathered along the nearest neighbours of the source branch's image tokens, per block;
    text queries attend as in plain sampling;
  * a joint pass (the Keyframe Joint Edit's model): :mod:`.dit_joint`.

The image-token count of a call comes from the APPLY_MODEL wrapper (:mod:`.wrappers`), by the adapter.

Cost: the edit branches of a call share one extended attention (one kernel call for their image queries, one
for their text queries), kernels return the heads layout and a call's pieces are merged once, and the
banks keep contiguous copies of the image rows they read, never views of a call's whole tensors: a view would
pin the call's text rows (and, in a Flux single block, the whole fused linear output behind k and v), and the
keyframe pass's calls may differ in text length (ComfyUI does not batch prompts of different token counts), so
only image rows of every call can be joined.
"""
from __future__ import annotations

import functools

import torch

from ...tokenflow_ops.correspondence import frame_fields, unit_tokens
from ...tokenflow_ops.propagation import propagate
from ..families.base import BlockKey
from .contract import (DiTBlockTag, PassContext, Phase, chunk_count, join_roles, pass_of, split_roles,
                       to_device)
from .dit_joint import joint_attention
from .dit_kernel import Kernel, extended_image_attention, merge_heads


class DiTBlockReplace:
    """``patches_replace["dit"][(kind, id)]``: while the block runs, its pass knows the block and counts its
    attention calls (``calls``: the calls the adapter declares in it).

    ``previous``: the block patch another node had put there. It runs inside TokenFlow's (it gets the block's
    arguments and the original block, as the host would have called it), so TokenFlow sees the attention calls
    of whatever it runs of the block and nothing of the other node is dropped.
    """

    def __init__(self, kind: str, block_id: int, calls: frozenset[int], previous=None) -> None:
        self.block, self.calls, self.previous = (kind, block_id), calls, previous

    def _run(self, args: dict, extra: dict, ran: list | None = None) -> dict:
        if self.previous is None:
            return extra["original_block"](args)
        if ran is None:
            return self.previous(args, extra)
        original = extra["original_block"]

        def original_block(block_args: dict) -> dict:
            ran.append(True)
            return original(block_args)

        return self.previous(args, {**extra, "original_block": original_block})

    def __call__(self, args: dict, extra: dict) -> dict:
        ctx = pass_of(args.get("transformer_options"))
        if ctx is None or ctx.image_tokens is None:
            return self._run(args, extra)
        tag: DiTBlockTag = {"block": self.block, "calls": 0, "declared": self.calls, "reached": False}
        ctx.dit_block = tag
        ran: list = []  # whether the host's own block ran (another node's block patch may skip it on purpose)
        try:
            out = self._run(args, extra, ran)
        finally:
            ctx.dit_block = None
        if self.calls and not tag["reached"] and (self.previous is None or ran):
            # The host's own block always attends: another node's override replaced TokenFlow's in the model's one
            # slot without calling it, and the block ran plain attention, which would pass for an edit.
            kind, index = self.block
            raise RuntimeError(f"TokenFlow: no attention of block {kind} {index} reached TokenFlow's attention "
                               "override: a node applied after TokenFlow replaced the model's attention override "
                               "without chaining it; apply that node before the TokenFlow node")
        return out


class AttentionOverride:
    """The clone's ``optimized_attention_override``: TokenFlow's attention, in front of the override it replaced.

    The host has one override slot per model. A node applied before TokenFlow (a kernel swap such as a
    SageAttention patch) keeps working: its override is kept as :attr:`previous`, and every attention TokenFlow
    computes, or passes through, goes through it, also when a node applied later chains TokenFlow's override in
    turn.
    """

    def __init__(self, previous=None) -> None:
        self.previous = previous

    def __call__(self, func, *args, **kwargs):
        host = func if self.previous is None else functools.partial(self.previous, func)
        return dit_attention_override(host, *args, **kwargs)


def set_attention_override(options: dict) -> None:
    """Make TokenFlow's :class:`AttentionOverride` the override of ``options`` (a clone's transformer_options),
    keeping the one already there (idempotent)."""
    previous = options.get("optimized_attention_override")
    if not isinstance(previous, AttentionOverride):
        options["optimized_attention_override"] = AttentionOverride(previous)


def dit_attention_override(func, q, k, v, heads, *args, **kwargs):
    """TokenFlow on the image tokens of the calls of a patched block, plain elsewhere (``func``: the host's kernel,
    through the override TokenFlow's replaced)."""
    options = kwargs.get("transformer_options") or {}
    ctx = pass_of(options)
    tag = ctx.dit_block if ctx is not None else None
    if tag is not None:
        tag["reached"] = True
    if tag is None or args:
        return func(q, k, v, heads, *args, **kwargs)
    call = tag["calls"]
    tag["calls"] += 1
    if ctx.phase is Phase.JOINT:
        return joint_attention(func, q, k, v, heads, kwargs, ctx, call in tag["declared"])
    if kwargs.get("mask") is not None or kwargs.get("skip_output_reshape"):
        raise RuntimeError("TokenFlow: attention masks (ConditioningSetMask / attention_mask) are not supported on "
                           "DiT models; remove the mask from the conditioning")
    block: BlockKey = (*tag["block"], call)
    kernel = Kernel(func, heads, kwargs)
    n_img = int(ctx.image_tokens)
    # Extraction runs the source branch alone through the same passes, so its fields are the on-the-fly ones.
    if ctx.phase in (Phase.KEYFRAMES, Phase.EXTRACT_KEYFRAMES):
        return _keyframe_attention(q, k, v, kernel, options, ctx, block, n_img)
    return _propagated_attention(q, k, v, kernel, options, ctx, block, n_img)


def _keyframe_attention(q, k, v, kernel: Kernel, options: dict, ctx: PassContext, block: BlockKey,
                        n_img: int) -> torch.Tensor:
    """Ordinary attention for the source chunk; ONE extended attention (two kernel calls) for all edit chunks."""
    chunks = chunk_count(options)
    src, edit = ctx.roles(options)
    (q_s, q_e), (k_s, k_e), (v_s, v_e) = (split_roles(kernel.to_heads(t), chunks, src) for t in (q, k, v))
    out_s = out_e = None
    if src is not None:
        out_s = kernel.heads_out(q_s, k_s, v_s)
        if ctx.field_provider is None:  # the source's image values for the nearest-neighbour search
            v_given = v_s if kernel.in_heads else split_roles(v, chunks, src)[0]
            ctx.bank.record_tokens(block, unit_tokens(kernel.image_values(v_given, n_img)))
        if block in ctx.pnp_attention:  # and its image keys / values for PnP
            ctx.bank.pnp_qk[block] = (image_rows(k_s, n_img, 2), image_rows(v_s, n_img, 2))
    if edit:
        injects = ctx.pnp_tensors.get(block, ctx.clone_settings.layout.adapter.pnp_injects) \
            if block in ctx.pnp_attention else ""
        src_kv = ctx.bank.pnp_store(block) if injects else None
        if injects:
            ctx.bank.record_injection("attention", block, ctx.phase, len(edit))
        out_e = extended_image_attention(q_e, k_e, v_e, src_kv, injects, kernel, n_img, len(edit))
    out = merge_heads(join_roles(out_s, out_e, chunks, src))
    ctx.bank.record_output(block, image_rows(out, n_img, 1), list(options.get("uuids", [None])))
    return out


def _propagated_attention(q, k, v, kernel: Kernel, options: dict, ctx: PassContext, block: BlockKey,
                          n_img: int) -> torch.Tensor:
    """Image tokens: the keyframe outputs gathered along the fields; text queries attend as in plain sampling."""
    chunks = chunk_count(options)
    src, _ = ctx.roles(options)
    if block not in ctx.bank.fields:
        if ctx.field_provider is not None:
            ctx.bank.fields[block] = to_device(ctx.field_provider(block, ctx.frames), q.device)
        elif src is not None:
            tokens = kernel.image_values(split_roles(v, chunks, src)[0], n_img)
            ctx.bank.fields[block] = frame_fields(tokens, ctx.frames, ctx.bank.source_tokens(block), ctx.pairing,
                                                  ctx.max_elements, plan=ctx.pair_plan(q.device), keys_are_unit=True)
    uuids = list(options.get("uuids", [None]))
    values, rows = ctx.bank.keyframe_values(block, uuids, ctx.keyframes)  # (R, n_img, d): image rows only
    fields = ctx.fields_for(block, values.device)
    img = propagate(values, fields, ctx.gather_rows(rows, n_img, values.device), ctx.frame_weights(values))
    img = img.reshape(-1, n_img, img.shape[-1])
    n_txt = (q.shape[2] if kernel.in_heads else q.shape[1]) - n_img
    if n_txt == 0:
        return img
    return torch.cat([kernel(kernel.text_tokens(q, n_txt), k, v), img], 1)


def image_rows(tensor: torch.Tensor, n_img: int, dim: int) -> torch.Tensor:
    """The last ``n_img`` tokens of ``tensor`` along ``dim`` in storage of their own (copied unless ``tensor`` is
    already exactly that): what a bank keeps must not hold the rest of the call's storage alive."""
    own = tensor.shape[dim] == n_img and tensor.is_contiguous() \
        and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    return tensor if own else tensor.narrow(dim, tensor.shape[dim] - n_img, n_img).clone(
        memory_format=torch.contiguous_format)
