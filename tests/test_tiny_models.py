"""Smoke tests of the tiny random-weight fixtures through ComfyUI's real code paths."""
from __future__ import annotations

import pytest
import torch

import comfy.model_base
import comfy.model_management
import comfy.sample
import nodes  # ComfyUI's core nodes (the host is first on sys.path)
import tiny_models
from comfy.ldm.modules.attention import BasicTransformerBlock

STEPS = 3
CFG = 4.0


def _sample(model, positive, negative, latent: torch.Tensor, seed: int = 0, denoise: float = 1.0) -> torch.Tensor:
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, STEPS, CFG, "euler", "normal", positive, negative, latent,
                               denoise=denoise, disable_pbar=True, seed=seed)


def _differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    # sensitivity lower bound (a change must move the output by more than float32 rounding could), FP_THRESHOLDS.md
    return (a - b).abs().mean().item() > 1e-3 * max(1.0, b.abs().mean().item())


def test_harness_imports():
    import sys
    from pathlib import Path

    import comfyui_tokenflow.tokenflow_ops.schedule as schedule

    repo = Path(__file__).resolve().parents[1]
    assert Path(nodes.__file__).resolve().parent != repo / "nodes", "ComfyUI's nodes module is shadowed"
    assert hasattr(nodes, "CLIPTextEncode")
    assert sys.modules["comfyui_tokenflow"].__path__ == [str(repo)]
    assert schedule.__name__ == "comfyui_tokenflow.tokenflow_ops.schedule"
    assert comfy.model_management.get_torch_device().type == "cpu"
    import comfy.ldm.modules.attention as attention
    assert attention.optimized_attention is attention.attention_pytorch


@pytest.mark.parametrize("family, blocks, model_type", [
    ("sd15", 16, comfy.model_base.ModelType.EPS),
    ("sd2v", 16, comfy.model_base.ModelType.V_PREDICTION),
    ("sdxl", 70, comfy.model_base.ModelType.EPS),
])
def test_unet_samples_through_comfy(request, family, blocks, model_type):
    model = request.getfixturevalue(f"tiny_{family}")
    assert model.model.model_type == model_type
    assert sum(isinstance(m, BasicTransformerBlock) for m in model.model.diffusion_model.modules()) == blocks
    assert all(torch.isfinite(p).all() for p in model.model.parameters())

    positive = tiny_models.make_conditioning(model, seed=1)
    negative = tiny_models.make_conditioning(family, seed=2)
    latent = torch.zeros(1, 4, 8, 8)
    out = _sample(model, positive, negative, latent)
    assert out.shape == latent.shape and torch.isfinite(out).all()
    assert out.std() > 0
    assert torch.equal(out, _sample(model, positive, negative, latent)), "sampling is not deterministic"
    assert _differs(out, _sample(model, tiny_models.make_conditioning(family, seed=3), negative, latent)), "prompt ignored"

    image = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    a = _sample(model, positive, negative, image, denoise=0.5)
    b = _sample(model, positive, negative, -image, denoise=0.5)
    assert torch.isfinite(a).all() and _differs(a, b), "output does not depend on the input latent"


def test_weights_are_seeded():
    a = tiny_models.make_unet_model("sd15", seed=7).model.diffusion_model.state_dict()
    b = tiny_models.make_unet_model("sd15", seed=7).model.diffusion_model.state_dict()
    c = tiny_models.make_unet_model("sd15", seed=8).model.diffusion_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_conditioning_layout(tiny_sd15, tiny_sdxl):
    cond, extra = tiny_models.make_conditioning(tiny_sd15, seed=0, n_tokens=5)[0]
    assert cond.shape == (1, 5, 32) and extra["pooled_output"].shape == (1, 32)
    cond, extra = tiny_models.make_conditioning(tiny_sdxl, seed=0, batch=2, width=96, height=64)[0]
    assert cond.shape == (2, 77, 64) and extra["pooled_output"].shape == (2, tiny_models.SDXL_POOLED_DIM)
    assert (extra["width"], extra["height"]) == (96, 64)
    # SDXL.encode_adm: pooled_output + 6 size embeddings must fill adm_in_channels exactly.
    adm = tiny_sdxl.model.encode_adm(**extra)
    assert adm.shape == (2, tiny_sdxl.model.model_config.unet_config["adm_in_channels"])
    assert torch.equal(tiny_models.make_conditioning("sdxl", seed=4)[0][0], tiny_models.make_conditioning("sdxl", seed=4)[0][0])


def test_vae_round_trip(tiny_vae):
    pixels = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    (latent,) = nodes.VAEEncode().encode(tiny_vae, pixels)
    assert latent["samples"].shape == (2, 4, 8, 8) and torch.isfinite(latent["samples"]).all()
    (image,) = nodes.VAEDecode().decode(tiny_vae, latent)
    assert image.shape == pixels.shape
    assert image.min() >= 0 and image.max() <= 1 and image.std() > 0.01
    other = tiny_vae.encode(1.0 - pixels)
    assert _differs(latent["samples"], other)
    assert tiny_vae.spacial_compression_encode() == 8


def test_clip_text_encode_feeds_sd15(tiny_clip, tiny_sd15):
    encode = nodes.CLIPTextEncode().encode
    (cat,) = encode(tiny_clip, "a photo of a cat")
    (dog,) = encode(tiny_clip, "a watercolor painting of a dog")
    assert cat[0][0].shape == (1, 77, 32) and cat[0][1]["pooled_output"].shape == (1, 32)
    assert torch.isfinite(cat[0][0]).all()
    assert torch.equal(cat[0][0], encode(tiny_clip, "a photo of a cat")[0][0][0])
    assert _differs(cat[0][0], dog[0][0])
    (empty,) = encode(tiny_clip, "")
    latent = torch.zeros(1, 4, 8, 8)
    assert _differs(_sample(tiny_sd15, cat, empty, latent), _sample(tiny_sd15, dog, empty, latent))


def test_controlnet_changes_output(tiny_sd15, tiny_controlnet):
    positive = tiny_models.make_conditioning(tiny_sd15, seed=1)
    negative = tiny_models.make_conditioning(tiny_sd15, seed=2)
    latent = torch.zeros(1, 4, 8, 8)
    hint = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(3))
    apply = nodes.ControlNetApplyAdvanced().apply_controlnet
    plain = _sample(tiny_sd15, positive, negative, latent)

    controlled = _sample(tiny_sd15, *apply(positive, negative, tiny_controlnet, hint, 1.0, 0.0, 1.0), latent)
    assert torch.isfinite(controlled).all() and _differs(controlled, plain)
    other_hint = _sample(tiny_sd15, *apply(positive, negative, tiny_controlnet, 1.0 - hint, 1.0, 0.0, 1.0), latent)
    assert _differs(controlled, other_hint), "the hint image is ignored"

    assert torch.equal(_sample(tiny_sd15, *apply(positive, negative, tiny_controlnet, hint, 0.0, 0.0, 1.0), latent), plain)
    # Strength 0 through the control path itself (the node short-circuits it): zero residuals.
    control = tiny_controlnet.copy().set_cond_hint(hint.movedim(-1, 1), 0.0, (0.0, 1.0))
    zero = [[[c, {**d, "control": control, "control_apply_to_uncond": False}] for c, d in cond] for cond in (positive, negative)]
    assert torch.equal(_sample(tiny_sd15, *zero, latent), plain)
