"""The one place a ModelPatcher is cloned and given TokenFlow's patches; the input model is never changed.

:func:`patched_clone` is the model of every TokenFlow run (extraction, edit) and :func:`joint_edit_model` the
Keyframe Joint Edit's. Both install, on a clone, the patches of the layout's sampling rule (the UNet's
``attn1`` patches, or a DiT's block patches and attention override), the per-call wrappers under one key,
and the clone's :class:`~.contract.CloneSettings` in ``model_options[KEY]``.
"""
from __future__ import annotations

import comfy.patcher_extension

from ..families.base import FLOW, ModelLayout
from ..families.registry import check_supported, sampling_rule
from . import unet
from .contract import KEY, CloneSettings
from .dit import DiTBlockReplace, set_attention_override
from .wrappers import call_key_wrapper, joint_pass_wrapper, tokenflow_call_wrapper


def _patch_name(patch) -> str:
    """Where another node's patch function lives (its module and qualified name), so a refusal can name the node."""
    fn = getattr(patch, "func", patch)  # functools.partial
    module = getattr(fn, "__module__", None) or type(fn).__module__
    return f"{module}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"


def check_attention_patches(model_patcher, layout: ModelLayout, input_name: str = "model") -> None:
    """Refuse other nodes' UNet self-attention patches that TokenFlow's cannot be chained with, naming the block
    and the patch; raised before any model call (the stages' checks and :func:`patched_clone`).

    TokenFlow replaces ``attn1`` of every transformer block of the layout. Another node's ``attn1`` replacement on
    one of them (Self-Attention Guidance's on the middle block; a ``(kind, id)`` entry covers every index of the
    block) computes its own attention: there is no order in which both run, and overwriting it would drop that
    node silently. A node that patches both the input (``attn1_patch``) and the output (``attn1_output_patch``) of
    self-attention, from one scope, re-lays the tokens around it and back (HyperTile's tiles, ToMe's merge), which
    TokenFlow's attention, gathered from keyframes by whole-frame correspondences, cannot follow. Other nodes'
    ``attn1_patch`` and ``attn1_output_patch`` entries stay chained: TokenFlow's ``attn1_patch`` is appended after
    theirs. DiT block patches and attention overrides are chained (:func:`install_dit_patches`).
    """
    if layout.sampling == FLOW:
        return
    options = model_patcher.model_options.get("transformer_options", {})
    own = unet.tokenflow_attn1_replace
    blocks = set(layout.transformer_blocks)
    for key, patch in options.get("patches_replace", {}).get("attn1", {}).items():
        key = tuple(key) if isinstance(key, (tuple, list)) else (key,)
        covered = key in blocks or any(block[:2] == key for block in blocks)
        if covered and patch is not own:
            raise ValueError(f"{input_name}: another node replaces the self-attention (attn1) of transformer block "
                             f"{key} with {_patch_name(patch)} (Self-Attention Guidance does, on the middle block); "
                             "TokenFlow replaces the self-attention of every transformer block, and the two cannot "
                             "both run: remove that node from the model given to TokenFlow")
    patches = options.get("patches", {})
    inputs = {_patch_name(p).rsplit(".", 1)[0]: p for p in patches.get("attn1_patch", [])}
    for output in patches.get("attn1_output_patch", []):
        scope = _patch_name(output).rsplit(".", 1)[0]
        if scope in inputs:
            raise ValueError(f"{input_name}: another node patches both the input and the output of the "
                             f"self-attention (attn1) of every transformer block ({_patch_name(inputs[scope])}, "
                             f"{_patch_name(output)}), re-laying the tokens around it (HyperTile and ToMe do), which "
                             "TokenFlow's attention, matched across frames by token, cannot follow: remove that node "
                             "from the model given to TokenFlow")


def install_unet_patches(model_patcher, layout: ModelLayout) -> None:
    """The ``attn1`` patch and one ``attn1`` replacement per transformer block (idempotent)."""
    patches = model_patcher.model_options.get("transformer_options", {}).get("patches", {})
    # Looked up on their module when installed, so that a replaced module function is the one installed.
    attn1_patch, attn1_replace = unet.tokenflow_attn1_patch, unet.tokenflow_attn1_replace
    if attn1_patch not in patches.get("attn1_patch", []):
        model_patcher.set_model_attn1_patch(attn1_patch)
    for kind, block_id, index in layout.transformer_blocks:
        model_patcher.set_model_attn1_replace(attn1_replace, kind, block_id, index)


def install_dit_patches(model_patcher, layout: ModelLayout) -> None:
    """A block patch per declared DiT block and TokenFlow's attention override, each chained in front of the one
    another node put there (idempotent)."""
    calls: dict[tuple[str, int], set[int]] = {}
    for kind, block_id, call in layout.transformer_blocks:
        calls.setdefault((kind, block_id), set()).add(call)
    replaced = model_patcher.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
    for (kind, block_id), block_calls in calls.items():
        previous = replaced.get((kind, block_id))
        if isinstance(previous, DiTBlockReplace):  # TokenFlow's own: chain what it chained
            previous = previous.previous
        model_patcher.set_model_patch_replace(DiTBlockReplace(kind, block_id, frozenset(block_calls), previous), "dit",
                                              kind, block_id)
    set_attention_override(model_patcher.model_options.setdefault("transformer_options", {}))


def install_wrappers(model_patcher, joint: bool) -> None:
    """The per-call wrappers (:mod:`.wrappers`), each under :data:`KEY`, replacing TokenFlow's own only; the joint
    pass wrapper on the Keyframe Joint Edit's model alone."""
    wrappers = comfy.patcher_extension.WrappersMP
    for wrapper_type, wrapper in ((wrappers.CALC_COND_BATCH, joint_pass_wrapper if joint else None),
                                  (wrappers.DIFFUSION_MODEL, call_key_wrapper),
                                  (wrappers.APPLY_MODEL, tokenflow_call_wrapper)):
        model_patcher.remove_wrappers_with_key(wrapper_type, KEY)
        if wrapper is not None:
            model_patcher.add_wrapper_with_key(wrapper_type, KEY, wrapper)


def patched_clone(model_patcher, layout: ModelLayout, joint: bool = False):
    """A clone of ``model_patcher`` with TokenFlow's patches for the layout's sampling rule; the input ModelPatcher
    is never changed. ``joint``: the Keyframe Joint Edit's model (every call extends attention across frames)."""
    check_attention_patches(model_patcher, layout)
    patched = model_patcher.clone()
    if layout.sampling == FLOW:
        install_dit_patches(patched, layout)
    else:
        install_unet_patches(patched, layout)
    install_wrappers(patched, joint)
    patched.model_options[KEY] = CloneSettings(layout, joint)
    return patched


def joint_edit_model(model_patcher):
    """The Keyframe Joint Edit's model: self-attention extended across every frame of the batch any sampler gives
    it (on a DiT: each frame's image queries see every frame's image tokens, :mod:`.dit_joint`)."""
    return patched_clone(model_patcher, check_supported(model_patcher, sampling=sampling_rule(model_patcher)),
                         joint=True)
