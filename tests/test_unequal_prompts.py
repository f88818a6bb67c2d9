"""Prompts of different token counts on Flux and SD3, through the Sampler node (tiny real models).

When the source, positive and negative prompts differ in token count, ComfyUI cannot batch their conds into
one model call (``can_concat_cond`` compares the cross-attention shapes), so the keyframe pass runs in calls of
different lengths. TokenFlow's stores must hold only the image rows they read, so that the calls' text rows
never meet: the edit must run, and equal the edit whose prompts are padded apart in calls of their own.
"""
from __future__ import annotations

import pytest
import torch

import tiny_dit_models
from comfyui_tokenflow.nodes import inversion_nodes, sampler_nodes

N = 3


def _frames() -> dict:
    return {"samples": torch.randn(N, 16, 8, 8, generator=torch.Generator().manual_seed(0))}


FAMILIES = {
    "flux": (tiny_dit_models.make_flux_model, tiny_dit_models.flux_conditioning, 1.0),
    "sd3": (tiny_dit_models.make_sd3_model, tiny_dit_models.sd3_conditioning, 4.0),
}


@pytest.mark.parametrize("editor", ["pnp", "sdedit"])
@pytest.mark.parametrize("family", ["flux", "sd3"])
@pytest.mark.parametrize("lengths", [(8, 16, 16), (8, 8, 16), (16, 8, 12)], ids=["src-pos", "pos-neg", "all"])
def test_unequal_prompt_lengths_edit(family, editor, lengths):
    make, conditioning, cfg = FAMILIES[family]
    model = make(seed=0)
    src, pos, neg = (conditioning(seed=s, tokens=t) for s, t in zip((1, 2, 3), lengths))
    inversion, _ = inversion_nodes.TokenFlowInvert.execute(model, _frames(), src, 4, 8).args
    (latent,) = sampler_nodes.TokenFlowSampler.execute(
        model, pos, neg, inversion, editor=editor, cfg=cfg if family == "sd3" else 2.0, pnp_attn_t=0.5,
        pnp_f_t=0.8, sdedit_start=0.9, batch_size=2, keyframes="random", seed=1).args
    assert latent["samples"].shape == (N, 16, 8, 8) and torch.isfinite(latent["samples"]).all()


@pytest.mark.parametrize("editor", ["pnp", "sdedit"])
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_every_prompt_in_calls_of_its_own_gives_the_batched_edit(family, editor, monkeypatch):
    """The call layout of unequal prompt lengths, forced on equal ones (float64): when the host batches no two
    conds, the keyframe pass records each branch in a call of its own and the propagation joins their image rows;
    the edit equals the batched one to float rounding."""
    import comfy.conds

    from comfyui_tokenflow.engine.flow.edit import run_edit
    from comfyui_tokenflow.engine.flow.invert import run_inversion
    from comfyui_tokenflow.engine.plan.settings import EditSettings

    world = tiny_dit_models.dit_world(family, 4)
    inversion = run_inversion(world["model"], {"samples": world["frames"]}, world["src"], 4, 8)
    settings = EditSettings.of(editor=editor, cfg=world["cfg"] if family == "sd3" else 2.0, batch_size=2)

    calls = []
    hook = world["model"].model.diffusion_model.register_forward_pre_hook(lambda *args: calls.append(1))

    def edit() -> tuple[torch.Tensor, int]:
        calls.clear()
        return run_edit(world["model"], world["pos"], world["neg"], inversion, settings)["samples"], len(calls)

    try:
        batched, batched_calls = edit()
        monkeypatch.setattr(comfy.conds.CONDRegular, "can_concat", lambda self, other: False)
        separate, separate_calls = edit()
    finally:
        hook.remove()
    assert separate_calls > batched_calls  # the branches really ran apart
    torch.testing.assert_close(separate, batched, rtol=0, atol=1e-6 * batched.abs().max())


def _bank_tensors(bank) -> list[tuple[str, torch.Tensor]]:
    found = []
    for name in ("keyframe_tokens", "keyframe_outputs", "pnp_qk", "fields", "residuals"):
        for key, held in getattr(bank, name).items():
            stack = [held]
            while stack:
                item = stack.pop()
                if isinstance(item, torch.Tensor):
                    found.append((f"{name}[{key}]", item))
                elif isinstance(item, (list, tuple)):
                    stack.extend(item)
    return found


@pytest.mark.parametrize("editor", ["pnp", "sdedit"])
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_every_bank_holds_at_most_a_quarter_more_than_it_stores(family, editor, monkeypatch):
    """A bank entry that is a view of a model call's tensor keeps the whole call's storage alive (text rows, a
    Flux single block's fused linear output behind k and v): every stored tensor's storage is at most 1.25x
    its own bytes, read at the end of each step before the bank is cleared."""
    from comfyui_tokenflow.engine.patches import contract

    make, conditioning, cfg = FAMILIES[family]
    model = make(seed=0)
    src, pos, neg = (conditioning(seed=s, tokens=t) for s, t in zip((1, 2, 3), (8, 16, 16)))
    inversion, _ = inversion_nodes.TokenFlowInvert.execute(model, _frames(), src, 4, 8).args
    worst: list[tuple[float, str]] = []
    clear = contract.StepBank.clear

    def inspecting_clear(bank):
        for where, tensor in _bank_tensors(bank):
            held = tensor.untyped_storage().nbytes() / max(tensor.numel() * tensor.element_size(), 1)
            worst.append((held, where))
        clear(bank)

    monkeypatch.setattr(contract.StepBank, "clear", inspecting_clear)
    sampler_nodes.TokenFlowSampler.execute(model, pos, neg, inversion, editor=editor, cfg=cfg, pnp_attn_t=1.0,
                                           pnp_f_t=0.8, sdedit_start=0.9, batch_size=2, keyframes="random", seed=1)
    assert worst, "no bank was read"
    assert max(worst)[0] <= 1.25, sorted(worst)[-3:]
