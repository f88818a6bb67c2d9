"""The per-call wrappers of the patch layer (see :mod:`.attention_patches`) and their installation.

- :func:`tokenflow_call_wrapper` (``APPLY_MODEL``, outside the possibly compiled diffusion model):
  the source latents of a shared call, the call's device tensors, the PnP ResBlock hooks for that
  one call and the call key;
- :func:`call_key_wrapper` (``DIFFUSION_MODEL``, inside it): reads the key, so compiled graphs guard on it;
- :func:`install_tokenflow_patches`: the attention patches and both wrappers on a model clone.
"""
from __future__ import annotations

import functools

import torch

import comfy.patcher_extension

from . import attention_patches
from .attention_patches import EXTRACT_PHASES, PASS_KEY, WRAPPER_KEY, PassContext, Phase, _branches, _pass_of, _trace
from .model_support import ModelLayout


class _SourceFeaturesRecorded(Exception):
    """Stops a source-only call early: it only ran for PnP residual features, and all are recorded."""


def _residual_hook(module, inputs, output, *, ctx: PassContext, path: str, chunks: int, src: int | None,
                   source_only: bool):
    if src is not None:
        ctx.bank.residuals[path] = _branches(output, chunks)[src]
        if source_only:
            # Eager only: a compiled UNet runs the (unused) rest; raising would break its graph.
            if (ctx.stop_after_residuals and not torch.compiler.is_compiling()
                    and all(p in ctx.bank.residuals for p in ctx.pnp_residual)):
                raise _SourceFeaturesRecorded
            return None
    # Every edit chunk gets the source's features (the source chunk keeps its own, which are the same).
    source = ctx.bank.residuals[path]
    _trace(ctx.bank, "residual", path, ctx.phase, 1)
    return source.repeat(chunks, *([1] * (source.ndim - 1))) if chunks > 1 else source


def _residual_hooks(unet: torch.nn.Module, ctx: PassContext, options: dict) -> list:
    """Hooks on the residual branch of the PnP ResBlocks for one call (removed by the caller)."""
    if not ctx.pnp_residual or ctx.phase in EXTRACT_PHASES:
        return []
    order = list(options.get("cond_or_uncond", [0]))
    src, edit = ctx.roles(options)
    hook = functools.partial(_residual_hook, ctx=ctx, chunks=len(order), src=src, source_only=not edit)
    handles = []
    try:
        for path in ctx.pnp_residual:
            last_layer = unet.get_submodule(path).out_layers[-1]  # after the second conv, before the skip add
            handles.append(last_layer.register_forward_hook(functools.partial(hook, path=path)))
    except BaseException:
        for handle in handles:
            handle.remove()
        raise
    return handles


CALL_KEY = "tokenflow_call"  # keyword argument of the diffusion model: see PassContext.call_key


def call_key_wrapper(executor, *args, **kwargs):
    """DIFFUSION_MODEL wrapper (inside a compiled UNet): reads the call key, so the graph guards on it.

    Dynamo guards only on what the traced code reads; comparing the keyword argument with the
    key the call was prepared with makes the key part of every compiled graph's guards.
    """
    key = kwargs.pop(CALL_KEY, None)
    options = kwargs.get("transformer_options")
    if options is None:  # positional: the UNet passes it 6th, Flux 8th; the dict that carries the pass
        for arg in args:
            if isinstance(arg, dict) and PASS_KEY in arg:
                options = arg
                break
    ctx = _pass_of(options)
    if ctx is not None and key != ctx.key:
        raise RuntimeError("TokenFlow: the UNet call was not prepared by the TokenFlow wrapper")
    return executor(*args, **kwargs)


def tokenflow_call_wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                           **kwargs):
    """APPLY_MODEL wrapper: everything per call that must stay outside the (possibly compiled) UNet.

    Runs outside ``diffusion_model`` (the host's torch.compile wrapper compiles only that): it gives
    the source chunk of a shared call the source latents, prepares the call's device tensors,
    hooks the PnP ResBlocks, passes the call's branch key to the UNet, and hands extracted fields
    to the sink after the call. Hooks and host reads never happen inside the traced region.
    """
    ctx = _pass_of(transformer_options)
    if ctx is None:
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    src, _ = ctx.roles(transformer_options)
    if ctx.source_input is not None and src is not None:  # also when ComfyUI runs the source chunk alone
        parts = list(x.chunk(len(transformer_options["cond_or_uncond"])))
        parts[src] = ctx.source_input.to(device=x.device, dtype=x.dtype)
        x = torch.cat(parts)
    ctx.prepare(x.device)
    ctx.key = kwargs[CALL_KEY] = ctx.call_key(transformer_options)
    unet = executor.class_obj.diffusion_model
    handles = _residual_hooks(getattr(unet, "_orig_mod", unet), ctx, transformer_options)  # compiled: its module
    try:
        out = executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    except _SourceFeaturesRecorded:
        return torch.zeros_like(x)  # this source prediction is never used
    finally:
        for handle in handles:
            handle.remove()
    if ctx.phase is Phase.EXTRACT_FRAMES and ctx.field_sink is not None:
        for block, fields in ctx.bank.fields.items():
            ctx.field_sink(block, ctx.frames, fields)
    return out


def install_tokenflow_patches(model_patcher, layout: ModelLayout) -> None:
    """Add TokenFlow's patches to a model CLONE (idempotent)."""
    patches = model_patcher.model_options.get("transformer_options", {}).get("patches", {})
    # The patch functions are looked up on their module when installed (the parity tests record through them).
    attn1_patch, attn1_replace = attention_patches.tokenflow_attn1_patch, attention_patches.tokenflow_attn1_replace
    if attn1_patch not in patches.get("attn1_patch", []):
        model_patcher.set_model_attn1_patch(attn1_patch)
    for kind, block_id, index in layout.transformer_blocks:
        model_patcher.set_model_attn1_replace(attn1_replace, kind, block_id, index)
    for wrapper_type, wrapper in ((comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, call_key_wrapper),
                                  (comfy.patcher_extension.WrappersMP.APPLY_MODEL, tokenflow_call_wrapper)):
        model_patcher.remove_wrappers_with_key(wrapper_type, WRAPPER_KEY)
        model_patcher.add_wrapper_with_key(wrapper_type, WRAPPER_KEY, wrapper)
