"""The step-grid rule and the 1000-step limit, one check, through the real nodes.

Editing timesteps lie on the inversion grid iff ``1000 // inversion_steps`` divides ``1000 // steps``
and the inversion grid reaches the first editing timestep; a count of 1000 would index t = 1000 of a
1000-entry schedule and is refused by name (999 is the largest that works). Every refusal happens
before any UNet call and names both inputs and values that fit.
"""
from __future__ import annotations

import pytest
import torch

import comfy.model_management
from comfyui_tokenflow.nodes import inversion_nodes, sampler_nodes
from comfyui_tokenflow.tokenflow_ops import schedule
from tokenflow_helpers import conds, invert, random_latent

Interrupted = comfy.model_management.InterruptProcessingException


class CountUNetCalls:
    """Counts forward calls of the real diffusion model (a pre-hook, removed on exit); can interrupt at call n."""

    def __init__(self, model, interrupt_at: int | None = None) -> None:
        self.module = model.model.diffusion_model
        self.interrupt_at = interrupt_at
        self.count = 0

    def _hook(self, module, args) -> None:
        self.count += 1
        if self.count == self.interrupt_at:
            comfy.model_management.interrupt_current_processing(True)

    def __enter__(self) -> "CountUNetCalls":
        self.handle = self.module.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()
        comfy.model_management.interrupt_current_processing(False)


def _rule(steps: int, inversion_steps: int) -> bool:
    """The rule as the docs state it."""
    r_edit, r_inv = 1000 // steps, 1000 // inversion_steps
    return steps == 1 or (r_edit % r_inv == 0 and (steps - 1) * r_edit <= (inversion_steps - 1) * r_inv)


@pytest.fixture(scope="module")
def inputs(tiny_sd15):
    src, pos, neg = conds(tiny_sd15)
    return dict(latent=random_latent(1, seed=5), src=src, pos=pos, neg=neg)


def _invert_node(model, inputs, steps, inversion_steps):
    return inversion_nodes.TokenFlowInvert.execute(model, inputs["latent"], inputs["src"], steps, inversion_steps,
                                                   frame_batch=1)


# ------------------------------------------------------------------ the rule itself

def test_documented_rule_is_exactly_grid_membership():
    pairs = [(s, i) for s in list(range(1, 41)) + [48, 49, 50, 99, 100, 250, 333, 500, 999]
             for i in range(1, schedule.MAX_STEPS + 1, 3)]
    for s, i in pairs:
        on_grid = set(schedule.editing_timesteps(s)) <= set(schedule.inversion_timesteps(i))
        assert schedule.grid_covers(s, i) == on_grid == _rule(s, i), (s, i)
    # divisibility alone is not enough: 1 divides 20, but a 600-step grid stops at t = 600 < 981
    assert not schedule.grid_covers(50, 600) and schedule.grid_covers(50, 999)


def test_every_count_up_to_1000_works_or_is_refused_by_name():
    for count in range(1, 1001):
        try:
            schedule.check_step_count(count, "inversion_steps")
        except ValueError as e:
            assert count == 1000, count
            assert "inversion_steps (1000)" in str(e) and "inversion_steps = 999 or less" in str(e)
            continue
        assert max(schedule.leading_timesteps(count)) <= 999, count  # inside the 1000-entry schedule
    with pytest.raises(ValueError, match="use at most 999 steps"):  # the grid itself never indexes past 999
        schedule.leading_timesteps(1000)


@pytest.mark.parametrize("steps,inversion_steps,fit_inversion,fit_steps",
                         [(4, 12, "8 or 20", "6"), (10, 30, "20 or 39", "15"), (8, 24, "8 or 39", "24")])
def test_message_names_both_inputs_and_values_that_fit(steps, inversion_steps, fit_inversion, fit_steps):
    with pytest.raises(ValueError) as raised:
        schedule.check_inversion_covers(steps, inversion_steps)
    message = str(raised.value)
    for words in (f"steps ({steps})", f"inversion_steps ({inversion_steps})",
                  f"1000 // inversion_steps ({1000 // inversion_steps}) divides 1000 // steps ({1000 // steps})",
                  f"Set inversion_steps to {fit_inversion} for steps = {steps}",
                  f"or steps to {fit_steps} for inversion_steps = {inversion_steps}"):
        assert words in message, f"{words!r} missing from: {message}"
    for suggestion in map(int, fit_inversion.split(" or ")):
        schedule.check_inversion_covers(steps, suggestion)
    for suggestion in map(int, fit_steps.split(" or ")):
        schedule.check_inversion_covers(suggestion, inversion_steps)


# ------------------------------------------------------------------ through the real nodes

@pytest.mark.parametrize("steps,inversion_steps", [(4, 12), (10, 30), (8, 24), (50, 600)])
def test_invert_node_refuses_off_grid_pairs_before_any_unet_call(tiny_sd15, inputs, steps, inversion_steps):
    with CountUNetCalls(tiny_sd15) as calls, pytest.raises(ValueError) as raised:
        _invert_node(tiny_sd15, inputs, steps, inversion_steps)
    message = str(raised.value)
    assert f"steps ({steps})" in message and f"inversion_steps ({inversion_steps})" in message, message
    assert "Set inversion_steps to" in message and "or steps to" in message, message
    assert calls.count == 0


@pytest.mark.parametrize("steps,inversion_steps,name", [(50, 1000, "inversion_steps"), (1000, 1000, "steps"),
                                                        (1000, 500, "steps")])
def test_invert_node_refuses_1000_by_name_before_any_unet_call(tiny_sd15, inputs, steps, inversion_steps, name):
    with CountUNetCalls(tiny_sd15) as calls, pytest.raises(ValueError) as raised:  # not a raw IndexError
        _invert_node(tiny_sd15, inputs, steps, inversion_steps)
    message = str(raised.value)
    assert f"{name} (1000) is too many" in message and f"Use {name} = 999 or less" in message, message
    assert calls.count == 0


@pytest.mark.parametrize("inversion_steps", [50, 100])
def test_invert_node_accepts_pairs_on_the_grid(tiny_sd15, inputs, inversion_steps):
    with CountUNetCalls(tiny_sd15) as calls:
        inversion, latent = _invert_node(tiny_sd15, inputs, 50, inversion_steps).result
    assert calls.count == inversion_steps  # one UNet call per inversion step (1 frame)
    assert inversion.timesteps == schedule.editing_timesteps(50) and inversion.trajectory.shape[0] == 50
    assert torch.isfinite(inversion.trajectory).all() and torch.isfinite(latent["samples"]).all()


@pytest.mark.parametrize("steps,inversion_steps", [(50, 500), (999, 999), (1, 999)])
def test_invert_node_starts_the_long_inversions(tiny_sd15, inputs, steps, inversion_steps):
    """500 (official) and 999 (the finest grid) pass every check and reach the UNet; interrupted there to save time."""
    with CountUNetCalls(tiny_sd15, interrupt_at=2) as calls, pytest.raises(Interrupted):
        _invert_node(tiny_sd15, inputs, steps, inversion_steps)
    assert calls.count == 2


@pytest.fixture(scope="module")
def inversion5(tiny_sd15, inputs):
    return invert(tiny_sd15, inputs["latent"], inputs["src"], steps=5, inversion_steps=10)


def _sample(model, inputs, inversion, steps):
    return sampler_nodes.TokenFlowSampler.execute(model=model, positive=inputs["pos"], negative=inputs["neg"],
                                                  inversion=inversion, editor="pnp", cfg=7.5, pnp_attn_t=0.5,
                                                  pnp_f_t=0.8, sdedit_start=0.9, batch_size=1, keyframes="random",
                                                  seed=1, steps=steps)


@pytest.mark.parametrize("steps,words", [
    (3, ["steps (3)", "the inversion's steps (5)", "or steps to 5 for the inversion's steps = 5",
         "sampler steps 0 uses the inversion's count"]),
    (4, ["steps (4)", "the inversion's steps (5)", "sampler steps 0 uses the inversion's count"]),
    (1000, ["steps (1000) is too many", "Use steps = 999 or less"]),
])
def test_sampler_refuses_steps_off_the_inversion_grid_before_any_unet_call(tiny_sd15, inputs, inversion5, steps,
                                                                           words):
    with CountUNetCalls(tiny_sd15) as calls, pytest.raises(ValueError) as raised:
        _sample(tiny_sd15, inputs, inversion5, steps)
    for word in words:
        assert word in str(raised.value), f"{word!r} missing from: {raised.value}"
    assert calls.count == 0


def test_sampler_accepts_steps_on_the_grid_and_a_refusal_leaves_no_trace(tiny_sd15, inputs, inversion5):
    clean = _sample(tiny_sd15, inputs, inversion5, 0).result[0]["samples"]
    with pytest.raises(ValueError):
        _sample(tiny_sd15, inputs, inversion5, 3)
    again = _sample(tiny_sd15, inputs, inversion5, 5).result[0]["samples"]
    assert torch.equal(clean, again)
    assert _sample(tiny_sd15, inputs, inversion5, 1).result[0]["samples"].shape == clean.shape  # 1 divides all


# ------------------------------------------------------------------ SDEdit's start

def _sdedit_timesteps_seen(model, inputs, inversion, start: float) -> tuple[torch.Tensor, list[int]]:
    """The edit of the sampler node with SDEdit at ``start``, and the timesteps the UNet was called at."""
    seen: list[int] = []

    def record(module, args, kwargs):
        t = args[1] if len(args) > 1 else kwargs["timesteps"]
        seen.extend(round(float(v)) for v in t.flatten())

    handle = model.model.diffusion_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        (latent,) = sampler_nodes.TokenFlowSampler.execute(
            model=model, positive=inputs["pos"], negative=inputs["neg"], inversion=inversion, editor="sdedit",
            cfg=7.5, pnp_attn_t=0.5, pnp_f_t=0.8, sdedit_start=start, batch_size=1, keyframes="random", seed=1).args
    finally:
        handle.remove()
    return latent["samples"], sorted(set(seen))


def test_a_start_below_2_over_steps_keeps_the_last_step_and_says_so(tiny_sd15, inputs, inversion5, caplog):
    """sdedit_start 0.3 of 5 steps: the official slice timesteps[int(1 - 1.5):] = timesteps[0:] would start from full
    noise (t = 801); the edit keeps the last step (t = 1), the one sdedit_start 0.4 = 2 / steps keeps, and says so."""
    with caplog.at_level("WARNING"):
        clamped, seen = _sdedit_timesteps_seen(tiny_sd15, inputs, inversion5, 0.3)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == ["TokenFlow: sdedit_start 0.3 with 5 steps is below 2 / steps: the official slice would keep "
                        "every step and start the edit from full noise; using sdedit_start 0.4 (2 / steps) instead: "
                        "the last step only, from timestep 1"]
    assert seen == [1]
    caplog.clear()
    named, named_seen = _sdedit_timesteps_seen(tiny_sd15, inputs, inversion5, 0.4)
    assert named_seen == [1] and torch.equal(clamped, named) and not caplog.records
    assert _sdedit_timesteps_seen(tiny_sd15, inputs, inversion5, 0.6)[1] == [1, 201]  # the official slice above it


def test_sdedit_timesteps_keep_the_official_slice_except_where_it_keeps_every_step():
    assert schedule.sdedit_timesteps(50, 0.04) == [1] == schedule.sdedit_timesteps(50, 0.01)
    assert schedule.sdedit_timesteps(50, 0.06) == [21, 1] and len(schedule.sdedit_timesteps(50, 1.0)) == 49
    assert schedule.sdedit_timesteps(1, 0.5) == [1]  # one step: nothing to keep but it
    assert [schedule.sdedit_keeps_every_step(50, s) for s in (0.01, 0.039, 0.04)] == [True, True, False]
