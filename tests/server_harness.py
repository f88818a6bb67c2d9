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
* ``write-examples`` writes ``example_workflows/*.json`` and their ``.jpg`` thumbnails (the names the
  frontend's template browser fetches: ``/api/workflow_templates/<pack>/<name>.jpg``) from the
  specifications in ``tests/example_specs.py`` (rendered by ``tests/workflow_builder.py``):

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
from dataclasses import dataclass
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


def _main(argv: list[str]) -> int:
    if argv[:1] != ["write-examples"]:
        print("usage: python tests/server_harness.py write-examples   (starts a temporary ComfyUI to read "
              "/object_info, then writes example_workflows/*.json and *.jpg)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="tokenflow-examples-") as tmp:
        server = ComfyServer(make_base_dir(Path(tmp), stand_ins=False))
        with server:
            object_info = server.object_info()
    from example_specs import write_examples  # tests/example_specs.py (it imports this module)

    for path in write_examples(object_info):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
