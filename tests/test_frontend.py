"""The real ComfyUI frontend loads and queues every example workflow (headless Chromium).

The host's own server (``main.py --cpu`` through ``tests/server_harness.py``, this pack and the
test-only stand-in models installed) serves the frontend the host pins (``comfyui-frontend-package``
in the host's ``requirements.txt``; checked). Debian's ``chromium``, driven by Playwright, opens it
and, for each ``example_workflows/*.json``:

1. drops the file on the canvas as a user would: a ``drop`` event carrying a ``File``; the app's
   own drop handler reads it (``app.handleFile``) and calls ``app.loadGraphData``;
2. checks the app's own missing-node detection (the ``missingNodeTypes`` list it hands to the
   ``afterConfigureGraph`` extension hook), that every node type is registered in LiteGraph, that no
   dialog (missing nodes, missing models, load error) and no error/warning toast (e.g. the workflow
   schema validation) appeared, that every widget holds a valid value (combo values among the
   options, numbers finite and within min/max, toggles boolean, texts strings), that the frontend kept
   the saved ``widgets_values`` and all links, and that no page error was thrown;
3. types the test-time sizes into the widgets (64x64, 5 frames, 2/4 steps, ...; the files keep the
   official settings; the Flux example's three core loaders become one Load Checkpoint of the tiny
   all-in-one Flux checkpoint, as in ``tests/test_dit_server.py``), clicks Run and checks the server accepted the prompt (``POST /api/prompt``
   answered 200 with a ``prompt_id`` and no ``node_errors``, the prompt is in ``/api/queue`` or
   ``/api/history``), then that the run ends with ``success`` within ``TOKENFLOW_FRONTEND_RUN_S``
   seconds (default 120) and the page shows no error;
4. checks after the run that each Preview Any node shows its warp-error number on the canvas;
5. keeps ``<workflow>.loaded.png`` (as it opens), ``<workflow>.queued.png`` (the Output group after
   the run, with the previews and the numbers) and ``<workflow>.frontend.json`` (what the page reported) in
   the ``test_artifacts`` directory, plus ``frontend.console.log``.

The page runs with the frontend's default settings (only the first-run tutorial is marked done), so
the examples are seen as a user sees them: ``test_example_opens_readable`` opens each one in a
1920x1080 and a 1366x768 window (device pixel ratio 1) and fails when it opens below the zoom under
which the frontend draws no text (its ``low_quality``: "LiteGraph.Canvas.MinFontSizeForLOD" 8 px over
the 14 px node font, 0.571, on frontends 1.27 and 1.35), when the Read me note is out of the window,
covered by the app's bars or needs scrolling, when a title is cut, or when a node lies outside its group;
it photographs each (``<workflow>.<window>.opened.png`` and ``.json`` in ``$TOKENFLOW_SCREENSHOTS``, default
``test-artifacts/screenshots``).

What a user of the examples would have installed is provided: the model file names the workflows
use are links to the tiny stand-in files, and the videos they name are short clips in ``input/``.

Browser tools (``tests/frontend_harness.py``) come from ``scripts/install_browser.sh`` (apt's chromium + the ``playwright`` Python
package, never ``playwright install``), run by a session fixture so a fresh machine works. If it
cannot install them the tests FAIL saying why; ``TOKENFLOW_SKIP_FRONTEND=1`` skips them explicitly.
``TOKENFLOW_CHROMIUM`` names another chromium binary (default ``/usr/bin/chromium``).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

import frontend_harness as fh
import frontend_js
from frontend_harness import playwright_sync_api  # noqa: F401 (the fixture)

REPO = Path(__file__).resolve().parents[1]
WORKFLOW_DIR = REPO / "example_workflows"
WORKFLOWS = sorted(WORKFLOW_DIR.glob("*.json"))
CHROMIUM, PAGE_TIMEOUT_MS = fh.CHROMIUM, fh.PAGE_TIMEOUT_MS
RUN_TIMEOUT_S = float(os.environ.get("TOKENFLOW_FRONTEND_RUN_S", "120"))
VIEWPORT = {"width": 1920, "height": 1080}
OPENING_VIEWPORTS = [VIEWPORT, {"width": 1366, "height": 768}]  # a full-HD screen and a common laptop's
STARTUP_WATCHDOG_S = 300  # browser launch + first page load
FLUX_CHECKPOINT = "tokenflow_tiny_flux.safetensors"  # tests/stand_in_nodes/tiny_files.py
SD3_CHECKPOINT = "sd3.5_large_fp8_scaled.safetensors"  # example_specs.SD35_LARGE (tokenflow_sd3.json)

if os.environ.get("TOKENFLOW_SKIP_FRONTEND") == "1":
    pytestmark = pytest.mark.skip(reason="TOKENFLOW_SKIP_FRONTEND=1: frontend tests explicitly skipped")


# --------------------------------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------------------------------

def _provide_workflow_files(server: Any, tiny: dict) -> dict[str, list[str]]:
    """What a user of the examples has installed: their model names and their input videos.

    The model names the workflows use (loader widgets and the ``models`` list the frontend checks)
    become links to the tiny stand-in files; each video the loaders name becomes a short clip in the
    server's input folder (unless already there).
    """
    flux = fh.tiny_files_module().write_flux_checkpoint(Path(tiny["checkpoint"]).parent / FLUX_CHECKPOINT)
    stand_ins = {"checkpoints": Path(tiny["checkpoint"]), "controlnet": Path(tiny["controlnet"]),
                 # the Flux example's core loaders: names only, swapped for the tiny Flux checkpoint before Run
                 "diffusion_models": flux, "text_encoders": flux, "vae": flux}
    # the SD3.5 example's checkpoint name: the tiny all-in-one SD3 checkpoint (a flow model, as the real one)
    by_name = {SD3_CHECKPOINT: fh.tiny_files_module().write_tiny_sd3_files(Path(tiny["checkpoint"]).parent.parent)[
        "checkpoint"]}
    folders = {d: (stand_ins[d].parent if d in ("checkpoints", "controlnet") else Path(server.base_dir) / "models" / d)
               for d in stand_ins}
    loaders = {"CheckpointLoaderSimple": ("ckpt_name", "checkpoints", 1),
               "ControlNetLoader": ("control_net_name", "controlnet", 1),
               "UNETLoader": ("unet_name", "diffusion_models", 1),
               "DualCLIPLoader": ("clip_name1", "text_encoders", 2), "VAELoader": ("vae_name", "vae", 1)}
    wanted: dict[str, set[str]] = {**{d: set() for d in stand_ins}, "videos": set()}
    for workflow in WORKFLOWS:
        for node in json.loads(workflow.read_text()).get("nodes", []):
            values = node.get("widgets_values")
            if node.get("type") in loaders and isinstance(values, list) and values:
                wanted[loaders[node["type"]][1]].update(values[:loaders[node["type"]][2]])
            if node.get("type") == "TokenFlowLoadVideo" and isinstance(values, list) and values and values[0]:
                wanted["videos"].add(values[0])
            for model in (node.get("properties") or {}).get("models") or []:
                if model.get("directory") in stand_ins and model.get("name"):
                    wanted[model["directory"]].add(model["name"])
    for directory, names in wanted.items():
        for name in names:
            if directory == "videos":
                target = Path(server.input_dir) / name
                if not target.exists():
                    fh.input_files().write_test_clip(target)
                continue
            folders[directory].mkdir(parents=True, exist_ok=True)
            alias = folders[directory] / name
            if not (alias.exists() or alias.is_symlink()):
                alias.symlink_to(by_name.get(name, stand_ins[directory]))
    return {k: sorted(v) for k, v in wanted.items()}


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real ComfyUI server (``tests/server_harness.py``) with this pack, the stand-in models and clips.

    Reuses a session ``comfy_server`` + ``tiny_model_files`` when a conftest provides them (one server
    per session); otherwise starts its own the same way and stops it after this module.
    """
    import server_harness as harness

    try:
        shared, tiny = request.getfixturevalue("comfy_server"), request.getfixturevalue("tiny_model_files")
    except pytest.FixtureLookupError:
        shared = tiny = None
    if shared is not None:
        shared.tf_files = _provide_workflow_files(shared, tiny)
        yield shared
        return
    tiny = fh.tiny_files_module().write_tiny_model_files(tmp_path_factory.mktemp("frontend-tiny-models"))
    base = harness.make_base_dir(tmp_path_factory.mktemp("frontend-comfy-base"))
    own = harness.ComfyServer(base, extra_model_paths=tiny["extra_model_paths"], python=sys.executable)
    try:
        own.tf_files = _provide_workflow_files(own, tiny)
        own.start(timeout=180)
        yield own
    finally:
        own.stop()


@pytest.fixture(scope="module")
def server_url(server: Any) -> str:
    return server.url


# --------------------------------------------------------------------------------------------------
# Page
# --------------------------------------------------------------------------------------------------



@pytest.fixture(scope="module")
def page(playwright_sync_api: Any, server_url: str, test_artifacts: Path) -> Iterator[Any]:
    """The frontend open in headless chromium, instrumented; page errors collected in ``page.tf_errors``."""
    # A fresh user would get the template browser on top of the canvas; a returning one would not. Every other
    # setting keeps the frontend's default (low-quality rendering when zoomed out and the minimap included): the
    # examples must read as a user sees them.
    fh.http(f"{server_url}/api/settings", {"Comfy.TutorialCompleted": True})
    with playwright_sync_api.sync_playwright() as pw:
        with fh.watchdog(STARTUP_WATCHDOG_S):
            browser = pw.chromium.launch(
                executable_path=CHROMIUM, headless=True, timeout=60_000,
                args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"])
        pg = None
        try:
            with fh.watchdog(STARTUP_WATCHDOG_S):
                context = browser.new_context(viewport=VIEWPORT)
                context.set_default_timeout(PAGE_TIMEOUT_MS)
                pg = context.new_page()
                pg.tf_errors, pg.tf_console = [], []
                pg.on("pageerror", lambda exc: pg.tf_errors.append(str(exc)))
                pg.on("console", lambda msg: pg.tf_console.append(f"[{msg.type}] {msg.text}"))
                started = time.monotonic()
                pg.goto(f"{server_url}/", wait_until="load", timeout=60_000)
                pg.wait_for_function("() => window.app && window.app.graph && window.app.canvas && window.LiteGraph"
                                     " && document.querySelector('[data-testid=\"queue-button\"]')", timeout=90_000)
                pg.tf_startup_s = round(time.monotonic() - started, 2)
                fh.page_eval(pg, frontend_js.INSTRUMENT_JS)
            # Errors thrown while the app booted (host frontend noise, before any workflow is loaded)
            # go to the console log but are not held against the workflows.
            pg.tf_startup_errors = list(pg.tf_errors)
            pg.tf_console += [f"[startup pageerror] {e}" for e in pg.tf_errors]
            pg.tf_errors.clear()
            yield pg
        finally:
            if pg is not None:
                with contextlib.suppress(Exception):
                    (test_artifacts / "frontend.console.log").write_text("\n".join(pg.tf_console) + "\n")
            with contextlib.suppress(Exception):
                browser.close()


def _pinned_frontend_version() -> str | None:
    requirements = fh.comfyui_path() / "requirements.txt"
    match = re.search(r"^comfyui-frontend-package==(\S+)", requirements.read_text(), re.M) if requirements.is_file() else None
    return match.group(1) if match else None


# --------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------

def test_example_workflows_exist() -> None:
    assert WORKFLOWS, f"no example workflows in {WORKFLOW_DIR}"


def test_frontend_is_the_pinned_one(page: Any, server_url: str) -> None:
    version = fh.page_eval(page, "() => window.__COMFYUI_FRONTEND_VERSION__ || null")
    pinned = _pinned_frontend_version()
    assert pinned, f"no comfyui-frontend-package pin in {fh.comfyui_path() / 'requirements.txt'}"
    assert version == pinned, f"the server serves frontend {version}, the host pins {pinned}"
    assert page.url.startswith(server_url)




@pytest.fixture(scope="module")
def screenshots(test_artifacts: Path) -> Path:
    """Where the opened examples are photographed: ``$TOKENFLOW_SCREENSHOTS``, else ``test-artifacts/screenshots``."""
    path = Path(os.environ.get("TOKENFLOW_SCREENSHOTS") or test_artifacts / "screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.mark.parametrize("viewport", OPENING_VIEWPORTS, ids=[f"{v['width']}x{v['height']}" for v in OPENING_VIEWPORTS])
@pytest.mark.parametrize("workflow", WORKFLOWS, ids=[w.stem for w in WORKFLOWS])
def test_example_opens_readable(workflow: Path, viewport: dict, page: Any, screenshots: Path) -> None:
    """Opened at the frontend's default settings, the example draws its text (zoom at or above the frontend's
    low-quality threshold), shows its whole Read me note, cuts no title and keeps every node in its group."""
    name = f"{workflow.stem}.{viewport['width']}x{viewport['height']}"
    page.tf_errors.clear()
    try:
        with fh.watchdog(3 * PAGE_TIMEOUT_MS / 1000 + 60):
            page.set_viewport_size(viewport)
            page.wait_for_timeout(500)
            fh.close_dialogs(page)
            result = fh.page_eval(page, frontend_js.DROP_AND_INSPECT_JS,
                           {"text": workflow.read_text(), "fileName": workflow.name, "timeoutMs": PAGE_TIMEOUT_MS},
                           timeout_ms=PAGE_TIMEOUT_MS + 5000)
            assert "error" not in result and not result["loadError"], result
            page.wait_for_timeout(800)  # the note's text element follows the canvas on the next frames
            opened = fh.page_eval(page, frontend_js.OPENED_VIEW_JS, {str(n["id"]): n["size"] for n in
                                                                     json.loads(workflow.read_text())["nodes"]})
            page.screenshot(path=str(screenshots / f"{name}.opened.png"))
            (screenshots / f"{name}.opened.json").write_text(json.dumps(opened, indent=1))
    finally:
        page.set_viewport_size(VIEWPORT)
        with contextlib.suppress(Exception):
            fh.close_dialogs(page)
    view = opened["view"]
    assert view["lowQuality"] is False and view["scale"] >= (view["threshold"] or 0), \
        (f"{name} opens at zoom {view['scale']}, below the frontend's {view['threshold']} under which it draws no "
         f"text (min font {view['minFontSizeForLod']} px / node text {view['nodeTextSize']} px)")
    assert not opened["problems"], f"{name}:\n  " + "\n  ".join(opened["problems"])
    assert not page.tf_errors, f"page errors while opening {name}: {page.tf_errors}"


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=[w.stem for w in WORKFLOWS])
def test_frontend_loads_and_queues_workflow(workflow: Path, page: Any, server: Any, test_artifacts: Path) -> None:
    text = workflow.read_text()
    url = server.url
    report: dict[str, Any] = {"workflow": workflow.name}
    timings: dict[str, float] = {}
    page.tf_errors.clear()
    try:
        with fh.watchdog(RUN_TIMEOUT_S + 3 * PAGE_TIMEOUT_MS / 1000 + 60):
            fh.close_dialogs(page)
            fh.page_eval(page, "() => { window.__tf.events = []; window.__tf.loadError = null; }")
            _load_and_check(page, workflow, text, report, timings, test_artifacts)
            _queue_and_run(page, server, workflow, report, timings, test_artifacts)
    finally:
        report["timings"] = timings
        report["page_errors"] = list(page.tf_errors)
        with contextlib.suppress(Exception):
            (test_artifacts / f"{workflow.stem}.frontend.json").write_text(json.dumps(report, indent=1, default=str))
        fh.clear_server_queue(url)
        with contextlib.suppress(Exception):
            fh.close_dialogs(page)


def _load_and_check(page: Any, workflow: Path, text: str, report: dict, timings: dict, artifacts: Path) -> None:
    # Drop the file on the canvas; the page waits (bounded) for the app's loadGraphData to finish.
    started = time.monotonic()
    result = fh.page_eval(page, frontend_js.DROP_AND_INSPECT_JS, {"text": text, "fileName": workflow.name, "timeoutMs": PAGE_TIMEOUT_MS},
                   timeout_ms=PAGE_TIMEOUT_MS + 5000)
    timings["load_s"] = round(time.monotonic() - started, 2)
    report["load"] = result
    page.wait_for_timeout(500)
    page.screenshot(path=str(artifacts / f"{workflow.stem}.loaded.png"))
    events = fh.page_eval(page, frontend_js.EVENTS_JS)
    report["load_events"] = events

    assert "error" not in result, result["error"]
    assert not result["loadError"], f"app.loadGraphData threw: {result['loadError']}"
    assert result["missing"] is not None, "the app's afterConfigureGraph hook did not run (load aborted?)"
    assert result["missing"] == [], f"the app reports missing node types: {result['missing']}"
    assert not result["unregistered"], f"node types not registered in the frontend: {result['unregistered']}"
    dialogs = fh.page_eval(page, frontend_js.OPEN_DIALOGS_JS)
    shown = [e for e in events if e["kind"] == "dialog"]
    assert not dialogs and not shown, f"the app showed dialogs while loading: {dialogs or shown}"
    toasts = [e for e in events if e["kind"] == "toast" and e["severity"] in ("error", "warn")]
    assert not toasts, f"the app showed error/warning toasts while loading: {toasts}"
    assert not result["problems"], "invalid graph or widget values after loading:\n  " + "\n  ".join(result["problems"])
    assert result["links"] == result["savedLinks"], f"{result['savedLinks']} links saved, {result['links']} loaded"
    assert not page.tf_errors, f"page errors while loading: {page.tf_errors}"


def _queue_and_run(page: Any, server: Any, workflow: Path, report: dict, timings: dict, artifacts: Path) -> None:
    url = server.url
    report["flux_loaders_swapped"] = fh.page_eval(page, frontend_js.FLUX_LOADERS_TO_CHECKPOINT_JS, FLUX_CHECKPOINT)
    report["overrides"] = fh.page_eval(page, frontend_js.TINY_OVERRIDES_JS)

    # Click Run, as a user would; the frontend builds the prompt and POSTs it.
    started = time.monotonic()
    try:
        with page.expect_response(lambda r: r.url.endswith("/api/prompt") and r.request.method == "POST",
                                  timeout=PAGE_TIMEOUT_MS) as response_info:
            page.locator('[data-testid="queue-button"]').first.click()
        response = response_info.value
    except Exception as exc:  # noqa: BLE001 (playwright's TimeoutError): say what the page showed instead
        pytest.fail(f"clicking Run sent no POST /api/prompt within {PAGE_TIMEOUT_MS} ms ({exc}); dialogs "
                    f"{fh.page_eval(page, frontend_js.OPEN_DIALOGS_JS)}, events {fh.page_eval(page, frontend_js.EVENTS_JS)}, page errors {page.tf_errors}")
    body = response.json()
    report["queue_response"] = {"status": response.status, "body": body}
    assert response.status == 200, f"the server refused the prompt ({response.status}): {json.dumps(body)[:3000]}"
    prompt_id = body.get("prompt_id")
    assert prompt_id, f"no prompt_id in the server's answer: {body}"
    assert not body.get("node_errors"), f"node errors: {body['node_errors']}"
    queue = fh.http(f"{url}/api/queue")
    held = {item[1] for item in queue["queue_running"] + queue["queue_pending"]}
    assert prompt_id in held or prompt_id in (fh.http(f"{url}/api/history/{prompt_id}") or {}), \
        f"prompt {prompt_id} is neither in /api/queue nor in /api/history"

    # It runs to the end on the server, and the page shows no error.
    entry, deadline = None, time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        entry = (fh.http(f"{url}/api/history/{prompt_id}") or {}).get(prompt_id)
        if entry and entry.get("status", {}).get("completed") is not None:
            break
        entry = None
        time.sleep(0.5)
    timings["queue_to_done_s"] = round(time.monotonic() - started, 2)
    assert entry is not None, (f"the queued run did not finish within {RUN_TIMEOUT_S:.0f} s "
                               f"(TOKENFLOW_FRONTEND_RUN_S)\n{fh.log_tail(server)}")
    status = entry["status"]
    report["run_status"] = status
    errors = [m for m in status.get("messages", []) if m and m[0] == "execution_error"]
    assert not errors and status.get("status_str") == "success", \
        f"the queued run failed: {json.dumps(errors or status)[:3000]}\n{fh.log_tail(server)}"
    page.wait_for_function("() => !window.app.runningNodeId", timeout=PAGE_TIMEOUT_MS)
    page.wait_for_timeout(1000)  # let the previews arrive and paint
    fh.page_eval(page, frontend_js.SHOW_GROUP_JS, "Output")  # the video, the warp-error plot and its numbers
    page.wait_for_timeout(300)
    page.screenshot(path=str(artifacts / f"{workflow.stem}.queued.png"))
    texts = fh.page_eval(page, frontend_js.PREVIEW_TEXTS_JS)
    report["preview_texts"] = texts
    consistency = sum(1 for n in json.loads(workflow.read_text())["nodes"] if n["type"] == "TokenFlowTemporalConsistency")
    assert len(texts) == 2 * consistency, f"{len(texts)} Preview Any nodes for {consistency} warp-error nodes: {texts}"
    for title, shown in texts.items():  # each shows its number on the canvas
        assert shown and all(fh.is_number(value) for value in shown), f"Preview Any {title!r} shows {shown}"
    events = fh.page_eval(page, frontend_js.EVENTS_JS)
    report["queue_events"] = events
    bad = [e for e in events if e["kind"] == "dialog" or (e["kind"] == "toast" and e["severity"] == "error")]
    assert not bad, f"the app showed errors after queueing: {bad}"
    assert not fh.page_eval(page, "() => window.app.lastNodeErrors || null"), "the app holds node errors"
    assert not fh.page_eval(page, "() => window.app.lastExecutionError || null"), "the app holds an execution error"
    assert not page.tf_errors, f"page errors while queueing: {page.tf_errors}"
    if workflow.stem == "tokenflow_sd3":  # its checkpoint name is the tiny SD3 file: loaded as the flow model it is
        assert "model_type FLOW" in server.log_text(), f"the SD3.5 example did not load an SD3 model\n{fh.log_tail(server)}"
