"""The headless runner (scripts/tokenflow_edit.py) as a user meets it, run as a subprocess (issue 8).

* Ctrl-C (SIGINT) while the sampler runs stops the graph at once, as the server's /interrupt does:
  exit 130 within seconds, no later node (VAE Decode, Save Video) starts, no output video and no
  temporary folder is left.
* The step-grid rule is checked before ComfyUI is even imported, with the script's option names.
* Polish: ``--help`` shows only real defaults; a damaged checkpoint file gives one line naming the
  file (the traceback only with ``--verbose``); the PyTorch thread count is set and printed.

The tiny checkpoint FILE is the one the server tests use (``input_files.write_tiny_model_files``).
"""
from __future__ import annotations

import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import input_files
import server_harness as harness

REPO = Path(__file__).resolve().parents[1]
RUNNER = REPO / "scripts" / "tokenflow_edit.py"
STAND_INS = REPO / "tests" / "stand_in_nodes"


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory) -> dict:
    return input_files.write_tiny_model_files(tmp_path_factory.mktemp("runner-models"))


def _command(video_file: Path, checkpoint: Path | str, output: Path, *extra: str) -> list[str]:
    return [sys.executable, str(RUNNER), "--video", str(video_file), "--prompt", "a shiny silver robotic wolf",
            "--inversion-prompt", "a wolf", "--checkpoint", str(checkpoint), "--output", str(output),
            "--width", "64", "--height", "64", "--cpu", "--extra-nodes", str(STAND_INS), *extra]


# The sampler's progress: "    edit step 2/50 (frame 3/5) ( 5%, 4 s)"
EDIT_PROGRESS = r"^\s+edit step (\d+)/(\d+) \(frame (\d+)/(\d+)\) \("


def _frame_steps(line: str) -> tuple[int, int]:
    """(frame steps done, frame steps in all) of a sampler progress line."""
    step, steps, frame, frames = map(int, re.match(EDIT_PROGRESS, line).groups())
    return (step - 1) * frames + frame, steps * frames


class LineReader:
    """Lines of a subprocess's pipe, read on a thread, waited for with a deadline."""

    def __init__(self, pipe) -> None:
        self.lines: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self._thread.start()

    def _read(self, pipe) -> None:
        for line in pipe:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                return None
            self.lines.append(line)
            if re.search(pattern, line):
                return line
        return None

    def rest(self, timeout: float = 10.0) -> str:
        self._thread.join(timeout)
        while not self._queue.empty():
            line = self._queue.get()
            if line is not None:
                self.lines.append(line)
        return "".join(self.lines)


def test_ctrl_c_stops_the_sampler_at_once_and_leaves_nothing(tmp_path, tiny_files, video_file):
    temp = tmp_path / "tmp"
    temp.mkdir()
    output = tmp_path / "out" / "edited.mp4"
    # 50 editing steps x 3 batches: the sampler alone runs for many seconds on the tiny model
    command = _command(video_file, tiny_files["checkpoint"], output, "--steps", "50", "--inversion-steps", "50",
                       "--batch-size", "2", "--frames", "5")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=harness.runner_env(TMPDIR=str(temp)))
    out, err = LineReader(process.stdout), LineReader(process.stderr)
    try:
        assert out.wait_for(r"TokenFlow Sampler", timeout=240), f"the sampler never started:\n{out.rest(1)}"
        progress = out.wait_for(EDIT_PROGRESS, timeout=120)
        assert progress, f"no sampler progress:\n{out.rest(1)}"
        done, total = _frame_steps(progress)
        assert done < total
        sent = time.monotonic()
        process.send_signal(signal.SIGINT)
        code = process.wait(timeout=30)
        elapsed = time.monotonic() - sent
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    stdout, stderr = out.rest(), err.rest()
    assert code == 130, f"exit {code}\nstdout:\n{stdout[-3000:]}\nstderr:\n{stderr[-3000:]}"
    # "At once": the sampler stops within the step it was in (progress counts frames: 5 per step; one more
    # step allowed for the pipe's lag behind the process). The wall-clock bound only catches a hang: on a
    # loaded 2-core CI machine the process's own exit has taken over 6 s.
    assert elapsed < 20.0, f"took {elapsed:.1f} s to stop"
    sampler_progress = [line for line in stdout.splitlines() if re.match(EDIT_PROGRESS, line)]
    last_done = _frame_steps(sampler_progress[-1])[0]
    assert last_done < total, "the sampler ran to the end"
    assert last_done <= done + 2 * 5, f"the sampler went on from {done} to {last_done} of {total} after Ctrl-C"
    for later in ("VAE Decode", "Create Video", "Save Video", "wrote "):
        assert later not in stdout, f"{later!r} ran after Ctrl-C:\n{stdout}"
    assert "interrupted" in stderr
    assert "PyTorch uses 1 CPU thread(s)" in stdout  # $OMP_NUM_THREADS=1 from runner_env
    assert not output.exists() and not output.parent.exists()
    assert list(temp.iterdir()) == [], f"left behind: {list(temp.iterdir())}"


@pytest.mark.parametrize("steps,inversion_steps,words", [
    ("4", "12", ["--steps (4)", "--inversion-steps (12)", "Set --inversion-steps to 8 or 20 for --steps = 4"]),
    ("50", "1000", ["--inversion-steps (1000) is too many", "Use --inversion-steps = 999 or less"]),
])
def test_runner_refuses_steps_off_the_grid_before_loading_anything(tmp_path, video_file, steps, inversion_steps, words):
    result = subprocess.run(_command(video_file, tmp_path / "none.safetensors", tmp_path / "out.mp4", "--steps", steps,
                                     "--inversion-steps", inversion_steps),
                            capture_output=True, text=True, timeout=120, env=harness.runner_env())
    assert result.returncode == 2, result.stderr
    for word in words:
        assert word in result.stderr, f"{word!r} missing from: {result.stderr}"
    assert "ComfyUI host" not in result.stdout  # refused before the host was imported


def test_help_shows_real_defaults_only():
    result = subprocess.run([sys.executable, str(RUNNER), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())  # argparse wraps lines
    assert "(default: None)" not in text and "(default: )" not in text and "(default: False)" not in text
    assert "(default: 50)" in text and "(default: 500)" in text and "(default: pnp)" in text
    assert "1000 // --inversion-steps must divide 1000 // --steps" in text and "1 to 999" in text


def _one_line_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def test_damaged_safetensors_checkpoint_is_one_line_naming_the_file(tmp_path, video_file):
    bad = tmp_path / "half-downloaded.safetensors"
    bad.write_bytes(b"\x00\xff" * 2000)
    command = _command(video_file, bad, tmp_path / "out.mp4", "--steps", "2", "--inversion-steps", "4")
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, env=harness.runner_env())
    assert result.returncode == 2, result.stderr
    line = _one_line_error(result.stderr)
    assert line.startswith(f"error: --checkpoint {bad}: not a .safetensors file") and "download it again" in line
    assert "ComfyUI host" not in result.stdout  # its header was read before the host loaded


def test_checkpoint_comfyui_cannot_load_is_one_line_naming_the_file(tmp_path, video_file):
    """A file whose header is sound but which holds no model: ComfyUI's loader refuses it, named by the option."""
    import safetensors.torch
    import torch

    bad = tmp_path / "not-a-model.safetensors"
    safetensors.torch.save_file({"weight": torch.zeros(4)}, str(bad))
    output = tmp_path / "out.mp4"
    command = _command(video_file, bad, output, "--steps", "2", "--inversion-steps", "4")
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, env=harness.runner_env())
    assert result.returncode == 1, result.stderr
    line = _one_line_error(result.stderr)
    assert line.startswith(f"error: --checkpoint {bad}: ComfyUI could not load it (") and "--verbose" in line, line
    assert not output.exists()


# -- bad inputs (issue 14, item 5) -------------------------------------------------------------------------------

def _faststart_mp4(path: Path, frames: int = 14, size: int = 64) -> Path:
    """An mp4 with its index (moov) first, as streaming encoders write it: cut mid-file, its first frames decode."""
    return input_files.write_mp4(path, n=frames, size=size, faststart=True)


def _bad_video(kind: str, folder: Path, video_file: Path) -> Path:
    if kind == "text renamed .mp4":
        path = folder / "notes.mp4"
        path.write_text("these are my notes, not a video\n" * 20)
    elif kind == "truncated mp4":  # index at the end, cut off: nothing to read
        whole = input_files.write_mp4(folder / "whole.mp4", n=8).read_bytes()
        path = folder / "half-copied.mp4"
        path.write_bytes(whole[:len(whole) // 2])
    else:  # "cut mid-file": index first, frames missing from the middle on
        whole = _faststart_mp4(folder / "whole-fast.mp4").read_bytes()
        path = folder / "cut.mp4"
        path.write_bytes(whole[:int(len(whole) * 0.6)])
    return path


def _run(video_file: Path, tiny_files: dict, output: Path, *extra: str, env: dict | None = None, frames: str = "2",
         timeout: float = 240) -> subprocess.CompletedProcess:
    command = _command(video_file, tiny_files["checkpoint"], output, "--steps", "2", "--inversion-steps", "4",
                       "--batch-size", "2", "--frames", frames, *extra)
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          env=harness.runner_env(**(env or {})))


@pytest.mark.parametrize("kind,fix", [
    ("text renamed .mp4", "Use an mp4/webm/mov/gif file or a folder of images."),
    ("truncated mp4", "Use an mp4/webm/mov/gif file or a folder of images."),
    ("cut mid-file", "set --frames 6 to load only them, or re-export / re-download the video."),
])
def test_a_bad_video_names_the_users_path_and_keeps_the_whole_fix(tmp_path, tiny_files, video_file, kind, fix):
    bad = _bad_video(kind, tmp_path, video_file)
    result = _run(bad, tiny_files, tmp_path / "out.mp4", frames="0")
    assert result.returncode == 1, result.stderr
    line = _one_line_error(result.stderr)
    assert line.startswith("error in TokenFlowLoadVideo: ValueError: ") and f"'{bad}'" in line, line
    assert fix in line and "tokenflow-edit-" not in line and "source.mp4" not in line, line
    assert "frame_load_cap" not in line and "..." not in line, line  # the runner's option names, nothing cut
    assert line.endswith("(--verbose shows the traceback)"), line


def test_a_video_too_large_for_ram_keeps_the_advice_in_the_runners_words(tmp_path, tiny_files, video_file):
    result = _run(video_file, tiny_files, tmp_path / "out.mp4", env={"TOKENFLOW_VIDEO_MAX_BYTES": "1000"})
    assert result.returncode == 1, result.stderr
    line = _one_line_error(result.stderr)
    assert "Load fewer or smaller frames: set --frames, raise --every-nth, or lower --width/--height." in line, line


def test_a_value_out_of_range_names_the_option(tmp_path, tiny_files, video_file):
    result = _run(video_file, tiny_files, tmp_path / "out.mp4", "--pnp-attn-t", "1.5")
    assert result.returncode == 2, result.stderr
    assert _one_line_error(result.stderr) == "error: --pnp-attn-t 1.5 is too large: the largest value is 1.0."
    result = _run(video_file, tiny_files, tmp_path / "out.mp4", "--cfg", "-1")
    assert result.returncode == 2, result.stderr
    assert _one_line_error(result.stderr) == "error: --cfg -1.0 is too small: the smallest value is 0.0."


def test_a_rounded_width_is_said_and_the_log_is_the_runners(tmp_path, tiny_files, video_file):
    output = tmp_path / "out.mp4"
    result = _run(video_file, tiny_files, output, "--width", "100", "--height", "0", "--threads", "2")
    assert result.returncode == 0, result.stderr
    assert "PyTorch uses 2 CPU thread(s)" in result.stdout  # --threads wins over $OMP_NUM_THREADS
    # The header gives the work; progress lines say what they count; every node's line ends with its time.
    assert "work: 2 frames at 128x128; about 26 model evaluations of one frame (inversion: 4 steps x 2 frames = 8; " \
        "edit: 2 steps x (2 frames + 1 keyframes) x 2 (prompts) + 2 steps of the source branch = 18)" in result.stdout
    for words in ("[5/11] TokenFlow Inversion: DDIM inversion, 4 steps", "    inversion step 4/4 (100%",
                  "    edit step 2/2 (frame 2/2) (100%", "    frame 2/2 loaded (100%"):
        assert words in result.stdout, words
    last_line = {line.split("]")[0]: line for line in result.stdout.splitlines() if line.startswith("[")}
    assert len(last_line) == 11 and all(re.search(r"(\(\d+\.\d s\)|: done in \d+\.\d s)$", line)
                                        for line in last_line.values()), last_line  # after its progress lines
    assert "note: --width 100 is rounded: the frames will be 128x128 (sizes are multiples of --size-multiple 64)." \
        in result.stdout
    assert "2 frames, 128x128" in result.stdout
    # Without --verbose: none of ComfyUI's own log (its root logger: "no match {...}" of model detection, loader
    # warnings), and the pack's warnings without logger names (ComfyUI names them after the folder's path).
    for line in result.stderr.splitlines():
        assert not re.match(r"(ERROR|WARNING|INFO) ", line) and " root:" not in line, line
        assert line.startswith(("warning: ", "error: ")), line


def test_a_size_advice_leads_to_a_whole_edit(tmp_path, tiny_files, video_file):
    """--width 56 --size-multiple 8 is refused at start (56 px frames are below TokenFlow's 64); the advised
    --width runs the whole edit. tests/test_runner_checks.py follows every other advice through the checks."""
    result = _run(video_file, tiny_files, tmp_path / "out.mp4", "--width", "56", "--size-multiple", "8", "--height", "0")
    assert result.returncode == 2 and "ComfyUI host" not in result.stdout, result.stderr
    line = _one_line_error(result.stderr)
    assert line.endswith("gives frames of 56x56 px; TokenFlow edits sides of 64 to 8192 px: pass --width 64."), line
    result = _run(video_file, tiny_files, tmp_path / "out.mp4", "--width", "64", "--size-multiple", "8", "--height", "0")
    assert result.returncode == 0, result.stderr
    assert "2 frames, 64x64" in result.stdout and "note:" not in result.stdout
    result = _run(video_file, tiny_files, tmp_path / "out.mp4", "--width", "80", "--size-multiple", "16",
                  "--height", "80")
    assert result.returncode == 0, result.stderr
    assert "2 frames, 80x80" in result.stdout and "note:" not in result.stdout


def test_verbose_shows_the_traceback_once_with_short_logger_names(tmp_path, tiny_files, video_file):
    bad = _bad_video("text renamed .mp4", tmp_path, video_file)
    result = _run(bad, tiny_files, tmp_path / "out.mp4", "--verbose")
    assert result.returncode == 1
    assert result.stderr.count("Traceback (most recent call last)") == 1, result.stderr
    assert f"error in TokenFlowLoadVideo: ValueError: Cannot read '{bad}'" in result.stderr
    named = [line.split(":")[0] for line in result.stderr.splitlines() if re.match(r"(INFO|WARNING|ERROR) \S+:", line)]
    assert named and not [n for n in named if "/" in n], named


def test_no_node_header_after_ctrl_c(capsys):
    """Ctrl-C during a node without progress steps (VAE Decode): the executor refuses the next node, so its header
    is not printed either (checked on the console the runner uses; the tiny VAE decodes too fast to hit)."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import runner_support
    finally:
        sys.path.remove(str(REPO / "scripts"))
    prompt = {"9": {"class_type": "VAEDecode"}, "10": {"class_type": "CreateVideo"}}
    stop = runner_support.StopOnCtrlC()
    stop.reassert = lambda: None  # not ComfyUI's interrupt flag of this (the test) process
    console = runner_support.Console(prompt, {"VAEDecode": "VAE Decode", "CreateVideo": "Create Video"}, stop)
    console.send_sync("executing", {"node": "9"})
    stop.requested = True
    console.send_sync("executing", {"node": "10"})
    out = capsys.readouterr().out
    assert "[1/2] VAE Decode" in out and "Create Video" not in out


def test_default_thread_count_is_half_the_cpus():
    """Measured (benchmarks/README.md, "Threads"): on a busy 2-core machine one thread ran the tiny edit and a
    full-size SD1.5 step several times faster than both cores; the default is half the CPUs, at least 1."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import runner_support
    finally:
        sys.path.remove(str(REPO / "scripts"))
    assert [runner_support.default_threads(n, n) for n in (1, 2, 3, 4, 16)] == [1, 1, 1, 2, 8]
    assert runner_support.default_threads(16, 4) == 4  # never more than PyTorch's own default
    result = subprocess.run([sys.executable, str(RUNNER), "--help"], capture_output=True, text=True, timeout=60)
    assert "half the CPUs this process may use" in " ".join(result.stdout.split())
