"""The real-size dry run (benchmarks/real_size.py): its verdict lines on two small cases.

The dry run replaces ComfyUI's device facts for its whole process (benchmarks/_real_size_shims.py), so it runs in
a subprocess, never inside the suite's host.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "real_size.py"
CHECK = re.compile(r"accounting check tiny \(cpu, real tensors\): tracker peak (\d+\.\d\d) MiB, profiler peak "
                   r"(\d+\.\d\d) MiB, difference (\d+\.\d\d)%")
PINNED = re.compile(r"page-locked host memory .*: peak (\d+) bytes ")
FITS = re.compile(r"verdict: fits peak_vram_gib=(\d+\.\d\d) peak_ram_gib=(\d+\.\d\d) weights=(full|partial) "
                  r"bank=(device|host)")


def run(*args: str) -> list[str]:
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()


def dry_run(*args: str) -> list[str]:
    return run("--model", "sd15", "--dtype", "fp16", "--size", "256", "--frames", "2", "--run-steps", "1", *args)


def test_sd15_fits_a_24_gb_card_with_the_weights_loaded_whole_and_a_bounded_page_locked_staging():
    lines = dry_run("--vram", "23.99", "--ram", "64", "--run-steps", "3")
    match = FITS.fullmatch(lines[-1])
    assert match, lines[-1]
    peak_vram = float(match.group(1))
    # The fp16 SD1.5 UNet is 1.60 GiB; it is loaded whole onto the device, so the device peak holds it.
    assert 1.6 <= peak_vram < 4.0, lines[-1]
    assert match.group(3) == "full"
    assert any(line.startswith("  - comfy.model_management.get_free_memory") for line in lines)  # shims listed
    # The inversion keeps all 3 steps of the 2-frame latent on the host (float32, 4 x 32 x 32: 32 KiB a step). They
    # reach it through one page-locked ring of at most two steps' bytes, not one page-locked tensor per step kept.
    pinned = [int(m.group(1)) for m in map(PINNED.match, lines) if m]
    step = 2 * 4 * 32 * 32 * 4
    assert len(pinned) == 1 and 0 < pinned[0] <= 2 * step, (pinned, step)


def test_a_card_too_small_for_one_frame_refuses_with_the_nodes_own_line():
    # 1.2 GiB: ComfyUI's minimum inference memory (1.19 GiB here) and one 256x256 frame's activations do not fit;
    # the weights are not counted (ComfyUI loads them partly), so a smaller frame would run.
    lines = dry_run("--vram", "1.2", "--ram", "64")
    assert lines[-1].startswith("verdict: refused: latent: one model call on a single 256x256 px frame"), lines[-1]
    assert "lower the resolution to 64x64 px or less" in lines[-1]


def test_the_trackers_peak_is_the_peak_of_the_profilers_allocation_events():
    # The dry run's workload on the CPU with real tensors (a tiny random-weight UNet): the tracker's peak of live
    # bytes against the running sum of torch.profiler's allocation and free events of the same run.
    line = run("--check", "tiny")[-1]
    match = CHECK.fullmatch(line)
    assert match, line
    tracker, profiler, difference = map(float, match.groups())
    assert profiler > 1.0, line  # the run allocated something to count
    assert difference <= 5.0, line
