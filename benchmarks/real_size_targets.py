#!/usr/bin/env python
"""Every real-size target of the memory plan in one go: one dry run (``real_size.py``) per target, each in its own
process (the dry run's stand-ins are process-wide), and one markdown table of their verdicts.

    python benchmarks/real_size_targets.py                      # all targets, one after the other
    python benchmarks/real_size_targets.py --only flux-fp8-1024,sd21-8gb --log-dir /tmp/rows

Each row: the verdict line, the device peak of each phase by holder (w weights, a activations, b bank,
t trajectory, f fields, c controlnet, s page-locked staging; GiB), the edit's FLOPs per step against plain sampling, the wall time. The
full output of each dry run goes to ``--log-dir`` (default: a temporary folder, named in the output).
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent / "real_size.py"
COMMON = ("--ram", "64", "--editor", "pnp")  # 40 frames, PnP on the fly, default settings unless a target says
SHORT = {"weights": "w", "activations": "a", "bank": "b", "trajectory": "t", "fields": "f", "controlnet": "c", "staging": "s"}


@dataclass(frozen=True)
class Target:
    name: str
    title: str
    args: tuple[str, ...]


def _target(name: str, title: str, model: str, dtype: str, size: int, frames: int, vram: float, *extra: str) -> Target:
    return Target(name, title, ("--model", model, "--dtype", dtype, "--size", str(size), "--frames", str(frames),
                                "--vram", str(vram), *extra))


# Issue-style targets: 40 frames, PnP on the fly, default settings, --ram 64, a "24 GB" card at 23.99 GiB unless said.
TARGETS = tuple(_target(*row) for row in (
    ("flux-fp8-1024", "Flux-dev fp8 1024², 24 GB", "flux-dev", "fp8", 1024, 40, 23.99),
    ("flux-bf16-1024", "Flux-dev bf16 1024², 24 GB", "flux-dev", "bf16", 1024, 40, 23.99),
    ("flux-fp8-512-120", "Flux-dev fp8 512², 120 frames, 24 GB", "flux-dev", "fp8", 512, 120, 23.99),
    ("sd35l-fp8-1024", "SD3.5 Large fp8 1024², 24 GB", "sd35-large", "fp8", 1024, 40, 23.99),
    ("sd35m-fp16-1024-12gb", "SD3.5 Medium fp16 1024², 12 GB (11.99)", "sd35-medium", "fp16", 1024, 40, 11.99),
    ("sdxl-12gb", "SDXL fp16 1024², 12 GB (11.99)", "sdxl", "fp16", 1024, 40, 11.99),
    ("sdxl-12gb-controlnet", "SDXL fp16 1024², 12 GB (11.99), one ControlNet", "sdxl", "fp16", 1024, 40, 11.99,
     "--editor", "controlnet"),
    ("sd21-8gb", "SD2.1 fp16 512², 8 GB (7.99)", "sd21", "fp16", 512, 40, 7.99),
    ("sd21-1000", "SD2.1 fp16 512², 1000 frames, 24 GB, 64 GB RAM", "sd21", "fp16", 512, 1000, 23.99),
    ("flux-bf16-2048-8gb", "Flux-dev bf16 2048², 40 frames, 8 GB (7.99)", "flux-dev", "bf16", 2048, 40, 7.99),
))
PHASE = re.compile(r"^(inversion|extraction|plain|edit): FLOPs/step ([\d.]+) T(?: \(([\d.]+)x plain\))?")
CUDA_ROW = re.compile(r"^  cuda\s+([\d.]+)\s+(.*)$")
HOLDER_HEADER = re.compile(r"^  device\s+peak GiB\s+(.*)$")


def summarize(lines: list[str]) -> tuple[str, str, str]:
    """(verdict, device peaks by phase and holder, edit FLOPs per step against plain) from a dry run's output."""
    verdict = next((line[len("verdict: "):] for line in reversed(lines) if line.startswith("verdict: ")),
                   "no verdict (see the log)")
    peaks, flops, phase, holders = [], "-", None, []
    plain_flops = None
    for line in lines:
        if match := PHASE.match(line):
            phase = match.group(1)
            if phase == "plain":
                plain_flops = match.group(2)
            if phase == "edit":
                flops = f"{match.group(2)} T = {match.group(3)}x plain ({plain_flops} T)"
        elif match := HOLDER_HEADER.match(line):
            holders = match.group(1).split()
        elif (match := CUDA_ROW.match(line)) and phase:
            parts = [f"{SHORT.get(h, h)} {float(v):.2f}" for h, v in zip(holders, match.group(2).split())
                     if float(v) >= 0.005]
            if parts:  # a phase a refusal stopped before any model call holds nothing
                peaks.append(f"{phase} {float(match.group(1)):.2f} ({', '.join(parts)})")
    return verdict, "; ".join(peaks) or "-", flops


def run(target: Target, log_dir: Path, python: str) -> tuple[str, str, str, float]:
    started = time.monotonic()
    done = subprocess.run([python, str(SCRIPT), *COMMON, *target.args], capture_output=True, text=True)
    seconds = time.monotonic() - started
    (log_dir / f"{target.name}.log").write_text(done.stdout + "\n--- stderr ---\n" + done.stderr[-20000:])
    lines = done.stdout.splitlines()
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        return f"error (exit {done.returncode}): {last}", "-", "-", seconds
    return (*summarize(lines), seconds)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help="comma-separated target names: " + ", ".join(t.name for t in TARGETS))
    p.add_argument("--log-dir", default=None, help="where each dry run's full output goes")
    args = p.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - {t.name for t in TARGETS})
    if unknown:
        p.error(f"--only: no target named {', '.join(unknown)}")
    chosen = [t for t in TARGETS if not names or t.name in names]
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="real_size_targets_"))
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"logs: {log_dir}", flush=True)
    print("| target | verdict | device peak by holder (GiB, per phase) | edit FLOPs/step | wall s |")
    print("|---|---|---|---|---:|", flush=True)
    for target in chosen:
        verdict, peaks, flops, seconds = run(target, log_dir, sys.executable)
        print(f"| {target.title} | `{verdict}` | {peaks} | {flops} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
