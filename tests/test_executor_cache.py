"""ComfyUI's cache through the real ``execution.PromptExecutor``: a changed edit prompt re-runs only the
sampler and what follows it; inversion and extraction come from ComfyUI's cache.
"""
from __future__ import annotations

import asyncio
import sys
import uuid
from pathlib import Path

import pytest
import torch

import folder_paths
import nodes as comfy_nodes
from input_files import write_frames
from tokenflow_helpers import INVERSION_STEPS, STEPS

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import runner_support  # noqa: E402  (scripts/: the executor as the runner makes it, for this host)


class RecordingServer:
    """What PromptExecutor needs of PromptServer: send_sync (recorded) and a few attributes."""

    def __init__(self) -> None:
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata: dict = {}
        self.messages: list[tuple[str, dict]] = []
        self.current: str | None = None

    def send_sync(self, event, data, sid=None) -> None:
        self.messages.append((event, data))
        if event == "executing":
            self.current = data.get("node")

    def queue_updated(self) -> None:
        pass


@pytest.fixture
def executor_nodes(tiny_sd15, tiny_clip, tiny_vae, tmp_path):
    """Our nodes registered the way ComfyUI registers a V3 custom node pack, plus test-only stand-ins."""
    saved = {name: dict(getattr(comfy_nodes, name)) for name in
             ("NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "LOADED_MODULE_DIRS", "EXTENSION_WEB_DIRS")}
    modules_before = set(sys.modules)
    import comfy.model_patcher  # the door (engine/door.py): the second copy of the pack loaded here registers there

    door = vars(comfy.model_patcher).setdefault("tokenflow_door", {})
    door_before = {key: dict(value) if isinstance(value, dict) else value for key, value in door.items()}
    input_dir = folder_paths.get_input_directory()
    folder_paths.set_input_directory(str(tmp_path / "input"))  # the video combo lists this (empty) folder
    collected: list[torch.Tensor] = []

    class TinyCheckpointLoader:  # stands in for CheckpointLoaderSimple with the tiny SD1.x model, CLIP and VAE
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {}}

        RETURN_TYPES = ("MODEL", "CLIP", "VAE")
        FUNCTION = "load"
        CATEGORY = "testing"

        def load(self):
            return tiny_sd15, tiny_clip, tiny_vae

    class CollectImages:  # an output node that keeps what it receives
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"images": ("IMAGE",)}}

        RETURN_TYPES = ()
        FUNCTION = "collect"
        OUTPUT_NODE = True
        CATEGORY = "testing"

        def collect(self, images):
            collected.append(images.clone())
            return {"ui": {"frames": [int(images.shape[0])]}}

    try:
        assert asyncio.run(comfy_nodes.load_custom_node(str(REPO))), "ComfyUI could not load the pack"
        assert "TokenFlowSampler" in comfy_nodes.NODE_CLASS_MAPPINGS
        comfy_nodes.NODE_CLASS_MAPPINGS["TestTinyCheckpointLoader"] = TinyCheckpointLoader
        comfy_nodes.NODE_CLASS_MAPPINGS["TestCollectImages"] = CollectImages
        yield collected
    finally:
        folder_paths.set_input_directory(input_dir)
        for name, value in saved.items():
            mapping = getattr(comfy_nodes, name)
            mapping.clear()
            mapping.update(value)
        for name in set(sys.modules) - modules_before:
            if name.startswith(str(REPO)):
                del sys.modules[name]
        for key, value in door_before.items():  # the first copy's editors and API again (the dict stays the same)
            if isinstance(value, dict):
                door[key].clear()
                door[key].update(value)
            else:
                door[key] = value


def workflow(frames: Path, prompt: str) -> dict:
    return {
        "1": {"class_type": "TestTinyCheckpointLoader", "inputs": {}},
        "2": {"class_type": "TokenFlowLoadVideo", "inputs": {
            "video": "", "path": str(frames), "frame_load_cap": 0, "skip_first_frames": 0, "select_every_nth": 1,
            "width": 64, "height": 64, "size_multiple": 64}},
        "3": {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": ["1", 2]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a wolf", "clip": ["1", 1]}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["1", 1]}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "ugly, blurry, low res", "clip": ["1", 1]}},
        "7": {"class_type": "TokenFlowInvert", "inputs": {
            "model": ["1", 0], "latent": ["3", 0], "conditioning": ["4", 0], "steps": STEPS,
            "inversion_steps": INVERSION_STEPS, "frame_batch": 16}},
        "8": {"class_type": "TokenFlowExtractCorrespondences", "inputs": {
            "model": ["1", 0], "inversion": ["7", 0], "batch_size": 2, "keyframes": "random", "seed": 1}},
        "9": {"class_type": "TokenFlowSampler", "inputs": {
            "model": ["1", 0], "positive": ["5", 0], "negative": ["6", 0], "inversion": ["7", 0], "editor": "pnp",
            "cfg": 7.5, "pnp_attn_t": 0.5, "pnp_f_t": 0.8, "sdedit_start": 0.9, "batch_size": 2,
            "keyframes": "random", "seed": 1, "correspondences": ["8", 0]}},
        "10": {"class_type": "VAEDecode", "inputs": {"samples": ["9", 0], "vae": ["1", 2]}},
        "11": {"class_type": "TestCollectImages", "inputs": {"images": ["10", 0]}},
    }


def run_prompt(executor, server: RecordingServer, prompt: dict, unet_module) -> tuple[list, list, dict]:
    """Validate and execute like the server's prompt worker; returns (executed ids, cached ids, UNet calls per id)."""
    import execution

    prompt_id = str(uuid.uuid4())
    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    assert valid, (error, node_errors)
    server.messages.clear()
    per_node: dict[str, int] = {}

    def count(module, args, kwargs):
        per_node[server.current] = per_node.get(server.current, 0) + 1

    handle = unet_module.register_forward_pre_hook(count, with_kwargs=True)
    try:
        executor.execute(prompt, prompt_id, {"client_id": "reliability-test"}, outputs)
    finally:
        handle.remove()
    errors = [d for e, d in server.messages if e in ("execution_error", "execution_interrupted")]
    assert executor.success and not errors, errors
    executed = [d["node"] for e, d in server.messages if e == "executing" and d.get("node") is not None]
    cached = next(d["nodes"] for e, d in server.messages if e == "execution_cached")
    return executed, cached, per_node


def test_executor_cache_reuses_inversion_and_extraction(executor_nodes, tiny_sd15, tmp_path):
    import execution

    collected = executor_nodes
    frames = write_frames(tmp_path / "frames", 4)
    server = RecordingServer()
    executor = runner_support.prompt_executor(execution, server)
    unet = tiny_sd15.model.diffusion_model
    all_nodes = [str(i) for i in range(1, 12)]

    executed, cached, calls = run_prompt(executor, server, workflow(frames, "a robot wolf"), unet)
    assert sorted(executed, key=int) == all_nodes and cached == []
    assert set(calls) == {"7", "8", "9"} and all(calls.values()), calls

    executed, cached, calls_again = run_prompt(executor, server, workflow(frames, "a marble statue of a wolf"), unet)
    assert sorted(executed, key=int) == ["5", "9", "10", "11"], "only the edit prompt and what follows may re-run"
    assert {"7", "8"} <= set(cached), "inversion and extraction must come from the cache"
    assert calls_again == {"9": calls["9"]}, "the second run may only spend UNet calls in the sampler"

    executed, cached, calls_same = run_prompt(executor, server, workflow(frames, "a marble statue of a wolf"), unet)
    assert executed == [] and calls_same == {} and sorted(cached, key=int) == all_nodes

    assert len(collected) == 2 and collected[0].shape == (4, 64, 64, 3)
    assert not torch.equal(collected[0], collected[1]), "the new edit prompt changed nothing"
    for module in unet.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks

