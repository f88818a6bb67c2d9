"""TokenFlow inside a DDPM UNet's transformer blocks, through the host's ``attn1`` patch points.

- ``attn1_patch`` (:func:`tokenflow_attn1_patch`) sees every block's ``norm1`` tokens: it records the source
  keyframes' tokens and computes (or looks up) the nearest-neighbour fields of the frames being propagated;
- ``attn1_replace`` (:func:`tokenflow_attn1_replace`) for every transformer block: ordinary, extended (joint
  keyframe) or propagated self-attention depending on the pass and the branch, with PnP query/key injection.

torch.compile (the host's ``TorchCompileModel`` compiles ``diffusion_model`` only): inside the UNet these
patches do tensor work only, with no host read, hook registration or exception, so a compiled UNet has no
graph break. What they branch on in Python (phase, branch roles, PnP blocks, sizes) is the same for every call
with the same :meth:`~.contract.PassContext.call_key`, which the call wrappers (:mod:`.wrappers`) pass to the
UNet as a keyword argument.
"""
from __future__ import annotations

import torch

import comfy.ldm.modules.attention as comfy_attention

from ...tokenflow_ops.attention import extended_attention
from ...tokenflow_ops.correspondence import frame_fields, unit_tokens
from ...tokenflow_ops.propagation import propagate
from ..families.base import BlockKey
from .contract import EXTRACT_PHASES, PassContext, Phase, branches, chunk_count, pass_of


def _block_key(extra: dict) -> BlockKey:
    # Read with .get(): hosts leave out the extra options they have no value for.
    block = extra.get("block")
    if block is None:
        raise RuntimeError("TokenFlow: this ComfyUI calls the self-attention patch without naming its block "
                           f"(extra options: {sorted(extra)}); TokenFlow needs the block to pair each frame's tokens "
                           "with the keyframes', so it cannot run on this host version")
    return (block[0], int(block[1]), int(extra.get("block_index", 0)))


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra: dict) -> torch.Tensor:
    # Looked up at call time so that the host's choice of kernel (SDPA, xformers, sage, ...) is used; the block's
    # options go along, so an ``optimized_attention_override`` on the model (a kernel-swapping node) sees these
    # calls as it sees the host's own.
    return comfy_attention.optimized_attention(q, k, v, extra["n_heads"], attn_precision=extra.get("attn_precision"),
                                               transformer_options=extra)


def tokenflow_attn1_patch(n: torch.Tensor, context: torch.Tensor, value: torch.Tensor, extra: dict):
    """Records / matches the source branch's ``norm1`` tokens; never changes them."""
    ctx = pass_of(extra)
    if ctx is None or ctx.phase is Phase.JOINT:
        return n, context, value
    block = _block_key(extra)
    src, _ = ctx.roles(extra)
    source_tokens = branches(n, chunk_count(extra))[src] if src is not None else None
    if ctx.phase in (Phase.KEYFRAMES, Phase.EXTRACT_KEYFRAMES):
        if source_tokens is not None and ctx.field_provider is None:  # only the nearest-neighbour search reads them
            ctx.bank.record_tokens(block, unit_tokens(source_tokens))
        return n, context, value
    # Extracted fields were prefetched before the call (PassContext.prepare); here only tensor ops.
    if block not in ctx.bank.fields and ctx.field_provider is None and source_tokens is not None:
        ctx.bank.fields[block] = frame_fields(source_tokens, ctx.frames, ctx.bank.source_tokens(block),
                                              ctx.pairing, ctx.max_elements, plan=ctx.pair_plan(n.device),
                                              keys_are_unit=True)
    if ctx.phase is Phase.EXTRACT_FRAMES:  # handed to the sink after the call (by the APPLY_MODEL wrapper)
        return n, context, value
    if block in ctx.foreign_attn1 or block[:2] in ctx.foreign_attn1:  # another replacement attends: whole tokens
        return n, context, value
    # Propagated frames never compute self-attention: hand the q/k/v projections a single token
    # each so that their cost vanishes too (the replacement below rebuilds the full token count).
    one = n[:, :1]
    return one, one, one


def _keyframe_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra: dict, ctx: PassContext,
                        block: BlockKey) -> torch.Tensor:
    """Keyframe pass: ordinary attention for the source chunk, one extended attention for all edit chunks."""
    chunks = chunk_count(extra)
    src, edit = ctx.roles(extra)
    bank = ctx.bank
    qs, ks, vs = branches(q, chunks), branches(k, chunks), branches(v, chunks)
    outs: list[torch.Tensor | None] = [None] * chunks
    if src is not None and block in ctx.pnp_attention:  # own storage: views would hold every branch's q and k
        bank.pnp_qk[block] = (qs[src].clone(), ks[src].clone())
    for i in range(chunks):
        if i not in edit:  # the source branch: ordinary per-frame self-attention
            outs[i] = _attention(qs[i], ks[i], vs[i], extra)
    if edit:
        def stacked(parts):
            return torch.stack([parts[i] for i in edit])

        if block in ctx.pnp_attention:
            q_src, k_src = bank.pnp_store(block)
            q_e, k_e = q_src.expand(len(edit), *q_src.shape), k_src.expand(len(edit), *k_src.shape)
            bank.record_injection("attention", block, ctx.phase, len(edit))
        else:
            q_e, k_e = stacked(qs), stacked(ks)
        out_e = extended_attention(q_e, k_e, stacked(vs), extra["n_heads"], lambda a, b, c, h: _attention(a, b, c, extra))
        for row, i in enumerate(edit):
            outs[i] = out_e[row]
    out = torch.cat(outs)
    bank.record_output(block, out, list(extra.get("uuids", [None])))
    return out


def _joint_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra: dict) -> torch.Tensor:
    """The Keyframe Joint Edit: each chunk's frames attend to the keys/values of all of that chunk's frames."""
    chunks = chunk_count(extra)
    split = [t.view(chunks, -1, *t.shape[1:]) for t in (q, k, v)]
    out = extended_attention(*split, extra["n_heads"], lambda a, b, c, h: _attention(a, b, c, extra))
    return out.reshape(q.shape[0], -1, out.shape[-1])


def tokenflow_attn1_replace(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra: dict) -> torch.Tensor:
    """Self-attention of one transformer block, as the current pass requires (output before to_out)."""
    ctx = pass_of(extra)
    if ctx is None or ctx.phase in EXTRACT_PHASES:
        return _attention(q, k, v, extra)
    if ctx.phase is Phase.JOINT:
        return _joint_attention(q, k, v, extra)
    block = _block_key(extra)
    foreign = ctx.foreign_attn1.get(block[:2])
    if foreign is not None:  # added by this call over TokenFlow's (a guidance node's perturbed pass): it runs
        return foreign(q, k, v, extra)
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


def foreign_attn1(ctx: PassContext, transformer_options: dict) -> dict:
    """The self-attention replacements of a call that are not TokenFlow's and run their block (per call, by the
    APPLY_MODEL wrapper; not for the Keyframe Joint Edit's passes): one the host picks over TokenFlow's (a block and
    transformer index of its own), or one for a whole block that this call added to the options its pass was made
    with (TokenFlow's own replacement defers to it). Their blocks keep all tokens in ``attn1_patch``."""
    if ctx.phase is Phase.JOINT:
        return {}
    replaces = (transformer_options.get("patches_replace") or {}).get("attn1") or {}
    ours = tokenflow_attn1_replace
    return {key: fn for key, fn in replaces.items()
            if fn is not ours and (len(key) == 3 or ctx.base_attn1.get(key) is not fn)}
