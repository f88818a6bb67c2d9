"""Saved workflows store widget values by position: the TokenFlow Sampler's must map to the same inputs as before
its editor inputs came from the editor registry.

``BEFORE`` is the contract: the widget order of the sampler's schema before the change (required inputs, then
optional ones, link-only inputs skipped, no control_after_generate slot: the seed's is off), hard-coded here.
The frontend maps ``widgets_values`` with the same order as :func:`workflow_format.widget_slots`.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import workflow_format
from comfyui_tokenflow.engine import editors
from comfyui_tokenflow.nodes.sampler_nodes import TokenFlowSampler
from editor_plugins.attention_only import AttentionOnlyEditor

REPO = Path(__file__).resolve().parents[1]
BEFORE = ["editor", "cfg", "pnp_attn_t", "pnp_f_t", "sdedit_start", "batch_size", "keyframes", "seed", "blend",
          "max_keyframes", "steps", "pnp_attention_blocks", "pnp_residual_blocks"]
WORKFLOWS = sorted((REPO / "example_workflows").glob("*.json")) + [REPO / "tests/fixtures/sampler_workflow_before.json"]


def _slots() -> list[tuple[str | None, str]]:
    return workflow_format.widget_slots(TokenFlowSampler.GET_NODE_INFO_V1())


def _samplers(path: Path) -> list[dict]:
    return [n for n in json.loads(path.read_text())["nodes"] if n["type"] == "TokenFlowSampler"]


def test_the_sampler_widgets_keep_their_positions():
    assert _slots() == [(name, "value") for name in BEFORE]


def test_a_plugin_editor_only_appends_widgets():
    editors.register_editor(AttentionOnlyEditor())
    try:
        assert _slots() == [(name, "value") for name in BEFORE] + [("attention_only_t", "value")]
    finally:
        editors.unregister_editor(AttentionOnlyEditor.name)


def test_a_plugin_editor_cannot_insert_a_required_input():
    class Pushy(AttentionOnlyEditor):
        name = "pushy"
        inputs = (editors.EditorSetting("pushy_t", float, 0.5, tooltip="t", required=True),)

    with pytest.raises(ValueError, match="must be optional"):
        editors.register_editor(Pushy())
    assert "pushy" not in editors.EDITORS


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_saved_widget_values_map_to_the_same_inputs(path: Path):
    info = {"TokenFlowSampler": TokenFlowSampler.GET_NODE_INFO_V1()}
    for node in _samplers(path):
        values = node["widgets_values"]
        assert len(values) == len(BEFORE), f"{path.name}: {len(values)} values"
        workflow = {"nodes": [{**node, "inputs": []}], "links": []}
        mapped = workflow_format.ui_to_api(workflow, info)[str(node["id"])]["inputs"]
        assert mapped == dict(zip(BEFORE, values)), path.name


def test_the_pre_change_fixture_is_discriminating():
    (node,) = _samplers(REPO / "tests/fixtures/sampler_workflow_before.json")
    values = node["widgets_values"]
    assert len(set(map(repr, values))) == len(values)  # every position holds a value of its own
