"""The editor registry is the one home of the editors' settings: the sampler's editor widgets and tooltip, the runner's
``--editor`` choices and flags and the defaults all come from the editors' declarations, and an editor is handed only
what it declared."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from comfyui_tokenflow.engine import editors
from comfyui_tokenflow.engine.plan.settings import EditSettings
from comfyui_tokenflow.nodes.sampler_nodes import TokenFlowSampler
from editor_plugins.attention_only import AttentionOnlyEditor
from tokenflow_helpers import conds, edit, invert, random_latent

REPO = Path(__file__).resolve().parents[1]


def _runner():
    sys.path.insert(0, str(REPO / "scripts"))  # the runner imports runner_support from beside itself
    try:
        spec = importlib.util.spec_from_file_location("tokenflow_edit_under_test", REPO / "scripts/tokenflow_edit.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO / "scripts"))
    return module


def test_the_sampler_widgets_come_from_the_declarations():
    inputs = {inp.id: inp for inp in TokenFlowSampler.define_schema().inputs}
    for editor in editors.EDITORS.values():
        assert f"{editor.name}: {editor.description}" in inputs["editor"].tooltip
        for declared in editor.inputs:
            widget = inputs[declared.name]
            assert (widget.default, widget.tooltip, widget.optional) == (declared.default, declared.tooltip,
                                                                           not declared.required)
    assert inputs["editor"].options == list(editors.EDITORS) and inputs["editor"].default == EditSettings().editor
    assert (inputs["cfg"].default, inputs["batch_size"].default, inputs["seed"].default) == (7.5, 8, 1)


def test_the_runner_flags_come_from_the_declarations():
    runner = _runner()
    args = runner.build_parser().parse_args([])
    assert args.editor == EditSettings().editor and args.cfg is None  # --cfg follows the detected family
    args.flux_route = False  # no --unet/--clip-l/--t5/--vae (the runner's main sets it)
    assert runner.models.resolve_family_settings(args, None, EditSettings().cfg) is None
    assert args.cfg == EditSettings().cfg  # not Flux: the sampler's default
    declared = [d for e in editors.EDITORS.values() for d in e.inputs]
    assert {d.name for d in declared} == {"pnp_attn_t", "pnp_f_t", "sdedit_start", "pnp_attention_blocks",
                                          "pnp_residual_blocks"}
    assert all(getattr(args, d.name) == d.default for d in declared)
    choices = next(a for a in runner.build_parser()._actions if a.dest == "editor").choices
    assert list(choices) == list(editors.EDITORS)
    args = runner.build_parser().parse_args(["--sdedit-start", "0.7", "--pnp-residual-blocks", "none"])
    prompt, _ = runner.build_prompt(args, "v.mp4", "c.safetensors", None, "p")
    sampler = prompt["8"]["inputs"]
    assert sampler["sdedit_start"] == 0.7 and sampler["pnp_residual_blocks"] == "none" and sampler["pnp_f_t"] == 0.8


def test_the_runner_takes_pnp_attn_t_from_the_familys_default_preset():
    """Unset, --pnp-attn-t is the published fraction of the family's default preset on Flux (rf_solver: 0.2, RF-Solver-
    Edit's demo), the editor's declared default elsewhere; given, it is kept."""
    runner = _runner()
    flux, sd3 = runner.models.Family("Flux", True, True, True), runner.models.Family("SD3", True)
    for family, argv, expected in ((flux, [], 0.2), (sd3, [], 0.5), (None, [], 0.5), (flux, ["--pnp-attn-t", "0.7"], 0.7)):
        args = runner.build_parser().parse_args(argv)
        args.flux_route = False
        assert runner.models.resolve_family_settings(args, family, EditSettings().cfg) is None
        assert args.pnp_attn_t == expected, (family, argv)


def test_an_editor_is_handed_only_what_it_declared(tiny_sd15):
    seen: list[dict] = []

    class Spy(AttentionOnlyEditor):
        name = "spy"

        def step_needs(self, timesteps_full, options, layout, unet):
            seen.append(dict(options))
            return super().step_needs(timesteps_full, options, layout, unet)

    editors.register_editor(Spy())
    try:
        src, pos, neg = conds(tiny_sd15)
        inversion = invert(tiny_sd15, random_latent(2), src, steps=2, inversion_steps=2)
        edit(tiny_sd15, pos, neg, inversion, editor="spy", pnp_attn_t=0.1, sdedit_start=0.5)
        edit(tiny_sd15, pos, neg, inversion, editor="spy", attention_only_t=0.25)
    finally:
        editors.unregister_editor("spy")
    assert seen == [{"attention_only_t": 0.5}, {"attention_only_t": 0.25}]  # its default, then the given value


def test_unknown_settings_and_taken_names_are_refused():
    with pytest.raises(TypeError, match="no registered editor declares"):
        EditSettings.of(editor="pnp", pnp_atn_t=0.5)

    class Clash(AttentionOnlyEditor):
        name = "clash"
        inputs = (editors.EditorSetting("pnp_f_t", float, 0.5, tooltip="t"),)

    with pytest.raises(ValueError, match="already declared by editor 'pnp'"):
        editors.register_editor(Clash())
