"""A real ComfyUI server for the tests, and the workflow tooling around it.

* :class:`ComfyServer` starts ``main.py`` of the host (``$COMFYUI_PATH``) as a subprocess on the
  loopback interface only, with ``--cpu --use-pytorch-cross-attention``, a throw-away
  ``--base-directory`` (its ``custom_nodes/`` holds a symlink named ``ComfyUI-TokenFlow`` to this
  repository and one to the test-only ``tests/stand_in_nodes`` pack), an in-memory database and
  ``--extra-model-paths-config`` for the tiny model files. ``$TOKENFLOW_TEST_THREADS`` (default 1)
  becomes ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` of the server. Every wait is bounded; :meth:`stop`
  terminates (then kills) the server's own process group.
* :func:`ui_to_api` turns a UI-format workflow (what the frontend saves: nodes, links,
  ``widgets_values``) into an API-format prompt, mapping ``widgets_values`` to input names with the
  widget order the frontend uses (``/object_info`` ``input_order``: required then optional inputs;
  a ``control_after_generate`` value after seed-like INTs; the upload button's value after all
  inputs of nodes with an upload combo).
* :func:`check_ui_workflow` / :func:`validate_api_prompt` check a workflow against ``/object_info``
  (node types, link types, input names, widget counts, numbers in range, combo values).
* :func:`build_examples` produces ``example_workflows/*.json`` and their ``.jpg`` thumbnails
  (the names the frontend's template browser fetches: ``/api/workflow_templates/<pack>/<name>.jpg``):

      bash -c 'source scripts/host_env.sh && "$PYTHON" tests/server_harness.py write-examples'
"""
from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

REPO = Path(__file__).resolve().parents[1]
PACK_DIR_NAME = "ComfyUI-TokenFlow"
STAND_IN_DIR_NAME = "tokenflow_test_stand_ins"
EXAMPLES_DIR = REPO / "example_workflows"
DEFAULT_COMFYUI = Path.home() / "comfy" / "ComfyUI"

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
UPLOAD_FLAGS = ("image_upload", "video_upload", "animated_image_upload")
FRONTEND_ONLY_NODES = {"Note", "MarkdownNote"}  # virtual nodes: never sent to the server


def comfyui_path() -> Path:
    return Path(os.environ.get("COMFYUI_PATH") or DEFAULT_COMFYUI).expanduser().resolve()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------

class ServerError(RuntimeError):
    pass


class ComfyServer:
    """``python main.py`` of the host, on 127.0.0.1, in its own process group."""

    def __init__(self, base_dir: Path, *, extra_model_paths: Path | None = None, python: str | None = None,
                 host_root: Path | None = None, port: int | None = None, threads: int | None = None,
                 extra_args: Iterable[str] = ()):
        self.base_dir = Path(base_dir)
        self.host_root = Path(host_root or comfyui_path())
        self.python = python or sys.executable
        self.port = port or free_port()
        self.threads = int(threads if threads is not None else os.environ.get("TOKENFLOW_TEST_THREADS", "1"))
        self.extra_model_paths = extra_model_paths
        self.extra_args = list(extra_args)
        self.log_path = self.base_dir / "server.log"
        self.proc: subprocess.Popen | None = None
        self._log_file = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def output_dir(self) -> Path:
        return self.base_dir / "output"

    @property
    def input_dir(self) -> Path:
        return self.base_dir / "input"

    def command(self) -> list[str]:
        cmd = [self.python, "main.py", "--cpu", "--use-pytorch-cross-attention",
               "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base_dir),
               "--database-url", "sqlite:///:memory:",
               "--preview-method", "none"]
        if self.extra_model_paths is not None:
            cmd += ["--extra-model-paths-config", str(self.extra_model_paths)]
        return cmd + self.extra_args

    def start(self, timeout: float = 180.0) -> "ComfyServer":
        env = dict(os.environ)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(self.threads)
        env["TOKENFLOW_TEST_THREADS"] = str(self.threads)
        env["PYTHONUNBUFFERED"] = "1"
        env.pop("COMFYUI_PATH", None)  # the server is the host itself
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.command(), cwd=self.host_root, env=env, stdin=subprocess.DEVNULL,
                                     stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise ServerError(f"ComfyUI exited with code {self.proc.returncode} while starting:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/system_stats", timeout=5) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError(f"ComfyUI did not answer on {self.url} within {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.5)

    def stop(self, timeout: float = 20.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
                try:
                    os.killpg(proc.pid, sig)  # the server's own group (start_new_session=True)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- logs -----------------------------------------------------------------------------
    def log_text(self) -> str:
        if self._log_file is not None:
            self._log_file.flush()
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_text()[-chars:]

    # -- HTTP -----------------------------------------------------------------------------
    def request(self, path: str, data: Any = None, timeout: float = 60.0) -> tuple[int, bytes]:
        body = None if data is None else json.dumps(data).encode()
        req = urllib.request.Request(self.url + path, data=body, method="POST" if body is not None else "GET",
                                     headers={"Content-Type": "application/json"} if body is not None else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def get_json(self, path: str, timeout: float = 60.0) -> Any:
        status, body = self.request(path, timeout=timeout)
        if status != 200:
            raise ServerError(f"GET {path}: HTTP {status}: {body[:2000]!r}")
        return json.loads(body)

    def object_info(self) -> dict:
        return self.get_json("/object_info")

    def queue_prompt(self, prompt: dict, client_id: str | None = None) -> str:
        status, body = self.request("/prompt", {"prompt": prompt, "client_id": client_id or uuid.uuid4().hex})
        if status != 200:
            text = body.decode(errors="replace")[:4000]
            raise ServerError(f"POST /prompt refused the prompt (HTTP {status}): {text}")
        return json.loads(body)["prompt_id"]

    def wait_for(self, prompt_id: str, timeout: float = 300.0, poll: float = 0.5) -> dict:
        """The /history entry of ``prompt_id`` once it finished; raises with the error (or on timeout)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise ServerError(f"ComfyUI died (exit {self.proc.returncode}) while running {prompt_id}:\n"
                                  f"{self.log_tail()}")
            history = self.get_json(f"/history/{prompt_id}")
            entry = history.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                status = entry["status"]
                if status.get("status_str") != "success" or not status.get("completed"):
                    raise ServerError(f"prompt {prompt_id} failed: {describe_failure(status)}\n--- log ---\n"
                                      f"{self.log_tail()}")
                return entry
            time.sleep(poll)
        self.request("/interrupt", {})
        raise ServerError(f"prompt {prompt_id} did not finish within {timeout:.0f} s\n--- log ---\n{self.log_tail()}")

    def run_prompt(self, prompt: dict, timeout: float = 300.0) -> dict:
        return self.wait_for(self.queue_prompt(prompt), timeout=timeout)


def describe_failure(status: dict) -> str:
    for event, data in status.get("messages", []):
        if event == "execution_error":
            tb = "".join(data.get("traceback") or [])
            return (f"{data.get('node_type')} (node {data.get('node_id')}): {data.get('exception_type')}: "
                    f"{data.get('exception_message')}\n{tb}")
        if event == "execution_interrupted":
            return f"interrupted at node {data.get('node_id')} ({data.get('node_type')})"
    return json.dumps(status)[:3000]


def output_files(history_entry: dict, output_dir: Path, suffixes: tuple[str, ...] = (".mp4",)) -> dict[str, list[Path]]:
    """Saved files (type "output") listed in a /history entry, by node id."""
    found: dict[str, list[Path]] = {}
    for node_id, outputs in history_entry.get("outputs", {}).items():
        for items in outputs.values():
            if not isinstance(items, list):
                continue
            for item in items:
                if isinstance(item, dict) and item.get("type") == "output" and \
                        str(item.get("filename", "")).lower().endswith(suffixes):
                    path = Path(output_dir) / item.get("subfolder", "") / item["filename"]
                    found.setdefault(node_id, []).append(path)
    return found


VIDEO_DIR = Path(os.environ.get("TOKENFLOW_TEST_VIDEOS", Path(__file__).resolve().parents[2] / "shared" / "videos"))
CLIP_FRAMES, CLIP_SIZE, CLIP_FPS = 6, 64, 20


def write_test_clip(path: Path, frames: int = CLIP_FRAMES, size: int = CLIP_SIZE, fps: int = CLIP_FPS) -> None:
    """The first ``frames`` frames of wolf.mp4 at ``size``x``size`` (synthetic frames if it is missing)."""
    import av
    import numpy as np
    from PIL import Image

    images = []
    source = VIDEO_DIR / "wolf.mp4"
    if source.is_file():
        with av.open(str(source)) as container:
            for frame in container.decode(video=0):
                images.append(frame.to_image().convert("RGB").resize((size, size), Image.BICUBIC))
                if len(images) == frames:
                    break
    while len(images) < frames:  # moving gradient + square
        i = len(images)
        yy, xx = np.mgrid[0:size, 0:size]
        rgb = np.stack([(xx * 4 + i * 9) % 256, (yy * 4) % 256, np.full_like(xx, 120)], -1).astype(np.uint8)
        rgb[20 + i:40 + i, 10 + 2 * i:30 + 2 * i] = (230, 230, 40)
        images.append(Image.fromarray(rgb))
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size, size, "yuv420p"
        for image in images:
            for packet in stream.encode(av.VideoFrame.from_image(image)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_tiny_model_files(models_dir: Path) -> dict:
    """The tiny checkpoint and ControlNet FILES of ``tests/stand_in_nodes/tiny_files.py`` (see there), plus their
    names (``checkpoint_name``, ``controlnet_name``); needs comfy importable (the test process has it)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tokenflow_harness_tiny_files",
                                                  REPO / "tests" / "stand_in_nodes" / "tiny_files.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    files = module.write_tiny_model_files(models_dir)
    files.update(checkpoint_name=module.CHECKPOINT_NAME, controlnet_name=module.CONTROLNET_NAME)
    return files


def runner_env(**extra: str) -> dict:
    """Environment for the headless runner as a subprocess: the test host, $TOKENFLOW_TEST_THREADS threads."""
    env = dict(os.environ)
    threads = env.get("TOKENFLOW_TEST_THREADS", "1")
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, PYTHONUNBUFFERED="1",
               COMFYUI_PATH=str(comfyui_path()), **extra)
    return env


def make_base_dir(base: Path, *, stand_ins: bool = True) -> Path:
    """A ComfyUI base directory whose custom_nodes/ links this repo (and the test stand-ins)."""
    custom = base / "custom_nodes"
    custom.mkdir(parents=True, exist_ok=True)
    for sub in ("input", "output", "temp", "user", "models"):
        (base / sub).mkdir(exist_ok=True)
    links = {PACK_DIR_NAME: REPO}
    if stand_ins:
        links[STAND_IN_DIR_NAME] = REPO / "tests" / "stand_in_nodes"
    for name, target in links.items():
        link = custom / name
        if not link.exists():
            link.symlink_to(target, target_is_directory=True)
    return base


# --------------------------------------------------------------------------------------------
# /object_info helpers: inputs, widgets in the frontend's order
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class InputSpec:
    name: str
    type: str  # "INT", "COMBO", "MODEL", ...
    options: dict
    optional: bool
    choices: tuple = ()

    @property
    def is_widget(self) -> bool:
        return self.type in WIDGET_TYPES and not self.options.get("forceInput", False)

    @property
    def has_control(self) -> bool:
        control = self.options.get("control_after_generate")
        if control is None:
            return self.type == "INT" and self.name in ("seed", "noise_seed")
        return bool(control)


def input_specs(node_info: dict) -> list[InputSpec]:
    """Required then optional inputs, each in ``input_order`` (the frontend's widget order)."""
    inputs = node_info.get("input", {})
    order = node_info.get("input_order") or {cat: list(inputs.get(cat, {})) for cat in ("required", "optional")}
    specs = []
    for category in ("required", "optional"):
        declared = inputs.get(category, {})
        for name in order.get(category, []):
            if name not in declared:
                continue
            raw = declared[name]
            options = raw[1] if len(raw) > 1 and isinstance(raw[1], dict) else {}
            if isinstance(raw[0], list):
                specs.append(InputSpec(name, "COMBO", options, category == "optional", tuple(raw[0])))
            else:
                choices = tuple(options.get("options", ())) if raw[0] == "COMBO" else ()
                specs.append(InputSpec(name, raw[0], options, category == "optional", choices))
    return specs


def has_upload_widget(node_info: dict) -> bool:
    return any(s.type == "COMBO" and not s.optional and any(s.options.get(f) for f in UPLOAD_FLAGS)
               for s in input_specs(node_info))


def widget_slots(node_info: dict) -> list[tuple[str | None, str]]:
    """The serialised widgets of a node, in order: (input name, "value" | "control") and (None, "upload")."""
    slots: list[tuple[str | None, str]] = []
    for spec in input_specs(node_info):
        if spec.is_widget:
            slots.append((spec.name, "value"))
            if spec.has_control:
                slots.append((spec.name, "control"))
    if has_upload_widget(node_info):
        slots.append((None, "upload"))
    return slots


def default_value(spec: InputSpec) -> Any:
    if "default" in spec.options:
        return spec.options["default"]
    if spec.type == "COMBO":
        return spec.choices[0] if spec.choices else ""
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(spec.type)


def output_types(node_info: dict) -> list[str]:
    return [t if isinstance(t, str) else "COMBO" for t in node_info.get("output", [])]


def types_compatible(out_type: str, in_type: str) -> bool:
    if "*" in (out_type, in_type):
        return True
    return bool(set(out_type.split(",")) & set(in_type.split(",")))


# --------------------------------------------------------------------------------------------
# UI workflow -> API prompt, and checks
# --------------------------------------------------------------------------------------------

def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """The API-format prompt of a UI-format workflow (frontend-only nodes and muted nodes dropped)."""
    links = {link[0]: link for link in workflow.get("links", [])}
    prompt: dict[str, dict] = {}
    for node in workflow["nodes"]:
        node_type = node["type"]
        if node_type in FRONTEND_ONLY_NODES or node.get("mode", 0) in (2, 4):
            continue
        if node_type not in object_info:
            raise KeyError(f"node {node['id']}: type {node_type!r} is not known to the server")
        info = object_info[node_type]
        specs = {s.name: s for s in input_specs(info)}
        inputs: dict[str, Any] = {}
        values = node.get("widgets_values", [])
        if isinstance(values, dict):
            inputs.update({k: v for k, v in values.items() if k in specs and specs[k].is_widget})
        else:
            for (name, kind), value in zip(widget_slots(info), values):
                if kind == "value" and name is not None:
                    inputs[name] = value
        for slot in node.get("inputs", []):
            link_id = slot.get("link")
            if link_id is None:
                continue
            link = links[link_id]
            inputs[slot["name"]] = [str(link[1]), int(link[2])]
        entry = {"class_type": node_type, "inputs": inputs}
        if node.get("title"):
            entry["_meta"] = {"title": node["title"]}
        prompt[str(node["id"])] = entry
    return prompt


def check_ui_workflow(workflow: dict, object_info: dict) -> list[str]:
    """Problems that would stop the frontend from loading ``workflow`` as intended (empty: none)."""
    problems: list[str] = []
    nodes = {n["id"]: n for n in workflow.get("nodes", [])}
    if len(nodes) != len(workflow.get("nodes", [])):
        problems.append("duplicate node ids")
    for key in ("last_node_id", "last_link_id", "links", "nodes", "version"):
        if key not in workflow:
            problems.append(f"missing top-level key {key!r}")
    if nodes and workflow.get("last_node_id", 0) < max(nodes):
        problems.append("last_node_id is smaller than a node id")
    links = {}
    for link in workflow.get("links", []):
        if len(link) != 6:
            problems.append(f"link {link} is not [id, origin, origin_slot, target, target_slot, type]")
            continue
        link_id, origin, origin_slot, target, target_slot, link_type = link
        links[link_id] = link
        if origin not in nodes or target not in nodes:
            problems.append(f"link {link_id} joins unknown nodes {origin} -> {target}")
            continue
        outs = nodes[origin].get("outputs", [])
        ins = nodes[target].get("inputs", [])
        if origin_slot >= len(outs) or link_id not in (outs[origin_slot].get("links") or []):
            problems.append(f"link {link_id} is not listed on output {origin_slot} of node {origin}")
        elif outs[origin_slot]["type"] != link_type:
            problems.append(f"link {link_id} type {link_type} != output type {outs[origin_slot]['type']}")
        if target_slot >= len(ins) or ins[target_slot].get("link") != link_id:
            problems.append(f"link {link_id} is not the link of input {target_slot} of node {target}")
        elif not types_compatible(link_type, ins[target_slot]["type"]):
            problems.append(f"link {link_id} type {link_type} does not fit input {ins[target_slot]['name']} "
                            f"({ins[target_slot]['type']}) of node {target}")
    if workflow.get("links") and workflow.get("last_link_id", 0) < max(links, default=0):
        problems.append("last_link_id is smaller than a link id")
    for node_id, node in nodes.items():
        node_type = node.get("type")
        where = f"node {node_id} ({node_type})"
        if node_type in FRONTEND_ONLY_NODES:
            continue
        if node_type not in object_info:
            problems.append(f"{where}: unknown node type")
            continue
        info = object_info[node_type]
        specs = {s.name: s for s in input_specs(info)}
        for slot in node.get("inputs", []):
            spec = specs.get(slot["name"])
            if spec is None:
                problems.append(f"{where}: input {slot['name']!r} does not exist")
            elif spec.is_widget and "widget" not in slot:
                problems.append(f"{where}: widget input {slot['name']!r} listed without its 'widget' entry")
            elif not types_compatible(slot["type"], spec.type):
                problems.append(f"{where}: input {slot['name']!r} has type {slot['type']}, server says {spec.type}")
        linked = {s["name"] for s in node.get("inputs", []) if s.get("link") is not None}
        for spec in specs.values():
            if not spec.optional and not spec.is_widget and spec.name not in linked:
                problems.append(f"{where}: required input {spec.name!r} is not connected")
        outs = output_types(info)
        if [o["type"] for o in node.get("outputs", [])] != outs:
            problems.append(f"{where}: outputs {[o['type'] for o in node.get('outputs', [])]} != server's {outs}")
        values = node.get("widgets_values", [])
        slots = widget_slots(info)
        if isinstance(values, list) and len(values) != len(slots):
            problems.append(f"{where}: {len(values)} widgets_values for {len(slots)} widgets "
                            f"{[n or kind for n, kind in slots]}")
    return problems


def validate_api_prompt(prompt: dict, object_info: dict) -> list[str]:
    """Node types, input names, connections and widget values (type, range, choice) per /object_info."""
    problems: list[str] = []
    for node_id, node in prompt.items():
        node_type = node.get("class_type")
        where = f"node {node_id} ({node_type})"
        if node_type not in object_info:
            problems.append(f"{where}: unknown node type")
            continue
        specs = {s.name: s for s in input_specs(object_info[node_type])}
        for name, value in node["inputs"].items():
            spec = specs.get(name)
            if spec is None:
                problems.append(f"{where}: unknown input {name!r}")
                continue
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                source = prompt.get(value[0])
                if source is None:
                    problems.append(f"{where}: input {name!r} links to missing node {value[0]}")
                    continue
                outs = output_types(object_info.get(source["class_type"], {}))
                if value[1] >= len(outs):
                    problems.append(f"{where}: input {name!r} links to missing output {value[1]} of node {value[0]}")
                elif not types_compatible(outs[value[1]], spec.type):
                    problems.append(f"{where}: input {name!r} ({spec.type}) linked to a {outs[value[1]]} output")
                continue
            if not spec.is_widget:
                problems.append(f"{where}: {spec.type} input {name!r} needs a connection, got {value!r}")
                continue
            problems += [f"{where}: {p}" for p in _value_problems(spec, value)]
        for spec in specs.values():
            if not spec.optional and spec.name not in node["inputs"]:
                problems.append(f"{where}: required input {spec.name!r} missing")
    return problems


def _value_problems(spec: InputSpec, value: Any) -> list[str]:
    if spec.type == "COMBO":
        return [] if value in spec.choices else [f"{spec.name}={value!r} is not one of {list(spec.choices)[:12]}"]
    if spec.type == "BOOLEAN":
        return [] if isinstance(value, bool) else [f"{spec.name}={value!r} is not a boolean"]
    if spec.type == "STRING":
        return [] if isinstance(value, str) else [f"{spec.name}={value!r} is not a string"]
    if spec.type == "INT" and (isinstance(value, bool) or not isinstance(value, int)):
        return [f"{spec.name}={value!r} is not an integer"]
    if spec.type == "FLOAT" and (isinstance(value, bool) or not isinstance(value, (int, float))
                                 or not math.isfinite(value)):
        return [f"{spec.name}={value!r} is not a number"]
    problems = []
    if "min" in spec.options and value < spec.options["min"]:
        problems.append(f"{spec.name}={value} < min {spec.options['min']}")
    if "max" in spec.options and value > spec.options["max"]:
        problems.append(f"{spec.name}={value} > max {spec.options['max']}")
    return problems


# --------------------------------------------------------------------------------------------
# Example workflows: specification -> UI-format JSON (+ thumbnail)
# --------------------------------------------------------------------------------------------

SD21_BASE = "v2-1_512-ema-pruned.safetensors"
SD21_BASE_URL = ("https://huggingface.co/stabilityai/stable-diffusion-2-1-base/resolve/main/"
                 "v2-1_512-ema-pruned.safetensors")
SD15 = "v1-5-pruned-emaonly-fp16.safetensors"
SD15_URL = ("https://huggingface.co/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/"
            "v1-5-pruned-emaonly-fp16.safetensors")
CANNY_CN = "control_v11p_sd15_canny_fp16.safetensors"
CANNY_CN_URL = ("https://huggingface.co/comfyanonymous/ControlNet-v1-1_fp16_safetensors/resolve/main/"
                "control_v11p_sd15_canny_fp16.safetensors")
MODEL_LINKS = {SD21_BASE: (SD21_BASE_URL, "checkpoints"), SD15: (SD15_URL, "checkpoints"),
               CANNY_CN: (CANNY_CN_URL, "controlnet")}

EDIT_PROMPT = "a shiny silver robotic wolf"
INVERSION_PROMPT = "a wolf"
NEGATIVE_PROMPT = "ugly, blurry, low res, unrealistic, unaesthetic"
VIDEO = "wolf.mp4"
PACK_CNR_ID = "comfyui-tokenflow"

COLUMN_WIDTH = 400
GAP = 40


@dataclass
class N:
    """One node of an example: id, type, place (column, band), widget values by input name."""

    id: int
    type: str
    col: int
    band: int = 0
    widgets: dict[str, Any] = field(default_factory=dict)
    title: str | None = None
    size: tuple[int, int] | None = None
    text: str | None = None  # MarkdownNote text


@dataclass
class Example:
    name: str
    nodes: list[N]
    links: list[tuple[int, str | int, int, str]]  # (from id, output name or index, to id, input name)
    bands: list[str] = field(default_factory=list)  # group titles per band ("" = no group)
    thumbnail: tuple[str, str] = ("", "")  # title, subtitle


def _node_size(node: N, info: dict | None, n_sockets: int, n_outputs: int, n_widgets: int) -> list[int]:
    if node.size:
        return list(node.size)
    if node.type == "CLIPTextEncode":
        return [400, 160]
    if node.type in ("PreviewImage", "SaveVideo"):
        return [340, 480]  # room for the image/video preview shown after a run
    height = 30 + 22 * max(n_sockets, n_outputs) + 26 * n_widgets
    if node.type == "TokenFlowLoadVideo":
        height += 300  # the upload widget's video preview
    return [320, height]


def build_ui_workflow(example: Example, object_info: dict) -> dict:
    nodes_by_id = {n.id: n for n in example.nodes}
    infos = {n.id: object_info.get(n.type) for n in example.nodes}
    # connections, resolved to slots later
    incoming: dict[int, dict[str, tuple[int, int, int]]] = {}
    link_rows = []
    for link_id, (src, out, dst, in_name) in enumerate(example.links, start=1):
        info = infos[src]
        names = info.get("output_name", [])
        out_index = out if isinstance(out, int) else names.index(out)
        link_rows.append([link_id, src, out_index, dst, None, output_types(info)[out_index]])
        incoming.setdefault(dst, {})[in_name] = (link_id, src, out_index)

    ui_nodes = []
    for node in example.nodes:
        info = infos[node.id]
        if node.type in FRONTEND_ONLY_NODES:
            ui_nodes.append({"id": node.id, "type": node.type, "pos": [0, 0], "size": list(node.size or (400, 220)),
                             "flags": {}, "order": 0, "mode": 0, "inputs": [], "outputs": [],
                             "title": node.title or "Note", "properties": {}, "widgets_values": [node.text or ""],
                             "color": "#432", "bgcolor": "#653"})
            continue
        if info is None:
            raise KeyError(f"{example.name}: node type {node.type} is not in /object_info")
        specs = input_specs(info)
        unknown = set(node.widgets) - {s.name for s in specs if s.is_widget}
        unknown |= set(incoming.get(node.id, {})) - {s.name for s in specs}
        if unknown:
            raise KeyError(f"{example.name}: node {node.id} ({node.type}) has no inputs {sorted(unknown)}")
        links_in = incoming.get(node.id, {})
        inputs = []
        for spec in specs:  # sockets: all non-widget inputs, then the linked widget inputs
            if not spec.is_widget:
                slot = {"name": spec.name, "type": spec.type, "link": links_in.get(spec.name, (None,))[0]}
                if spec.optional:
                    slot["shape"] = 7
                inputs.append(slot)
        for spec in specs:
            if spec.is_widget and spec.name in links_in:
                inputs.append({"name": spec.name, "type": spec.type, "widget": {"name": spec.name},
                               "link": links_in[spec.name][0]})
        for index, slot in enumerate(inputs):
            if slot["link"] is not None:
                link_rows[slot["link"] - 1][4] = index
        outputs = []
        for index, (out_type, out_name) in enumerate(zip(output_types(info), info.get("output_name", []))):
            ids = [row[0] for row in link_rows if row[1] == node.id and row[2] == index]
            slot = {"name": out_name, "type": out_type, "links": ids}
            if ids:
                slot["slot_index"] = index
            outputs.append(slot)
        values = []
        for name, kind in widget_slots(info):
            if kind == "upload":
                values.append("image")
            elif kind == "control":
                values.append("fixed")
            else:
                spec = next(s for s in specs if s.name == name)
                values.append(node.widgets.get(name, default_value(spec)))
        properties: dict[str, Any] = {"Node name for S&R": node.type}
        module = info.get("python_module", "")
        properties["cnr_id"] = "comfy-core" if module in ("nodes",) or module.startswith("comfy_extras") \
            else PACK_CNR_ID
        models = [values[0]] if node.type in ("CheckpointLoaderSimple", "ControlNetLoader") else []
        if models and models[0] in MODEL_LINKS:
            url, directory = MODEL_LINKS[models[0]]
            properties["models"] = [{"name": models[0], "url": url, "directory": directory}]
        entry = {"id": node.id, "type": node.type, "pos": [0, 0],
                 "size": _node_size(node, info, len(inputs), len(outputs), len(values)),
                 "flags": {}, "order": 0, "mode": 0, "inputs": inputs, "outputs": outputs,
                 "properties": properties, "widgets_values": values}
        if node.title:
            entry["title"] = node.title
        ui_nodes.append(entry)

    _layout(example, ui_nodes)
    _execution_order(ui_nodes, link_rows)
    groups = _groups(example, ui_nodes)
    return {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"comfyui-tokenflow/{example.name}")),
        "revision": 0,
        "last_node_id": max(nodes_by_id),
        "last_link_id": len(link_rows),
        "nodes": ui_nodes,
        "links": link_rows,
        "groups": groups,
        "config": {},
        "extra": {"ds": {"scale": 0.55, "offset": [60, 60]}},
        "version": 0.4,
    }


def _layout(example: Example, ui_nodes: list[dict]) -> None:
    spec = {n.id: n for n in example.nodes}
    bands = sorted({n.band for n in example.nodes})
    columns = sorted({n.col for n in example.nodes})
    col_width = {c: max(ui["size"][0] for ui in ui_nodes if spec[ui["id"]].col == c) + GAP for c in columns}
    x_of, x = {}, 0
    for c in columns:
        x_of[c] = x
        x += col_width[c]
    y = 0
    for band in bands:
        top = y + (50 if example.bands and example.bands[band] else 0)
        bottom = top
        for c in columns:
            yy = top
            for ui in ui_nodes:
                if spec[ui["id"]].col == c and spec[ui["id"]].band == band:
                    ui["pos"] = [x_of[c], yy]
                    yy += ui["size"][1] + GAP + 30  # 30: title bar
            bottom = max(bottom, yy)
        y = bottom + GAP


def _execution_order(ui_nodes: list[dict], link_rows: list[list]) -> None:
    deps = {n["id"]: {row[1] for row in link_rows if row[3] == n["id"]} for n in ui_nodes}
    order, done = [], set()
    while len(order) < len(ui_nodes):
        ready = sorted(i for i in deps if i not in done and deps[i] <= done)
        if not ready:
            raise ValueError("the example graph has a cycle")
        order += ready
        done |= set(ready)
    rank = {node_id: i for i, node_id in enumerate(order)}
    for n in ui_nodes:
        n["order"] = rank[n["id"]]


def _groups(example: Example, ui_nodes: list[dict]) -> list[dict]:
    spec = {n.id: n for n in example.nodes}
    groups = []
    for band, title in enumerate(example.bands):
        members = [ui for ui in ui_nodes if spec[ui["id"]].band == band]
        if not title or not members:
            continue
        x0 = min(m["pos"][0] for m in members) - 20
        y0 = min(m["pos"][1] for m in members) - 80
        x1 = max(m["pos"][0] + m["size"][0] for m in members) + 20
        y1 = max(m["pos"][1] + m["size"][1] for m in members) + 20
        groups.append({"id": len(groups) + 1, "title": title, "bounding": [x0, y0, x1 - x0, y1 - y0],
                       "color": "#3f789e", "font_size": 24, "flags": {}})
    return groups


def _common_source(ckpt: str, frames: int = 40) -> tuple[list[N], list[tuple]]:
    """Checkpoint, video, VAE encode, prompts and inversion: nodes 1-9."""
    nodes = [
        N(1, "CheckpointLoaderSimple", 0, widgets={"ckpt_name": ckpt}),
        N(2, "TokenFlowLoadVideo", 0, widgets={"video": VIDEO, "frame_load_cap": frames, "skip_first_frames": 0,
                                               "select_every_nth": 1, "width": 512, "height": 512,
                                               "size_multiple": 64, "path": ""}),
        N(3, "VAEEncode", 1),
        N(4, "CLIPTextEncode", 1, widgets={"text": INVERSION_PROMPT}, title="Inversion prompt (describes the source)"),
        N(5, "CLIPTextEncode", 1, widgets={"text": EDIT_PROMPT}, title="Edit prompt"),
        N(6, "CLIPTextEncode", 1, widgets={"text": NEGATIVE_PROMPT}, title="Negative prompt"),
        N(7, "TokenFlowInvert", 2, widgets={"steps": 50, "inversion_steps": 500, "frame_batch": 16}),
    ]
    links = [
        (2, 0, 3, "pixels"), (1, "VAE", 3, "vae"),
        (1, "CLIP", 4, "clip"), (1, "CLIP", 5, "clip"), (1, "CLIP", 6, "clip"),
        (1, "MODEL", 7, "model"), (3, 0, 7, "latent"), (4, 0, 7, "conditioning"),
    ]
    return nodes, links


def _edit_tail(first_id: int, col: int, sampler_id: int, prefix: str, band: int = 0,
               frames_from: int = 2, consistency: bool = True) -> tuple[list[N], list[tuple]]:
    """VAE Decode -> Create Video (fps from the loader) -> Save Video (+ warp error)."""
    decode, create, save, warp, plot = range(first_id, first_id + 5)
    nodes = [N(decode, "VAEDecode", col, band), N(create, "CreateVideo", col, band, widgets={"fps": 20.0}),
             N(save, "SaveVideo", col + 1, band,
               widgets={"filename_prefix": prefix, "format": "auto", "codec": "auto"})]
    links = [(sampler_id, 0, decode, "samples"), (1, "VAE", decode, "vae"),
             (decode, 0, create, "images"), (frames_from, "fps", create, "fps"), (create, 0, save, "video")]
    if consistency:
        nodes += [N(warp, "TokenFlowTemporalConsistency", col, band, widgets={"flow_preset": "medium"}),
                  N(plot, "PreviewImage", col + 1, band, title="Warp error per frame pair")]
        links += [(decode, 0, warp, "edited_frames"), (frames_from, "IMAGE", warp, "source_frames"),
                  (warp, "plot", plot, "images")]
    return nodes, links


def _sampler(node_id: int, col: int, editor: str, band: int = 0, **extra) -> N:
    widgets = {"editor": editor, "cfg": 7.5, "pnp_attn_t": 0.5, "pnp_f_t": 0.8, "sdedit_start": 0.9,
               "batch_size": 8, "keyframes": "random", "seed": 1, "blend": "official", "max_keyframes": 0,
               "steps": 0, "pnp_attention_blocks": "auto", "pnp_residual_blocks": "auto"}
    widgets.update(extra)
    return N(node_id, "TokenFlowSampler", col, band, widgets=widgets)


def _extract(node_id: int, col: int, band: int = 0) -> N:
    return N(node_id, "TokenFlowExtractCorrespondences", col, band,
             widgets={"batch_size": 8, "keyframes": "random", "seed": 1, "blend": "official", "max_keyframes": 0,
                      "preview_frame": -1})


NOTE_VIDEO = ("Put **wolf.mp4** (or your clip) in `ComfyUI/input/` or use *choose file to upload* on "
              "**TokenFlow Load Video**. 40 frames at 512x512 and 500 inversion steps are the paper's setting; "
              "for a quick look use `inversion_steps` 50 and fewer frames.")


def example_specs() -> list[Example]:
    examples = []

    # -- PnP (the paper's main setting) ---------------------------------------------------
    nodes, links = _common_source(SD21_BASE)
    nodes += [_extract(8, 2), N(9, "PreviewImage", 3, title="Correspondence check (frame | rebuilt | keyframe)"),
              _sampler(10, 3, "pnp")]
    links += [(1, "MODEL", 8, "model"), (7, "inversion", 8, "inversion"), (2, "IMAGE", 8, "source_images"),
              (8, "preview", 9, "images"),
              (1, "MODEL", 10, "model"), (5, 0, 10, "positive"), (6, 0, 10, "negative"),
              (7, "inversion", 10, "inversion"), (8, "correspondences", 10, "correspondences")]
    tail, tail_links = _edit_tail(11, 4, 10, "video/tokenflow_pnp")
    nodes += tail + [N(20, "MarkdownNote", 0, text=(
        "### TokenFlow + Plug-and-Play (the paper's setting)\n\n" + NOTE_VIDEO +
        "\n\nSD 2.1-base (`" + SD21_BASE + "`) in `models/checkpoints/`. Leave *correspondences* unconnected "
        "to compute them on the fly exactly as the official code does."), title="Read me", size=(400, 260))]
    examples.append(Example("tokenflow_pnp", nodes, links + tail_links,
                            thumbnail=("TokenFlow + PnP", EDIT_PROMPT)))

    # -- SDEdit ---------------------------------------------------------------------------
    nodes, links = _common_source(SD21_BASE)
    nodes += [_extract(8, 2), _sampler(10, 3, "sdedit")]
    links += [(1, "MODEL", 8, "model"), (7, "inversion", 8, "inversion"),
              (1, "MODEL", 10, "model"), (5, 0, 10, "positive"), (6, 0, 10, "negative"),
              (7, "inversion", 10, "inversion"), (8, "correspondences", 10, "correspondences")]
    tail, tail_links = _edit_tail(11, 4, 10, "video/tokenflow_sdedit")
    nodes += tail + [N(20, "MarkdownNote", 0, text=(
        "### TokenFlow + SDEdit\n\n" + NOTE_VIDEO + "\n\n`sdedit_start` sets how much noise the edit starts "
        "from (0.9: 44 of 50 steps). Higher changes more, keeps less of the source."),
        title="Read me", size=(400, 240))]
    examples.append(Example("tokenflow_sdedit", nodes, links + tail_links,
                            thumbnail=("TokenFlow + SDEdit", EDIT_PROMPT)))

    # -- ControlNet (canny) ---------------------------------------------------------------
    nodes, links = _common_source(SD15)
    nodes += [N(21, "Canny", 1, widgets={"low_threshold": 0.4, "high_threshold": 0.8}),
              N(22, "ControlNetLoader", 1, widgets={"control_net_name": CANNY_CN}),
              N(23, "ControlNetApplyAdvanced", 2, widgets={"strength": 1.0, "start_percent": 0.0,
                                                           "end_percent": 1.0}),
              _extract(8, 2), _sampler(10, 3, "controlnet")]
    links += [(2, "IMAGE", 21, "image"), (5, 0, 23, "positive"), (6, 0, 23, "negative"),
              (22, 0, 23, "control_net"), (21, 0, 23, "image"),
              (1, "MODEL", 8, "model"), (7, "inversion", 8, "inversion"),
              (1, "MODEL", 10, "model"), (23, "positive", 10, "positive"), (23, "negative", 10, "negative"),
              (7, "inversion", 10, "inversion"), (8, "correspondences", 10, "correspondences")]
    tail, tail_links = _edit_tail(11, 4, 10, "video/tokenflow_controlnet")
    nodes += tail + [N(20, "MarkdownNote", 0, text=(
        "### TokenFlow + ControlNet (canny)\n\n" + NOTE_VIDEO + "\n\nSD 1.5 (`" + SD15 + "`) in "
        "`models/checkpoints/`, `" + CANNY_CN + "` in `models/controlnet/`. Every frame gets its own canny "
        "hint, also in the keyframe pass."), title="Read me", size=(400, 260))]
    examples.append(Example("tokenflow_controlnet", nodes, links + tail_links,
                            thumbnail=("TokenFlow + ControlNet", "canny edges per frame")))

    # -- Baselines, side by side ----------------------------------------------------------
    nodes, links = _common_source(SD21_BASE)
    for n in nodes:
        n.band = 0
    # band 0 also holds TokenFlow (PnP)
    nodes += [_extract(8, 2, band=0), _sampler(10, 3, "pnp", band=0)]
    links += [(1, "MODEL", 8, "model"), (7, "inversion", 8, "inversion"),
              (1, "MODEL", 10, "model"), (5, 0, 10, "positive"), (6, 0, 10, "negative"),
              (7, "inversion", 10, "inversion"), (8, "correspondences", 10, "correspondences")]
    tail, tail_links = _edit_tail(11, 4, 10, "video/baseline_tokenflow", band=0)
    nodes += tail
    links += tail_links
    # band 1: per-frame editing (each frame edited alone from its own inverted noise)
    ksampler = {"add_noise": "disable", "noise_seed": 1, "steps": 50, "cfg": 7.5, "sampler_name": "ddim",
                "scheduler": "ddim_uniform", "start_at_step": 0, "end_at_step": 10000,
                "return_with_leftover_noise": "disable"}
    nodes += [N(30, "KSamplerAdvanced", 3, band=1, widgets=dict(ksampler), title="Per-frame edit (no TokenFlow)")]
    links += [(1, "MODEL", 30, "model"), (5, 0, 30, "positive"), (6, 0, 30, "negative"),
              (7, "inverted_latent", 30, "latent_image")]
    tail, tail_links = _edit_tail(31, 4, 30, "video/baseline_per_frame", band=1)
    nodes += tail
    links += tail_links
    # band 2: joint edit of keyframes only (every 5th frame, no propagation)
    nodes += [N(40, "TokenFlowLoadVideo", 0, band=2, title="Keyframes: every 5th frame",
                widgets={"video": VIDEO, "frame_load_cap": 8, "skip_first_frames": 0, "select_every_nth": 5,
                         "width": 512, "height": 512, "size_multiple": 64, "path": ""}),
              N(41, "VAEEncode", 1, band=2),
              N(42, "TokenFlowInvert", 2, band=2, widgets={"steps": 50, "inversion_steps": 500, "frame_batch": 16}),
              N(43, "TokenFlowKeyframeJointEdit", 2, band=2),
              N(44, "KSamplerAdvanced", 3, band=2, widgets=dict(ksampler), title="Joint edit of the keyframes")]
    links += [(40, 0, 41, "pixels"), (1, "VAE", 41, "vae"),
              (1, "MODEL", 42, "model"), (41, 0, 42, "latent"), (4, 0, 42, "conditioning"),
              (1, "MODEL", 43, "model"),
              (43, 0, 44, "model"), (5, 0, 44, "positive"), (6, 0, 44, "negative"),
              (42, "inverted_latent", 44, "latent_image")]
    tail, tail_links = _edit_tail(45, 4, 44, "video/baseline_keyframes_joint", band=2, frames_from=40)
    nodes += tail
    links += tail_links
    nodes.append(N(20, "MarkdownNote", 0, band=0, text=(
        "### Baselines, side by side\n\n" + NOTE_VIDEO + "\n\n1. **TokenFlow** (PnP).\n2. **Per-frame**: each "
        "frame edited alone from its own inverted noise (flickers).\n3. **Keyframes only**: every 5th frame "
        "edited jointly with extended attention (consistent, but only 8 frames; cost grows with the square of "
        "the frame count).\n\nCompare the warp errors (lower = more consistent)."),
        title="Read me", size=(400, 330)))
    examples.append(Example("baselines", nodes, links,
                            bands=["Source, inversion and TokenFlow (PnP)", "Per-frame editing",
                                   "Keyframe joint edit only"],
                            thumbnail=("Baselines", "TokenFlow | per-frame | keyframes only")))
    return examples


def build_examples(object_info: dict) -> dict[str, dict]:
    return {ex.name: build_ui_workflow(ex, object_info) for ex in example_specs()}


def write_thumbnail(path: Path, title: str, subtitle: str, video: str | None, kind: str = "") -> None:
    """A 512x384 JPEG: a frame of the source clip (or a neutral card) with a label."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    width, height = 512, 384
    canvas = Image.new("RGB", (width, height), (28, 30, 36))
    frame = None
    if video and os.path.exists(video):
        import av

        with av.open(video) as container:
            for i, f in enumerate(container.decode(video=0)):
                if i == 10:
                    frame = f.to_image().convert("RGB")
                    break
    if frame is not None:
        if kind == "controlnet":
            import cv2

            edges = cv2.Canny(np.asarray(frame.convert("L")), 80, 160)
            half = frame.resize((256, 256))
            canvas.paste(half, (0, 24))
            canvas.paste(Image.fromarray(edges).convert("RGB").resize((256, 256)), (256, 24))
        elif kind == "baselines":
            third = frame.resize((170, 170))
            for i, tint in enumerate(((1.0, 1.0, 1.0), (1.15, 0.9, 0.85), (0.85, 0.95, 1.15))):
                arr = np.clip(np.asarray(third, dtype=np.float32) * np.array(tint), 0, 255).astype(np.uint8)
                canvas.paste(Image.fromarray(arr), (1 + i * 171, 80))
        elif kind == "sdedit":  # the source, then partly noised (where SDEdit starts from)
            arr = np.asarray(frame.resize((384, 384)), dtype=np.float32)
            noise = np.random.default_rng(0).normal(127.0, 70.0, arr.shape)
            arr[:, 192:] = 0.55 * arr[:, 192:] + 0.45 * noise[:, 192:]
            canvas.paste(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)), (64, 0))
        else:
            canvas.paste(frame.resize((384, 384)), (64, 0))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle([(0, height - 96), (width, height)], fill=(14, 16, 22))
    title_font = ImageFont.load_default(size=32)
    sub_font = ImageFont.load_default(size=20)
    draw.text((18, height - 88), title, fill=(255, 255, 255), font=title_font)
    draw.text((18, height - 44), subtitle, fill=(190, 200, 215), font=sub_font)
    canvas.save(path, "JPEG", quality=85, optimize=True)


def write_examples(object_info: dict, out_dir: Path = EXAMPLES_DIR, video: str | None = None) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    video = video or os.path.join(os.environ.get("TOKENFLOW_TEST_VIDEOS", "/work/shared/videos"), "wolf.mp4")
    workflows = build_examples(object_info)
    for example in example_specs():
        workflow = workflows[example.name]
        problems = check_ui_workflow(workflow, object_info)
        if problems:
            raise ValueError(f"{example.name}: " + "; ".join(problems))
        path = out_dir / f"{example.name}.json"
        path.write_text(json.dumps(workflow, indent=2) + "\n", encoding="utf-8")
        kind = next((k for k in ("controlnet", "sdedit", "baselines") if k in example.name), "")
        write_thumbnail(out_dir / f"{example.name}.jpg", *example.thumbnail, video=video, kind=kind)
        written += [path, out_dir / f"{example.name}.jpg"]
    return written


def _main(argv: list[str]) -> int:
    if argv[:1] != ["write-examples"]:
        print("usage: python tests/server_harness.py write-examples   (starts a temporary ComfyUI to read "
              "/object_info, then writes example_workflows/*.json and *.jpg)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="tokenflow-examples-") as tmp:
        server = ComfyServer(make_base_dir(Path(tmp), stand_ins=False))
        with server:
            object_info = server.object_info()
    for path in write_examples(object_info):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
