"""Flux-dev inverts at guidance 1 and edits at the user's guidance (RF-Solver, FireFlow and Stable Flow invert at
guidance 1): the guidance of the inversion prompt reaches the diffusion model, the runner's graph and the Flux
example put FluxGuidance 1 on the inversion prompt and the user's on the edit prompt, and every example and the
runner name the inversion method explicitly.
"""
from __future__ import annotations

import argparse

import pytest
import torch

import tiny_dit_models
from comfy_extras.nodes_flux import FluxGuidance
from comfyui_tokenflow.engine.plan.settings import EditSettings
from comfyui_tokenflow.nodes.inversion_nodes import TokenFlowInvert
from comfyui_tokenflow.nodes.sampler_nodes import TokenFlowSampler
from example_specs import example_specs
from test_fixed_point_inversion import _runner


class GuidanceAtTheModel:
    """The ``guidance`` values entering the diffusion model's forward (a pre-hook with kwargs; removed on exit)."""

    def __init__(self, model) -> None:
        self.module = model.model.diffusion_model
        self.values: list[float] = []

    def _hook(self, module, args, kwargs) -> None:
        self.values += [float(v) for v in kwargs["guidance"].flatten()]

    def __enter__(self) -> "GuidanceAtTheModel":
        self.handle = self.module.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def _guided(seed: int, guidance: float) -> list:
    (cond,) = FluxGuidance.execute(tiny_dit_models.flux_conditioning(seed=seed, guidance=None), guidance).result
    return cond


def test_the_inversion_guidance_reaches_the_model_and_the_edit_keeps_its_own():
    flux = tiny_dit_models.make_flux_model(seed=0)
    latent = {"samples": torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.5}
    with GuidanceAtTheModel(flux) as seen:
        inversion, _ = TokenFlowInvert.execute(flux, latent, _guided(1, 1.0), 3, 3, 0, "fixed_point").result
    assert seen.values and set(seen.values) == {1.0}
    at_35, _ = TokenFlowInvert.execute(flux, latent, _guided(1, 3.5), 3, 3, 0, "fixed_point").result
    assert (at_35.inverted - inversion.inverted).abs().max() > 1e-4  # the guidance embedding is live: it matters
    with GuidanceAtTheModel(flux) as seen:
        TokenFlowSampler.execute(flux, _guided(2, 3.5), _guided(3, 3.5), inversion, "pnp", 1.0, 2, "random", 1,
                                 pnp_attn_t=0.5, pnp_f_t=0.8)
    # the source branch runs on the inversion prompt (guidance 1), the edit branch on the edit prompt (3.5)
    assert set(seen.values) == {1.0, 3.5}, sorted(set(seen.values))
    assert EditSettings().editor == "pnp"


def _runner_args(runner, *flags: str, video: str = "clip.mp4") -> argparse.Namespace:
    return runner.build_parser().parse_args(["--video", video, "--prompt", "p", "--checkpoint", "c.safetensors",
                                             *flags])


@pytest.mark.parametrize("guidance", [3.5, 5.0])
def test_the_runner_inverts_flux_dev_at_guidance_1_and_edits_at_the_users(guidance):
    runner = _runner()
    args = _runner_args(runner, "--guidance", str(guidance), "--inversion-method", "fixed_point")
    prompt, _ = runner.build_prompt(args, "clip.mp4", "c.safetensors", None, "out")
    runner.models.add_flux_dev_nodes(prompt, args.guidance, (64, 64))
    inversion_cond = prompt[prompt["7"]["inputs"]["conditioning"][0]]
    edit_cond = prompt[prompt["8"]["inputs"]["positive"][0]]
    assert inversion_cond["class_type"] == edit_cond["class_type"] == "FluxGuidance"
    assert inversion_cond["inputs"]["guidance"] == 1.0 and edit_cond["inputs"]["guidance"] == guidance
    assert inversion_cond["inputs"]["conditioning"] == ["4", 0] and edit_cond["inputs"]["conditioning"] == ["5", 0]


@pytest.mark.parametrize("flow,method", [(True, "fixed_point"), (False, "ddim")])
def test_the_runner_names_the_method_auto_stands_for(flow, method, tmp_path):
    runner = _runner()
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"")
    args = _runner_args(runner, video=str(video))
    assert args.inversion_method == "auto" and runner.checks.check_args(args) is None
    assert runner.models.resolve_inversion_method(args, flow) is None and args.inversion_method == method
    prompt, _ = runner.build_prompt(args, "clip.mp4", "c.safetensors", None, "out")
    assert prompt["7"]["inputs"]["method"] == method
    # auto on a --checkpoint may be ddim: the grid rule is refused before anything loads, and checked again for the
    # detected family (on a flow model --inversion-steps is not used)
    bad = _runner_args(runner, "--steps", "50", "--inversion-steps", "600", video=str(video))
    assert "--inversion-steps (600)" in runner.checks.check_args(bad)
    message = runner.models.resolve_inversion_method(bad, flow)
    assert (message is None) if flow else ("--inversion-steps (600)" in message and "\n" not in message), message


def _node(example, node_id: int):
    return next(n for n in example.nodes if n.id == node_id)


def _feeding(example, to_id: int, to_input: str):
    (source,) = [_node(example, a) for a, _, b, name in example.links if b == to_id and name == to_input]
    return source


def test_the_flux_example_inverts_at_guidance_1_and_every_example_names_its_method():
    examples = {e.name: e for e in example_specs()}
    flux = examples["tokenflow_flux"]
    inversion_guidance = _feeding(flux, 7, "conditioning")
    sampler = next(n for n in flux.nodes if n.type == "TokenFlowSampler")
    edit_guidance = _feeding(flux, sampler.id, "positive")
    assert inversion_guidance.type == edit_guidance.type == "FluxGuidance"
    assert inversion_guidance.widgets["guidance"] == 1.0 and edit_guidance.widgets["guidance"] == 3.5
    methods = {name: [n.widgets["method"] for n in e.nodes if n.type == "TokenFlowInvert"]
               for name, e in examples.items()}
    assert methods["tokenflow_flux"] == methods["tokenflow_sd3"] == ["fixed_point"]
    assert all(m == "ddim" for name, ms in methods.items() if name not in ("tokenflow_flux", "tokenflow_sd3")
               for m in ms) and all(methods.values())
