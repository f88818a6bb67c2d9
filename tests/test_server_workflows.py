"""The pack inside a REAL ComfyUI server, the example workflows end to end, and the headless runner.

One ComfyUI server (``tests/server_harness.py``) is started per test session, on 127.0.0.1 only,
with ``--cpu --use-pytorch-cross-attention``, a temporary ``--base-directory`` whose
``custom_nodes/`` links this repo (as ``ComfyUI-TokenFlow``) and the test-only
``tests/stand_in_nodes`` pack, and ``--extra-model-paths-config`` pointing at tiny random-weight
model FILES written by ``tests/stand_in_nodes/tiny_files.py``. The real core ``CheckpointLoaderSimple``
and ``ControlNetLoader`` load them (the stand-in pack only registers the tiny SD1.x config so the
checkpoint's family is detected). It is always stopped at the end of the session.

The test clip is ``input/wolf.mp4`` of the temporary base dir: the first 6 frames of
``$TOKENFLOW_TEST_VIDEOS/wolf.mp4`` (default ``/work/shared/videos``) at 64x64, 20 fps, or a
synthetic 6-frame clip when that file is missing, so the example workflows keep their video name.

Every ``example_workflows/*.json`` is converted from UI format to an API prompt with the widget
order from ``/object_info``, then these TEST-TIME OVERRIDES are applied (the shipped files keep
the official settings):

* ``CheckpointLoaderSimple.ckpt_name`` / ``ControlNetLoader.control_net_name``: the tiny files;
* ``TokenFlowLoadVideo``: ``width = height = 64``; ``frame_load_cap = 5`` (3 for loaders with
  ``select_every_nth > 1``); ``select_every_nth = min(value, 2)``;
* ``TokenFlowInvert``: ``steps = 2``, ``inversion_steps = 4``, ``frame_batch = 2``;
* ``TokenFlowExtractCorrespondences`` / ``TokenFlowSampler``: ``batch_size = 2`` (several batches,
  the last one shorter);
* ``KSampler`` / ``KSamplerAdvanced``: ``steps = 2``.

Each prompt is validated against ``/object_info`` (types, names, ranges, choices), queued with
POST /prompt, and every saved mp4 listed in ``/history`` is read back with PyAV: frame count, size
and fps must be what the loader feeding its Create Video produced. The converted prompts and the
videos are copied to ``test-artifacts/server_workflows/``.
"""
from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import pytest

import example_specs
import input_files
import server_harness as harness
import workflow_format

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(p.stem for p in (REPO / "example_workflows").glob("*.json"))
EXPECTED_EXAMPLES = ["baselines", "tokenflow_controlnet", "tokenflow_pnp", "tokenflow_sdedit"]  # the SD ones
# The Flux example (core Flux loaders, cfg 1) and the SD3.5 one run in tests/test_dit_server.py, on the tiny Flux
# (its loaders swapped for one checkpoint) and the tiny SD3 checkpoint.
ALL_EXAMPLES = sorted(EXPECTED_EXAMPLES + ["tokenflow_flux", "tokenflow_sd3"])
VIDEO_DIR, CLIP_FRAMES, CLIP_SIZE, CLIP_FPS = (input_files.VIDEO_DIR, input_files.CLIP_FRAMES, input_files.CLIP_SIZE,
                                              input_files.CLIP_FPS)
PROMPT_TIMEOUT = 300.0

# The stable contract: node id -> (required inputs in order, optional inputs, output types).
CONTRACT = {
    "TokenFlowLoadVideo": (
        ["video", "frame_load_cap", "skip_first_frames", "select_every_nth", "width", "height", "size_multiple"],
        ["path"], ["IMAGE", "INT", "FLOAT"]),
    "TokenFlowInvert": (["model", "latent", "conditioning", "steps", "inversion_steps"], ["frame_batch"],
                        ["TOKENFLOW_INVERSION", "LATENT"]),
    "TokenFlowExtractCorrespondences": (
        ["model", "inversion", "batch_size", "keyframes", "seed"],
        ["blend", "max_keyframes", "preview_frame", "source_images"], ["TOKENFLOW_CORRESPONDENCES", "IMAGE"]),
    "TokenFlowKeyframeJointEdit": (["model"], [], ["MODEL"]),
    "TokenFlowSampler": (
        ["model", "positive", "negative", "inversion", "editor", "cfg", "pnp_attn_t", "pnp_f_t", "sdedit_start",
         "batch_size", "keyframes", "seed"],
        ["correspondences", "blend", "max_keyframes", "steps", "pnp_attention_blocks", "pnp_residual_blocks"],
        ["LATENT"]),
    "TokenFlowTemporalConsistency": (["edited_frames", "source_frames"], ["flow_preset"], ["FLOAT", "FLOAT", "IMAGE"]),
}


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_model_files(tmp_path_factory) -> dict:
    return input_files.write_tiny_model_files(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory, tiny_model_files):
    base = harness.make_base_dir(tmp_path_factory.mktemp("comfy-base"))
    input_files.write_test_clip(base / "input" / "wolf.mp4")
    server = harness.ComfyServer(base, extra_model_paths=tiny_model_files["extra_model_paths"], python=sys.executable)
    try:
        server.start(timeout=180)
        server.startup_log = server.log_text()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def object_info(comfy_server) -> dict:
    return comfy_server.object_info()


@pytest.fixture(scope="session")
def artifacts(test_artifacts) -> Path:
    path = test_artifacts / "server_workflows"
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_example(name: str) -> dict:
    return json.loads((REPO / "example_workflows" / f"{name}.json").read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------------
# overrides and expectations
# --------------------------------------------------------------------------------------------

def apply_test_overrides(prompt: dict, tiny: dict) -> dict:
    """The documented test-time overrides (module docstring), in place; returns ``prompt``."""
    for node in prompt.values():
        inputs, kind = node["inputs"], node["class_type"]
        if kind == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = tiny["checkpoint_name"]
        elif kind == "ControlNetLoader":
            inputs["control_net_name"] = tiny["controlnet_name"]
        elif kind == "TokenFlowLoadVideo":
            strided = inputs.get("select_every_nth", 1) > 1
            inputs.update(width=CLIP_SIZE, height=CLIP_SIZE, frame_load_cap=3 if strided else 5,
                          select_every_nth=min(inputs.get("select_every_nth", 1), 2))
        elif kind == "TokenFlowInvert":
            inputs.update(steps=2, inversion_steps=4, frame_batch=2)
        elif kind in ("TokenFlowExtractCorrespondences", "TokenFlowSampler"):
            inputs["batch_size"] = 2
        elif kind in ("KSampler", "KSamplerAdvanced"):
            inputs["steps"] = 2
    return prompt


def expected_videos(prompt: dict) -> dict[str, tuple[int, float]]:
    """SaveVideo node id -> (frames, fps) from the TokenFlowLoadVideo whose fps feeds its Create Video."""
    expected = {}
    for node_id, node in prompt.items():
        if node["class_type"] != "SaveVideo":
            continue
        create = prompt[node["inputs"]["video"][0]]
        assert create["class_type"] == "CreateVideo", f"SaveVideo {node_id} is not fed by Create Video"
        fps_link = create["inputs"]["fps"]
        assert isinstance(fps_link, list), "Create Video's fps must come from the loader"
        loader = prompt[fps_link[0]]["inputs"]
        available = math.ceil(max(CLIP_FRAMES - loader["skip_first_frames"], 0) / loader["select_every_nth"])
        frames = min(loader["frame_load_cap"] or available, available)
        expected[node_id] = (frames, CLIP_FPS / loader["select_every_nth"])
    return expected


def check_consistency_texts(prompt: dict, history_entry: dict) -> dict[str, float]:
    """Every warp-error node's two numbers reach a Preview Any node, whose UI message (what the frontend shows on
    the canvas) carries the number as text. Returns Preview Any node id -> the number shown."""
    shown = {}
    for node_id, node in prompt.items():
        if node["class_type"] != "TokenFlowTemporalConsistency":
            continue
        feeds = {preview["inputs"]["source"][1]: preview_id for preview_id, preview in prompt.items()
                 if preview["class_type"] == "PreviewAny" and str(preview["inputs"]["source"][0]) == node_id}
        assert sorted(feeds) == [0, 1], f"warp-error node {node_id}: outputs {sorted(feeds)} shown, expected 0 and 1"
        for slot, preview_id in feeds.items():
            (text,) = history_entry["outputs"][preview_id]["text"]
            shown[preview_id] = float(text)
            assert math.isfinite(shown[preview_id]) and (slot == 0 or 0.0 <= shown[preview_id] <= 1.0), text
    assert shown, "no warp-error node in the prompt"
    return shown


def read_video(path: Path) -> tuple[int, int, int, Fraction]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        return frames, stream.width, stream.height, stream.average_rate


# --------------------------------------------------------------------------------------------
# the server and the pack
# --------------------------------------------------------------------------------------------

def test_object_info_lists_every_tokenflow_node(object_info):
    for node_id, (required, optional, outputs) in CONTRACT.items():
        assert node_id in object_info, f"{node_id} missing from /object_info"
        info = object_info[node_id]
        assert info["input_order"]["required"] == required, node_id
        assert set(optional) <= set(info["input_order"].get("optional", [])), node_id
        assert info["output"] == outputs, node_id
    pack_nodes = {k: v for k, v in object_info.items() if harness.PACK_DIR_NAME in v.get("python_module", "")}
    assert set(CONTRACT) <= set(pack_nodes)
    for node_id, info in pack_nodes.items():  # every node of the pack, also ones added later
        assert info["category"] == "TokenFlow", node_id
        assert info["display_name"] and info["description"], node_id
        for category in ("required", "optional"):
            for name, spec in info["input"].get(category, {}).items():
                options = spec[1] if len(spec) > 1 else {}
                assert options.get("tooltip", "").strip(), f"{node_id}.{name} has no tooltip"
        assert len(info["output_tooltips"]) == len(info["output"]) and all(info["output_tooltips"]), node_id


def test_server_log_has_no_import_errors_for_the_pack(comfy_server):
    log = comfy_server.startup_log
    assert "Import times for custom nodes" in log
    pack_lines = [line for line in log.splitlines() if harness.PACK_DIR_NAME in line]
    assert pack_lines and not any("IMPORT FAILED" in line for line in pack_lines), "\n".join(pack_lines)
    for bad in ("Cannot import", "Traceback", "IMPORT FAILED", "Error while calling comfy_entrypoint"):
        assert bad not in log, f"{bad!r} in the server log:\n{log[-4000:]}"


def test_example_workflows_are_offered_as_templates(comfy_server):
    assert EXAMPLES == ALL_EXAMPLES
    templates = comfy_server.get_json("/workflow_templates")
    assert sorted(templates.get(harness.PACK_DIR_NAME, [])) == ALL_EXAMPLES
    for name in ALL_EXAMPLES:
        base = f"/api/workflow_templates/{harness.PACK_DIR_NAME}/{name}"
        assert comfy_server.get_json(base + ".json") == load_example(name)
        status, body = comfy_server.request(base + ".jpg")  # the frontend asks for <name>.jpg
        assert status == 200 and body[:3] == b"\xff\xd8\xff", f"{name}.jpg not served as a JPEG"


def test_thumbnails_and_readme_give_the_reading_order_and_a_one_line_caption(tmp_path):
    """The template browser shows a pack's examples by file name and thumbnail only, in the server's file order."""
    from workflow_builder import write_thumbnail

    specs = example_specs.example_specs()
    assert specs[0].name == "tokenflow_pnp"  # the paper's setting first
    assert [ex.thumbnail[0].split(".")[0] for ex in specs] == [str(i) for i in range(1, len(specs) + 1)]
    for ex in specs:
        title, caption = ex.thumbnail
        assert ("checked on tiny models only" in caption) == (ex.name in ("tokenflow_flux", "tokenflow_sd3")), caption
        assert "SD" in caption or "Flux" in caption, f"{ex.name}: the caption names no model: {caption}"
        write_thumbnail(tmp_path / f"{ex.name}.jpg", title, caption, video=None)  # one line each, else ValueError
    with pytest.raises(ValueError, match="does not fit one line"):
        write_thumbnail(tmp_path / "long.jpg", "title", "a caption far longer than one line of the thumbnail " * 2,
                        video=None)
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    listed = re.findall(r"^\d+\. `(\w+)\.json`", readme.split("### Example workflows", 1)[1], re.M)
    assert listed == [ex.name for ex in specs], listed


@pytest.mark.parametrize("name", EXPECTED_EXAMPLES)
def test_example_workflow_loads_in_the_frontend_format(object_info, name):
    from PIL import Image

    workflow = load_example(name)
    assert workflow_format.check_ui_workflow(workflow, object_info) == []
    with Image.open(REPO / "example_workflows" / f"{name}.jpg") as thumb:
        assert thumb.format == "JPEG" and 256 <= thumb.width <= 1024 and 192 <= thumb.height <= 1024
    prompt = workflow_format.ui_to_api(workflow, object_info)
    samplers = [n["inputs"] for n in prompt.values() if n["class_type"] == "TokenFlowSampler"]
    inversions = [n["inputs"] for n in prompt.values() if n["class_type"] == "TokenFlowInvert"]
    texts = {n["inputs"]["text"] for n in prompt.values() if n["class_type"] == "CLIPTextEncode"}
    assert samplers and inversions
    for s in samplers:  # the official defaults
        assert (s["cfg"], s["pnp_attn_t"], s["pnp_f_t"], s["batch_size"], s["sdedit_start"]) == (7.5, 0.5, 0.8, 8, 0.9)
        assert s["editor"] == {"tokenflow_sdedit": "sdedit", "tokenflow_controlnet": "controlnet"}.get(name, "pnp")
    assert all((i["steps"], i["inversion_steps"]) == (50, 500) for i in inversions)
    assert {example_specs.EDIT_PROMPT, example_specs.NEGATIVE_PROMPT, example_specs.INVERSION_PROMPT} <= texts
    loaders = [n["inputs"] for n in prompt.values() if n["class_type"] == "TokenFlowLoadVideo"]
    assert all(loader["video"] == "wolf.mp4" for loader in loaders)
    assert expected_videos(prompt)  # every Save Video gets its fps from the loader


def _frame_holds(group: dict, node: dict) -> bool:
    x, y, w, h = group["bounding"]
    (nx, ny), (nw, nh) = node["pos"], node["size"]
    return x <= nx and nx + nw <= x + w and y <= ny - 30 and ny + nh <= y + h  # 30: the node's title bar


def _overlap(a: dict, b: dict) -> bool:
    (ax, ay, aw, ah), (bx, by, bw, bh) = a["bounding"], b["bounding"]
    return ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah


@pytest.mark.parametrize("name", EXPECTED_EXAMPLES)
def test_example_reads_in_groups_with_forward_wires_and_a_note_that_matches_it(name):
    workflow = load_example(name)
    nodes = {n["id"]: n for n in workflow["nodes"]}
    groups = workflow["groups"]
    stages = [g["title"].split(":")[0].split(" (")[0] for g in groups]
    assert set(stages) == {"Load", "Invert", "Edit", "Output"}, stages
    for node in nodes.values():  # every node in exactly one group, the note outside them
        frames = [g["title"] for g in groups if _frame_holds(g, node)]
        assert len(frames) == (0 if node["type"] == "MarkdownNote" else 1), (node["id"], node["type"], frames)
    assert not [(a["title"], b["title"]) for i, a in enumerate(groups) for b in groups[i + 1:] if _overlap(a, b)]
    for link in workflow["links"]:  # wires run forward (left to right), never doubling back
        src, dst = nodes[link[1]], nodes[link[3]]
        assert src["pos"][0] + src["size"][0] < dst["pos"][0], (name, link)
    note = " ".join(n["widgets_values"][0] for n in nodes.values() if n["type"] == "MarkdownNote")
    sampler = next(n for n in nodes.values() if n["type"] == "TokenFlowSampler")
    connected = any(i["name"] == "correspondences" and i["link"] is not None for i in sampler["inputs"])
    if connected:
        assert "**extracted**" in note and "connected to the sampler" in note and "on the fly**" not in note
    else:  # the official setting
        assert "on the fly" in note and "unconnected" in note and "**extracted**" not in note
    assert connected == (name in ("tokenflow_sdedit", "tokenflow_controlnet"))
    assert "500 inversion steps are the official code's" in note and "the paper used 1000" in note
    assert "paper's setting" not in note and "github.com/omerbt/TokenFlow" in note


@pytest.mark.parametrize("name", EXPECTED_EXAMPLES)
def test_example_workflow_runs_on_the_server(comfy_server, object_info, tiny_model_files, artifacts, name):
    prompt = apply_test_overrides(workflow_format.ui_to_api(load_example(name), object_info), tiny_model_files)
    (artifacts / f"{name}.api.json").write_text(json.dumps(prompt, indent=2), encoding="utf-8")
    assert workflow_format.validate_api_prompt(prompt, object_info) == []
    expected = expected_videos(prompt)

    entry = comfy_server.run_prompt(prompt, timeout=PROMPT_TIMEOUT)

    videos = harness.output_files(entry, comfy_server.output_dir)
    assert set(videos) == set(expected), f"videos from nodes {sorted(videos)}, expected {sorted(expected)}"
    for node_id, (frames, fps) in expected.items():
        (path,) = videos[node_id]
        assert path.suffix == ".mp4" and path.is_file()
        shutil.copy(path, artifacts / f"{name}_{prompt[node_id]['inputs']['filename_prefix'].split('/')[-1]}.mp4")
        assert read_video(path) == (frames, CLIP_SIZE, CLIP_SIZE, Fraction(fps).limit_denominator(1000)), path
    check_consistency_texts(prompt, entry)


def test_server_refuses_an_out_of_range_widget(comfy_server, object_info, tiny_model_files):
    prompt = apply_test_overrides(workflow_format.ui_to_api(load_example("tokenflow_pnp"), object_info), tiny_model_files)
    invert = next(n for n in prompt.values() if n["class_type"] == "TokenFlowInvert")
    invert["inputs"]["inversion_steps"] = 5000
    assert any("inversion_steps" in p for p in workflow_format.validate_api_prompt(prompt, object_info))
    status, body = comfy_server.request("/prompt", {"prompt": prompt})
    assert status == 400 and b"inversion_steps" in body


# --------------------------------------------------------------------------------------------
# the headless runner (scripts/tokenflow_edit.py, scripts/run.sh)
# --------------------------------------------------------------------------------------------

RUNNER = REPO / "scripts" / "tokenflow_edit.py"


def _runner_env() -> dict:
    return harness.runner_env()


def test_runner_without_checkpoint_says_what_to_pass(tmp_path):
    result = subprocess.run([sys.executable, str(RUNNER), "--video", str(tmp_path / "x.mp4"), "--prompt", "a robot"],
                            capture_output=True, text=True, timeout=60, env=_runner_env())
    assert result.returncode == 2
    assert "--checkpoint" in result.stderr and "models/checkpoints" in result.stderr
    assert "https://huggingface.co/" in result.stderr and "v2-1_512-ema-pruned.safetensors" in result.stderr
    # the README's main-job command answers the same, after setting up the host
    result = subprocess.run(["bash", str(REPO / "scripts" / "run.sh")], capture_output=True, text=True, timeout=300,
                            env=_runner_env())
    assert result.returncode == 2 and "--checkpoint" in result.stderr


def test_runner_edits_a_clip_end_to_end(tmp_path, tiny_model_files, artifacts):
    clip = tmp_path / "clip.mp4"
    input_files.write_test_clip(clip)
    output = tmp_path / "out" / "edited.mp4"
    command = [sys.executable, str(RUNNER), "--video", str(clip), "--prompt", "a shiny silver robotic wolf",
               "--inversion-prompt", "a wolf", "--checkpoint", str(tiny_model_files["checkpoint"]),
               "--output", str(output), "--steps", "2", "--inversion-steps", "4", "--batch-size", "2",
               "--frames", "5", "--width", "64", "--height", "64", "--cpu",
               "--extra-nodes", str(REPO / "tests" / "stand_in_nodes")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=PROMPT_TIMEOUT, env=_runner_env())
    assert result.returncode == 0, f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-5000:]}"
    assert "TokenFlow Inversion: DDIM inversion, 4 steps" in result.stdout and "TokenFlow Sampler" in result.stdout
    assert f"wrote {output}" in result.stdout
    shutil.copy(output, artifacts / "headless_runner.mp4")
    assert read_video(output) == (5, CLIP_SIZE, CLIP_SIZE, Fraction(CLIP_FPS))
