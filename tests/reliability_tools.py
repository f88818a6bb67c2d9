"""Instruments and the shared clip of the reliability tests, against the real host (no mock of the UNet,
ModelPatcher, sampler or attention).

Used by ``test_bad_inputs``, ``test_interrupts``, ``test_determinism``, ``test_executor_cache`` and
``test_errors_in_pass``:

* :class:`UNetCalls` counts forward calls of the diffusion models (a pre-hook) and keeps the TokenFlow
  StepBanks it sees; :class:`ProgressHook` installs a ComfyUI progress-bar hook;
  :class:`TrackedControlNet` is the real ControlNet, remembering its copies and failing on demand;
  :func:`assert_clean` checks nothing was left behind on the model, its modules, the banks or the
  ControlNet copies.
* :data:`STAGES` runs one stage (inversion, extraction, a PnP edit with a ControlNet) on the clip.
* :func:`make_clip` (a 3-frame clip, its inversion, correspondences and ControlNet conditioning) and
  :func:`clean_results` (the results of clean runs) back the module-scoped fixtures ``clip`` and
  ``clean`` of ``tests/conftest.py``: each test module gets its own.
"""
from __future__ import annotations

import copy

import torch

import comfy.controlnet
import comfy.utils
import nodes as comfy_nodes
from comfyui_tokenflow.engine.ddpm import invert as ddpm_invert
from comfyui_tokenflow.engine.patches import contract
from tokenflow_helpers import INVERSION_STEPS, STEPS, conds, edit, extract, random_latent

N = 3  # frames; batches of 2: a full batch and a short one
INVERSION_FRAME_BATCH = 2  # two UNet calls per inversion step, so an interrupt can land between them


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
        ctx = (kwargs.get("transformer_options") or {}).get(contract.KEY)
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
    return ddpm_invert.run_inversion(model, clip["latent"], clip["src"], STEPS, INVERSION_STEPS,
                                     frame_batch=INVERSION_FRAME_BATCH)


def run_extraction(model, clip):
    return extract(model, clip["inversion"], batch_size=2)


def run_controlled_edit(model, clip, editor="pnp"):
    """A PnP edit with a (tracked) ControlNet on both prompts: PnP hooks, banks and ControlNet copies all in play."""
    return edit(model, clip["cpos"], clip["cneg"], clip["inversion"], editor=editor, batch_size=2)


STAGES = {"inversion": run_inversion, "extraction": run_extraction, "sampling": run_controlled_edit}


def make_clip(tiny_sd15, tiny_controlnet) -> dict:
    """A 3-frame clip: its conditionings, inversion, correspondences and (tracked) ControlNet conditioning."""
    src, pos, neg = conds(tiny_sd15)
    latent = random_latent(N, seed=21)
    inversion = ddpm_invert.run_inversion(tiny_sd15, latent, src, STEPS, INVERSION_STEPS,
                                          frame_batch=INVERSION_FRAME_BATCH)
    control = tracked_controlnet(tiny_controlnet)
    cpos, cneg = apply_controlnet(pos, neg, control, hints(N))
    out = dict(src=src, pos=pos, neg=neg, latent=latent, inversion=inversion, control=control.state,
               cpos=cpos, cneg=cneg)
    out["corr"] = run_extraction(tiny_sd15, out)
    return out


def clean_results(tiny_sd15, clip) -> dict:
    """Results of clean runs, the reference for every rerun after an interrupt or a failure."""
    return {"inversion": clip["inversion"], "extraction": clip["corr"],
            "sampling": run_controlled_edit(tiny_sd15, clip)}


def assert_same_result(stage: str, a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{stage}: not bit-identical"
    else:
        assert_same_product(a, b)

