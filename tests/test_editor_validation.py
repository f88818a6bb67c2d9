"""Every editor is checked whenever the registry is read, however it got in (``engine/editors/validation.py``).

An editor registered with ``register_editor``, written into the door's dict after the pack loaded, or left there by a
pack that loaded before it: one with a required input, an input named like one of the TokenFlow Sampler's own or
another editor's, or needing a door API version this TokenFlow does not serve is left out with ONE logged line (the
editor, the input, the fix), and the sampler's schema still builds with its saved widget order and the other editors.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

import workflow_format
from comfyui_tokenflow.engine import door, editors
from comfyui_tokenflow.engine.editors.validation import RESERVED_INPUTS, SAMPLER_INPUTS
from comfyui_tokenflow.engine.plan.settings import EditSettings
from comfyui_tokenflow.nodes.sampler_nodes import TokenFlowSampler
from editor_plugins.attention_only import AttentionOnlyEditor
from editor_plugins.refused import editor, optional, required
from test_widget_positions import BEFORE
from tokenflow_helpers import conds, edit, invert, random_latent

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests/fixtures/sampler_workflow_before.json"
LEFT_OUT = "(the editor is left out)"
GOOD = AttentionOnlyEditor.name


@pytest.fixture
def shared(caplog):
    """The door's editor dict on the host with a good plug-in registered; restored as it was afterwards."""
    import comfy.model_patcher

    editors_dict = vars(comfy.model_patcher)[door.ATTRIBUTE]["editors"]
    saved = dict(editors_dict)
    editors.register_editor(AttentionOnlyEditor())
    caplog.set_level(logging.WARNING)
    try:
        yield editors_dict
    finally:
        editors_dict.clear()
        editors_dict.update(saved)


def refusals(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if LEFT_OUT in r.getMessage()]


def assert_sampler_intact(left_out: str) -> None:
    """The schema builds (ComfyUI's own validation included), without ``left_out``, with the good plug-in; every
    saved widget value maps to the input it did before."""
    schema = TokenFlowSampler.GET_SCHEMA()  # validates: repeated input ids raise here
    combo = next(i for i in schema.inputs if i.id == "editor")
    assert combo.options == ["pnp", "sdedit", "controlnet", GOOD] and left_out not in combo.options
    assert left_out not in combo.tooltip
    info = TokenFlowSampler.GET_NODE_INFO_V1()  # what /object_info serves
    assert workflow_format.widget_slots(info) == [(name, "value") for name in [*BEFORE, "attention_only_t"]]
    (node,) = [n for n in json.loads(FIXTURE.read_text())["nodes"] if n["type"] == "TokenFlowSampler"]
    mapped = workflow_format.ui_to_api({"nodes": [{**node, "inputs": []}], "links": []},
                                       {"TokenFlowSampler": info})[str(node["id"])]["inputs"]
    assert mapped == dict(zip(BEFORE, node["widgets_values"]))
    assert editors.get_editor(GOOD).name == GOOD
    with pytest.raises(ValueError, match=f"editor '{left_out}' is not available"):
        editors.get_editor(left_out)


def read_everything() -> None:
    """Every reader of the registry, twice: a refusal must still be logged once."""
    for _ in range(2):
        TokenFlowSampler.GET_NODE_INFO_V1()
        editors.stable_inputs(), editors.appended_inputs(), editors.editor_tooltip(), editors.editor_names()
        EditSettings.of(editor=GOOD, attention_only_t=0.3)


def test_the_reserved_names_are_the_samplers_own_inputs():
    declared = {d.id if hasattr(d, "id") else d.name for e in editors.usable_editors().values() for d in e.inputs}
    own = {i.id for i in TokenFlowSampler.define_schema().inputs} - declared
    assert own == SAMPLER_INPUTS
    assert set(EditSettings.__dataclass_fields__) <= RESERVED_INPUTS


def test_a_required_input_written_into_the_door_is_left_out(shared, caplog):
    shared["late_required"] = editor("late_required", required("late_required_t"))
    assert_sampler_intact("late_required")
    read_everything()
    (line,) = refusals(caplog)
    assert "editor 'late_required'" in line and "input 'late_required_t' must be optional" in line
    assert "optional=True" in line


@pytest.mark.parametrize("name", sorted(RESERVED_INPUTS))
def test_an_input_named_like_a_sampler_input_is_left_out(shared, caplog, name):
    key = f"late_{name}"
    shared[key] = editor(key, optional(name))
    assert_sampler_intact(key)
    read_everything()
    (line,) = refusals(caplog)
    assert f"editor '{key}': input '{name}' is one of the TokenFlow Sampler's own inputs" in line
    assert f"e.g. prefixed with the editor's name: {key}_{name}" in line


@pytest.mark.parametrize("taken, owner", [("attention_only_t", GOOD), ("pnp_f_t", "pnp"), ("sdedit_start", "sdedit")])
def test_an_input_of_another_editor_is_left_out(shared, caplog, taken, owner):
    key = f"late_clash_{owner}"
    shared[key] = editor(key, optional(taken))
    assert_sampler_intact(key)
    read_everything()
    (line,) = refusals(caplog)
    assert f"editor '{key}': input '{taken}' is already declared by editor '{owner}'" in line


def test_an_input_declared_twice_is_left_out(shared, caplog):
    shared["late_twice"] = editor("late_twice", optional("late_twice_t"), optional("late_twice_t"))
    assert_sampler_intact("late_twice")
    (line,) = refusals(caplog)
    assert "editor 'late_twice': input 'late_twice_t' is declared twice" in line


def test_an_editor_needing_another_door_api_version_is_skipped(shared, caplog):
    newer = door.API_VERSION + 1
    shared["late_newer"] = editor("late_newer", optional("late_newer_t"), api_version=newer)
    assert_sampler_intact("late_newer")
    read_everything()
    (line,) = refusals(caplog)
    assert f"editor 'late_newer' needs door API version {newer}" in line
    assert f"this TokenFlow's door is version {door.API_VERSION}" in line

    shared["late_current"] = editor("late_current", optional("late_current_t"), api_version=door.API_VERSION)
    assert editors.get_editor("late_current").name == "late_current"  # the version served: kept
    assert editors.appended_inputs()[-1].id == "late_current_t"


def test_an_api_version_that_is_not_an_int_is_skipped(shared, caplog):
    shared["late_text_version"] = editor("late_text_version", api_version="1")
    assert_sampler_intact("late_text_version")
    (line,) = refusals(caplog)
    assert "editor 'late_text_version': api_version must be an int" in line and "'1'" in line


def test_a_built_in_name_written_into_the_door_leaves_the_built_in_editor_in_place(shared, caplog):
    builtin = editors.get_editor("sdedit")
    shared["sdedit"] = editor("sdedit")  # no sdedit_start: would drop a saved widget
    schema = TokenFlowSampler.GET_SCHEMA()
    assert editors.get_editor("sdedit") is builtin and "sdedit_start" in [i.id for i in schema.inputs]
    assert workflow_format.widget_slots(TokenFlowSampler.GET_NODE_INFO_V1())[:len(BEFORE)] == [
        (name, "value") for name in BEFORE]
    read_everything()
    (line,) = refusals(caplog)
    assert "editor 'sdedit': the name of a built-in editor" in line and "a name of its own" in line


@pytest.mark.parametrize("bad, fragment", [
    (editor("reg_seed", optional("seed")), "input 'seed' is one of the TokenFlow Sampler's own inputs"),
    (editor("reg_required", required("reg_required_t")), "input 'reg_required_t' must be optional"),
    (editor("reg_clash", optional("attention_only_t")),
     f"input 'attention_only_t' is already declared by editor '{GOOD}'"),
    (editor("reg_newer", api_version=door.API_VERSION + 1), f"needs door API version {door.API_VERSION + 1}"),
    (editor("pnp"), "editor 'pnp': the name of a built-in editor"),
], ids=["seed", "required", "clash", "newer_api", "builtin_name"])
def test_register_editor_refuses_with_one_line(shared, caplog, bad, fragment):
    builtin = editors.get_editor("pnp")
    with pytest.raises(ValueError, match=fragment):
        editors.register_editor(bad)
    assert shared.get(bad.name) is (builtin if bad.name == "pnp" else None)
    read_everything()
    (line,) = refusals(caplog)
    assert fragment in line and f"editor '{bad.name}'" in line
    TokenFlowSampler.GET_SCHEMA()


def test_a_left_out_editors_input_is_no_setting(shared):
    shared["late_seedless"] = editor("late_seedless", optional("late_seedless_t"), required("late_seedless_r"))
    with pytest.raises(TypeError, match="no registered editor declares"):
        EditSettings.of(editor=GOOD, late_seedless_t=0.1)


def test_a_good_editor_still_runs_beside_a_bad_one(shared, tiny_sd15):
    shared["late_bad_seed"] = editor("late_bad_seed", optional("seed"))
    src, pos, neg = conds(tiny_sd15)
    inversion = invert(tiny_sd15, random_latent(2), src, steps=2, inversion_steps=2)
    trace: list = []
    edit(tiny_sd15, pos, neg, inversion, editor=GOOD, attention_only_t=1.0, trace=trace)
    assert [e for e in trace if e[1] == "attention"]  # the plug-in's own injections ran


BEFORE_LOAD = """
import json, logging, sys
sys.path[:0] = [{devkit!r}, {tests!r}]
import host_bootstrap
host_bootstrap.bootstrap(cpu=True, threads=1)
lines = []
handler = logging.Handler()
handler.emit = lambda record: lines.append(record.getMessage())
logging.getLogger().addHandler(handler)
import comfy.model_patcher
from editor_plugins.refused import editor, optional, required
door = vars(comfy.model_patcher).setdefault("tokenflow_door", {{}})
door.setdefault("editors", {{}}).update({{
    "early_seed": editor("early_seed", optional("seed")),
    "early_required": editor("early_required", required("early_required_t")),
    "early_newer": editor("early_newer", api_version=2 ** 20),
    "pnp": editor("pnp"),
    "early_good": editor("early_good", optional("early_good_t")),
}})
from comfyui_tokenflow.nodes.sampler_nodes import TokenFlowSampler
from comfyui_tokenflow.engine import editors
import workflow_format
for _ in range(3):
    schema = TokenFlowSampler.GET_SCHEMA()
    info = TokenFlowSampler.GET_NODE_INFO_V1()
print(json.dumps({{"options": next(i.options for i in schema.inputs if i.id == "editor"),
                   "slots": [name for name, _ in workflow_format.widget_slots(info)],
                   "pnp_builtin": type(editors.get_editor("pnp")).__name__,
                   "lines": [line for line in lines if {left_out!r} in line]}}))
"""


def test_editors_left_in_the_door_before_the_pack_loads_are_checked():
    from host_bootstrap import comfyui_path

    script = BEFORE_LOAD.format(devkit=str(REPO / "devkit"), tests=str(REPO / "tests"), left_out=LEFT_OUT)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COMFYUI_PATH": str(comfyui_path())})
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["options"] == ["pnp", "sdedit", "controlnet", "early_good"]
    assert result["slots"] == [*BEFORE, "early_good_t"] and result["pnp_builtin"] == "PlugAndPlayEditor"
    lines = sorted(result["lines"])
    assert len(lines) == 4, lines  # one each, although the registry was read many times
    assert "editor 'early_newer' needs door API version 1048576" in lines[0]
    assert "editor 'early_required': input 'early_required_t' must be optional" in lines[1]
    assert "editor 'early_seed': input 'seed' is one of the TokenFlow Sampler's own inputs" in lines[2]
    assert "editor 'pnp': the name of a built-in editor" in lines[3]
