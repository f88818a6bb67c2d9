"""A real ComfyUI server for the tests: the host's ``main.py`` as a subprocess.

:class:`ComfyServer` starts ``main.py`` of the host (``$COMFYUI_PATH``) as a subprocess on the
loopback interface only, with ``--cpu --use-pytorch-cross-attention``, a throw-away
``--base-directory`` (:func:`make_base_dir`: its ``custom_nodes/`` holds a symlink named
``ComfyUI-TokenFlow`` to this repository and one to the test-only ``tests/stand_in_nodes`` pack), an
in-memory database and ``--extra-model-paths-config`` for the tiny model files.
``$TOKENFLOW_TEST_THREADS`` (default 1) becomes ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` of the server
(and of the headless runner, :func:`runner_env`). Every wait is bounded; :meth:`ComfyServer.stop`
terminates (then kills) the server's own process group.

The files the tests hand to the server are written by ``tests/input_files.py``; workflows are
converted and checked against ``/object_info`` by ``tests/workflow_format.py``.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Iterable

REPO = Path(__file__).resolve().parents[1]
PACK_DIR_NAME = "ComfyUI-TokenFlow"
STAND_IN_DIR_NAME = "tokenflow_test_stand_ins"
DEFAULT_COMFYUI = Path.home() / "comfy" / "ComfyUI"


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
