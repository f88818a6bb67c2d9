"""Bad inputs are refused with a message naming the input and the fix, before any UNet call (counted with a
forward pre-hook on the diffusion model) and before any progress is reported.

Against the real host: real models (a tiny SD1.x UNet, a second one, a tiny Flux DiT), real nodes and
real files (a frame folder, an mp4, a truncated mp4, a text file named .mp4).
"""
from __future__ import annotations

import pytest
import torch

import tiny_dit_models
import tiny_models
from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete
from comfyui_tokenflow.engine import sampling_paths
from comfyui_tokenflow.engine.ddpm import invert as ddpm_invert
from comfyui_tokenflow.data import product_io
from comfyui_tokenflow.nodes import product_io_nodes, video_nodes
from input_files import write_frames, write_mp4
from reliability_tools import INVERSION_FRAME_BATCH, N, ProgressHook, UNetCalls, apply_controlnet, hints
from tokenflow_helpers import INVERSION_STEPS, STEPS, edit, extract, random_latent



def tiny_flux():
    """A real ComfyUI Flux model (comfy.model_base.Flux, a DiT) with a tiny config; never run."""
    return tiny_dit_models.make_flux_model(depth=1, depth_single_blocks=1)


@pytest.fixture(scope="module")
def world(tiny_sd15, tiny_controlnet, clip, tmp_path_factory):
    """Everything the bad-input cases need: a second model, another clip's products, files, a Flux model."""
    folder = tmp_path_factory.mktemp("reliability")
    other = tiny_models.make_unet_model("sd15", seed=1)
    other_latent = random_latent(N, seed=22)
    other_inversion = ddpm_invert.run_inversion(tiny_sd15, other_latent, clip["src"], STEPS, INVERSION_STEPS,
                                                frame_batch=INVERSION_FRAME_BATCH)
    other_corr = extract(tiny_sd15, other_inversion, batch_size=2)
    other_model_corr = extract(other, ddpm_invert.run_inversion(
        other, clip["latent"], clip["src"], STEPS, INVERSION_STEPS, frame_batch=INVERSION_FRAME_BATCH), batch_size=2)
    (x0_model,) = ModelSamplingDiscrete().patch(tiny_sd15, "x0", False)  # the core node, as a user would apply it
    mp4 = write_mp4(folder / "clip.mp4")
    truncated = folder / "truncated.mp4"
    truncated.write_bytes(mp4.read_bytes()[: mp4.stat().st_size // 2])
    bogus = folder / "notes.mp4"
    bogus.write_bytes(b"this is not a video, just some text saved with the wrong extension\n" * 20)
    return dict(
        model=tiny_sd15, other=other, flux=tiny_flux(), wan=tiny_dit_models.make_wan_model(), clip=clip, other_latent=other_latent,
        other_inversion=other_inversion, other_corr=other_corr, other_model_corr=other_model_corr, x0_model=x0_model,
        inversion_file=product_io.save_inversion(clip["inversion"], folder / "inversion.safetensors"),
        corr_file=product_io.save_correspondences(clip["corr"], folder / "corr.safetensors"),
        xl_pos=tiny_models.make_conditioning("sdxl", seed=12), frames=write_frames(folder / "frames", 4),
        mp4=mp4, truncated=truncated, bogus=bogus, controlnet=tiny_controlnet,
    )


def _invert(w, latent=None, model=None, cond=None, steps=STEPS, inversion_steps=INVERSION_STEPS):
    return ddpm_invert.run_inversion(model or w["model"], latent if latent is not None else w["clip"]["latent"],
                                     cond or w["clip"]["src"], steps, inversion_steps, frame_batch=2)


def _edit(w, model=None, pos=None, neg=None, inversion=None, **settings):
    c = w["clip"]
    return edit(model or w["model"], pos or c["pos"], neg or c["neg"], inversion or c["inversion"], **settings)


def _with_area(conditioning):
    import node_helpers

    return node_helpers.conditioning_set_values(conditioning, {"area": (4, 4, 0, 0), "strength": 1.0,
                                                               "set_area_to_bounds": False})


def _joint_edit(model):
    from comfyui_tokenflow.nodes.joint_edit_nodes import TokenFlowKeyframeJointEdit

    return TokenFlowKeyframeJointEdit.execute(model).result[0]


def _extract_node(w, images):
    from comfyui_tokenflow.nodes.correspondence_nodes import TokenFlowExtractCorrespondences

    return TokenFlowExtractCorrespondences.execute(w["model"], w["clip"]["inversion"], 2, "random", 1,
                                                   source_images=images)


def _samples(shape, fill=None, **extra):
    samples = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    if fill is not None:
        samples[0, 0, 0, 0] = fill
    return {"samples": samples, **extra}


def _load_video(w, **kwargs):
    args = dict(video="", path="", frame_load_cap=0, skip_first_frames=0, select_every_nth=1, width=64, height=64,
                size_multiple=64)
    args.update(kwargs)
    return video_nodes.TokenFlowLoadVideo.execute(**args)


def _hint_mismatch(w):
    c = w["clip"]
    pos, neg = apply_controlnet(c["pos"], c["neg"], w["controlnet"], hints(N - 1))
    return _edit(w, pos=pos, neg=neg, editor="controlnet")


# (case id, call, words the message must contain: the input's name and the fix)
BAD_INPUTS = [
    ("inversion_steps-off-the-grid", lambda w: _invert(w, inversion_steps=12),
     ["steps (5)", "inversion_steps (12)", "Set inversion_steps to 10 or 20"]),
    ("sampler-steps-not-on-the-inversion-grid", lambda w: _edit(w, steps=3),
     ["steps (3)", "the inversion's steps (5)", "sampler steps 0 uses the inversion's count", "inverting again"]),
    ("latent-with-0-frames", lambda w: _invert(w, latent=_samples((0, 4, 8, 8))),
     ["latent", "0 frames", "frame_load_cap"]),
    ("latent-4x4-too-small", lambda w: _invert(w, latent=_samples((N, 4, 4, 4))),
     ["latent", "32x32 px", "the width (32 px) is below 64 px; the height (32 px) is below 64 px",
      "between 64 and 8192 px", "width/height"]),
    ("latent-too-large", lambda w: _invert(w, latent=_samples((1, 4, 8, 1032))),
     ["latent", "8256x64 px", "(the width (8256 px) is above 8192 px)", "between 64 and 8192 px"]),
    ("latent-too-tall", lambda w: _invert(w, latent=_samples((1, 4, 1032, 8))),
     ["latent", "64x8256 px", "(the height (8256 px) is above 8192 px)", "between 64 and 8192 px"]),
    ("latent-channels-of-another-vae", lambda w: _invert(w, latent=_samples((N, 16, 8, 8))),
     ["latent", "16 channels", "expects 4", "VAE that belongs to this checkpoint"]),
    ("latent-of-a-video-model", lambda w: _invert(w, latent=_samples((1, 4, N, 8, 8))),
     ["latent", "video-model latents", "VAE Encode"]),
    ("latent-with-nan", lambda w: _invert(w, latent=_samples((N, 4, 8, 8), fill=float("nan"))),
     ["latent", "NaN", "re-encode", "--fp32-vae"]),
    ("latent-with-inf", lambda w: _invert(w, latent=_samples((N, 4, 8, 8), fill=float("inf"))),
     ["latent", "infinite", "re-encode"]),
    ("latent-with-noise-mask", lambda w: _invert(w, latent=_samples((N, 4, 8, 8), noise_mask=torch.ones(1, 8, 8))),
     ["latent", "Set Latent Noise Mask", "remove the mask node"]),
    ("model-flux-inversion", lambda w: _invert(w, model=w["flux"], latent=_samples((N, 16, 8, 8))),
     ["model is Flux", "DiT", "Load an SD1.x/SD2.x/SDXL checkpoint"]),
    ("model-flux-extraction", lambda w: extract(w["flux"], w["clip"]["inversion"]),  # flow path: another model's
     ["inversion", "different model", "invert the video with the same checkpoint"]),
    ("model-flux-sampler", lambda w: _edit(w, model=w["flux"]),
     ["model is Flux", "DiT", "Load an SD1.x/SD2.x/SDXL checkpoint"]),
    ("model-wan-video-model", lambda w: sampling_paths.path_for(w["wan"]).invert(
        w["wan"], _samples((1, 16, 2, 8, 8)), [[torch.zeros(1, 8, 32), {}]], STEPS, INVERSION_STEPS, 2),
     ["model", "WanModel, a video model", "an IMAGE model", "Load Checkpoint", "Load Diffusion Model"]),
    ("sampler-area-conditioning", lambda w: _edit(w, pos=_with_area(w["clip"]["pos"])),
     ["positive", "Conditioning Set Area", "not supported", "Remove the Set Area node"]),
    ("inversion-area-conditioning", lambda w: _invert(w, cond=_with_area(w["clip"]["src"])),
     ["conditioning", "Conditioning Set Area", "Remove the Set Area node"]),
    ("sampler-joint-edit-model", lambda w: _edit(w, model=_joint_edit(w["model"])),
     ["model", "Keyframe Joint Edit", "Connect the model from Load Checkpoint"]),
    ("inversion-joint-edit-model", lambda w: _invert(w, model=_joint_edit(w["model"])),
     ["model", "Keyframe Joint Edit", "Connect the model from Load Checkpoint"]),
    ("extraction-joint-edit-model", lambda w: extract(_joint_edit(w["model"]), w["clip"]["inversion"]),
     ["model", "Keyframe Joint Edit", "patch it themselves"]),
    ("extraction-source_images-of-other-frames", lambda w: _extract_node(w, torch.rand(N - 1, 64, 64, 3)),
     ["source_images", f"{N - 1}x64x64x3 images do not match the inversion ({N} frames of 64x64 px)",
      "leave it unconnected"]),
    ("extraction-source_images-of-another-size", lambda w: _extract_node(w, torch.rand(N, 128, 128, 3)),
     ["source_images", "do not match the inversion", "connect the frames that were encoded"]),
    ("latent-too-large-for-the-device", lambda w: _invert(w, latent=_samples((1, 4, 1024, 1024))),
     ["latent", "8192x8192 px frame needs about", "more than this device has", "lower the resolution"]),
    ("sampler-correspondences-of-another-inversion", lambda w: _edit(w, correspondences=w["other_corr"]),
     ["correspondences", "different inversion", "connect the same TokenFlow Invert output"]),
    ("sampler-correspondences-of-another-model", lambda w: _edit(w, correspondences=w["other_model_corr"]),
     ["correspondences", "different inversion", "connect the same TokenFlow Invert output"]),
    ("model-with-x0-sampling", lambda w: _invert(w, model=w["x0_model"]),
     ["model predicts X0", "epsilon and v-prediction", "Remove the sampling-patch node"]),
    ("sampler-model-differs-from-inversion", lambda w: _edit(w, model=w["other"]),
     ["inversion", "different model", "invert the video with the same checkpoint"]),
    ("extraction-model-differs-from-inversion", lambda w: extract(w["other"], w["clip"]["inversion"]),
     ["inversion", "different model", "invert the video with the same checkpoint"]),
    ("load-inversion-other-frames", lambda w: product_io_nodes.TokenFlowLoadInversion.execute(
        w["inversion_file"], w["model"], w["other_latent"]),
     ["latent", "inversion of other frames", "Connect the same video frames"]),
    ("load-inversion-other-size", lambda w: product_io_nodes.TokenFlowLoadInversion.execute(
        w["inversion_file"], w["model"], _samples((N, 4, 10, 10))),
     ["latent", "inversion of other frames", "Connect the same video frames"]),
    ("load-inversion-other-model", lambda w: product_io_nodes.TokenFlowLoadInversion.execute(
        w["inversion_file"], w["other"], w["clip"]["latent"]),
     ["model", "different model", "Connect the checkpoint it was inverted with"]),
    ("load-correspondences-other-inversion", lambda w: product_io_nodes.TokenFlowLoadCorrespondences.execute(
        w["corr_file"], w["other_inversion"]),
     ["inversion", "different inversion", "extract them again"]),
    ("controlnet-hint-count", _hint_mismatch,
     ["positive", f"{N - 1} hint images", f"{N} frames", "one hint per frame"]),
    ("prompt-from-another-text-encoder", lambda w: _edit(w, pos=w["xl_pos"]),
     ["positive", "width 64", "expects 32", "CLIP of the same checkpoint"]),
    ("inversion-prompt-from-another-text-encoder", lambda w: _invert(w, cond=w["xl_pos"]),
     ["conditioning", "width 64", "CLIP of the same checkpoint"]),
    ("pnp_attention_blocks-typo", lambda w: _edit(w, pnp_attention_blocks="decoder 4-11"),
     ["pnp_attention_blocks", "write e.g. 'output:4-11'"]),
    ("pnp_attention_blocks-flux-preset-on-an-sd-unet", lambda w: _edit(w, pnp_attention_blocks="stable_flow"),
     ["pnp_attention_blocks", "'stable_flow' (a flux preset) is not a value for this sd1/sd2 model",
      "write e.g. 'output:4-11', or 'auto', 'none'"]),
    ("pnp_attention_blocks-suffix-on-an-sd-unet", lambda w: _edit(w, pnp_attention_blocks="output:4-11:kv"),
     ["pnp_attention_blocks", "injects the source's queries and keys", "write 'output:4-11'"]),
    ("video-file-not-a-video", lambda w: _load_video(w, path=str(w["bogus"])),
     ["as a video", "corrupt, truncated or not a video", "Use an mp4/webm/mov/gif file"]),
    ("video-file-truncated", lambda w: _load_video(w, path=str(w["truncated"])),
     ["as a video", "truncated", "Use an mp4/webm/mov/gif file"]),
    ("video-selection-leaves-0-frames", lambda w: _load_video(w, path=str(w["frames"]), skip_first_frames=10),
     ["skip_first_frames=10", "leaves none", "Lower skip_first_frames"]),
    ("video-does-not-fit-in-memory", lambda w: _load_video(w, path=str(w["mp4"]), width=4096, height=4096),
     ["Loading 8 frames of 4096x4096", "set frame_load_cap", "raise select_every_nth", "lower width/height"]),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_refused_before_any_unet_call(world, case, monkeypatch):
    _, call, words = case
    monkeypatch.setenv("TOKENFLOW_VIDEO_MAX_BYTES", str(64 * 2**20))  # the memory case must not depend on the RAM
    progress: list = []
    with UNetCalls(world["model"], world["other"], world["flux"], world["wan"]) as calls, ProgressHook(
            lambda *a, **k: progress.append(a)):
        with pytest.raises(ValueError) as raised:
            call(world)
    message = str(raised.value)
    for word in words:
        assert word in message, f"{word!r} missing from: {message}"
    assert calls.count == 0, f"{calls.count} UNet calls ran before the error"
    assert progress == [], "work was reported (progress) before the error"

