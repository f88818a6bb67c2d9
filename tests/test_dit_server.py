"""The Flux and SD3.5 example workflows (``example_workflows/tokenflow_flux.json``, ``tokenflow_sd3.json``) in a
REAL ComfyUI server.

The example uses the core Flux loaders (UNETLoader ``flux1-dev.safetensors``, DualCLIPLoader
``clip_l`` + ``t5xxl_fp16`` type flux, VAELoader ``ae``). DualCLIPLoader cannot load a tiny text
encoder: for type flux it always builds ``comfy.text_encoders.flux.FluxClipModel`` from the fixed
T5-XXL config (``t5_config_xxl.json``, d_model 4096, 24 layers) and CLIP-L config, with no option
for other widths (``comfy/sd.py`` ``load_text_encoder_state_dicts``). So the run here swaps the three
loaders for one ``CheckpointLoaderSimple`` (MODEL, CLIP, VAE from slots 0, 1, 2) loading the tiny
all-in-one Flux checkpoint of ``tests/stand_in_nodes/tiny_files.py``, which ComfyUI detects as the
stand-in ``TinyFlux`` config (``tests/stand_in_nodes/__init__.py``), the way the SD server tests
load their tiny checkpoint. Every other node of the example runs as shipped, with the test-time
sizes of ``tests/test_server_workflows.py`` (``apply_test_overrides``); ModelSamplingFlux's width / height
come from the loaded frames (Get Image Size), so they are the test frames'.

The SD3.5 example loads one all-in-one checkpoint through ``CheckpointLoaderSimple``, as ComfyUI's own SD3.5
template does; the run here only points its ``ckpt_name`` at the tiny all-in-one SD3 checkpoint (stand-in
``TinySD3``), the way the SD examples run on the tiny SD1.5 one.

One server per module (its own base dir and model paths: the tiny Flux and SD3 checkpoints), stopped at the end.
"""
from __future__ import annotations

import json
import shutil
import sys
from fractions import Fraction
from pathlib import Path

import pytest

import example_specs
import input_files
import server_harness as harness
import test_server_workflows as sd_server
import workflow_format

REPO = Path(__file__).resolve().parents[1]
NAME = "tokenflow_flux"
FLUX_LOADERS = {"UNETLoader": 0, "DualCLIPLoader": 1, "VAELoader": 2}  # -> CheckpointLoaderSimple output slot


@pytest.fixture(scope="module")
def flux_files(tmp_path_factory) -> dict:
    """The tiny Flux and SD3 checkpoints in one models folder (its extra_model_paths.yaml names ``checkpoints``)."""
    models = tmp_path_factory.mktemp("tiny-dit")
    files = input_files.write_tiny_flux_files(models)
    files["sd3_checkpoint_name"] = input_files.write_tiny_sd3_files(models)["checkpoint_name"]
    return files


@pytest.fixture(scope="module")
def flux_server(tmp_path_factory, flux_files):
    base = harness.make_base_dir(tmp_path_factory.mktemp("comfy-flux-base"))
    input_files.write_test_clip(base / "input" / "wolf.mp4")
    server = harness.ComfyServer(base, extra_model_paths=flux_files["extra_model_paths"], python=sys.executable)
    try:
        server.start(timeout=180)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def object_info(flux_server) -> dict:
    return flux_server.object_info()


def swap_flux_loaders(prompt: dict, ckpt_name: str) -> dict:
    """The API prompt with the core Flux loaders replaced by one CheckpointLoaderSimple of ``ckpt_name``."""
    loaders = {node_id: FLUX_LOADERS[node["class_type"]] for node_id, node in prompt.items()
               if node["class_type"] in FLUX_LOADERS}
    assert sorted(FLUX_LOADERS.values()) == sorted(loaders.values()), "the example lacks a core Flux loader"
    checkpoint = "flux_checkpoint"
    swapped = {node_id: node for node_id, node in prompt.items() if node_id not in loaders}
    for node in swapped.values():
        for name, value in node["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and str(value[0]) in loaders:
                node["inputs"][name] = [checkpoint, loaders[str(value[0])]]
    swapped[checkpoint] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}}
    return swapped


def _of_type(prompt: dict, kind: str) -> list[dict]:
    return [node["inputs"] for node in prompt.values() if node["class_type"] == kind]


def _checked_example(name: str, object_info: dict) -> tuple[dict, dict]:
    """(UI workflow, API prompt) of example ``name``: it validates against the node definitions and its thumbnail
    is a JPEG of the size the template browser shows."""
    from PIL import Image

    workflow = sd_server.load_example(name)
    assert workflow_format.check_ui_workflow(workflow, object_info) == []
    with Image.open(REPO / "example_workflows" / f"{name}.jpg") as thumb:
        assert thumb.format == "JPEG" and 256 <= thumb.width <= 1024 and 192 <= thumb.height <= 1024
    return workflow, workflow_format.ui_to_api(workflow, object_info)


def test_flux_example_uses_the_core_flux_loaders_and_loads_in_the_frontend_format(object_info):
    workflow, prompt = _checked_example(NAME, object_info)
    (unet,), (clip,), (vae,) = (_of_type(prompt, kind) for kind in FLUX_LOADERS)
    assert unet["unet_name"] == example_specs.FLUX_DEV and vae["vae_name"] == example_specs.FLUX_AE
    assert (clip["clip_name1"], clip["clip_name2"], clip["type"]) == (example_specs.CLIP_L, example_specs.T5XXL,
                                                                      "flux")
    (sampler,), (invert,), (loader,) = (_of_type(prompt, k) for k in
                                        ("TokenFlowSampler", "TokenFlowInvert", "TokenFlowLoadVideo"))
    assert (sampler["editor"], sampler["cfg"], sampler["pnp_attn_t"], sampler["pnp_f_t"], sampler["batch_size"]) == \
        ("pnp", 1.0, example_specs.FLUX_PNP_ATTN_T, 0.8, 8)  # the rf_solver preset's published fraction
    assert "correspondences" not in sampler  # on the fly, the official setting
    assert (invert["steps"], invert["inversion_steps"], invert["method"]) == (50, 500, "fixed_point")
    guided = {node_id: node["inputs"]["guidance"] for node_id, node in prompt.items()
              if node["class_type"] == "FluxGuidance"}
    # Flux-dev inverts at guidance 1 and edits at FluxGuidance's default
    assert guided[str(sampler["positive"][0])] == 3.5 and guided[str(invert["conditioning"][0])] == 1.0
    assert prompt[str(sampler["negative"][0])]["class_type"] == "CLIPTextEncode"  # unused at cfg 1
    (shift,) = _of_type(prompt, "ModelSamplingFlux")
    assert (loader["width"], loader["height"]) == (512, 512)
    size_id = str(shift["width"][0])  # the shift's width / height are the loaded frames' (Get Image Size)
    assert prompt[size_id]["class_type"] == "GetImageSize" and (shift["width"], shift["height"]) == \
        ([shift["width"][0], 0], [shift["width"][0], 1])
    assert prompt[str(prompt[size_id]["inputs"]["image"][0])]["class_type"] == "TokenFlowLoadVideo"
    sampling_id = next(i for i, n in prompt.items() if n["class_type"] == "ModelSamplingFlux")
    assert [str(sampler["model"][0]), str(invert["model"][0])] == [sampling_id, sampling_id]
    texts = {n["text"] for n in _of_type(prompt, "CLIPTextEncode")}
    assert {example_specs.EDIT_PROMPT, example_specs.NEGATIVE_PROMPT, example_specs.INVERSION_PROMPT} <= texts
    note = " ".join(n["widgets_values"][0] for n in workflow["nodes"] if n["type"] == "MarkdownNote")
    for words in ("models/diffusion_models/", "models/text_encoders/", "models/vae/", example_specs.FLUX_DEV,
                  example_specs.CLIP_L, example_specs.T5XXL, example_specs.FLUX_AE, "cfg 1", "skips the negative",
                  "ModelSamplingFlux", "tiny random-weight models only", "on the fly", "unconnected",
                  "fixed_point", "github.com/omerbt/TokenFlow"):
        assert words in note, words
    models = {m["name"]: m["directory"] for n in workflow["nodes"] for m in n["properties"].get("models", [])}
    assert models == {example_specs.FLUX_DEV: "diffusion_models", example_specs.CLIP_L: "text_encoders",
                      example_specs.T5XXL: "text_encoders", example_specs.FLUX_AE: "vae"}


@pytest.mark.parametrize("name", ["tokenflow_flux", "tokenflow_sd3"])
def test_dit_example_reads_in_groups_with_forward_wires(name):
    workflow = sd_server.load_example(name)
    nodes = {n["id"]: n for n in workflow["nodes"]}
    groups = workflow["groups"]
    assert [g["title"] for g in groups] == ["Load", "Invert", "Edit", "Output"]
    for node in nodes.values():
        frames = [g["title"] for g in groups if sd_server._frame_holds(g, node)]
        assert len(frames) == (0 if node["type"] == "MarkdownNote" else 1), (node["id"], node["type"], frames)
    assert not [(a["title"], b["title"]) for i, a in enumerate(groups) for b in groups[i + 1:]
                if sd_server._overlap(a, b)]
    for link in workflow["links"]:
        src, dst = nodes[link[1]], nodes[link[3]]
        assert src["pos"][0] + src["size"][0] < dst["pos"][0], link


def _run_and_check_videos(server, prompt: dict, name: str, object_info: dict, test_artifacts: Path) -> str:
    """Runs ``prompt`` through POST /prompt; every Save Video holds the loader's frames at its fps. Returns the log."""
    artifacts = test_artifacts / "server_workflows"
    artifacts.mkdir(parents=True, exist_ok=True)
    (artifacts / f"{name}.api.json").write_text(json.dumps(prompt, indent=2), encoding="utf-8")
    assert workflow_format.validate_api_prompt(prompt, object_info) == []
    expected = sd_server.expected_videos(prompt)
    log_before = len(server.log_text())

    entry = server.run_prompt(prompt, timeout=sd_server.PROMPT_TIMEOUT)

    videos = harness.output_files(entry, server.output_dir)
    assert set(videos) == set(expected)
    for node_id, (frames, fps) in expected.items():
        (path,) = videos[node_id]
        shutil.copy(path, artifacts / f"{name}.mp4")
        assert sd_server.read_video(path) == (frames, input_files.CLIP_SIZE, input_files.CLIP_SIZE,
                                              Fraction(fps).limit_denominator(1000)), path
    sd_server.check_consistency_texts(prompt, entry)
    return server.log_text()[log_before:]  # this run's lines only


def test_flux_example_runs_on_the_server_with_the_tiny_flux_checkpoint(flux_server, object_info, flux_files,
                                                                        test_artifacts):
    prompt = workflow_format.ui_to_api(sd_server.load_example(NAME), object_info)
    prompt = sd_server.apply_test_overrides(swap_flux_loaders(prompt, flux_files["checkpoint_name"]), flux_files)
    log = _run_and_check_videos(flux_server, prompt, NAME, object_info, test_artifacts)
    assert "model_type FLUX" in log, "the checkpoint was not loaded as a Flux model"
    assert "TokenFlow: flow inversion of 5 frames" in log, "the inversion did not take the flow (Flux) path"


# -- SD3.5 --------------------------------------------------------------------------------------------------------

SD3_NAME = "tokenflow_sd3"


def test_sd3_example_loads_one_checkpoint_in_the_frontend_format(object_info):
    workflow, prompt = _checked_example(SD3_NAME, object_info)
    (checkpoint,) = _of_type(prompt, "CheckpointLoaderSimple")
    assert checkpoint["ckpt_name"] == example_specs.SD35_LARGE
    assert not any(_of_type(prompt, kind) for kind in (*FLUX_LOADERS, "FluxGuidance", "ModelSamplingFlux"))
    (sampler,), (invert,), (loader,) = (_of_type(prompt, k) for k in
                                        ("TokenFlowSampler", "TokenFlowInvert", "TokenFlowLoadVideo"))
    assert (sampler["editor"], sampler["cfg"], sampler["pnp_attn_t"], sampler["batch_size"],
            sampler["pnp_attention_blocks"]) == ("pnp", example_specs.SD35_CFG, 0.5, 8, "auto")
    assert "correspondences" not in sampler  # on the fly, the official setting
    assert (invert["steps"], invert["inversion_steps"], invert["method"]) == (50, 500, "fixed_point")
    assert (loader["width"], loader["height"], loader["video"]) == (512, 512, "wolf.mp4")
    checkpoint_id = next(i for i, n in prompt.items() if n["class_type"] == "CheckpointLoaderSimple")
    assert [str(sampler["model"][0]), str(invert["model"][0])] == [checkpoint_id, checkpoint_id]
    assert prompt[str(sampler["negative"][0])]["inputs"]["text"] == example_specs.NEGATIVE_PROMPT  # used at cfg 4
    note = " ".join(n["widgets_values"][0] for n in workflow["nodes"] if n["type"] == "MarkdownNote")
    for words in ("models/checkpoints/", example_specs.SD35_LARGE, example_specs.SD35_LARGE_URL, "cfg 4",
                  "Stable Flow", "double_block:9-17", "tiny random-weight models only", "on the fly", "unconnected",
                  "fixed_point", "github.com/omerbt/TokenFlow"):
        assert words in note, words
    models = {m["name"]: m["directory"] for n in workflow["nodes"] for m in n["properties"].get("models", [])}
    assert models == {example_specs.SD35_LARGE: "checkpoints"}


def test_sd3_example_runs_on_the_server_with_the_tiny_sd3_checkpoint(flux_server, object_info, flux_files,
                                                                      test_artifacts):
    prompt = workflow_format.ui_to_api(sd_server.load_example(SD3_NAME), object_info)
    prompt = sd_server.apply_test_overrides(prompt, {**flux_files, "checkpoint_name": flux_files["sd3_checkpoint_name"]})
    log = _run_and_check_videos(flux_server, prompt, SD3_NAME, object_info, test_artifacts)
    assert "model_type FLOW" in log, "the checkpoint was not loaded as a flow (SD3) model"
    assert "TokenFlow: flow inversion of 5 frames" in log, "the inversion did not take the flow path on SD3"
