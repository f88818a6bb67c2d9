"""The browser and server tools of the frontend test (``tests/test_frontend.py``): Playwright with Debian's chromium
(installed by ``scripts/install_browser.sh``), a watchdog for a hung renderer, bounded page calls, and small HTTP
helpers for the test server."""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

import frontend_js

REPO = Path(__file__).resolve().parents[1]
INSTALL_SCRIPT = REPO / "scripts" / "install_browser.sh"
CHROMIUM = os.environ.get("TOKENFLOW_CHROMIUM", "/usr/bin/chromium")
PAGE_TIMEOUT_MS = 30_000


@pytest.fixture(scope="session")
def playwright_sync_api() -> Any:
    """``playwright.sync_api`` with Debian's chromium present; installs both when missing, or fails."""
    env = dict(os.environ, PYTHON=sys.executable, TOKENFLOW_CHROMIUM=CHROMIUM)
    try:
        proc = subprocess.run(["bash", str(INSTALL_SCRIPT)], env=env, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{INSTALL_SCRIPT} did not finish within 900 s (apt-get/pip hanging?). "
                    "Set TOKENFLOW_SKIP_FRONTEND=1 to skip the frontend tests explicitly.")
    if proc.returncode != 0:
        pytest.fail(
            f"could not install the browser tools for the frontend test ({INSTALL_SCRIPT} exited "
            f"{proc.returncode}):\n{proc.stderr[-3000:]}\nInstall Debian's chromium (apt-get install chromium) and "
            f"`{sys.executable} -m pip install playwright`, or set TOKENFLOW_SKIP_FRONTEND=1 to skip explicitly.")
    importlib.invalidate_caches()
    try:
        return importlib.import_module("playwright.sync_api")
    except ImportError as exc:  # installed into another interpreter?
        pytest.fail(f"playwright is not importable from {sys.executable} after {INSTALL_SCRIPT}: {exc}")


@contextlib.contextmanager
def watchdog(seconds: float) -> Iterator[None]:
    """Kill this process's Playwright driver (and so its browser) if the block runs over ``seconds``.

    Playwright's own timeouts bound every wait; this is the backstop for a hung renderer or driver:
    the pending Playwright call then raises and the test fails instead of hanging the suite.
    """
    import threading

    def fire() -> None:
        try:
            import psutil

            for child in psutil.Process().children(recursive=False):
                with contextlib.suppress(psutil.Error):
                    if "playwright" in " ".join(child.cmdline()):
                        for proc in child.children(recursive=True) + [child]:
                            with contextlib.suppress(psutil.Error):
                                proc.kill()
        except Exception:  # noqa: BLE001 (a watchdog must not raise in its thread)
            pass

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def page_eval(pg: Any, js: str, arg: Any = None, timeout_ms: int = PAGE_TIMEOUT_MS) -> Any:
    """``page.evaluate`` of an (async) function expression, rejected in the page after ``timeout_ms``."""
    bounded = (f"async (arg) => Promise.race([({js.strip()})(arg), new Promise((_, reject) => "
               f"setTimeout(() => reject(new Error('page call timed out after {timeout_ms} ms')), {timeout_ms}))])")
    return pg.evaluate(bounded, arg)


def comfyui_path() -> Path:
    return Path(os.environ.get("COMFYUI_PATH") or Path.home() / "comfy" / "ComfyUI").expanduser().resolve()


def http(url: str, data: Any = None, timeout: float = 10.0) -> Any:
    body = None if data is None else json.dumps(data).encode()
    request = urllib.request.Request(url, data=body, method="GET" if data is None else "POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        raw = response.read()
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return raw.decode(errors="replace")


def tiny_files_module() -> Any:
    path = REPO / "tests" / "stand_in_nodes" / "tiny_files.py"
    spec = importlib.util.spec_from_file_location("tokenflow_frontend_tiny_files", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def input_files() -> Any:
    import input_files

    return input_files


def clear_server_queue(server_url: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        http(f"{server_url}/api/queue", {"clear": True})
        http(f"{server_url}/api/interrupt", {})
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            queue = http(f"{server_url}/api/queue")
            if not queue["queue_running"] and not queue["queue_pending"]:
                return
            http(f"{server_url}/api/interrupt", {})
            time.sleep(0.5)


def log_tail(server: Any) -> str:
    with contextlib.suppress(Exception):
        return "--- server log ---\n" + server.log_tail(4000)
    return ""


def is_number(text: Any) -> bool:
    try:
        return isinstance(text, str) and math.isfinite(float(text))
    except ValueError:
        return False


def close_dialogs(pg: Any) -> None:
    for _ in range(3):
        if not page_eval(pg, frontend_js.OPEN_DIALOGS_JS):
            return
        pg.keyboard.press("Escape")
        pg.wait_for_timeout(300)
