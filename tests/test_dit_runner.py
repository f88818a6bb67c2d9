"""The headless runner (scripts/tokenflow_edit.py) on Flux and SD3: all-in-one checkpoints end to end, and the
one-line messages for Flux's separate files (``--unet --clip-l --t5 --vae``), run as a subprocess.

The Flux checkpoint is the tiny all-in-one file of ``tests/stand_in_nodes/tiny_files.py``
(``input_files.write_tiny_flux_files``), detected by ComfyUI as the stand-in ``TinyFlux`` config
(``--extra-nodes tests/stand_in_nodes``); the SD3 one (``write_tiny_sd3_files``) as ``TinySD3``. The separate-files route cannot run end to end on tiny files:
DualCLIPLoader always builds the full-size T5-XXL for type flux (``tests/test_dit_server.py``); its
argument checks, name resolution and family check run here (they come before any model is loaded).
"""
from __future__ import annotations

import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import pytest

import input_files
import model_links
import server_harness as harness

REPO = Path(__file__).resolve().parents[1]
RUNNER = REPO / "scripts" / "tokenflow_edit.py"
STAND_INS = REPO / "tests" / "stand_in_nodes"
FLUX_FILES = ["--unet", "flux1-dev.safetensors", "--clip-l", "clip_l.safetensors", "--t5", "t5xxl_fp16.safetensors",
              "--vae", "ae.safetensors"]


@pytest.fixture(scope="module")
def flux_checkpoint(tmp_path_factory) -> Path:
    return input_files.write_tiny_flux_files(tmp_path_factory.mktemp("dit-runner-flux"))["checkpoint"]


def _run(video_file: Path, output: Path, *models: str, timeout: float = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, str(RUNNER), "--video", str(video_file), "--prompt", "a shiny silver robotic wolf",
               "--inversion-prompt", "a wolf", "--output", str(output), "--steps", "2", "--inversion-steps", "4",
               "--batch-size", "2", "--frames", "5", "--width", "64", "--height", "64", "--cpu",
               "--extra-nodes", str(STAND_INS), *models]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=harness.runner_env())


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def _read(path: Path) -> tuple[int, int, int, Fraction]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return sum(1 for _ in container.decode(stream)), stream.width, stream.height, stream.average_rate


def test_runner_edits_with_an_all_in_one_flux_checkpoint(tmp_path, video_file, flux_checkpoint, test_artifacts):
    output = tmp_path / "edited.mp4"
    result = _run(video_file, output, "--checkpoint", str(flux_checkpoint))
    assert result.returncode == 0, f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-5000:]}"
    out = result.stdout
    # ComfyUI detects Flux; cfg 1; --inversion-method auto is the fixed point there
    assert ("with pnp on Flux (TinyFlux), cfg 1, 2 steps (inversion fixed point on the editing grid, at most 3 "
            "evaluations per step)") in out
    for node in ("Load Checkpoint", "FluxGuidance", "ModelSamplingFlux",
                 "TokenFlow Inversion: fixed-point flow inversion on the 2 editing steps, at most 3 evaluations per step",
                 "TokenFlow Sampler"):
        assert node in out, node
    assert f"wrote {output}" in out
    (test_artifacts / "dit_runner").mkdir(exist_ok=True)
    (test_artifacts / "dit_runner" / "flux_checkpoint.mp4").write_bytes(output.read_bytes())
    assert _read(output) == (5, input_files.CLIP_SIZE, input_files.CLIP_SIZE, Fraction(input_files.CLIP_FPS))


def test_runner_edits_with_an_all_in_one_sd3_checkpoint(tmp_path, video_file):
    """SD3.x through --checkpoint: detected by ComfyUI (the stand-in TinySD3), no Flux nodes, SD3.5's cfg (4)."""
    sd3 = input_files.write_tiny_sd3_files(tmp_path / "models")["checkpoint"]
    output = tmp_path / "edited.mp4"
    result = _run(video_file, output, "--checkpoint", str(sd3), "--editor", "sdedit")
    assert result.returncode == 0, f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-5000:]}"
    assert ("with sdedit on TinySD3, cfg 4, 2 steps (inversion fixed point on the editing grid, at most 3 evaluations "
            "per step)") in result.stdout
    assert "FluxGuidance" not in result.stdout and "ModelSamplingFlux" not in result.stdout
    assert _read(output) == (5, input_files.CLIP_SIZE, input_files.CLIP_SIZE, Fraction(input_files.CLIP_FPS))


def _missing(flag: str, given: str) -> str:
    file = next(f for f in FLUX_FILE_KINDS if f[0] == flag)
    return (f"error: {given} given but {flag} missing: pass {flag} {file[1].name} ({file[2]}, a path or a file name in "
            f"ComfyUI/models/{file[1].folder}/; download: {file[1].url}).")


FLUX_FILE_KINDS = [("--unet", model_links.FLUX_DEV, "the Flux diffusion model"),
                   ("--clip-l", model_links.CLIP_L, "the CLIP-L text encoder"),
                   ("--t5", model_links.T5XXL, "the T5-XXL text encoder"), ("--vae", model_links.FLUX_AE, "the Flux VAE")]


@pytest.mark.parametrize("given, messages", [
    (["--unet", "flux1-dev.safetensors"], [_missing(flag, "--unet") for flag in ("--clip-l", "--t5", "--vae")]),
    (FLUX_FILES[:6], [_missing("--vae", "--unet")]),
    (["--vae", "ae.safetensors", "--t5", "t5.safetensors"], [_missing(flag, "--t5") for flag in ("--unet", "--clip-l")]),
    (["--checkpoint", "model.safetensors", "--unet", "flux1-dev.safetensors"],
     ["error: --checkpoint and --unet given: pass either one all-in-one checkpoint (--checkpoint) or Flux's separate "
      "files (--unet, --clip-l, --t5, --vae), not both."]),
], ids=["only-unet", "no-vae", "no-unet", "checkpoint-and-unet"])
def test_every_missing_flux_option_is_named_at_once(tmp_path, video_file, given, messages):
    result = _run(video_file, tmp_path / "out.mp4", *given, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert [line for line in result.stderr.splitlines() if line.strip()] == messages
    assert "ComfyUI host:" not in result.stdout  # refused before the host (and any model) was loaded


def test_flux_file_names_resolve_like_the_core_loaders_and_the_family_is_checked(tmp_path, video_file):
    """A name that is no file and in no models folder is refused naming its flag; files ComfyUI does not detect as a
    Flux diffusion model (here the tiny SD1.x checkpoint) are refused before any model is loaded."""
    result = _run(video_file, tmp_path / "out.mp4", *FLUX_FILES[:-1], "no-such-vae.safetensors")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 4, result.stderr  # every missing file at once
    assert lines[0].startswith("error: --unet flux1-dev.safetensors: no such file, and no file of that name in "), lines
    assert "diffusion_models" in lines[0] and model_links.FLUX_DEV.url in lines[0], lines
    assert lines[3].startswith("error: --vae no-such-vae.safetensors: no such file") and "models/vae" in lines[3]
    sd15 = input_files.write_tiny_model_files(tmp_path / "models")["checkpoint"]
    result = _run(video_file, tmp_path / "out.mp4", "--unet", str(sd15), "--clip-l", str(sd15), "--t5", str(sd15),
                  "--vae", str(sd15))
    assert _one_line_error(result) == (
        f"error: --unet {sd15}: ComfyUI does not detect a Flux diffusion model in it (TinySD15); "
        "--unet/--clip-l/--t5/--vae are for Flux, other models go through --checkpoint.")
    result = _run(video_file, tmp_path / "out.mp4", "--checkpoint", str(sd15), "--guidance", "3.5")
    assert _one_line_error(result) == ("error: --guidance is Flux-dev's distilled guidance and this model (TinySD15) "
                                       "has none: drop --guidance (use --cfg).")
