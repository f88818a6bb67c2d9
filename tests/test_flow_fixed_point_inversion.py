"""Exact flow inversion on the editing grid (TokenFlowInvert's ``method`` fixed_point / auto on Flux and SD3).

The implicit Euler step against its closed form, one iteration against the Euler inversion on the editing grid,
round-trip reconstruction (the edit's own sampler run back) against Euler at 50 and 500 steps on tiny float64
Flux and SD3, the stopping rule and the cap, one model call per chunk and iteration within the cost bound, what
``auto`` and a saved ``ddim`` mean per family, refusals before any model call, and the product's file.
"""
from __future__ import annotations

import math

import pytest
import torch

import tiny_dit_models
from comfyui_tokenflow.data import product_io
from comfyui_tokenflow.engine.flow import edit as flow_edit, invert as flow_invert
from comfyui_tokenflow.engine.plan.settings import EditSettings
from comfyui_tokenflow.nodes import inversion_nodes
from comfyui_tokenflow.tokenflow_ops import fixed_point
from comfyui_tokenflow.tokenflow_ops.flow_inversion import euler_step, solve_flow_inversion_step
from test_step_grid import CountUNetCalls
from tokenflow_helpers import conds, random_latent

STEPS = 50


def _latent(n: int = 2, seed: int = 5) -> dict:
    return {"samples": torch.randn(n, 16, 8, 8, generator=torch.Generator().manual_seed(seed)) * 0.5}


@pytest.fixture(scope="module", params=["flux", "sd3"])
def world(request) -> dict:
    """A float64 tiny Flux / SD3 and its inversion prompt (Flux at guidance 1, as the examples invert)."""
    make, conditioning, _ = tiny_dit_models.DIT_FAMILIES[request.param]
    extra = {"guidance": 1.0} if request.param == "flux" else {}
    return dict(family=request.param, model=tiny_dit_models.float64_dit(make(seed=0)),
                src=conditioning(seed=1, dtype=torch.float64, **extra))


def _invert(world: dict, steps: int = STEPS, inversion_steps: int | None = None, latent=None, **kwargs):
    return flow_invert.run_inversion(world["model"], latent or _latent(), world["src"], steps,
                                     inversion_steps or steps, **kwargs)


def round_trip_psnr(model, inversion) -> float:
    """The round trip's PSNR in dB (peak: the source latents' range)."""
    rec = flow_invert.reconstruct(model, inversion).double()
    x0 = inversion.x0.double()
    return 10 * math.log10(float(x0.max() - x0.min()) ** 2 / float(((rec - x0) ** 2).mean()))


# ------------------------------------------------------------------ the pure step


def test_the_solver_finds_the_latent_the_euler_sampling_step_maps_back():
    """v(x) = a x + b: the implicit step x = x_next + (s - s_next)(a x + b) in closed form, and the explicit one."""
    g = torch.Generator().manual_seed(0)
    x_next, b = (torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64) for _ in range(2))
    a, s_next, s = 1.5, 0.3, 0.5  # contraction |a (s - s_next)| = 0.3
    solved = solve_flow_inversion_step(lambda x: a * x + b, x_next, s_next, s, max_iterations=20, tolerance=0.0)
    exact = (x_next + (s - s_next) * b) / (1 - a * (s - s_next))
    assert (solved.x - exact).abs().max() < 1e-9 * exact.abs().max()
    resampled = euler_step(solved.x, a * solved.x + b, s, s_next)  # the sampler's step from the solution
    assert (resampled - x_next).abs().max() < 1e-9 * x_next.abs().max()
    one = solve_flow_inversion_step(lambda x: a * x + b, x_next, s_next, s, max_iterations=1, tolerance=0.0)
    assert torch.equal(one.x, euler_step(x_next, a * x_next + b, s_next, s)) and one.residuals == []
    assert (one.x - exact).abs().max() > 1e-2  # the explicit step is not the inverse: the check can fail


# ------------------------------------------------------------------ through the real engine


def test_one_iteration_is_the_euler_inversion_on_the_editing_grid(world):
    euler = _invert(world, steps=5)
    one = _invert(world, steps=5, method="fixed_point", max_iterations=1)
    assert torch.equal(one.trajectory, euler.trajectory) and torch.equal(one.inverted, euler.inverted)
    assert (one.method, euler.method, one.inverted_timestep, one.inversion_steps) == ("fixed_point", "ddim", 801, 5)
    assert one.evaluations == [1.0] * 5 and one.residuals == [None] * 5 and euler.evaluations == []
    more = _invert(world, steps=5, method="fixed_point", max_iterations=4, tolerance=0.0)
    assert (more.trajectory - euler.trajectory).abs().max() > 1e-3  # more iterations do change the result


# Measured (benchmarks/README.md, 2 frames, 50 steps, float64): PSNR of the round trip, fixed point at the defaults
# against Euler 500 / Euler 50: Flux 45.3 / 20.1 / 22.7 dB, SD3 89.8 / 41.4 / 44.2 dB. Margin: 15 dB.
def test_fixed_point_reconstructs_far_better_than_euler_at_500_and_at_the_same_grid(world):
    model = world["model"]
    auto = _invert(world, method="auto")
    euler_500, euler_50 = _invert(world, inversion_steps=500), _invert(world)
    fp, e500, e50 = (round_trip_psnr(model, inv) for inv in (auto, euler_500, euler_50))
    assert auto.method == "fixed_point" and sum(auto.evaluations) / STEPS <= fixed_point.DEFAULT_MAX_ITERATIONS
    assert fp > e500 + 15 and fp > e50 + 15, (world["family"], fp, e500, e50)


def test_the_stopping_rule_and_the_cap(world, caplog):
    """On 25 steps (measured at k = 10: Flux's slowest step 2.8e-2, the others 1e-2 .. 3e-9; SD3 all below 3e-8, the
    float32 latents' rounding floor)."""
    steps = 25
    exact = _invert(world, steps=steps, method="fixed_point", max_iterations=3, tolerance=0.0)
    assert exact.evaluations == [3.0] * steps and all(r is not None for r in exact.residuals)
    loose = _invert(world, steps=steps, method="fixed_point", max_iterations=10, tolerance=0.5)
    assert loose.evaluations == [2.0] * steps  # the first residual exists after 2 evaluations and is below 0.5
    tight = _invert(world, steps=steps, method="fixed_point", max_iterations=20, tolerance=1e-6)
    for evaluations, residual in zip(tight.evaluations, tight.residuals):
        assert residual <= 1e-6 or evaluations == 20, tight.residuals
    assert max(tight.evaluations) > 2 and sum(tight.evaluations) < 10 * steps, tight.evaluations
    with caplog.at_level("WARNING"):
        capped = _invert(world, steps=steps, method="fixed_point", max_iterations=2, tolerance=1e-12)
    worst = max(range(steps), key=lambda i: capped.residuals[i])
    t = capped.timesteps[::-1][worst]  # the residuals run with the steps, sigma ascending
    assert f"{steps} of {steps} steps stopped at max_iterations (2)" in caplog.text, caplog.text
    assert f"at t = {t})" in caplog.text, caplog.text


def test_one_model_call_per_chunk_and_iteration_within_the_cost_bound(world):
    whole = _invert(world, steps=4, method="fixed_point", max_iterations=3, tolerance=0.0)
    with CountUNetCalls(world["model"]) as calls:
        chunked = _invert(world, steps=4, frame_batch=1, method="fixed_point", max_iterations=3, tolerance=0.0)
    assert calls.count == 2 * 3 * 4  # 2 chunks of 1 frame, 3 iterations, 4 steps
    # the same arithmetic per frame (float64 model): measured equal on the CPU; rounding allowed, as on the UNets
    assert (chunked.trajectory - whole.trajectory).abs().max() < 1e-9 * whole.trajectory.abs().max()
    with CountUNetCalls(world["model"]) as calls:
        default = _invert(world, steps=10, latent=_latent(3), method="auto")
    # at most 3 evaluations per frame and editing step (all 3 frames in one call per iteration)
    assert calls.count == sum(default.evaluations) <= 3 * 10


def test_an_edit_runs_from_a_fixed_point_inversion_and_its_file_loads(world, tmp_path):
    inv = _invert(world, steps=3, method="fixed_point", max_iterations=2)
    loaded = product_io.load_inversion(product_io.save_inversion(inv, tmp_path / "flow_fp.safetensors"))
    for name in ("method", "max_iterations", "tolerance", "evaluations", "residuals", "inverted_timestep", "family"):
        assert getattr(loaded, name) == getattr(inv, name), name
    assert torch.equal(loaded.trajectory, inv.trajectory)
    _, cond, cfg = tiny_dit_models.DIT_FAMILIES[world["family"]]
    pos, neg = (cond(seed=s, dtype=torch.float64) for s in (2, 3))
    out = flow_edit.run_edit(world["model"], pos, neg, loaded, EditSettings(cfg=cfg, batch_size=2))["samples"]
    assert out.shape == inv.x0.shape and torch.isfinite(out).all()


# ------------------------------------------------------------------ the method per family, refusals


def test_auto_is_the_default_and_resolves_per_family_and_a_saved_ddim_keeps_euler(tiny_sd15):
    flux, src = tiny_dit_models.make_flux_model(seed=0), tiny_dit_models.flux_conditioning(seed=1, guidance=1.0)
    node = inversion_nodes.TokenFlowInvert
    by_id = {i.id: i for i in node.define_schema().inputs}
    assert by_id["method"].default == "auto" and by_id["method"].options == ["ddim", "fixed_point", "auto"]
    unsaid, _ = node.execute(flux, _latent(), src, 4, 8).result  # a prompt without method
    auto, _ = node.execute(flux, _latent(), src, 4, 8, 0, "auto").result
    explicit = flow_invert.run_inversion(flux, _latent(), src, 4, 8, method="fixed_point")
    assert unsaid.method == auto.method == "fixed_point" and torch.equal(auto.trajectory, explicit.trajectory)
    assert torch.equal(unsaid.trajectory, auto.trajectory)
    saved_ddim, _ = node.execute(flux, _latent(), src, 4, 8, 0, "ddim").result
    euler = flow_invert.run_inversion(flux, _latent(), src, 4, 8)
    assert saved_ddim.method == "ddim" and saved_ddim.inversion_steps == 8 and saved_ddim.inverted_timestep == 876
    assert torch.equal(saved_ddim.trajectory, euler.trajectory)
    sd_src, _, _ = conds(tiny_sd15)
    latent = random_latent(1)
    unet_auto, _ = node.execute(tiny_sd15, latent, sd_src, 4, 8, 0, "auto").result
    unet_ddim, _ = node.execute(tiny_sd15, latent, sd_src, 4, 8, 0, "ddim").result
    assert unet_auto.method == "ddim" and torch.equal(unet_auto.trajectory, unet_ddim.trajectory)


@pytest.mark.parametrize("kwargs,name,works", [
    (dict(max_iterations=0), "max_iterations (0)", "use 3"),
    (dict(max_iterations=21), "max_iterations (21)", "use 3"),
    (dict(tolerance=-0.1), "tolerance (-0.1)", "use 0.001"),
    (dict(tolerance=1.0), "tolerance (1.0)", "use 0.001"),
    (dict(method="newton"), "method ('newton')", "fixed_point"),
    (dict(steps=1000), "steps (1000)", "steps = 999"),
])
@pytest.mark.parametrize("method", ["auto", "fixed_point"])
def test_bad_settings_are_refused_before_any_model_call(kwargs, name, works, method):
    flux = tiny_dit_models.make_flux_model(seed=0)
    args = dict(steps=4, inversion_steps=8, frame_batch=0, method=method, max_iterations=3, tolerance=1e-3)
    args.update(kwargs)
    with CountUNetCalls(flux) as calls, pytest.raises(ValueError) as raised:
        inversion_nodes.TokenFlowInvert.execute(flux, _latent(1), tiny_dit_models.flux_conditioning(seed=1), **args)
    message = str(raised.value)
    assert calls.count == 0 and message.startswith(name) and works in message and "\n" not in message, message


def test_the_euler_grid_rule_still_holds_for_a_saved_ddim_and_not_for_fixed_point():
    flux = tiny_dit_models.make_flux_model(seed=0)
    src = tiny_dit_models.flux_conditioning(seed=1)
    with CountUNetCalls(flux) as calls, pytest.raises(ValueError, match=r"inversion_steps \(600\)"):
        flow_invert.run_inversion(flux, _latent(1), src, 50, 600, method="ddim")
    assert calls.count == 0
    flow_invert.check_inversion_settings(50, 600, "auto", 3, 1e-3)  # inversion_steps is not used: nothing to refuse

