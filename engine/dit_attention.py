"""TokenFlow inside a flow-matching transformer (Flux, SD3.x) through the host's public patch points.

A model clone gets (see :func:`install_dit_patches`):

- a ``patches_replace["dit"]`` entry for every block the family adapter declares: it only tags the
  block's ``transformer_options`` with the block and a counter of its attention calls, then runs
  the original block;
- ``transformer_options["optimized_attention_override"]``: every attention call of a tagged block
  comes here with q, k, v. The image tokens are the last ``n_img`` tokens of each call (the
  adapter's rule: text first in Flux and SD3 joint attention; SD3.5's second attention holds
  image tokens only), so TokenFlow acts on image tokens alone:

  * keyframe pass, source branch: ordinary attention; its image-token values are recorded for the
    nearest-neighbour search (the DiT analogue of the UNet's ``norm1`` tokens: a linear map of the
    block's normalised, modulated image tokens), and its image keys/values for PnP;
  * keyframe pass, edit branches: each keyframe's IMAGE queries attend to its own text keys/values
    (repeated once per keyframe, which keeps plain attention's text/image balance) plus the image
    keys/values of ALL keyframes (extended attention); text queries attend as in plain sampling. PnP (``pnp_attention`` blocks): the source's image values (RF-Solver-Edit,
    adapter ``pnp_injects="v"``) or keys and values (Stable Flow, ``"kv"``) replace the edit's;
  * propagation pass, every branch: image-token outputs are the two-keyframe blend of keyframe
    outputs gathered along the nearest neighbours of the source branch's image tokens, per block;
    text queries attend as in plain sampling.
- a keyed ``APPLY_MODEL`` wrapper that tells the override ``n_img`` (from the latent's size, by the
  adapter) and the source-input wrapper the UNet path uses (the source chunk's own latents).

The per-call instructions are the same :class:`PassContext` / :class:`StepBank` the UNet path uses.

Cost (benchmarks/README.md, "DiT step cost"): the edit branches of a call share one extended attention
(one kernel call for their image queries, one for their text queries), kernels return the heads layout
and a call's pieces are merged once, and the keyframe outputs are kept whole so that propagation
gathers their image rows in place.
"""
from __future__ import annotations

import functools
import logging

import torch

import comfy.patcher_extension

from ..tokenflow_ops.correspondence import frame_fields, unit_tokens
from ..tokenflow_ops.propagation import propagate
from .attention_patches import PASS_KEY, WRAPPER_KEY, PassContext, Phase
from .call_wrappers import call_key_wrapper, tokenflow_call_wrapper
from .model_support import BlockKey, ModelLayout

log = logging.getLogger(__name__)

BLOCK_TAG = "tokenflow_dit_block"
IMAGE_TOKENS = "tokenflow_dit_image_tokens"
INJECTS = "tokenflow_dit_injects"
DIT_WRAPPER_KEY = "tokenflow_dit"
PREVIOUS_OVERRIDE = "tokenflow_previous_attention_override"


class DiTBlockReplace:
    """``patches_replace["dit"][(kind, id)]``: tag the block's options, run the original block."""

    def __init__(self, kind: str, block_id: int) -> None:
        self.block = (kind, block_id)

    def __call__(self, args: dict, extra: dict) -> dict:
        options = args.get("transformer_options") or {}
        if PASS_KEY not in options:
            return extra["original_block"](args)
        tagged = {**options, BLOCK_TAG: {"block": self.block, "calls": 0}}
        return extra["original_block"]({**args, "transformer_options": tagged})


def _to_heads(t: torch.Tensor, heads: int, skip_reshape: bool) -> torch.Tensor:
    if skip_reshape:
        return t  # (B, H, T, D)
    if t.ndim == 4:  # (B, T, H, D) (SD3's values)
        return t.transpose(1, 2)
    b, n = t.shape[:2]  # (B, T, H*D)
    return t.reshape(b, n, heads, -1).transpose(1, 2)


def _merge(t: torch.Tensor) -> torch.Tensor:
    """(B, H, T, D) -> (B, T, H*D)."""
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


class _Kernel:
    """The host's attention function with one call's own options, for q/k/v in the layout its block gives:
    (B, H, T, D) (Flux, ``in_heads``) or (B, T, H*D) (SD3; its values may be (B, T, H, D)).

    ``kernel(q, k, v)`` is plain attention, (B, T, H*D) out. :meth:`heads_out` takes and gives the heads
    layout (``skip_output_reshape``), so the pieces of a call are joined there and merged once.
    """

    def __init__(self, func, heads: int, kwargs: dict) -> None:
        self.func, self.heads = func, heads
        self.in_heads = bool(kwargs.get("skip_reshape", False))
        self.kwargs = {k: v for k, v in kwargs.items() if k not in ("skip_reshape", "skip_output_reshape", "mask")}

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.func(q, k, v, self.heads, skip_reshape=self.in_heads, **self.kwargs)

    def heads_out(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = self.func(q, k, v, self.heads, skip_reshape=True, skip_output_reshape=True, **self.kwargs)
        if out.ndim == 3:  # a backend path that merges anyway (attention_pytorch past SDP_BATCH_LIMIT)
            out = _to_heads(out, self.heads, False)
        return out

    def to_heads(self, t: torch.Tensor) -> torch.Tensor:
        return _to_heads(t, self.heads, self.in_heads)

    def text_tokens(self, t: torch.Tensor, n_txt: int) -> torch.Tensor:
        return t[:, :, :n_txt] if self.in_heads else t[:, :n_txt]

    def image_values(self, v: torch.Tensor, n_img: int) -> torch.Tensor:
        """(B, n_img, H*D): the image-token values of ``v`` (rows of this call's values, as given), merged."""
        n_txt = (v.shape[2] if self.in_heads else v.shape[1]) - n_img
        if self.in_heads:
            return _merge(v[:, :, -n_img:] if n_txt else v)
        return (v[:, -n_img:] if n_txt else v).flatten(2)


def set_attention_override(options: dict, override) -> None:
    """Make ``override`` the clone's ``optimized_attention_override``, keeping the one already there.

    The host has one override slot per model. A node applied before TokenFlow (a kernel swap such as a
    SageAttention patch) keeps working: it is kept in :data:`PREVIOUS_OVERRIDE` and every attention TokenFlow
    computes, or passes through, goes through it (:func:`host_attention`)."""
    previous = options.get("optimized_attention_override")
    if previous is not None and previous is not override:
        options[PREVIOUS_OVERRIDE] = previous
    options["optimized_attention_override"] = override


def host_attention(func, options: dict, own):
    """The attention function a call of the override ``own`` should use: the host's ``func``, through the override
    ``own`` replaced. Only the override in the model's slot resolves it: one of the pack's overrides kept as
    the previous one (a joint-edit model fed to the TokenFlow sampler) is handed that already."""
    previous = options.get(PREVIOUS_OVERRIDE)
    if previous is None or options.get("optimized_attention_override") is not own:
        return func
    return functools.partial(previous, func)


def dit_attention_override(func, q, k, v, heads, *args, **kwargs):
    """``optimized_attention_override``: TokenFlow on the image tokens of tagged blocks, plain elsewhere."""
    options = kwargs.get("transformer_options") or {}
    tag, ctx = options.get(BLOCK_TAG), options.get(PASS_KEY)
    func = host_attention(func, options, dit_attention_override)
    if tag is None or ctx is None or args:
        return func(q, k, v, heads, *args, **kwargs)
    if kwargs.get("mask") is not None or kwargs.get("skip_output_reshape"):
        raise RuntimeError("TokenFlow: attention masks (ConditioningSetMask / attention_mask) are not supported on "
                           "DiT models; remove the mask from the conditioning")
    block: BlockKey = (*tag["block"], tag["calls"])
    tag["calls"] += 1
    kernel = _Kernel(func, heads, kwargs)
    n_img = int(options[IMAGE_TOKENS])
    # Extraction (engine/dit_extraction.py) runs the source branch alone through the same passes, so its
    # fields are the on-the-fly ones.
    if ctx.phase in (Phase.KEYFRAMES, Phase.EXTRACT_KEYFRAMES):
        return _keyframe_attention(q, k, v, kernel, options, ctx, block, n_img)
    return _propagated_attention(q, k, v, kernel, options, ctx, block, n_img)


def _by_role(t: torch.Tensor, chunks: int, src: int | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
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
    parts = t.chunk(chunks)
    return parts[src], torch.cat([p for i, p in enumerate(parts) if i != src])


def _join_roles(source: torch.Tensor | None, edit: torch.Tensor | None, chunks: int, src: int | None) -> torch.Tensor:
    """The inverse of :func:`_by_role`."""
    if source is None or edit is None:
        return edit if source is None else source
    if src == 0:
        return torch.cat([source, edit])
    if src == chunks - 1:
        return torch.cat([edit, source])
    parts = list(edit.chunk(chunks - 1))
    return torch.cat(parts[:src] + [source] + parts[src:])


def _chunks(options: dict) -> int:
    return len(options.get("cond_or_uncond", [0]))


def _keyframe_attention(q, k, v, kernel: _Kernel, options: dict, ctx: PassContext, block: BlockKey,
                        n_img: int) -> torch.Tensor:
    """Ordinary attention for the source chunk; ONE extended attention (two kernel calls) for all edit chunks."""
    chunks = _chunks(options)
    src, edit = ctx.roles(options)
    (q_s, q_e), (k_s, k_e), (v_s, v_e) = (_by_role(kernel.to_heads(t), chunks, src) for t in (q, k, v))
    out_s = out_e = None
    if src is not None:
        out_s = kernel.heads_out(q_s, k_s, v_s)
        if ctx.field_provider is None:  # the source's image values for the nearest-neighbour search
            v_given = v_s if kernel.in_heads else _by_role(v, chunks, src)[0]
            ctx.bank.keyframe_tokens[block] = unit_tokens(kernel.image_values(v_given, n_img))
        if block in ctx.pnp_attention:  # and its image keys / values for PnP
            ctx.bank.pnp_qk[block] = (k_s[:, :, -n_img:], v_s[:, :, -n_img:]) if k_s.shape[2] > n_img else (k_s, v_s)
    if edit:
        injects = options.get(INJECTS, "v") if block in ctx.pnp_attention else ""
        src_kv = ctx.bank.pnp_qk[block] if injects else None
        if injects and ctx.bank.trace is not None:
            ctx.bank.trace.extend([("attention", block, f"edit_{ctx.phase.value}")] * len(edit))
        out_e = _extended(q_e, k_e, v_e, src_kv, injects, kernel, n_img, len(edit))
    out = _merge(_join_roles(out_s, out_e, chunks, src))
    # The whole output is kept (text tokens first): propagation gathers its image rows in place, no copy.
    ctx.bank.keyframe_outputs.setdefault(block, []).append((out, list(options.get("uuids", [None]))))
    return out


def _joint_kv(k: torch.Tensor, v: torch.Tensor, src_kv: tuple | None, injects: str, n_img: int,
              branches: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of the extended attention of C edit branches of K keyframes each, (C*K, H, K*T, D) each.

    Row i: its own text tokens repeated K times, then the image tokens of all K keyframes of its
    branch (its own branch's, or the source's where PnP injects them). Built for k and v at once.
    """
    rows, heads, tokens, dim = k.shape
    frames, n_txt = rows // branches, tokens - n_img
    own = torch.stack((k, v))  # (2, C*K, H, T, D)

    def own_img() -> torch.Tensor:
        return own[:, :, :, n_txt:] if n_txt else own
    if injects == "kv" or branches == 1:  # one set of K keyframes' image tokens for every row: (2, K, H, n_img, D)
        if injects == "kv":
            img = torch.stack(src_kv)
        elif injects:  # "v": own image keys, the source's image values
            img = torch.stack((k[:, :, n_txt:] if n_txt else k, src_kv[1]))
        else:
            img = own_img()
        shared = img.transpose(1, 2).reshape(2, 1, heads, frames * n_img, dim).expand(-1, rows, -1, -1, -1)
        if n_txt == 0:
            return tuple(shared.unbind(0))
        joint = torch.cat((own[:, :, :, :n_txt].repeat(1, 1, 1, frames, 1), shared), 3)
        return tuple(joint.unbind(0))
    if injects:  # "v", several branches: (2, C, K, H, n_img, D)
        src_v = src_kv[1].unsqueeze(0).expand(branches, -1, -1, -1, -1)
        img = torch.stack(((k[:, :, n_txt:] if n_txt else k).unflatten(0, (branches, frames)), src_v))
    else:
        img = own_img().unflatten(1, (branches, frames))
    shared = img.transpose(2, 3).reshape(2, branches, 1, heads, frames * n_img, dim).expand(-1, -1, frames, -1, -1, -1)
    if n_txt:
        text = own[:, :, :, :n_txt].repeat(1, 1, 1, frames, 1).unflatten(1, (branches, frames))
        shared = torch.cat((text, shared), 4)
    return tuple(shared.flatten(1, 2).unbind(0))


def _extended(q, k, v, src_kv: tuple | None, injects: str, kernel: _Kernel, n_img: int,
              branches: int) -> torch.Tensor:
    """K keyframes: image queries see own text + every keyframe's image tokens; text queries attend as usual.

    The own text keys/values are repeated K times (one copy per keyframe's image tokens), so that
    the text-to-image balance of the softmax is that of plain attention: K identical keyframes give
    exactly the single-frame result (the UNet's extended attention has the same property).
    q, k, v: (C*K, H, T, D) of ``branches`` edit branches; out in the same layout.
    """
    n_txt = q.shape[2] - n_img
    k_joint, v_joint = _joint_kv(k, v, src_kv, injects, n_img, branches)
    if n_txt == 0:
        return kernel.heads_out(q, k_joint, v_joint)
    img_out = kernel.heads_out(q[:, :, n_txt:], k_joint, v_joint)
    txt_out = kernel.heads_out(q[:, :, :n_txt], k, v)
    return torch.cat([txt_out, img_out], 2)


def _propagated_attention(q, k, v, kernel: _Kernel, options: dict, ctx: PassContext, block: BlockKey,
                          n_img: int) -> torch.Tensor:
    """Image tokens: the keyframe outputs gathered along the fields; text queries attend as in plain sampling."""
    chunks = _chunks(options)
    src, _ = ctx.roles(options)
    if block not in ctx.bank.fields:
        if ctx.field_provider is not None:
            ctx.bank.fields[block] = ctx.field_provider(block, ctx.frames).to(q.device, non_blocking=True)
        elif src is not None:
            tokens = kernel.image_values(_by_role(v, chunks, src)[0], n_img)
            ctx.bank.fields[block] = frame_fields(tokens, ctx.frames, ctx.bank.keyframe_tokens[block], ctx.pairing,
                                                  ctx.max_elements, plan=ctx.pair_plan(q.device), keys_are_unit=True)
    uuids = list(options.get("uuids", [None]))
    values, rows = ctx.bank.keyframe_values(block, uuids, ctx.keyframes)  # (R, T_kf, d): text first, then image
    fields = ctx.fields_for(block, values.device)
    n_txt_kf = values.shape[1] - n_img
    base = _image_rows(ctx, rows, values.shape[1], n_txt_kf, values.device)
    img = propagate(values, fields, base, ctx.frame_weights(values))
    img = img.reshape(-1, n_img, img.shape[-1])
    n_txt = (q.shape[2] if kernel.in_heads else q.shape[1]) - n_img
    if n_txt == 0:
        return img
    return torch.cat([kernel(kernel.text_tokens(q, n_txt), k, v), img], 1)


def _image_rows(ctx: PassContext, rows: tuple[int, ...], tokens: int, n_txt: int, device: torch.device) -> torch.Tensor:
    """Flat rows of the keyframes' image tokens in whole keyframe outputs of ``tokens`` tokens (text first), for
    :func:`propagate`; prepared once per call and layout (SD3.5 has two: joint and image-only attention)."""
    def make() -> torch.Tensor:
        first = ctx._device_cache.get(("dit_first_layout", rows, device))
        if first is None:  # the call's first layout: the shared gather rows, offset past the text
            ctx._device_cache[("dit_first_layout", rows, device)] = tokens
            base = ctx.gather_rows(rows, tokens, device)
        else:  # another layout: rescaled from the first one's rows (no second host-built tensor)
            base = ctx.gather_rows(rows, first, device) // first * tokens
        return base + n_txt if n_txt else base

    return ctx._cached(("dit_rows", rows, tokens, n_txt, device), make)


def image_tokens_wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                         **kwargs):
    """APPLY_MODEL wrapper: tells the attention override how many image tokens this call's latents give."""
    adapter = transformer_options.get("tokenflow_dit_adapter")
    if adapter is not None and PASS_KEY in transformer_options:
        dm = executor.class_obj.diffusion_model
        transformer_options = {**transformer_options,
                               IMAGE_TOKENS: adapter.image_tokens(dm, int(x.shape[-2]), int(x.shape[-1]))}
    return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)


def install_dit_patches(model_patcher, layout: ModelLayout) -> None:
    """Add TokenFlow's DiT patches to a model CLONE (idempotent)."""
    adapter = layout.adapter
    for kind, block_id in dict.fromkeys((b[0], b[1]) for b in layout.transformer_blocks):
        model_patcher.set_model_patch_replace(DiTBlockReplace(kind, block_id), "dit", kind, block_id)
    options = model_patcher.model_options.setdefault("transformer_options", {})
    set_attention_override(options, dit_attention_override)
    options["tokenflow_dit_adapter"] = adapter
    options[INJECTS] = adapter.pnp_injects
    # The UNet's per-call wrappers (source input, device tensors prepared outside the model, the call key read
    # inside it) and the image-token count of this family.
    apply_model, diffusion_model = comfy.patcher_extension.WrappersMP.APPLY_MODEL, comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL
    wrappers = ((apply_model, WRAPPER_KEY, tokenflow_call_wrapper), (diffusion_model, WRAPPER_KEY, call_key_wrapper),
                (apply_model, DIT_WRAPPER_KEY, image_tokens_wrapper))
    for wrapper_type, key, wrapper in wrappers:
        model_patcher.remove_wrappers_with_key(wrapper_type, key)
        model_patcher.add_wrapper_with_key(wrapper_type, key, wrapper)


__all__ = ["install_dit_patches", "dit_attention_override", "DiTBlockReplace", "set_attention_override",
           "host_attention"]
