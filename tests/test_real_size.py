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
FITS = re.compile(r"verdict: fits peak_vram_gib=(\d+\.\d\d) peak_ram_gib=(\d+\.\d\d) weights=(full|partial) "
                  r"bank=(device|host)")


def dry_run(*args: str) -> list[str]:
    done = subprocess.run([sys.executable, str(SCRIPT), "--model", "sd15", "--dtype", "fp16", "--size", "256",
                           "--frames", "2", "--run-steps", "1", *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()


def test_sd15_fits_a_24_gb_card_with_the_weights_loaded_whole():
    lines = dry_run("--vram", "23.99", "--ram", "64")
    match = FITS.fullmatch(lines[-1])
    assert match, lines[-1]
    peak_vram = float(match.group(1))
    # The fp16 SD1.5 UNet is 1.60 GiB; it is loaded whole onto the device, so the device peak holds it.
    assert 1.6 <= peak_vram < 4.0, lines[-1]
    assert match.group(3) == "full"
    assert any(line.startswith("  - comfy.model_management.get_free_memory") for line in lines)  # shims listed


def test_a_card_smaller_than_the_weights_refuses_with_the_nodes_own_line():
    lines = dry_run("--vram", "1.5", "--ram", "64")
    assert lines[-1].startswith("verdict: refused: latent: one UNet call on a single 256x256 px frame"), lines[-1]
    assert "lower the resolution" in lines[-1]
