"""The per-call wrappers of a TokenFlow-patched clone, all under the one key :data:`~.contract.KEY`.

- :func:`joint_pass_wrapper` (``CALC_COND_BATCH``, the Keyframe Joint Edit's model only): any sampler drives
  that model, so its pass is made here, from the clone's settings (``model_options[KEY]``);
- :func:`tokenflow_call_wrapper` (``APPLY_MODEL``, outside the possibly compiled diffusion model): the source
  latents of a shared call, the image-token count of a DiT call, the call's device tensors, the PnP ResBlock
  hooks for that one call and the call key;
- :func:`call_key_wrapper` (``DIFFUSION_MODEL``, inside it): reads the key, so compiled graphs guard on it.
"""
from __future__ import annotations

import functools

import torch

from ..families.base import FLOW
from .unet import foreign_attn1
from .contract import EXTRACT_PHASES, KEY, PassContext, Phase, SourceBranchMissing, StepBank, branches, pass_of

CALL_KEY = "tokenflow_call"  # keyword argument of the diffusion model: see PassContext.call_key


class _SourceFeaturesRecorded(Exception):
    """Stops a source-only call early: it only ran for PnP residual features, and all are recorded."""


def _residual_hook(module, inputs, output, *, ctx: PassContext, path: str, chunks: int, src: int | None,
                   source_only: bool):
    if src is not None:
        ctx.bank.residuals[path] = branches(output, chunks)[src]
        if source_only:
            # Eager only: a compiled UNet runs the (unused) rest; raising would break its graph.
            if (ctx.stop_after_residuals and not torch.compiler.is_compiling()
                    and all(p in ctx.bank.residuals for p in ctx.pnp_residual)):
                raise _SourceFeaturesRecorded
            return None
    # Every edit chunk gets the source's features (the source chunk keeps its own, which are the same).
    source = ctx.bank.residuals.get(path)
    if source is None:
        raise SourceBranchMissing(f"TokenFlow: no source features for the PnP ResBlock {path}; the source branch did "
                                  "not run before the edit branches")
    ctx.bank.record_injection("residual", path, ctx.phase, 1)
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


def joint_pass_wrapper(executor, model, conds, x_in, timestep, model_options):
    """CALC_COND_BATCH wrapper of the Keyframe Joint Edit's model: a joint pass for every batch of conds.

    Its frames only size the call key (one more key per batch size); its bank stays empty.
    """
    settings = model_options.get(KEY)
    options = model_options.get("transformer_options", {})
    if settings is not None and settings.joint and pass_of(options) is None:
        ctx = PassContext(Phase.JOINT, bank=StepBank(), frames=torch.arange(x_in.shape[0]), clone_settings=settings)
        model_options = {**model_options, "transformer_options": {**options, KEY: ctx}}
    return executor(model, conds, x_in, timestep, model_options)


def call_key_wrapper(executor, *args, **kwargs):
    """DIFFUSION_MODEL wrapper (inside a compiled model): reads the call key, so the graph guards on it.

    Dynamo guards only on what the traced code reads; comparing the keyword argument with the
    key the call was prepared with makes the key part of every compiled graph's guards.
    """
    key = kwargs.pop(CALL_KEY, None)
    options = kwargs.get("transformer_options")
    if options is None:  # positional: the UNet passes it 6th, Flux 8th; the dict that carries the pass
        for arg in args:
            if isinstance(arg, dict) and KEY in arg:
                options = arg
                break
    ctx = pass_of(options)
    if ctx is not None and key != ctx.key:
        raise RuntimeError("TokenFlow: the UNet call was not prepared by the TokenFlow wrapper")
    return executor(*args, **kwargs)


def _image_tokens(executor, ctx: PassContext, x: torch.Tensor, kwargs: dict) -> None:
    """A DiT call: how many image tokens its latents give, for the attention override (by the family adapter)."""
    if ctx.phase is Phase.JOINT and kwargs.get("ref_latents") is not None:
        # Their tokens follow the image tokens: not the adapter's layout.
        raise ValueError("positive/negative: the conditioning carries reference latents (Flux Kontext / "
                         "ReferenceLatent), whose tokens TokenFlow Keyframe Joint Edit cannot tell from the "
                         "frames' image tokens; remove the ReferenceLatent node or sample with the plain model")
    dm = executor.class_obj.diffusion_model
    ctx.image_tokens = ctx.clone_settings.layout.adapter.image_tokens(dm, int(x.shape[-2]), int(x.shape[-1]))


def tokenflow_call_wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                           **kwargs):
    """APPLY_MODEL wrapper: everything per call that must stay outside the (possibly compiled) model.

    Runs outside ``diffusion_model`` (the host's torch.compile wrapper compiles only that): it gives
    the source chunk of a shared call the source latents, tells a DiT's attention how many image tokens the
    call has, prepares the call's device tensors, hooks the PnP ResBlocks, passes the call's branch key to
    the model, and hands extracted fields to the sink after the call. Hooks and host reads never happen
    inside the traced region.
    """
    ctx = pass_of(transformer_options)
    if ctx is None:
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    if ctx.clone_settings is None:
        raise RuntimeError("TokenFlow: a pass reached a model without TokenFlow's settings; passes are made for "
                           "the models patched_clone returns")
    if ctx.clone_settings.layout.sampling == FLOW:
        _image_tokens(executor, ctx, x, kwargs)
    else:
        ctx.foreign_attn1 = foreign_attn1(ctx, transformer_options)
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
