"""Issue 5, reliability, against the real host (no mock of the UNet, ModelPatcher, sampler or attention).

1. Bad inputs are refused with a message naming the input and the fix, before any UNet call
   (counted with a forward pre-hook on the diffusion model).
2. ComfyUI's interrupt stops inversion, extraction and sampling within one batch; nothing is left
   on the model and the next run is bit-identical to a clean one.
3. Same inputs and seed give bit-identical results on the CPU.
4. Through the real ``execution.PromptExecutor``: a changed edit prompt re-runs only the sampler
   and what follows it; inversion and extraction come from ComfyUI's cache.
5. An error inside a pass surfaces as itself (not as a cleanup error) and cleanup still happens.
"""
from __future__ import annotations

import asyncio
import copy
import logging
import sys
import uuid
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

import comfy.controlnet
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models
import comfy.utils
import folder_paths
import nodes as comfy_nodes
import tiny_models
from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete
from comfyui_tokenflow.engine import attention_patches, inversion_runner
from comfyui_tokenflow.data import product_io
from comfyui_tokenflow.nodes import product_io_nodes, video_nodes
from tokenflow_helpers import INVERSION_STEPS, STEPS, conds, edit, extract, random_latent

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
N = 3  # frames; batches of 2: a full batch and a short one
INVERSION_FRAME_BATCH = 2  # two UNet calls per inversion step, so an interrupt can land between them
Interrupted = comfy.model_management.InterruptProcessingException


# ------------------------------------------------------------------ instruments (real objects, no mocks)

class UNetCalls:
    """Counts forward calls of the diffusion models (a pre-hook, removed on exit) and keeps every TokenFlow
    StepBank seen in the calls' ``transformer_options``."""

    def __init__(self, *models, on_call=None) -> None:
        unique = {id(m.model.diffusion_model): m.model.diffusion_model for m in models}
        self.modules = list(unique.values())
        self.on_call = on_call
        self.count = 0
        self.banks: list = []
        self.handles: list = []

    def _hook(self, module, args, kwargs):
        self.count += 1
        ctx = (kwargs.get("transformer_options") or {}).get(attention_patches.PASS_KEY)
        if ctx is not None and all(bank is not ctx.bank for bank in self.banks):
            self.banks.append(ctx.bank)
        if self.on_call is not None:
            self.on_call(self.count)

    def __enter__(self) -> "UNetCalls":
        self.handles = [m.register_forward_pre_hook(self._hook, with_kwargs=True) for m in self.modules]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()


class ProgressHook:
    """Installs a ComfyUI global progress-bar hook for the duration of a ``with`` block."""

    def __init__(self, fn) -> None:
        self.fn = fn

    def __enter__(self):
        self.previous = comfy.utils.PROGRESS_BAR_HOOK
        comfy.utils.set_progress_bar_global_hook(self.fn)
        return self

    def __exit__(self, *exc) -> None:
        comfy.utils.set_progress_bar_global_hook(self.previous)


class ControlState:
    """Shared by a tracked ControlNet and all its copies."""

    def __init__(self) -> None:
        self.copies: list = []
        self.get_control_calls = 0
        self.fail_at: int | None = None  # get_control raises from this call on
        self.fail_cleanup = False


class TrackedControlNet(comfy.controlnet.ControlNet):
    """The real ControlNet (real control model), remembering every copy made of it and able to fail on demand."""

    state: ControlState

    def copy(self):
        c = super().copy()
        c.__class__ = TrackedControlNet
        c.state = self.state
        self.state.copies.append(c)
        return c

    def get_control(self, *args, **kwargs):
        self.state.get_control_calls += 1
        if self.state.fail_at is not None and self.state.get_control_calls >= self.state.fail_at:
            raise RuntimeError("ControlNet failed inside get_control")
        return super().get_control(*args, **kwargs)

    def cleanup(self):
        super().cleanup()
        if self.state.fail_cleanup:
            raise RuntimeError("ControlNet cleanup failed")


def tracked_controlnet(controlnet) -> TrackedControlNet:
    tracked = controlnet.copy()
    tracked.__class__ = TrackedControlNet
    tracked.state = ControlState()
    return tracked


def apply_controlnet(pos, neg, controlnet, hints: torch.Tensor):
    return comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(pos, neg, controlnet, hints, 1.0, 0.0, 1.0)


def hints(n: int, seed: int = 3) -> torch.Tensor:
    return torch.rand(n, 64, 64, 3, generator=torch.Generator().manual_seed(seed))


def model_state(model) -> dict:
    return dict(options=copy.deepcopy(model.model_options), patches={k: list(v) for k, v in model.patches.items()},
                wrappers=copy.deepcopy(model.wrappers), callbacks=copy.deepcopy(model.callbacks),
                object_patches=dict(model.object_patches), injections=copy.deepcopy(model.injections),
                additional_models=copy.deepcopy(model.additional_models), hook_patches=dict(model.hook_patches))


def assert_clean(model, state: dict, calls: UNetCalls | None = None, control: ControlState | None = None,
                 control_copies_before: int = 0) -> None:
    """Nothing left behind: the input ModelPatcher as it was, no hook on any module of the shared diffusion model,
    every StepBank emptied, every ControlNet copy made during the run cleaned."""
    assert model_state(model) == state, "the input ModelPatcher was changed"
    for name, module in model.model.diffusion_model.named_modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, f"hook left on {name or 'unet'}"
    if calls is not None:
        assert all(bank.is_empty() for bank in calls.banks), "a TokenFlow StepBank was not cleared"
    if control is not None:
        made = control.copies[control_copies_before:]
        assert made, "no ControlNet copy was made: the test does not exercise the per-subset copies"
        for c in made:
            assert c.cond_hint is None and c.timestep_range is None, "a ControlNet copy was not cleaned"


def assert_same_product(a, b) -> None:
    for name, value in vars(a).items():
        other = getattr(b, name)
        if isinstance(value, torch.Tensor):
            assert value.dtype == other.dtype and torch.equal(value, other), name
        elif isinstance(value, dict) and any(isinstance(v, torch.Tensor) for v in value.values()):
            assert list(value) == list(other), name
            for key in value:
                assert torch.equal(value[key], other[key]), f"{name}[{key}]"
        elif name == "conditioning":
            assert len(value) == len(other) and all(torch.equal(x[0], y[0]) for x, y in zip(value, other))
        else:
            assert value == other, name


# ------------------------------------------------------------------ one clip, its products and the clean runs

def run_inversion(model, clip):
    return inversion_runner.run_inversion(model, clip["latent"], clip["src"], STEPS, INVERSION_STEPS,
                                          frame_batch=INVERSION_FRAME_BATCH)


def run_extraction(model, clip):
    return extract(model, clip["inversion"], batch_size=2)


def run_controlled_edit(model, clip, editor="pnp"):
    """A PnP edit with a (tracked) ControlNet on both prompts: PnP hooks, banks and ControlNet copies all in play."""
    return edit(model, clip["cpos"], clip["cneg"], clip["inversion"], editor=editor, batch_size=2)


STAGES = {"inversion": run_inversion, "extraction": run_extraction, "sampling": run_controlled_edit}


@pytest.fixture(scope="module")
def clip(tiny_sd15, tiny_controlnet):
    src, pos, neg = conds(tiny_sd15)
    latent = random_latent(N, seed=21)
    inversion = inversion_runner.run_inversion(tiny_sd15, latent, src, STEPS, INVERSION_STEPS,
                                               frame_batch=INVERSION_FRAME_BATCH)
    control = tracked_controlnet(tiny_controlnet)
    cpos, cneg = apply_controlnet(pos, neg, control, hints(N))
    out = dict(src=src, pos=pos, neg=neg, latent=latent, inversion=inversion, control=control.state,
               cpos=cpos, cneg=cneg)
    out["corr"] = run_extraction(tiny_sd15, out)
    return out


@pytest.fixture(scope="module")
def clean(tiny_sd15, clip):
    """Results of clean runs, the reference for every rerun after an interrupt or a failure."""
    return {"inversion": clip["inversion"], "extraction": clip["corr"],
            "sampling": run_controlled_edit(tiny_sd15, clip)}


def assert_same_result(stage: str, a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{stage}: not bit-identical"
    else:
        assert_same_product(a, b)


# ------------------------------------------------------------------ 1. bad inputs

def tiny_flux():
    """A real ComfyUI Flux model (comfy.model_base.Flux, a DiT) with a tiny config; never run."""
    config = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 32, "context_in_dim": 32,
              "hidden_size": 32, "mlp_ratio": 2.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1,
              "axes_dim": [4, 6, 6], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True}
    model_config = comfy.supported_models.Flux(config)
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({}, device=CPU)
    return comfy.model_patcher.ModelPatcher(model, load_device=CPU, offload_device=CPU)


def write_frames(folder: Path, n: int, size: int = 64, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (size, size + n, 3), dtype=np.uint8)
    for i in range(n):
        Image.fromarray(np.ascontiguousarray(base[:, i:i + size])).save(folder / f"frame_{i:03d}.png")
    return folder


def write_mp4(path: Path, n: int = 8, size: int = 64) -> Path:
    """A small H.264 mp4 with its index (moov) at the end, as most cameras and encoders write it."""
    frames = np.random.default_rng(1).integers(0, 255, (n, size, size, 3), dtype=np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=20)
        stream.height = stream.width = size
        stream.pix_fmt = "yuv420p"
        for a in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def world(tiny_sd15, tiny_controlnet, clip, tmp_path_factory):
    """Everything the bad-input cases need: a second model, another clip's products, files, a Flux model."""
    folder = tmp_path_factory.mktemp("reliability")
    other = tiny_models.make_unet_model("sd15", seed=1)
    other_latent = random_latent(N, seed=22)
    other_inversion = inversion_runner.run_inversion(tiny_sd15, other_latent, clip["src"], STEPS, INVERSION_STEPS,
                                                     frame_batch=INVERSION_FRAME_BATCH)
    other_corr = extract(tiny_sd15, other_inversion, batch_size=2)
    other_model_corr = extract(other, inversion_runner.run_inversion(
        other, clip["latent"], clip["src"], STEPS, INVERSION_STEPS, frame_batch=INVERSION_FRAME_BATCH), batch_size=2)
    (x0_model,) = ModelSamplingDiscrete().patch(tiny_sd15, "x0", False)  # the core node, as a user would apply it
    mp4 = write_mp4(folder / "clip.mp4")
    truncated = folder / "truncated.mp4"
    truncated.write_bytes(mp4.read_bytes()[: mp4.stat().st_size // 2])
    bogus = folder / "notes.mp4"
    bogus.write_bytes(b"this is not a video, just some text saved with the wrong extension\n" * 20)
    return dict(
        model=tiny_sd15, other=other, flux=tiny_flux(), clip=clip, other_latent=other_latent,
        other_inversion=other_inversion, other_corr=other_corr, other_model_corr=other_model_corr, x0_model=x0_model,
        inversion_file=product_io.save_inversion(clip["inversion"], folder / "inversion.safetensors"),
        corr_file=product_io.save_correspondences(clip["corr"], folder / "corr.safetensors"),
        xl_pos=tiny_models.make_conditioning("sdxl", seed=12), frames=write_frames(folder / "frames", 4),
        mp4=mp4, truncated=truncated, bogus=bogus, controlnet=tiny_controlnet,
    )


def _invert(w, latent=None, model=None, cond=None, steps=STEPS, inversion_steps=INVERSION_STEPS):
    return inversion_runner.run_inversion(model or w["model"], latent if latent is not None else w["clip"]["latent"],
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
    ("model-flux-extraction", lambda w: extract(w["flux"], w["clip"]["inversion"]),
     ["model is Flux", "DiT", "Load an SD1.x/SD2.x/SDXL checkpoint"]),
    ("model-flux-sampler", lambda w: _edit(w, model=w["flux"]),
     ["model is Flux", "DiT", "Load an SD1.x/SD2.x/SDXL checkpoint"]),
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
    with UNetCalls(world["model"], world["other"], world["flux"]) as calls, ProgressHook(
            lambda *a, **k: progress.append(a)):
        with pytest.raises(ValueError) as raised:
            call(world)
    message = str(raised.value)
    for word in words:
        assert word in message, f"{word!r} missing from: {message}"
    assert calls.count == 0, f"{calls.count} UNet calls ran before the error"
    assert progress == [], "work was reported (progress) before the error"


# ------------------------------------------------------------------ 2. interruption

def _interrupt() -> None:
    comfy.model_management.interrupt_current_processing(True)


# UNet calls of one batch: an inversion or extraction batch is one call, a sampling batch two (source, edit).
BATCH_CALLS = {"inversion": 1, "extraction": 1, "sampling": 2}


@pytest.mark.parametrize("trigger", ["progress", "unet-call"])
@pytest.mark.parametrize("stage", list(STAGES))
def test_interrupt_stops_within_a_batch_and_leaves_nothing_behind(tiny_sd15, clip, clean, stage, trigger):
    model = tiny_sd15.clone()
    state = model_state(model)
    control = clip["control"]
    copies_before = len(control.copies)
    flagged_at: list[int] = []

    def set_flag_once(calls_so_far: int) -> None:
        if not flagged_at:
            flagged_at.append(calls_so_far)
            _interrupt()

    # "progress": after the first step (inversion) or batch (extraction, sampling) reports progress;
    # "unet-call": from inside the 3rd UNet call, in the middle of a step.
    on_call = (lambda i: set_flag_once(i) if i == 3 else None) if trigger == "unet-call" else None
    on_progress = (lambda *a, **k: set_flag_once(calls.count)) if trigger == "progress" else None
    try:
        with UNetCalls(model, on_call=on_call) as calls, ProgressHook(on_progress):
            with pytest.raises(Interrupted):
                STAGES[stage](model, clip)
    finally:
        comfy.model_management.interrupt_current_processing(False)
    assert flagged_at, "the interrupt was never triggered"
    after = calls.count - flagged_at[0]
    assert after <= BATCH_CALLS[stage], f"{after} UNet calls started after the interrupt"
    assert_clean(model, state, calls, control if stage == "sampling" else None, copies_before)
    with UNetCalls(model) as rerun_calls:
        again = STAGES[stage](model, clip)
    assert_same_result(stage, clean[stage], again)
    assert_clean(model, state, rerun_calls)


# ------------------------------------------------------------------ 3. determinism

EDITS = {
    "pnp": dict(editor="pnp"),
    "sdedit": dict(editor="sdedit"),
    "controlnet": dict(editor="controlnet", control=True),
    "pnp-controlnet": dict(editor="pnp", control=True),
    "pnp-extracted": dict(editor="pnp", extracted=True),
    "sdedit-extracted": dict(editor="sdedit", extracted=True),
    "controlnet-extracted": dict(editor="controlnet", control=True, extracted=True),
}


def test_inversion_and_extraction_are_deterministic(tiny_sd15, clip):
    for _ in range(2):
        assert_same_product(clip["inversion"], run_inversion(tiny_sd15, clip))
        assert_same_product(clip["corr"], run_extraction(tiny_sd15, clip))


@pytest.mark.parametrize("name", list(EDITS))
def test_every_editor_is_deterministic(tiny_sd15, clip, name):
    mode = dict(EDITS[name])
    control, extracted = mode.pop("control", False), mode.pop("extracted", False)
    pos, neg = (clip["cpos"], clip["cneg"]) if control else (clip["pos"], clip["neg"])
    corr = clip["corr"] if extracted else None
    first = edit(tiny_sd15, pos, neg, clip["inversion"], correspondences=corr, **mode)
    second = edit(tiny_sd15, pos, neg, clip["inversion"], correspondences=corr, **mode)
    assert torch.isfinite(first).all()
    assert torch.equal(first, second), f"{name}: two runs differ by {(first - second).abs().max()}"


# ------------------------------------------------------------------ 4. ComfyUI's cache through the real executor

class RecordingServer:
    """What PromptExecutor needs of PromptServer: send_sync (recorded) and a few attributes."""

    def __init__(self) -> None:
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata: dict = {}
        self.messages: list[tuple[str, dict]] = []
        self.current: str | None = None

    def send_sync(self, event, data, sid=None) -> None:
        self.messages.append((event, data))
        if event == "executing":
            self.current = data.get("node")

    def queue_updated(self) -> None:
        pass


@pytest.fixture
def executor_nodes(tiny_sd15, tiny_clip, tiny_vae, tmp_path):
    """Our nodes registered the way ComfyUI registers a V3 custom node pack, plus test-only stand-ins."""
    saved = {name: dict(getattr(comfy_nodes, name)) for name in
             ("NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "LOADED_MODULE_DIRS", "EXTENSION_WEB_DIRS")}
    modules_before = set(sys.modules)
    input_dir = folder_paths.get_input_directory()
    folder_paths.set_input_directory(str(tmp_path / "input"))  # the video combo lists this (empty) folder
    collected: list[torch.Tensor] = []

    class TinyCheckpointLoader:  # stands in for CheckpointLoaderSimple with the tiny SD1.x model, CLIP and VAE
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {}}

        RETURN_TYPES = ("MODEL", "CLIP", "VAE")
        FUNCTION = "load"
        CATEGORY = "testing"

        def load(self):
            return tiny_sd15, tiny_clip, tiny_vae

    class CollectImages:  # an output node that keeps what it receives
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"images": ("IMAGE",)}}

        RETURN_TYPES = ()
        FUNCTION = "collect"
        OUTPUT_NODE = True
        CATEGORY = "testing"

        def collect(self, images):
            collected.append(images.clone())
            return {"ui": {"frames": [int(images.shape[0])]}}

    try:
        assert asyncio.run(comfy_nodes.load_custom_node(str(REPO))), "ComfyUI could not load the pack"
        assert "TokenFlowSampler" in comfy_nodes.NODE_CLASS_MAPPINGS
        comfy_nodes.NODE_CLASS_MAPPINGS["TestTinyCheckpointLoader"] = TinyCheckpointLoader
        comfy_nodes.NODE_CLASS_MAPPINGS["TestCollectImages"] = CollectImages
        yield collected
    finally:
        folder_paths.set_input_directory(input_dir)
        for name, value in saved.items():
            mapping = getattr(comfy_nodes, name)
            mapping.clear()
            mapping.update(value)
        for name in set(sys.modules) - modules_before:
            if name.startswith(str(REPO)):
                del sys.modules[name]


def workflow(frames: Path, prompt: str) -> dict:
    return {
        "1": {"class_type": "TestTinyCheckpointLoader", "inputs": {}},
        "2": {"class_type": "TokenFlowLoadVideo", "inputs": {
            "video": "", "path": str(frames), "frame_load_cap": 0, "skip_first_frames": 0, "select_every_nth": 1,
            "width": 64, "height": 64, "size_multiple": 64}},
        "3": {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": ["1", 2]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a wolf", "clip": ["1", 1]}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["1", 1]}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "ugly, blurry, low res", "clip": ["1", 1]}},
        "7": {"class_type": "TokenFlowInvert", "inputs": {
            "model": ["1", 0], "latent": ["3", 0], "conditioning": ["4", 0], "steps": STEPS,
            "inversion_steps": INVERSION_STEPS, "frame_batch": 16}},
        "8": {"class_type": "TokenFlowExtractCorrespondences", "inputs": {
            "model": ["1", 0], "inversion": ["7", 0], "batch_size": 2, "keyframes": "random", "seed": 1}},
        "9": {"class_type": "TokenFlowSampler", "inputs": {
            "model": ["1", 0], "positive": ["5", 0], "negative": ["6", 0], "inversion": ["7", 0], "editor": "pnp",
            "cfg": 7.5, "pnp_attn_t": 0.5, "pnp_f_t": 0.8, "sdedit_start": 0.9, "batch_size": 2,
            "keyframes": "random", "seed": 1, "correspondences": ["8", 0]}},
        "10": {"class_type": "VAEDecode", "inputs": {"samples": ["9", 0], "vae": ["1", 2]}},
        "11": {"class_type": "TestCollectImages", "inputs": {"images": ["10", 0]}},
    }


def run_prompt(executor, server: RecordingServer, prompt: dict, unet_module) -> tuple[list, list, dict]:
    """Validate and execute like the server's prompt worker; returns (executed ids, cached ids, UNet calls per id)."""
    import execution

    prompt_id = str(uuid.uuid4())
    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    assert valid, (error, node_errors)
    server.messages.clear()
    per_node: dict[str, int] = {}

    def count(module, args, kwargs):
        per_node[server.current] = per_node.get(server.current, 0) + 1

    handle = unet_module.register_forward_pre_hook(count, with_kwargs=True)
    try:
        executor.execute(prompt, prompt_id, {"client_id": "reliability-test"}, outputs)
    finally:
        handle.remove()
    errors = [d for e, d in server.messages if e in ("execution_error", "execution_interrupted")]
    assert executor.success and not errors, errors
    executed = [d["node"] for e, d in server.messages if e == "executing" and d.get("node") is not None]
    cached = next(d["nodes"] for e, d in server.messages if e == "execution_cached")
    return executed, cached, per_node


def test_executor_cache_reuses_inversion_and_extraction(executor_nodes, tiny_sd15, tmp_path):
    import execution

    collected = executor_nodes
    frames = write_frames(tmp_path / "frames", 4)
    server = RecordingServer()
    executor = execution.PromptExecutor(server, cache_type=execution.CacheType.CLASSIC)
    unet = tiny_sd15.model.diffusion_model
    all_nodes = [str(i) for i in range(1, 12)]

    executed, cached, calls = run_prompt(executor, server, workflow(frames, "a robot wolf"), unet)
    assert sorted(executed, key=int) == all_nodes and cached == []
    assert set(calls) == {"7", "8", "9"} and all(calls.values()), calls

    executed, cached, calls_again = run_prompt(executor, server, workflow(frames, "a marble statue of a wolf"), unet)
    assert sorted(executed, key=int) == ["5", "9", "10", "11"], "only the edit prompt and what follows may re-run"
    assert {"7", "8"} <= set(cached), "inversion and extraction must come from the cache"
    assert calls_again == {"9": calls["9"]}, "the second run may only spend UNet calls in the sampler"

    executed, cached, calls_same = run_prompt(executor, server, workflow(frames, "a marble statue of a wolf"), unet)
    assert executed == [] and calls_same == {} and sorted(cached, key=int) == all_nodes

    assert len(collected) == 2 and collected[0].shape == (4, 64, 64, 3)
    assert not torch.equal(collected[0], collected[1]), "the new edit prompt changed nothing"
    for module in unet.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


# ------------------------------------------------------------------ 5. errors inside a pass

@pytest.mark.parametrize("cleanup_fails", [False, True], ids=["error", "error-and-failing-cleanup"])
def test_controlnet_error_inside_a_pass_surfaces_and_everything_is_cleaned(tiny_sd15, clip, clean, cleanup_fails,
                                                                            caplog):
    model = tiny_sd15.clone()
    state = model_state(model)
    control = clip["control"]
    control.get_control_calls = 0
    run_controlled_edit(model, clip)
    per_step = control.get_control_calls // STEPS
    copies_before = len(control.copies)
    control.get_control_calls, control.fail_at, control.fail_cleanup = 0, per_step + 1, cleanup_fails  # 2nd step
    try:
        with UNetCalls(model) as calls, caplog.at_level(logging.WARNING):
            with pytest.raises(RuntimeError) as raised:
                run_controlled_edit(model, clip)
    finally:
        control.fail_at, control.fail_cleanup = None, False
    assert type(raised.value) is RuntimeError and str(raised.value) == "ControlNet failed inside get_control"
    assert control.get_control_calls == per_step + 1, "the failure did not happen at the second step"
    if cleanup_fails:
        assert any("cleaning up a ControlNet copy failed" in r.getMessage() for r in caplog.records)
    assert_clean(model, state, calls, control, copies_before)
    with UNetCalls(model) as rerun_calls:
        assert torch.equal(run_controlled_edit(model, clip), clean["sampling"])
    assert_clean(model, state, rerun_calls)


class PatchFailure(Exception):
    pass


@pytest.mark.parametrize("stage", list(STAGES))
def test_model_patch_error_at_the_second_step_surfaces_and_everything_is_cleaned(tiny_sd15, clip, clean, stage):
    sigmas_seen: list[float] = []

    def failing_patch(n, extra):
        sigma = float(extra["sigmas"].flatten()[0])
        if sigma not in sigmas_seen:
            sigmas_seen.append(sigma)
        if len(sigmas_seen) == 2:
            raise PatchFailure(f"user patch failed at sigma {sigma:.4f}")
        return n

    patched = tiny_sd15.clone()
    patched.set_model_attn1_output_patch(failing_patch)
    state = model_state(patched)
    with UNetCalls(patched) as calls:
        with pytest.raises(PatchFailure, match=r"^user patch failed at sigma \d"):
            STAGES[stage](patched, clip)
    assert len(sigmas_seen) == 2
    assert_clean(patched, state, calls)
    if stage != "inversion":
        assert calls.banks, "no StepBank was seen: the failure happened outside the TokenFlow passes"
    with UNetCalls(tiny_sd15) as rerun_calls:
        again = STAGES[stage](tiny_sd15, clip)
    assert_same_result(stage, clean[stage], again)
    assert_clean(tiny_sd15, model_state(tiny_sd15), rerun_calls)
