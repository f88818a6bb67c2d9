"""Console, Ctrl-C handling and small host helpers of the headless runner (scripts/tokenflow_edit.py).

Imported by the runner from its own folder before it puts the ComfyUI host first on ``sys.path``;
ComfyUI modules are imported inside the functions, once the host is importable.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path


class StartUp:
    """What start-up is doing, for the message of a Ctrl-C there (``stage``; "" once the graph runs).

    While entered, Ctrl-C raises KeyboardInterrupt at once, as Python's own handler does, and is remembered: the
    host can swallow the KeyboardInterrupt (under Python's default handler ``asyncio.run`` turns it into a
    cancelled task, which a node pack's loader may catch), and start-up would then go on to a misleading error.
    :meth:`at` raises again at the next stage, and :attr:`interrupted_in` keeps the stage it came in."""

    def __init__(self) -> None:
        self.stage = "checking the command line"
        self.interrupted_in: str | None = None
        self.previous = None

    def __enter__(self) -> "StartUp":
        # An ignored SIGINT stays ignored, as Python leaves it (a shell's background job inherits it so)
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            self.previous = signal.signal(signal.SIGINT, self.ctrl_c)
        return self

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)

    def ctrl_c(self, signum, frame) -> None:
        if self.interrupted_in is None:
            self.interrupted_in = self.stage
        raise KeyboardInterrupt

    def at(self, stage: str) -> None:
        """Start-up moves on to ``stage``, unless a Ctrl-C came in earlier and was swallowed on the way."""
        if self.interrupted_in is not None:
            raise KeyboardInterrupt
        self.stage = stage

    def interrupted_message(self) -> str:
        stage = self.interrupted_in if self.interrupted_in is not None else self.stage
        return f"interrupted{f' while {stage}' if stage else ''}: nothing was written (no output file)"


class StopOnCtrlC:
    """Ctrl-C (SIGINT) while the graph runs does what the server's /interrupt does: it sets ComfyUI's interrupt
    flag, so the running node stops at its next step or batch and no further node starts. A second Ctrl-C
    aborts at once (KeyboardInterrupt)."""

    def __init__(self) -> None:
        self.requested = False
        self.previous = None

    def __enter__(self) -> "StopOnCtrlC":
        self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self.previous)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.reassert()
        print("\ninterrupting: stopping at the next step (press Ctrl-C again to abort at once)", file=sys.stderr,
              flush=True)

    def reassert(self) -> None:
        """Set ComfyUI's interrupt flag again if Ctrl-C was pressed (the executor clears it when a run starts)."""
        if self.requested:
            import comfy.model_management

            comfy.model_management.interrupt_current_processing(True)


class Console:
    """What ComfyUI's server would send to the browser, printed instead: a line per node, ended by its time, and
    its progress in the words of ``units`` (class type -> (value, total) -> "edit step 2/4 ...")."""

    def __init__(self, prompt: dict, titles: dict[str, str], stop: StopOnCtrlC, units: dict | None = None):
        self.prompt, self.titles, self.stop, self.units = prompt, titles, stop, units or {}
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata: dict = {}
        self.started = time.monotonic()
        self.node_started = self.started
        self._node: str | None = None  # the running node's id
        self._open = False  # its line waits for its time (no progress line came)
        self._last_fraction = -1.0
        self._tty = sys.stdout.isatty()
        self._done = 0
        self._total = len(prompt)

    def _name(self, node_id) -> str:
        node = self.prompt.get(str(node_id), {})
        class_type = node.get("class_type", "?")
        title = self.titles.get(class_type, class_type)
        meta = node.get("_meta", {}).get("title")
        return f"{title}: {meta}" if meta else title

    def send_sync(self, event: str, data, sid=None) -> None:
        self.stop.reassert()
        if event == "execution_cached":
            self._done += len(data.get("nodes", []))
        elif event == "executing" and isinstance(data, dict):
            self.end_node()
            if data.get("node") is None or self.stop.requested:  # after Ctrl-C the node is refused: no line for it
                return
            self._done += 1
            self._node, self._open = str(data["node"]), True
            self.node_started = time.monotonic()
            self._last_fraction = -1.0
            print(f"[{self._done}/{self._total}] {self._name(data['node'])}", end="", flush=True)

    def end_node(self) -> None:
        """End the running node's line with its time (a line of its own after progress lines)."""
        if self._node is None:
            return
        elapsed = time.monotonic() - self.node_started
        if self._tty and 0 <= self._last_fraction < 1:  # a progress line left open by "\r"
            print(flush=True)
        if self._open:
            print(f" ({elapsed:.1f} s)", flush=True)
        else:
            print(f"[{self._done}/{self._total}] {self._name(self._node)}: done in {elapsed:.1f} s", flush=True)
        self._node, self._open = None, False

    def queue_updated(self) -> None:
        pass

    def progress(self, value, total, preview=None, prompt_id=None, node_id=None) -> None:
        import comfy.model_management
        from comfy_execution.progress import get_progress_state
        from comfy_execution.utils import get_executing_context

        # As ComfyUI's main.py hook: an interrupt stops the node at its next progress update.
        comfy.model_management.throw_exception_if_processing_interrupted()

        context = get_executing_context()
        if node_id is None and context is not None:
            node_id = context.node_id
        try:
            get_progress_state().update_progress(node_id, value, total, preview)
        except Exception:  # noqa: BLE001 - progress display must never break the edit
            pass
        total = max(int(total or 1), 1)
        fraction = min(value / total, 1.0)
        words = self.units.get(self.prompt.get(str(node_id), {}).get("class_type"), lambda v, t: f"{v}/{t}")
        counted = words(int(value), total)
        if counted is None:  # a second bar of the node that counts what another already shows
            return
        if self._open:  # the node's line ends here; its time comes on the line after the progress
            print(flush=True)
            self._open = False
        line = f"    {counted} ({100 * fraction:3.0f}%, {time.monotonic() - self.node_started:.0f} s)"
        if self._tty:
            print("\r" + line, end="" if value < total else "\n", flush=True)
            self._last_fraction = fraction
        elif fraction >= 1.0 or fraction - self._last_fraction >= 0.1:
            print(line, flush=True)
            self._last_fraction = fraction


class NoExecutorTracebacks(logging.Filter):
    """Drops the executor's own error records (message + traceback) of a failed node."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and Path(record.pathname).name == "execution.py")


class OnlyPackRecords(logging.Filter):
    """Without --verbose: drops ComfyUI's own records (its root logger: model detection's ``no match``, loader
    warnings...) and the executor's error records; the runner reports failures itself, in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name != "root" and NoExecutorTracebacks.filter(self, record)


def short_logger_name(name: str) -> str:
    """A custom node pack's logger is named after its folder's absolute path (ComfyUI imports a folder pack as
    ``/abs/path`` with "." -> "_x_"): keep the folder's name, ``ComfyUI-TokenFlow.engine.plan.edit_plan``."""
    head, dot, tail = name.partition(".")
    if "/" in head or "\\" in head:
        head = head.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1].replace("_x_", ".")
    return head + dot + tail


class RunnerFormatter(logging.Formatter):
    """``warning: message`` (default) or ``WARNING ComfyUI-TokenFlow.engine.x: message`` (--verbose)."""

    def __init__(self, verbose: bool) -> None:
        super().__init__()
        self.verbose = verbose

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            message = f"{message}\n{record.exc_text}"
        if self.verbose:
            return f"{record.levelname} {short_logger_name(record.name)}: {message}"
        return f"{record.levelname.lower()}: {message}"


def setup_logging(verbose: bool) -> None:
    """INFO and every logger with --verbose; else the pack's (and other packs') warnings, as ``warning: ...``."""
    handler = logging.StreamHandler()
    handler.setFormatter(RunnerFormatter(verbose))
    if not verbose:
        handler.addFilter(OnlyPackRecords())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO if verbose else logging.WARNING)


def default_threads(available: int, torch_default: int) -> int:
    """Half the CPUs this process may use (at least 1, at most PyTorch's own default). Measured on a busy 2-core
    machine (benchmarks/README.md, "Threads"): all cores ran the tiny edit 3.2x and a full-size SD1.5 PnP run 2.7x
    slower than one thread (medians), because the OpenMP threads spin against the machine's other work; half leaves it room."""
    return max(1, min(available // 2, torch_default))


def set_threads(requested: int) -> tuple[int, int]:
    """Set PyTorch's CPU thread count: --threads, else $OMP_NUM_THREADS, else :func:`default_threads` of the CPUs
    this process may use (affinity / container limits). Returns (threads, CPUs available)."""
    import torch

    try:
        available = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        available = os.cpu_count() or 1
    from_env = os.environ.get("OMP_NUM_THREADS", "").strip()
    threads = requested or (int(from_env) if from_env.isdigit() and int(from_env) > 0 else 0)
    threads = threads or default_threads(available, torch.get_num_threads())
    torch.set_num_threads(threads)
    return threads, available


def accelerator_available() -> bool:
    import torch

    checks = (lambda: torch.cuda.is_available(), lambda: torch.backends.mps.is_available(),
              lambda: torch.xpu.is_available())
    for check in checks:
        try:
            if check():
                return True
        except Exception:  # noqa: BLE001 - a backend this torch build lacks
            continue
    return False


def register_model(folder: str, given: str, folder_paths) -> str | None:
    """The name ComfyUI's loader needs for ``given`` (a path, or a name inside the models folder)."""
    path = Path(given).expanduser()
    if path.is_file():
        folder_paths.add_model_folder_path(folder, str(path.resolve().parent), is_default=True)
        return path.name
    if folder_paths.get_full_path(folder, given) is not None:
        return given
    return None


def describe(path: Path) -> str:
    try:
        import av

        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            frames = sum(1 for _ in container.decode(stream))
            return f"{frames} frames, {stream.width}x{stream.height}, {float(stream.average_rate):g} fps"
    except Exception as e:  # noqa: BLE001 - only a description
        return f"unreadable: {e}"


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: ...)" only for real defaults (not None, "", False or [])."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, "", False, []) or action.default is argparse.SUPPRESS or \
                "(default:" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def prompt_executor(execution, server):
    """ComfyUI's ``PromptExecutor`` with the classic cache, made the way this host's ``main.py`` makes it: hosts
    that take ``cache_args`` read its RAM headroom after every node (0.3.x took ``cache_size`` instead)."""
    import inspect

    options: dict = {"cache_type": execution.CacheType.CLASSIC}
    if "cache_args" in inspect.signature(execution.PromptExecutor.__init__).parameters:
        from comfy.cli_args import args

        options["cache_args"] = {"lru": getattr(args, "cache_lru", 0), "ram": getattr(args, "cache_ram", 0)}
    return execution.PromptExecutor(server, **options)


def find_host(explicit: str | None, repo: Path) -> Path | None:
    """The ComfyUI host: ``explicit``, $COMFYUI_PATH, the ComfyUI holding ``repo`` in custom_nodes/, ~/comfy/ComfyUI."""
    candidates = [explicit, os.environ.get("COMFYUI_PATH")]
    if repo.parent.name == "custom_nodes":
        candidates.append(str(repo.parent.parent))
    candidates.append(str(Path.home() / "comfy" / "ComfyUI"))
    for candidate in candidates:
        if candidate and (Path(candidate).expanduser() / "comfy" / "model_patcher.py").is_file():
            return Path(candidate).expanduser().resolve()
    return None
