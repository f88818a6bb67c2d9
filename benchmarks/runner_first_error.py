"""Seconds from starting the headless runner to its first error line, before and after ComfyUI's start-up.

    bash -c 'source scripts/host_env.sh && "$PYTHON" benchmarks/runner_first_error.py [--repeat 3]'

Runs ``scripts/tokenflow_edit.py`` as a user would (a subprocess, the host of ``$COMFYUI_PATH``) on inputs refused
before the host loads (scripts/runner_checks.py) and on one refused by ComfyUI's validation after start-up, and
times ``source scripts/host_env.sh`` (what ``scripts/run.sh`` spends before the runner starts). Prints a Markdown
table of the median wall seconds. The model file is a one-tensor .safetensors (a sound header: validation does
not load it); the video is any file (its header is only read for the frame size).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNNER = REPO / "scripts" / "tokenflow_edit.py"


def _timed(command: list[str], env: dict) -> tuple[float, int, str]:
    start = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    return time.monotonic() - start, result.returncode, (lines[0] if lines else "")[:70]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    options = parser.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        import safetensors.torch
        import torch

        model = work / "model.safetensors"
        safetensors.torch.save_file({"weight": torch.zeros(4)}, str(model))
        video = work / "clip.mp4"
        video.write_bytes(b"\0" * 64)
        base = [sys.executable, str(RUNNER), "--video", str(video), "--prompt", "a robot", "--cpu", "--steps", "2",
                "--inversion-steps", "4", "--width", "64", "--height", "64"]
        cases = {
            "before start-up: --width 56 --size-multiple 8": base + ["--checkpoint", str(model), "--width", "56",
                                                                      "--size-multiple", "8"],
            "before start-up: a folder as --checkpoint": base + ["--checkpoint", folder],
            "before start-up: four missing Flux files": base + ["--unet", "a", "--clip-l", "b", "--t5", "c", "--vae", "d"],
            "after start-up: --pnp-attn-t 1.5 (validation)": base + ["--checkpoint", str(model), "--pnp-attn-t", "1.5"],
        }
        rows = [("`source scripts/host_env.sh` (run.sh's environment check)",
                 [_timed(["bash", "-c", f"source {REPO / 'scripts' / 'host_env.sh'} 2>/dev/null"], env)
                  for _ in range(options.repeat)])]
        rows += [(name, [_timed(command, env) for _ in range(options.repeat)]) for name, command in cases.items()]
    print(f"| case | median s (of {options.repeat}) | exit | first line |\n|---|---|---|---|")
    for name, runs in rows:
        seconds, code, line = statistics.median(r[0] for r in runs), runs[0][1], runs[0][2]
        print(f"| {name} | {seconds:.2f} | {code} | `{line}` |")


if __name__ == "__main__":
    main()
