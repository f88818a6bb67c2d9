"""The door (engine/door.py): another custom node pack adds an editor without importing this pack, in a live ComfyUI.

``tests/door_pack`` is that second pack. It is loaded by the REAL server (``tests/server_harness.py``)
from a second ``custom_nodes`` folder that ComfyUI scans before (``is_default: true`` in an extra
paths file) or after the base directory's, where this pack is ``ComfyUI-TokenFlow``; its folder name
sorts before (``aaa_...``) or after (``zzz_...``) too. In both orders its editor is in the sampler's
``editor`` widget (after the built-in ones, its input appended last) and an edit through POST /prompt
runs with it; its second, faulty editor (an input named ``seed``) is left out with one logged line and the
sampler stays. The in-process tests check the door's dict itself.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

import input_files
import server_harness as harness
import workflow_format
from test_server_workflows import apply_test_overrides, expected_videos, load_example, read_video

REPO = Path(__file__).resolve().parents[1]
DOOR_PACK = REPO / "tests" / "door_pack"
EDITOR = "door_attention_only"


# -- in process --------------------------------------------------------------------------------------------------

def test_the_registry_is_the_door_dict_on_the_host_and_the_api_is_published():
    import comfy.model_patcher

    from comfyui_tokenflow.engine import door, editors
    from comfyui_tokenflow.nodes.sampler_nodes import TokenFlowSampler

    shared = vars(comfy.model_patcher)[door.ATTRIBUTE]
    assert shared["editors"] is editors.EDITORS and list(editors.EDITORS)[:3] == ["pnp", "sdedit", "controlnet"]
    api = shared["api"]
    assert api.StepNeeds is editors.StepNeeds and api.register_editor is editors.register_editor
    assert api.version == door.API_VERSION

    class Late:  # written straight into the dict after the pack loaded, as a later pack does
        name, description, inputs = "late_door_editor", "test", ()

    shared["editors"][Late.name] = Late()
    try:
        assert editors.get_editor(Late.name) is shared["editors"][Late.name]
        combo = next(i for i in TokenFlowSampler.define_schema().inputs if i.id == "editor")
        assert combo.options[-1] == Late.name and combo.options[:3] == ["pnp", "sdedit", "controlnet"]
    finally:
        editors.unregister_editor(Late.name)


# -- a real server, the door pack loaded before and after this pack ------------------------------------------------

@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory) -> dict:
    return input_files.write_tiny_model_files(tmp_path_factory.mktemp("door-models"))


@pytest.fixture(scope="module", params=["before", "after"])
def door_server(request, tmp_path_factory, tiny_files):
    order = request.param
    base = harness.make_base_dir(tmp_path_factory.mktemp(f"door-{order}"))
    input_files.write_test_clip(base / "input" / "wolf.mp4")
    other = base / "other_custom_nodes"
    other.mkdir()
    (other / f"{'aaa' if order == 'before' else 'zzz'}_tokenflow_door").symlink_to(DOOR_PACK, target_is_directory=True)
    paths = base / "door_paths.yaml"
    paths.write_text(f"door_pack:\n    base_path: {base.as_posix()}\n    is_default: {str(order == 'before').lower()}\n"
                     "    custom_nodes: other_custom_nodes\n", encoding="utf-8")
    server = harness.ComfyServer(base, extra_model_paths=tiny_files["extra_model_paths"], python=sys.executable,
                                 extra_args=["--extra-model-paths-config", str(paths)])
    try:
        server.start(timeout=240)
        server.order = order
        yield server
    finally:
        server.stop()


def test_a_second_pack_adds_an_editor_through_the_door_and_an_edit_runs_with_it(door_server, tiny_files):
    log = door_server.log_text()
    assert "IMPORT FAILED" not in log and "Traceback" not in log, log[-4000:]
    loaded = log.index("tokenflow door test pack: editor registered")
    expected = "not loaded yet" if door_server.order == "before" else "already loaded"
    assert log[loaded:].splitlines()[0].endswith(f"TokenFlow {expected}"), log[loaded:loaded + 200]

    info = door_server.object_info()
    sampler = info["TokenFlowSampler"]
    options = sampler["input"]["required"]["editor"][1]["options"] if len(sampler["input"]["required"]["editor"]) > 1 \
        and "options" in sampler["input"]["required"]["editor"][1] else sampler["input"]["required"]["editor"][0]
    assert list(options)[:3] == ["pnp", "sdedit", "controlnet"] and EDITOR in options, options
    assert "door_bad_seed" not in options  # its input named seed would have dropped the whole sampler
    assert door_server.log_text().count("editor 'door_bad_seed': input 'seed' is one of the TokenFlow Sampler's") == 1
    assert sampler["input_order"]["optional"][-1] == "door_attention_t"

    prompt = apply_test_overrides(workflow_format.ui_to_api(load_example("tokenflow_pnp"), info), tiny_files)
    node = next(n for n in prompt.values() if n["class_type"] == "TokenFlowSampler")
    node["inputs"].update(editor=EDITOR, door_attention_t=0.5)
    assert workflow_format.validate_api_prompt(prompt, info) == []
    entry = door_server.run_prompt(prompt, timeout=300)

    assert "door_attention_only planned 2 steps, q/k injected in 1" in door_server.log_text()
    videos = harness.output_files(entry, door_server.output_dir)
    for node_id, (frames, _fps) in expected_videos(prompt).items():
        (path,) = videos[node_id]
        assert read_video(path)[:3] == (frames, input_files.CLIP_SIZE, input_files.CLIP_SIZE)
