"""PnP injection presets of the flow transformers (values of pnp_attention_blocks): the blocks each names, the
tensors it injects there (seen in the attention calls of a real edit), block lists with suffixes, refusals.

The tiny Flux here has 4 double and 8 single blocks, so that scaling a preset from Flux-dev's 19 / 38 blocks
gives different blocks for each preset.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import tiny_dit_models
from comfyui_tokenflow.engine.families import FLOW, ModelLayout, dit
from comfyui_tokenflow.engine.families.block_lists import parse_attention_injection, parse_block_list
from comfyui_tokenflow.engine.families.registry import check_supported
from comfyui_tokenflow.engine.flow.edit import run_edit as run_flow_edit
from comfyui_tokenflow.engine.flow.invert import run_inversion as run_flow_inversion
from comfyui_tokenflow.engine.patches.contract import Phase, pass_of
from comfyui_tokenflow.engine.plan.settings import EditSettings
from reliability_tools import UNetCalls

STEPS, INVERSION_STEPS = 4, 8
SCRIPTS = str(Path(__file__).resolve().parents[1] / "scripts")


def _vital_layers_script():
    """scripts/find_vital_layers.py as a module (its siblings runner_models / runner_support beside it)."""
    sys.path.insert(0, SCRIPTS)
    try:
        import find_vital_layers
    finally:
        sys.path.remove(SCRIPTS)
    return find_vital_layers


def _keys(double: int, single: int) -> tuple:
    return (tuple(("double_block", i, 0) for i in range(double))
            + tuple(("single_block", i, 0) for i in range(single)))


def _flux_layout(double: int, single: int) -> ModelLayout:
    keys = _keys(double, single)
    return ModelLayout("flux", "flow", keys, dit.FLUX.pnp_attention(keys), (), sampling=FLOW, adapter=dit.FLUX)


FLUX_DEV = _flux_layout(19, 38)


def test_flux_dev_presets_are_the_published_blocks():
    rf_solver = parse_attention_injection("rf_solver", FLUX_DEV)
    assert rf_solver == {("single_block", i, 0): "v" for i in range(20, 38)}
    assert parse_attention_injection("auto", FLUX_DEV) == rf_solver  # auto is the family's default preset
    stable_flow = parse_attention_injection("stable_flow", FLUX_DEV)
    assert stable_flow == {**{("double_block", i, 0): "kv" for i in (0, 1, 17, 18)},
                           **{("single_block", i, 0): "kv" for i in (6, 9, 34, 35, 37)}}


def test_presets_scale_to_the_models_block_count():
    small = _flux_layout(4, 8)
    assert parse_block_list("rf_solver", small, ()) == tuple(("single_block", i, 0) for i in range(4, 8))  # 20/38 on
    # Stable Flow's layers at their relative depth: double 0,1 -> 0; 17,18 -> 3; single 6,9 -> 1; 34,35,37 -> 7.
    assert parse_block_list("stable_flow", small, ()) == (("double_block", 0, 0), ("double_block", 3, 0),
                                                          ("single_block", 1, 0), ("single_block", 7, 0))


def test_block_list_suffixes_choose_what_is_injected():
    small = _flux_layout(4, 8)
    assert parse_attention_injection("single_block:6-7", small) == {("single_block", 6, 0): "v",
                                                                    ("single_block", 7, 0): "v"}  # Flux's default: V
    assert parse_attention_injection("double_block:1:kv; single_block:2:v", small) == {
        ("double_block", 1, 0): "kv", ("single_block", 2, 0): "v"}
    with pytest.raises(ValueError, match=r"^pnp_attention_blocks: cannot read 'single_block:2:q'; write e.g. "):
        parse_attention_injection("single_block:2:q", small)
    with pytest.raises(ValueError, match="single_block 2 is given twice, injecting 'v' and 'kv'; name it once"):
        parse_attention_injection("single_block:2:v, single_block:1-3:kv", small)


def test_a_suffix_is_refused_on_an_sd_unet(tiny_sd15):
    layout = check_supported(tiny_sd15)
    assert parse_attention_injection("output:4-11", layout) == dict.fromkeys(layout.default_pnp_attention, "")
    with pytest.raises(ValueError, match=r"'output:4-11:kv': the sd1/sd2 UNet injects the source's queries and keys.*"
                                         r"write 'output:4-11'$"):
        parse_attention_injection("output:4-11:kv", layout)


def test_the_printed_list_of_find_vital_layers_is_the_preset_it_replaces():
    find_vital_layers = _vital_layers_script()
    for layout in (FLUX_DEV, _flux_layout(4, 8)):
        preset = parse_attention_injection("stable_flow", layout)
        printed = find_vital_layers.as_block_list([b[:2] for b in preset])
        assert parse_attention_injection(printed, layout) == preset, printed
    assert find_vital_layers.as_block_list([("single_block", 9), ("double_block", 0), ("double_block", 1),
                                            ("single_block", 6)]) == "double_block:0-1:kv, single_block:6:kv, " \
                                                                     "single_block:9:kv"


# -- in a real edit: what reaches the attention kernel ----------------------------------------------------------------

@pytest.fixture(scope="module", params=["flux", "sd3"])
def world(request):
    make, conditioning, cfg = tiny_dit_models.DIT_FAMILIES[request.param]
    sizes = {"depth": 4, "depth_single_blocks": 8} if request.param == "flux" else {}
    model = tiny_dit_models.float64_dit(make(seed=0, **sizes))
    src, pos, neg = (conditioning(seed=s, dtype=torch.float64) for s in (1, 2, 3))
    frames = torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.5
    inversion = run_flow_inversion(model, {"samples": frames}, src, STEPS, INVERSION_STEPS)
    return dict(family=request.param, model=model, pos=pos, neg=neg, cfg=cfg, inversion=inversion,
                layout=check_supported(model, sampling=FLOW))


def _edit(world, model=None, **settings):
    settings = EditSettings.of(cfg=world["cfg"], batch_size=2, editor="pnp", **settings)
    return run_flow_edit(model or world["model"], world["pos"], world["neg"], world["inversion"], settings)["samples"]


class KernelCalls:
    """An attention override applied before TokenFlow (as a kernel-swap node would be): every attention TokenFlow
    computes passes through it. Keeps, per step and block, the keyframe pass's calls' q, k, v."""

    def __init__(self) -> None:
        self.calls: dict[tuple, list] = {}
        self.banks: list = []  # one StepBank per step, held so that no later bank takes an earlier one's id

    def __deepcopy__(self, memo) -> "KernelCalls":
        return self  # ModelPatcher.clone deep-copies model_options: every clone records here

    def __call__(self, func, q, k, v, heads, *args, **kwargs):
        ctx = pass_of(kwargs.get("transformer_options"))
        tag = ctx.dit_block if ctx is not None else None
        if tag is not None and ctx.phase is Phase.KEYFRAMES:
            step = next((i for i, bank in enumerate(self.banks) if bank is ctx.bank), len(self.banks))
            if step == len(self.banks):
                self.banks.append(ctx.bank)
            self.calls.setdefault((step, (*tag["block"], tag["calls"] - 1)), []).append((q, k, v))
        return func(q, k, v, heads, *args, **kwargs)

    def injected(self, keyframes: int) -> dict[tuple, str]:
        """Per (step, block): which of the source's image keys / values the edit's image queries attended to."""
        found = {}
        for key, calls in self.calls.items():
            _, k_src, v_src = next(c for c in calls if c[0].shape[2] == c[1].shape[2])  # the source's own attention
            tokens = k_src.shape[2]
            _, k_ext, v_ext = next(c for c in calls if c[1].shape[2] == keyframes * tokens)  # the edit's extended one
            n_img = next(c for c in calls if c[1].shape[2] == keyframes * tokens)[0].shape[2]

            def same(ext, src):
                src_img = src[:, :, -n_img:].transpose(0, 1).reshape(src.shape[1], keyframes * n_img, -1)
                return all(torch.equal(row[:, -keyframes * n_img:], src_img) for row in ext)
            found[key] = "k" * same(k_ext, k_src) + "v" * same(v_ext, v_src)
        return found


@pytest.mark.parametrize("value", ["auto", "rf_solver", "stable_flow", "double_block:0:v, single_block:5-6:kv",
                                   "double_block:1:v", "none"])
def test_each_value_injects_exactly_its_blocks_and_tensors(world, value):
    if world["family"] == "sd3" and value in ("rf_solver", "stable_flow") or \
            world["family"] == "flux" and value == "double_block:1:v":
        pytest.skip("not a value of this family")
    if world["family"] == "sd3" and "single_block" in value:
        value = "double_block:0:v, double_block:1:kv"
    expected = parse_attention_injection(value, world["layout"])
    if world["family"] == "sd3" and value == "auto":
        assert expected == {("double_block", 1, 0): "kv"}  # the heuristic: the second quarter's joint attention
    if value == "auto" and world["family"] == "flux":
        assert expected == {("single_block", i, 0): "v" for i in range(4, 8)}
    model = world["model"].clone()
    calls = KernelCalls()
    model.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = calls
    _edit(world, model, pnp_attn_t=1.0, pnp_attention_blocks=value)
    seen = calls.injected(keyframes=2)
    assert {block for _, block in seen} == set(world["layout"].transformer_blocks)
    # From the second step on the edit's own image tokens differ from the source's: equal ones were injected.
    for step in range(1, STEPS):
        at_step = {block: what for (s, block), what in seen.items() if s == step}
        assert at_step == {block: expected.get(block, "") for block in world["layout"].transformer_blocks}, step


def test_a_list_injects_as_the_preset_it_names(world):
    if world["family"] != "flux":
        pytest.skip("Flux has named presets")
    find_vital_layers = _vital_layers_script()
    for preset in ("rf_solver", "stable_flow"):
        injection = parse_attention_injection(preset, world["layout"])
        printed = find_vital_layers.as_block_list([b[:2] for b in injection], *set(injection.values()))
        assert torch.equal(_edit(world, pnp_attention_blocks=printed), _edit(world, pnp_attention_blocks=preset))
    assert torch.equal(_edit(world, pnp_attention_blocks="single_block:4-7"), _edit(world))  # no suffix: Flux's V


@pytest.mark.parametrize("value, words", [
    ("stable_flow", "'stable_flow' (a flux preset) is not a value for this sd3 model"),
    ("vital", "'vital' is not a value for this sd3 model"),
    ("double_block:0:qk", "cannot read 'double_block:0:qk'"),
])
def test_a_value_the_family_lacks_is_refused_before_any_model_call(world, value, words):
    if world["family"] != "sd3":
        pytest.skip("refusals on SD3 (Flux's own values are its presets)")
    with UNetCalls(world["model"]) as calls, pytest.raises(ValueError) as raised:
        _edit(world, pnp_attention_blocks=value)
    message = str(raised.value)
    assert message.startswith("pnp_attention_blocks: ") and words in message and "\n" not in message
    assert "'auto', 'none'" in message and "double_block:1" in message, message  # the values that work
    assert calls.count == 0


def test_the_flux_example_uses_the_default_presets_published_fraction():
    import example_specs
    from comfyui_tokenflow.engine.families.injection_presets import RF_SOLVER

    flux = next(e for e in example_specs.example_specs() if e.name == "tokenflow_flux")
    sampler = next(n for n in flux.nodes if n.type == "TokenFlowSampler")
    assert sampler.widgets["pnp_attn_t"] == RF_SOLVER.fraction == 0.2
    assert sampler.widgets["pnp_attention_blocks"] == "auto" and dit.FLUX.pnp_attention is RF_SOLVER.blocks
