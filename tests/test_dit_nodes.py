"""The TokenFlow nodes take a Flux or SD3 model exactly as an SD one (tiny real models); refusals come
before any model call, with the input and the fix named."""
from __future__ import annotations

import pytest
import torch

import tiny_dit_models
from comfyui_tokenflow.engine.ddpm import edit as ddpm_edit
from comfyui_tokenflow.nodes import inversion_nodes, sampler_nodes

N = 3


def _frames() -> dict:
    return {"samples": torch.randn(N, 16, 8, 8, generator=torch.Generator().manual_seed(0))}


def _sample(model, pos, neg, inversion, **overrides):
    args = dict(editor="pnp", cfg=1.0, pnp_attn_t=0.5, pnp_f_t=0.8, sdedit_start=0.9, batch_size=2,
                keyframes="random", seed=1)
    args.update(overrides)
    return sampler_nodes.TokenFlowSampler.execute(model, pos, neg, inversion, **args)


@pytest.fixture(scope="module")
def flux():
    model = tiny_dit_models.make_flux_model(seed=0)
    src, pos, neg = (tiny_dit_models.flux_conditioning(seed=s) for s in (1, 2, 3))
    inversion, inverted = inversion_nodes.TokenFlowInvert.execute(model, _frames(), src, 4, 8).args
    return dict(model=model, src=src, pos=pos, neg=neg, inversion=inversion, inverted=inverted)


class _Calls:
    def __init__(self, model):
        self.count = 0
        self.handle = model.model.diffusion_model.register_forward_pre_hook(self._hook)

    def _hook(self, *args):
        self.count += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_flux_through_the_nodes(flux):
    assert flux["inversion"].family == "flux" and flux["inverted"]["samples"].shape == (N, 16, 8, 8)
    (latent,) = _sample(flux["model"], flux["pos"], flux["neg"], flux["inversion"]).args
    assert latent["samples"].shape == (N, 16, 8, 8) and torch.isfinite(latent["samples"]).all()


def test_sd3_through_the_nodes():
    model = tiny_dit_models.make_sd3_model(seed=0)
    src, pos, neg = (tiny_dit_models.sd3_conditioning(seed=s) for s in (1, 2, 3))
    inversion, _ = inversion_nodes.TokenFlowInvert.execute(model, _frames(), src, 4, 8).args
    (latent,) = _sample(model, pos, neg, inversion, cfg=4.0, editor="sdedit").args
    assert inversion.family == "sd3" and torch.isfinite(latent["samples"]).all()


def test_at_cfg_1_the_negative_is_unused(flux):
    """Flux-dev is guidance-distilled: at cfg 1 the sampler skips the negative branch entirely."""
    a = _sample(flux["model"], flux["pos"], flux["neg"], flux["inversion"]).args[0]["samples"]
    b = _sample(flux["model"], flux["pos"], flux["src"], flux["inversion"]).args[0]["samples"]
    assert torch.equal(a, b)


@pytest.mark.parametrize("case, overrides, words", [
    ("unet-residual-blocks", dict(pnp_residual_blocks="output_blocks.4.0"),
     ["pnp_residual_blocks", "without ResBlocks", "set it to auto"]),
    ("unknown-attention-blocks", dict(pnp_attention_blocks="output:4-11"),
     ["pnp_attention_blocks", "names no transformer block"]),
    ("sd-text-embeddings", dict(positive=[[torch.randn(1, 77, 768), {"pooled_output": torch.randn(1, 768)}]]),
     ["positive", "768 wide", "DualCLIPLoader"]),
    ("not-correspondences", dict(correspondences=object()), ["correspondences", "TokenFlow Extract Correspondences"]),
])
def test_flux_refusals_come_before_any_model_call(flux, case, overrides, words):
    pos = overrides.pop("positive", flux["pos"])
    with _Calls(flux["model"]) as calls, pytest.raises(ValueError) as error:
        _sample(flux["model"], pos, flux["neg"], flux["inversion"], **overrides)
    assert calls.count == 0
    message = str(error.value)
    assert all(w in message for w in words), message


def test_a_flux_inversion_into_an_sd_sampler_is_refused(flux, tiny_sd15):
    with pytest.raises(ValueError, match="inversion"):
        ddpm_edit.run_edit(tiny_sd15, flux["pos"], flux["neg"], flux["inversion"], ddpm_edit.EditSettings())


def test_a_flux_inversion_saves_and_loads_through_the_nodes(flux, tmp_path):
    from comfyui_tokenflow.data import product_io
    from comfyui_tokenflow.nodes import product_io_nodes

    path = product_io.save_inversion(flux["inversion"], tmp_path / "flux.safetensors")
    loaded, inverted = product_io_nodes.TokenFlowLoadInversion.execute(str(path), flux["model"], _frames()).args
    assert loaded.family == "flux" and torch.equal(loaded.trajectory, flux["inversion"].trajectory)
    assert torch.equal(inverted["samples"], flux["inverted"]["samples"])
    a = _sample(flux["model"], flux["pos"], flux["neg"], loaded).args[0]["samples"]
    b = _sample(flux["model"], flux["pos"], flux["neg"], flux["inversion"]).args[0]["samples"]
    assert torch.equal(a, b)


def test_kontext_reference_latents_are_refused_before_any_model_call(flux):
    pos = [[flux["pos"][0][0], {**flux["pos"][0][1], "reference_latents": [torch.zeros(1, 16, 8, 8)]}]]
    with _Calls(flux["model"]) as calls, pytest.raises(ValueError, match="positive: it carries reference latents"):
        _sample(flux["model"], pos, flux["neg"], flux["inversion"])
    assert calls.count == 0


@pytest.mark.parametrize("stage", ["inversion", "sampler"])
def test_a_flux_attention_mask_is_refused_before_any_model_call(flux, stage):
    """A text encoder's attention mask on a Flux prompt: refused by name at the inversion and at the sampler."""
    def masked(conditioning):
        cond, extra = conditioning[0]
        return [[cond, {**extra, "attention_mask": torch.ones(1, cond.shape[1])}]]

    with _Calls(flux["model"]) as calls, pytest.raises(ValueError) as error:
        if stage == "inversion":
            inversion_nodes.TokenFlowInvert.execute(flux["model"], _frames(), masked(flux["src"]), 4, 8)
        else:
            _sample(flux["model"], masked(flux["pos"]), flux["neg"], flux["inversion"])
    assert calls.count == 0
    message = str(error.value)
    assert "\n" not in message and message.startswith(
        f"{'conditioning' if stage == 'inversion' else 'positive'}: it carries an attention mask"), message
    assert "encode the prompt without the mask" in message
