"""The headless runner's checks before the host loads (scripts/runner_checks.py), as a user meets them.

* Each bad input (a size TokenFlow cannot edit, a folder or a damaged file as a model, a text file posing as
  .safetensors, an --output folder or .gif, missing Flux files, --frames -3) gets its line(s) and exit 2 from
  the runner's ``main`` with neither torch nor ComfyUI imported (the probe below lists what was).
* Every piece of advice is followed: the suggested options go back through the same checks and pass (one size
  advice is also followed through a whole edit in tests/test_runner.py).
* Model files are judged by their headers: the safetensors length + JSON, a .ckpt's zip directory.
* The models folders and extensions are the host's own (folder_paths).
* Ctrl-C during start-up says what was interrupted and that nothing was written.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import input_files
import model_links
import server_harness as harness

REPO = Path(__file__).resolve().parents[1]
RUNNER = REPO / "scripts" / "tokenflow_edit.py"
# Runs the runner's main() and then says which heavy modules it imported (the checks must import none).
PROBE = ("import sys; sys.path.insert(0, {scripts!r}); import tokenflow_edit; code = tokenflow_edit.main(sys.argv[1:]); "
         "print('imported:', sorted(m for m in ('torch', 'comfy', 'folder_paths', 'nodes') if m in sys.modules)); "
         "sys.exit(code)")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return input_files.write_tiny_model_files(tmp_path_factory.mktemp("checks-models"))["checkpoint"]


@pytest.fixture(scope="module")
def runner():
    scripts = str(REPO / "scripts")
    if scripts not in sys.path:
        sys.path.insert(0, scripts)
    import runner_checks
    import tokenflow_edit

    return tokenflow_edit, runner_checks


def _argv(video_file: Path, checkpoint: Path | str | None, *extra: str) -> list[str]:
    models = ["--checkpoint", str(checkpoint)] if checkpoint else []
    return ["--video", str(video_file), "--prompt", "a robot wolf", *models, "--steps", "2", "--inversion-steps", "4",
            "--cpu", *extra]


def _refused_before_host(argv: list[str]) -> list[str]:
    """The runner's error lines; asserts exit 2 and that neither torch nor ComfyUI was imported."""
    result = subprocess.run([sys.executable, "-c", PROBE.format(scripts=str(REPO / "scripts")), *argv],
                            capture_output=True, text=True, timeout=60, env=harness.runner_env())
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "imported: []" in result.stdout, result.stdout  # no torch, no ComfyUI: the host never loaded
    assert "ComfyUI host" not in result.stdout and "Traceback" not in result.stderr, result.stderr
    return [line for line in result.stderr.splitlines() if line.strip()]


def _accepted(runner, argv: list[str]) -> bool:
    tokenflow_edit, runner_checks = runner
    args = tokenflow_edit.build_parser().parse_args(argv)
    _, _, problems = runner_checks.check_before_host(args, harness.comfyui_path())
    assert not problems, problems
    return True


def _follow(argv: list[str], line: str) -> list[str]:
    """``argv`` with the options the line's advice ("... pass --width 64 --height 64.") set to its values."""
    advice = re.search(r"pass ((?:--[\w-]+ \S+?(?: |(?=\.$)))+)", line)
    assert advice, f"no advice to follow in: {line}"
    followed = list(argv)
    for flag, value in re.findall(r"(--[\w-]+) (\S+)", advice.group(1)):
        if flag in followed:
            followed[followed.index(flag) + 1] = value
        else:
            followed += [flag, value]
    return followed


@pytest.mark.parametrize("extra,words", [
    (["--width", "7"], "error: --width 7 is below --size-multiple 64 (it would round to nothing); TokenFlow edits "
                       "sides of 64 to 8192 px: pass --width 64."),
    (["--width", "56", "--size-multiple", "8"], "error: --width 56 with --size-multiple 8 gives frames of 56x56 px; "
                                                "TokenFlow edits sides of 64 to 8192 px: pass --width 64."),
    (["--width", "16", "--height", "40", "--size-multiple", "8"], "pass --width 64 --height 64."),
    (["--width", "100", "--height", "48", "--size-multiple", "16"], "gives frames of 96x48 px; TokenFlow edits sides "
                                                                      "of 64 to 8192 px: pass --height 64."),
    (["--width", "0", "--height", "8192", "--size-multiple", "8"], None),  # the source is square: fits exactly
    (["--size-multiple", "7"], "error: --size-multiple 7 is not a multiple of 8 from 8 to 128: pass --size-multiple 8"),
    (["--size-multiple", "200"], "pass --size-multiple 128"),
    (["--skip-frames", "40"], "skips all 6 frames of --video"),
], ids=["width-7", "width-56-multiple-8", "both-small", "height-rounds-below", "largest", "multiple-7",
        "multiple-200", "skip-all"])
def test_size_and_frame_advice_leads_to_a_command_that_passes(runner, video_file, tiny_checkpoint, extra, words):
    argv = _argv(video_file, tiny_checkpoint, *extra)
    if words is None:
        assert _accepted(runner, argv)
        return
    lines = _refused_before_host(argv)
    assert len(lines) == 1 and words in lines[0], lines
    assert _accepted(runner, _follow(argv, lines[0]))


def test_a_frame_size_advice_is_exact_where_a_0_side_follows_the_aspect_ratio(runner, tmp_path, tiny_checkpoint):
    """A wide source: --width 64 with --size-multiple 8 gives a 40 px height, so the width to pass is larger."""
    from PIL import Image

    wide = tmp_path / "wide"
    wide.mkdir()
    for i in range(3):
        Image.new("RGB", (160, 96), (i * 60, 90, 30)).save(wide / f"frame_{i}.png")
    argv = _argv(wide, tiny_checkpoint, "--width", "64", "--size-multiple", "8")
    lines = _refused_before_host(argv)
    assert "gives frames of 64x40 px" in lines[0] and "pass --width 104." in lines[0], lines
    assert _accepted(runner, _follow(argv, lines[0]))


def test_bad_counts_and_outputs_each_get_their_line(runner, video_file, tiny_checkpoint, tmp_path):
    for flag, value, words in (("--frames", "-3", "error: --frames -3 is below 0: pass the number of frames to edit, "
                                                   "or 0 for all of them."),
                               ("--every-nth", "0", "error: --every-nth 0 is below 1"),
                               ("--batch-size", "0", "error: --batch-size 0 is below 1")):
        lines = _refused_before_host(_argv(video_file, tiny_checkpoint, flag, value))
        assert lines == [lines[0]] and lines[0].startswith(words), lines
    for output, advice in ((tmp_path, f"--output {tmp_path / 'clip_tokenflow.mp4'}"),
                           (tmp_path / "edit.gif", f"--output {tmp_path / 'edit.mp4'}")):
        argv = _argv(video_file, tiny_checkpoint, "--output", str(output))
        lines = _refused_before_host(argv)
        assert len(lines) == 1 and lines[0].startswith(f"error: --output {output}") and advice in lines[0], lines
        assert _accepted(runner, _follow(argv, lines[0]))


def _bad_models(folder: Path, checkpoint: Path) -> dict[str, tuple[Path, str]]:
    """Bad --checkpoint files -> (path, the start of the runner's line after the path)."""
    folder.mkdir()
    text = folder / "notes.safetensors"
    text.write_text("my notes, not a model\n" * 10)
    whole = checkpoint.read_bytes()
    cut = folder / "cut.safetensors"
    cut.write_bytes(whole[:len(whole) // 3])  # the header is whole, the tensors are not
    damaged = folder / "damaged.ckpt"
    damaged.write_bytes(b"this is not a pickled state dict\n" * 50)
    renamed = folder / "model.txt"
    renamed.write_bytes(whole[:100])
    models = folder / "models"
    models.mkdir()
    (models / checkpoint.name).symlink_to(checkpoint)
    return {"text posing as .safetensors": (text, ": not a .safetensors file (no safetensors header"),
            "cut download": (cut, ": incomplete .safetensors file (its header lists"),
            "damaged ckpt": (damaged, ": not a readable .ckpt file (neither PyTorch's zip format nor a pickle"),
            "other extension": (renamed, ": not a model file ComfyUI's loaders read: pass a .safetensors file"),
            "folder": (models, f" is a folder: pass the model file in it (a .safetensors or .ckpt file, e.g. "
                               f"{models / checkpoint.name})")}


def test_bad_model_files_are_one_line_naming_the_file(runner, tmp_path, video_file, tiny_checkpoint):
    for kind, (path, words) in _bad_models(tmp_path / "bad", tiny_checkpoint).items():
        lines = _refused_before_host(_argv(video_file, path))
        assert lines == [f"error: --checkpoint {path}{words}" + lines[0][len(f"error: --checkpoint {path}{words}"):]]
        assert len(lines[0]) < 300 and lines[0].endswith("."), (kind, lines)
    folder = tmp_path / "bad" / "models"
    assert _accepted(runner, _argv(video_file, folder / tiny_checkpoint.name))  # the file the folder's line names


def test_a_missing_checkpoint_names_where_it_was_looked_for(video_file):
    lines = _refused_before_host(_argv(video_file, "no-such-model.safetensors"))
    models = harness.comfyui_path() / "models" / "checkpoints"
    assert lines == [f"error: --checkpoint no-such-model.safetensors: no such file, and no file of that name in "
                     f"{models}: pass an existing file (e.g. {model_links.SD21_BASE.name}, TokenFlow's official "
                     f"model: {model_links.SD21_BASE.url})."]


def test_every_missing_flux_file_is_named_at_once_with_folder_and_download(video_file):
    given = {"--unet": "flux1-dev-missing.safetensors", "--clip-l": "clip_l-missing.safetensors",
             "--t5": "t5-missing.safetensors", "--vae": "ae-missing.safetensors"}
    lines = _refused_before_host(_argv(video_file, None, *[word for pair in given.items() for word in pair]))
    models = harness.comfyui_path() / "models"
    links = {"--unet": model_links.FLUX_DEV, "--clip-l": model_links.CLIP_L, "--t5": model_links.T5XXL,
             "--vae": model_links.FLUX_AE}
    folders = {"--unet": ("unet", "diffusion_models"), "--clip-l": ("text_encoders", "clip"),
               "--t5": ("text_encoders", "clip"), "--vae": ("vae",)}
    assert len(lines) == 4, lines
    for line, (flag, name) in zip(lines, given.items()):
        looked = " or ".join(str(models / sub) for sub in folders[flag])
        assert line.startswith(f"error: {flag} {name}: no such file, and no file of that name in {looked}; download "
                               f"it from {links[flag].url}"), line
    lines = _refused_before_host(_argv(video_file, None, "--unet", "flux1-dev.safetensors"))
    assert [line.split(" missing:")[0] for line in lines] == [
        f"error: --unet given but {flag}" for flag in ("--clip-l", "--t5", "--vae")]
    assert all(links[flag].url in line for flag, line in zip(("--clip-l", "--t5", "--vae"), lines))


def test_model_files_are_judged_by_their_headers(runner, tmp_path):
    _, runner_checks = runner
    state = {"weight": torch.zeros(3, 4)}
    zipped, legacy = tmp_path / "zipped.ckpt", tmp_path / "legacy.pt"
    torch.save(state, zipped)
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    import safetensors.torch

    good = tmp_path / "good.safetensors"
    safetensors.torch.save_file(state, str(good))
    for path in (zipped, legacy, good):
        assert runner_checks.model_file_problem(path) is None, path
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(zipped.read_bytes()[:-30])  # the zip directory at the end is gone
    short = tmp_path / "short.safetensors"
    short.write_bytes(good.read_bytes()[:-1])
    assert runner_checks.model_file_problem(cut).startswith("not a readable .ckpt file")
    assert runner_checks.model_file_problem(short).startswith("incomplete .safetensors file")


def test_the_models_folders_and_extensions_are_the_hosts(runner):
    """Where the checks look is where the core loaders look (the host's folder_paths defaults)."""
    import folder_paths

    _, runner_checks = runner
    for kind, subfolders in runner_checks.MODEL_FOLDERS.items():
        places = folder_paths.folder_names_and_paths[kind][0]
        assert [str(Path(folder_paths.models_dir) / sub) for sub in subfolders] == \
            [place for place in places if Path(place).parent == Path(folder_paths.models_dir)], kind
    assert set(runner_checks.SAFETENSORS + runner_checks.PICKLED) == set(folder_paths.supported_pt_extensions)


def test_ctrl_c_during_start_up_says_what_it_interrupted(tmp_path, video_file, tiny_checkpoint):
    output = tmp_path / "out.mp4"
    # Ctrl-C in a terminal reaches a foreground runner whose SIGINT is at its default; a suite started in the
    # background (a shell's `&`) would hand the runner an ignored SIGINT, which Python keeps ignored.
    process = subprocess.Popen([sys.executable, str(RUNNER), *_argv(video_file, tiny_checkpoint, "--output", str(output),
                                                                    "--width", "64")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=harness.runner_env(),
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert process.stdout.readline().startswith("ComfyUI host:")  # the checks passed; start-up begins
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert re.fullmatch(r"interrupted while (starting ComfyUI|loading ComfyUI's nodes)[^:]*: nothing was written "
                        r"\(no output file\)", lines[-1]), stderr
    assert "Traceback" not in stderr and not output.exists()


def test_a_ctrl_c_the_host_swallows_still_stops_start_up():
    scripts = str(REPO / "scripts")
    if scripts not in sys.path:
        sys.path.insert(0, scripts)
    import runner_support

    outer = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, whatever started pytest
    try:
        start_up = runner_support.StartUp()
        start_up.at("loading ComfyUI's nodes and the custom node packs")
        with start_up:
            assert signal.getsignal(signal.SIGINT) == start_up.ctrl_c
            try:  # what a host's loader may do with the KeyboardInterrupt
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)
            except KeyboardInterrupt:
                pass
            with pytest.raises(KeyboardInterrupt):
                start_up.at("checking the model and the graph")
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert start_up.interrupted_message() == ("interrupted while loading ComfyUI's nodes and the custom node "
                                                  "packs: nothing was written (no output file)")
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a background job's SIGINT stays ignored
        with runner_support.StartUp():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, outer)
