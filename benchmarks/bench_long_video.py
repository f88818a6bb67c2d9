#!/usr/bin/env python
"""Long videos in bounded memory: how TokenFlow's per-step memory and stored products scale with frames.

With a tiny SD1.5-layout UNet (``--model tiny``), small latents (16x16) and 2 steps, for 8 -> 256
frames, one fresh worker process per row measures:

- the stored products: latents, the inversion trajectory (steps x frames latents, CPU) and the
  extracted correspondences (integer fields, CPU) in MiB;
- ONE sampling step of the edit (PnP with on-the-fly correspondences, the official mode, and SDEdit
  with extracted correspondences): seconds per step and peak memory of a step above the memory at
  the step's start (CPU: peak RSS increase, exact through the kernel's high-water mark; CUDA:
  ``max_memory_allocated``), and the keyframe bank (the keyframe tokens / outputs / PnP q,k one step
  keeps for its propagation passes);
- then the effect of ``max_keyframes`` (EditSettings.max_keyframes) at the longest clip.

The claim checked: a step's peak does not grow with the frame count except for the frames' own
latents (a few per-frame latent buffers: edit latents, source latents, output) and the keyframe
bank, which grows with the number of keyframes (one per batch of B frames; ``max_keyframes`` 0 = auto: none up to 64 frames, 16 beyond).

    python benchmarks/bench_long_video.py                          # default: 8,32,64,128,256 frames
    python benchmarks/bench_long_video.py --frames 8,64 --max-keyframes 0,8
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _host  # noqa: E402

RESULT_TAG = "BENCH_RESULT "
EDIT_PHASES = ("pnp", "sdedit_extracted")


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=_ints, default=[8, 32, 64, 128, 256])
    p.add_argument("--latent", type=int, default=16)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--model", choices=("tiny", "mid", "full"), default="tiny")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-keyframes", type=_ints, default=[0, 16, 8, 4],
                   help="caps tried at the longest clip (0 = one keyframe per batch)")
    p.add_argument("--fixed-cap", type=int, default=8, help="also run every clip with more keyframes than this with "
                   "max_keyframes = this (0: no)")
    p.add_argument("--max-keyframes-frames", type=int, default=0,
                   help="clip length for the max_keyframes table (default: the largest --frames)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--memory-steps", type=int, default=1, help="CPU: peaks from one extra run per phase with this many "
                   "steps (PnP: every step with q/k and residual injection) and glibc's mmap threshold fixed at 4 KiB "
                   "(see _phases.memory_mode); 0 = the timed runs' peaks")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    p.add_argument("--clock", choices=("auto", "cpu", "wall"), default="auto", help="time measure: cpu = this "
                   "process's CPU seconds (robust on a shared machine; auto picks it on CPU with 1 thread), wall = "
                   "wall seconds (auto on CUDA or with several threads)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-frames", type=int, help=argparse.SUPPRESS)
    p.add_argument("--worker-max-keyframes", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--worker-phases", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run_worker(args: argparse.Namespace) -> None:
    _host.start_worker(args)
    import torch

    import _phases
    from comfyui_tokenflow.tokenflow_ops.keyframes import spread_keyframe_groups

    first = _phases.memory_first(args.device, args.memory_steps)
    work = _phases.Workload(args.model, args.device, args.worker_frames, args.latent, args.steps, args.steps,
                            batch_size=args.batch_size, max_keyframes=args.worker_max_keyframes)
    work.warm_up()
    phases = args.worker_phases.split(",")
    results = _phases.measure_memory_and_phases(
        work, phases, first, args.memory_steps, args.repeats,
        lambda m: print(f"[worker {args.worker_frames} frames] {m}", file=sys.stderr, flush=True))
    info = {"machine": _host.machine_lines(work.torch_device), "threads": torch.get_num_threads(),
            "products": _phases.product_sizes(work),
            "group_size": spread_keyframe_groups(work.frames, work.batch_size, work.max_keyframes)}
    print(RESULT_TAG + json.dumps({"info": info, "phases": results}), flush=True)


def _spawn(args: argparse.Namespace, frames: int, max_keyframes: int, phases: list[str]) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--worker-frames", str(frames),
           "--worker-max-keyframes", str(max_keyframes), "--worker-phases", ",".join(phases),
           "--latent", str(args.latent), "--steps", str(args.steps), "--model", args.model, "--device", args.device,
           "--batch-size", str(args.batch_size), "--repeats", str(args.repeats), "--memory-steps", str(args.memory_steps), "--threads", str(args.threads), "--clock", args.clock]
    print(f"[long-video] {frames} frames, max_keyframes {max_keyframes}: {','.join(phases)}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=dict(os.environ))
    if proc.returncode != 0:
        raise SystemExit(f"worker failed ({proc.returncode}): {' '.join(cmd)}")
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    raise SystemExit("worker printed no result")


def report(args, scaling: list[tuple[int, dict]], capped: list[tuple[int, int, dict]]) -> str:
    info = scaling[0][1]["info"] if scaling else capped[0][2]["info"]
    lines = [f"### Long videos: scaling with the frame count — model `{args.model}`, latent {args.latent}×{args.latent}, "
             f"{args.steps} steps, B={args.batch_size}, device {args.device}", ""]
    lines += info["machine"]
    lines.append("- step peak: peak memory of one sampling step above the memory at its start (CPU: RSS high-water "
                 "mark; CUDA: max_memory_allocated), the largest over the edit's steps; bank: keyframe tokens, "
                 "self-attention outputs and PnP q/k one step holds for its propagation passes; "
                 "latents: the clip's latents (one buffer of n×4×h×w float32)")
    lines.append("")
    if scaling:
        lines.append("| frames | keyframes/step | latents MiB | trajectory MiB | corr. MiB | inversion s/step | "
                     "inversion peak MiB | extraction s/step | extraction peak MiB | PnP s/step | PnP step peak MiB | "
                     "PnP bank MiB | SDEdit(ext.) s/step | SDEdit(ext.) step peak MiB |")
        lines.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for frames, result in scaling:
            ph, prod = result["phases"], result["info"]["products"]
            inv, ext, pnp, sde = (ph.get(k, {}) for k in ("inversion", "extraction", "pnp", "sdedit_extracted"))
            lines.append(
                f"| {frames} | {pnp.get('keyframes', 0)} | {prod['latents_mib']:.2f} | "
                f"{prod.get('trajectory_mib', 0):.2f} | {prod.get('correspondences_mib', 0):.2f} | "
                f"{inv.get('s_per_step', 0):.2f} | {inv.get('peak_mib', 0):.0f} | {ext.get('s_per_step', 0):.2f} | "
                f"{ext.get('peak_mib', 0):.0f} | {pnp.get('s_per_step', 0):.2f} | {pnp.get('step_peak_mib', 0):.0f} | "
                f"{pnp.get('bank_mib', 0):.1f} | {sde.get('s_per_step', 0):.2f} | {sde.get('step_peak_mib', 0):.0f} |")
    if capped:
        lines.append("")
        lines.append("`max_keyframes` (PnP, on the fly): the cap at the longest clip, then a fixed cap over the clip "
                     "lengths. Fewer keyframes per step make the joint keyframe pass (one UNet call on all keyframes, "
                     "extended attention over all their tokens) cheaper and smaller; frames then propagate from "
                     "keyframes further away. With a fixed cap the step peak stays flat as the clip grows.")
        lines.append("")
        lines.append("| frames | max_keyframes | keyframes/step | group size | latents MiB | s/step | keyframe pass s/step | "
                     "propagation s/step | step peak MiB | bank MiB |")
        lines.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for frames, cap, result in capped:
            pnp = result["phases"]["pnp"]
            group = result["info"].get("group_size", 0)
            lines.append(f"| {frames} | {cap or '0 (auto)'} | {pnp['keyframes']} | {group} | "
                         f"{result['info']['products']['latents_mib']:.2f} | "
                         f"{pnp['s_per_step']:.2f} | {pnp['keyframe_s_per_step']:.2f} | "
                         f"{pnp['propagation_s_per_step']:.2f} | {pnp['step_peak_mib']:.0f} | {pnp['bank_mib']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        return
    start = time.perf_counter()
    scaling = [(frames, _spawn(args, frames, 0, ["inversion", "extraction", *EDIT_PHASES])) for frames in args.frames]
    longest = args.max_keyframes_frames or max(args.frames)
    runs: dict[tuple[int, int], dict] = {(f, 0): r for f, r in scaling}

    def capped_run(frames: int, cap: int) -> tuple[int, int, dict]:
        if (frames, cap) not in runs:
            runs[(frames, cap)] = _spawn(args, frames, cap, ["pnp"])
        return frames, cap, runs[(frames, cap)]

    capped = [capped_run(longest, cap) for cap in args.max_keyframes]
    if args.fixed_cap:
        capped += [capped_run(f, args.fixed_cap) for f in args.frames
                   if f != longest and -(-f // args.batch_size) > args.fixed_cap]
    text = report(args, scaling, capped) + f"\n(benchmark wall time {time.perf_counter() - start:.0f} s)\n"
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    if args.json:
        args.json.write_text(json.dumps({"scaling": [{"frames": f, **r} for f, r in scaling],
                                         "max_keyframes": [{"frames": f, "max_keyframes": c, **r} for f, c, r in capped]},
                                        indent=1))


if __name__ == "__main__":
    main()
