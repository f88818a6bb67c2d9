#!/usr/bin/env python
"""TokenFlow per phase versus plain CFG sampling of the same frames: UNet calls, torch ops, time, memory.

For every (frames, latent size) of the grid, one fresh worker process builds a random-weight
SD1.5-architecture UNet (``--model``: tiny / mid / full, see ``models.py``), the frames and the
prompts, warms up with one plain step, then measures each phase:

- ``inversion``: ``ddpm.invert.run_inversion`` (TokenFlowInvert: DDIM inversion, no CFG, all
  frames in one call per step when they fit, no reconstruction pass), per inversion step;
- ``extraction``: ``sampling_paths.run_extraction`` (clean source pass: a keyframe call, then
  the frames in as few calls as memory allows);
- ``plain`` / ``plain_controlnet``: the core KSampler path, ``comfy.sample.sample`` with sampler
  ``ddim``, scheduler ``ddim_uniform``, the same UNet, steps and cfg (and the same per-frame
  ControlNet for the ControlNet baseline);
- the TokenFlow edits ``pnp`` (correspondences on the fly, the official numbers), ``pnp_extracted``,
  ``sdedit_extracted`` and ``controlnet_extracted`` (``ddpm.edit.run_edit``), split into
  keyframe pass and propagation pass by the ``PassContext.phase`` of each guider call.

Per phase, in this order and in separate runs: peak memory (CPU: a 1-step run with a fresh heap),
time (``--repeats`` interleaved runs), then one counting run (``_counting.py``): the UNet forward
passes per step with their batch sizes (a forward pre-hook on ``model.model.diffusion_model``; the
ControlNet's likewise) and the torch ops dispatched per step (every aten call a
``TorchDispatchMode`` sees inside the step; model loading excluded). Nothing is compiled: the
measured path is eager PyTorch. Ratios ("× plain") are against plain CFG on the same frames
(ControlNet phases: against plain CFG with the same ControlNet).

Time per step: each step kind's fastest step (PnP steps differ only by their injections), on the
process's CPU clock with 1 thread on a CPU (robust on a shared machine), wall time on CUDA; also
extrapolated to the official 50 steps' mix of step kinds (``--mix-steps``). Memory: peak increase
above the phase's start (CPU: resident set through the kernel's high-water mark; CUDA:
``torch.cuda.max_memory_allocated`` of the timed run). ``--isolate`` runs every phase in its own
process.

    python benchmarks/bench_tokenflow.py --model tiny --frames 40 --latent 16 --steps 4   # the op-count targets
    python benchmarks/bench_tokenflow.py --frames 8 --latent 16 --phases plain,pnp
    python benchmarks/bench_tokenflow.py --device cuda --model full --frames 40 --latent 64 --steps 10 \\
        --threads 0      # the GPU check of the seconds-per-step targets (= bench_gpu_full.sh)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _host  # noqa: E402

DEFAULT_PHASES = ("inversion", "extraction", "plain", "plain_controlnet", "pnp", "pnp_extracted",
                  "sdedit_extracted", "controlnet_extracted")
LABELS = {
    "inversion": "inversion (TokenFlowInvert)",
    "extraction": "extraction (correspondences)",
    "plain": "plain CFG (KSampler path)",
    "plain_controlnet": "plain CFG + ControlNet",
    "pnp": "PnP, on the fly",
    "pnp_extracted": "PnP, extracted corr.",
    "sdedit_extracted": "SDEdit, extracted corr.",
    "controlnet_extracted": "ControlNet, extracted corr.",
    "sdedit": "SDEdit, on the fly",
    "controlnet": "ControlNet, on the fly",
}
BASELINE = {"pnp": "plain", "pnp_extracted": "plain", "sdedit_extracted": "plain", "sdedit": "plain",
            "controlnet_extracted": "plain_controlnet", "controlnet": "plain_controlnet", "inversion": "plain",
            "extraction": "plain"}
# The cost targets: what a TokenFlow step may cost against a plain CFG step on the same frames. Ops per
# step (device-independent; defined at 40 frames, latent 16, the tiny model, 4 steps, B = 8, random
# keyframes, no max_keyframes): a keyframe call and a propagation call against plain's one call is 2x.
# Seconds per step: for --device cuda runs (40 frames, 512x512, full SD1.5 architecture, fp16, 10 steps);
# a CPU hides the per-op cost they are about.
TARGETS = {
    "ops_per_step": {"pnp": 2.5, "sdedit_extracted": 2.3, "controlnet_extracted": 2.3},
    "gpu_s_per_step": {"pnp": 1.7, "pnp_extracted": 1.5, "sdedit_extracted": 1.15, "controlnet_extracted": 1.15,
                       "inversion": 0.55},
}
RESULT_TAG = "BENCH_RESULT "


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=_ints, default=[8, 16], help="comma-separated frame counts (default 8,16)")
    p.add_argument("--latent", type=_ints, default=[16, 24], help="comma-separated latent sizes (default 16,24; "
                   "pixels are 8x)")
    p.add_argument("--model", choices=("tiny", "mid", "full"), default="mid", help="UNet size (see models.py)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--steps", type=int, default=4, help="editing steps of the timed runs (default 4: PnP steps of "
                   "every kind: q/k+residual injection, residual only, none; SDEdit 0.9 visits 2)")
    p.add_argument("--inversion-steps", type=int, default=0, help="inversion steps (default: --steps; time is per step)")
    p.add_argument("--batch-size", type=int, default=8, help="TokenFlow batch size B (one keyframe per batch)")
    p.add_argument("--cfg", type=float, default=7.5)
    p.add_argument("--max-keyframes", type=int, default=0)
    p.add_argument("--phases", default=",".join(DEFAULT_PHASES), help=f"comma-separated, from {tuple(LABELS)}")
    p.add_argument("--repeats", type=int, default=1, help="runs of each phase, interleaved; per step kind the fastest "
                   "step counts (default 1)")
    p.add_argument("--mix-steps", type=int, default=50, help="also estimate s/step for this step count's mix of step "
                   "kinds (PnP injects q/k in the first half, residuals in the first 80%%; default 50, the official)")
    p.add_argument("--memory-steps", type=int, default=1, help="CPU: peak memory comes from one extra run per phase "
                   "with this many steps (PnP: every step with q/k and residual injection, its heaviest kind) and "
                   "glibc's mmap threshold fixed at 4 KiB (repeatable RSS peaks; 0 = take the peaks of the timed "
                   "runs, which vary by +-15 MiB with heap fragmentation)")
    p.add_argument("--count-steps", type=int, default=0, help="steps of the counting run (UNet calls and torch ops "
                   "per step; default 0: the same as --steps)")
    p.add_argument("--no-count", action="store_true", help="skip the counting run")
    p.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto", help="weight "
                   "dtype of the UNet and ControlNet (auto: float32 on a CPU, ComfyUI's choice on CUDA; a reduced "
                   "dtype on a CPU checks that code path)")
    p.add_argument("--inversion-frame-batch", type=int, default=0, help="TokenFlowInvert's frame_batch (0: auto, all "
                   "frames per call when they fit)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: on a shared machine one "
                   "thread per process is far less disturbed by other load; 0 = torch's default)")
    p.add_argument("--isolate", action="store_true", help="one fresh process per phase (slower; memory cross-check)")
    p.add_argument("--target-seconds", type=float, default=0.0, help="also report the PnP edit's total seconds "
                   "against this target (GPU run: 30)")
    p.add_argument("--json", type=Path, help="write all results here as JSON")
    p.add_argument("--markdown", type=Path, help="write the Markdown report here")
    p.add_argument("--clock", choices=("auto", "cpu", "wall"), default="auto", help="time measure: cpu = this "
                   "process's CPU seconds (robust on a shared machine; auto picks it on CPU with 1 thread), wall = "
                   "wall seconds (auto on CUDA or with several threads)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# -- worker: one config, some phases, in this process --------------------------------------------
def run_worker(args: argparse.Namespace) -> None:
    _host.start_worker(args)
    import torch

    import _phases
    import models

    frames, latent = args.frames[0], args.latent[0]
    phases = args.phases.split(",")
    first = _phases.memory_first(args.device, args.memory_steps)
    work = _phases.Workload(args.model, args.device, frames, latent, args.steps, args.inversion_steps or args.steps,
                            batch_size=args.batch_size, cfg=args.cfg, max_keyframes=args.max_keyframes,
                            dtype=args.dtype, inversion_frame_batch=args.inversion_frame_batch)
    # Products made by an earlier isolated worker.
    if args.workdir is not None:
        for name in ("inversion", "correspondences"):
            path = args.workdir / f"{name}.pt"
            if path.is_file():
                setattr(work, name, torch.load(path, weights_only=False))
    start = time.perf_counter()
    work.warm_up()
    warm_s = time.perf_counter() - start
    results = _phases.measure_memory_and_phases(
        work, phases, first, args.memory_steps, args.repeats,
        lambda m: print(f"[worker {frames}x{latent}] {m}", file=sys.stderr, flush=True), mix_steps=args.mix_steps or args.steps)
    if not args.no_count:  # after the timed runs: the dispatch mode slows every op down
        for phase, counts in _phases.measure_counts(work, phases, args.count_steps).items():
            results[phase].update(counts)
    if args.workdir is not None:
        for name in ("inversion", "correspondences"):
            path = args.workdir / f"{name}.pt"
            if getattr(work, name) is not None and not path.is_file():
                torch.save(getattr(work, name), path)
    device = work.torch_device
    info = {
        "machine": _host.machine_lines(device),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "dtype": str(work.model.model.get_dtype()).replace("torch.", ""),
        "parameters": models.parameter_count(work.model), "warm_up_s": warm_s,
        "products": _phases.product_sizes(work),
    }
    print(RESULT_TAG + json.dumps({"info": info, "phases": results}), flush=True)


def _spawn(args: argparse.Namespace, frames: int, latent: int, phases: list[str], workdir: Path | None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--frames", str(frames), "--latent", str(latent),
           "--model", args.model, "--device", args.device, "--steps", str(args.steps),
           "--inversion-steps", str(args.inversion_steps), "--batch-size", str(args.batch_size), "--cfg", str(args.cfg),
           "--max-keyframes", str(args.max_keyframes), "--phases", ",".join(phases), "--repeats", str(args.repeats), "--mix-steps", str(args.mix_steps), "--memory-steps", str(args.memory_steps),
           "--threads", str(args.threads), "--clock", args.clock, "--count-steps", str(args.count_steps),
           "--dtype", args.dtype, "--inversion-frame-batch", str(args.inversion_frame_batch)]
    if args.no_count:
        cmd.append("--no-count")
    if workdir is not None:
        cmd += ["--workdir", str(workdir)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=dict(os.environ))
    if proc.returncode != 0:
        raise SystemExit(f"worker failed ({proc.returncode}): {' '.join(cmd)}")
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    raise SystemExit("worker printed no result")


def run_config(args: argparse.Namespace, frames: int, latent: int) -> dict:
    phases = args.phases.split(",")
    if not args.isolate:
        return _spawn(args, frames, latent, phases, None)
    merged: dict = {"phases": {}}
    with tempfile.TemporaryDirectory(prefix="tokenflow-bench-") as tmp:
        # Products first so that the isolated edit workers load them instead of recomputing.
        order = sorted(phases, key=lambda p: (p not in ("inversion",), p not in ("extraction",)))
        for phase in order:
            out = _spawn(args, frames, latent, [phase], Path(tmp))
            merged["info"] = out["info"]
            merged["phases"].update(out["phases"])
    return merged


# -- report ---------------------------------------------------------------------------------------
def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _ratio(phases: dict, phase: str, key: str) -> float | None:
    base = phases.get(BASELINE.get(phase, ""))
    r = phases[phase]
    if not base or phase in ("plain", "plain_controlnet") or r.get(key) is None or not base.get(key):
        return None
    return r[key] / base[key]


def _verdict(ratio: float | None, target: float | None) -> str:
    return "" if ratio is None or target is None else ("ok" if ratio <= target else "**over**")


def _patterns(patterns: dict[str, int]) -> str:
    """'15+120 ×4': images per UNet call in one step, and how many steps ran that way."""
    ordered = sorted(patterns.items(), key=lambda kv: -kv[1])
    return "; ".join(f"{p} ×{n}" for p, n in ordered)


def count_table(configs: list[tuple[int, int, dict]]) -> list[str]:
    targets = TARGETS["ops_per_step"]
    lines = ["| frames | latent | phase | steps | UNet calls/step | images per call (× steps) | "
             "ControlNet calls/step | ops/step | of which the pack's | × plain | target | |",
             "|---:|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---|"]
    for frames, latent, result in configs:
        phases = result["phases"]
        for phase, r in phases.items():
            if "ops_per_step" not in r:
                continue
            ratio = _ratio(phases, phase, "ops_per_step")
            target = targets.get(phase)
            control = (f"{r['controlnet_calls_per_step']:.2f} ({_patterns(r['controlnet_patterns'])})"
                       if r.get("controlnet_calls_per_step") else "")
            lines.append(
                f"| {frames} | {latent} | {LABELS.get(phase, phase)} | {r['count_steps']} | "
                f"{r['unet_calls_per_step']:.2f} | {_patterns(r['unet_patterns'])} | {control} | "
                f"{r['ops_per_step']:,.0f} | {r.get('pack_ops_per_step', 0):,.0f} | "
                f"{_fmt(ratio, 2) if ratio is not None else ''} | "
                f"{'≤ %g×' % target if target else ''} | {_verdict(ratio, target)} |")
    return lines


def pack_op_lines(configs: list[tuple[int, int, dict]], top: int = 6) -> list[str]:
    """Where the pack's own ops per step go (innermost pack function), per TokenFlow phase."""
    lines = []
    for frames, latent, result in configs:
        for phase, r in result["phases"].items():
            functions = r.get("pack_ops_by_function") or {}
            if functions and phase not in ("plain", "plain_controlnet"):
                listed = ", ".join(f"`{f.split('/', 1)[-1]}` {v:,.0f}" for f, v in list(functions.items())[:top])
                lines.append(f"- {frames}×{latent}² {LABELS.get(phase, phase)}: {listed}")
    return lines


def time_table(args: argparse.Namespace, configs: list[tuple[int, int, dict]]) -> list[str]:
    mix = args.mix_steps or args.steps
    targets = TARGETS["gpu_s_per_step"]
    on_gpu = args.device == "cuda"
    lines = [f"| frames | latent | phase | steps | s/step | s/step @{mix} | keyframe s/step | propagation s/step | "
             f"peak MiB | step peak MiB | × plain | {'target' if on_gpu else 'GPU target'} | |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for frames, latent, result in configs:
        phases = result["phases"]
        for phase, r in phases.items():
            ratio = _ratio(phases, phase, "mix_s_per_step")
            target = targets.get(phase)
            split = phase not in ("plain", "plain_controlnet", "inversion")
            lines.append(
                f"| {frames} | {latent} | {LABELS.get(phase, phase)} | {r['steps']} | {_fmt(r['s_per_step'])} | "
                f"{_fmt(r['mix_s_per_step'])} | "
                f"{_fmt(r['keyframe_s_per_step']) if split else ''} | {_fmt(r['propagation_s_per_step']) if split else ''} "
                f"| {r['peak_mib']:.0f} | {r['step_peak_mib']:.0f} | {_fmt(ratio, 2) if ratio is not None else ''} | "
                f"{'≤ %g×' % target if target else ''} | {_verdict(ratio, target) if on_gpu else ''} |")
    return lines


def report(args: argparse.Namespace, configs: list[tuple[int, int, dict]]) -> str:
    info = configs[0][2]["info"]
    clock = _host.resolve_clock(args.clock, args.device, args.threads)
    mix = args.mix_steps or args.steps
    memory = (f"separate {args.memory_steps}-step run with glibc's mmap threshold fixed at 4 KiB"
              if args.device == "cpu" and args.memory_steps else "the timed runs")
    lines = [f"### TokenFlow vs plain CFG — model `{args.model}` ({info['parameters'] / 1e6:.1f}M params, "
             f"{info['dtype']}), device {args.device}", ""]
    lines += info["machine"]
    lines.append(f"- steps {args.steps} (inversion {args.inversion_steps or args.steps}), batch size B="
                 f"{args.batch_size}, random keyframes, cfg {args.cfg}, max_keyframes {args.max_keyframes}, "
                 f"inversion frame_batch {args.inversion_frame_batch or 'auto'}, repeats {args.repeats}, "
                 f"{'one process per phase' if args.isolate else 'one process per config'}, "
                 f"clock: {'process CPU seconds' if clock == 'cpu' else 'wall seconds'}; eager PyTorch (no torch.compile)")
    lines.append("- **targets**: TokenFlow's cost per step against plain CFG on the same frames (ControlNet: "
                 "plain CFG + the same ControlNet): ops per step at 40 frames, latent 16, tiny model, 4 steps: PnP on "
                 "the fly ≤ 2.5×, SDEdit / ControlNet with extracted correspondences ≤ 2.3×; seconds per step on a "
                 "GPU (`--device cuda`, full model, 512², 40 frames): PnP on the fly ≤ 1.7×, PnP extracted ≤ 1.5×, "
                 "SDEdit / ControlNet extracted ≤ 1.15×, inversion ≤ 0.55×"
                 + ("" if args.device == "cuda" else " (not judged on this device)"))
    if configs and any("ops_per_step" in r for _, _, c in configs for r in c["phases"].values()):
        steps = args.count_steps or args.steps
        lines += ["", f"UNet calls and torch ops per step (separate {steps}-step counting run; UNet calls counted "
                  "at the UNet's entry with their batch sizes, ControlNet calls at the ControlNet's; ops: every aten "
                  "call inside the step seen by a TorchDispatchMode, model loading excluded):", ""]
        lines += count_table(configs)
        compiled = [f"{LABELS.get(p, p)} ({r['compiled_frames']})" for _, _, c in configs
                    for p, r in c["phases"].items() if r.get("compiled_frames")]
        if compiled:
            lines += ["", "**torch.compile was active** (dynamo frames compiled in the counting run): "
                      + ", ".join(compiled)]
        pack_lines = pack_op_lines(configs)
        if pack_lines:
            lines += ["", "The pack's own ops per step (patches, TokenFlow ops, guider; the rest is ComfyUI: UNet, "
                      "ControlNet, sampling), by innermost pack function:", ""] + pack_lines
    lines.append("")
    lines.append(f"Time and memory. s/step: per model evaluation, each step kind's fastest step (PnP steps differ by "
                 f"their injections); @{mix}: the same for a {mix}-step edit's mix of step kinds (PnP: q/k injection in "
                 f"the first {int(mix * 0.5)}, residuals in the first {int(mix * 0.8)} steps); keyframe / propagation: "
                 f"seconds per step inside the keyframe pass and the propagation pass (the rest: CFG combination, "
                 f"conditioning subsets); × plain uses @{mix}; peak: memory above the phase's start (CPU: peak RSS "
                 f"increase, from a {memory}; CUDA: max_memory_allocated); step peak: the largest one model evaluation "
                 f"(one step) reached")
    lines.append("")
    lines += time_table(args, configs)
    products = [(f, l, r["info"]["products"]) for f, l, r in configs]
    lines.append("")
    lines.append("Stored products: " + "; ".join(
        f"{f}×{l}²: trajectory {p.get('trajectory_mib', 0):.2f} MiB, correspondences "
        f"{p.get('correspondences_mib', 0):.2f} MiB" for f, l, p in products))
    if args.target_seconds:
        lines.append("")
        for frames, latent, result in configs:
            pnp = result["phases"].get("pnp")
            plain = result["phases"].get("plain")
            if pnp is None:
                continue
            verdict = "meets" if pnp["wall_s"] <= args.target_seconds else "MISSES"
            ratio = f", {pnp['mix_s_per_step'] / plain['mix_s_per_step']:.2f}× plain CFG per step" if plain else ""
            plain_total = f" (plain CFG: {plain['wall_s']:.1f} s)" if plain else ""
            lines.append(f"**PnP edit, {frames} frames, latent {latent}, {pnp['steps']} steps: {pnp['wall_s']:.1f} s "
                         f"wall in total{plain_total} — {verdict} the {args.target_seconds:g} s target{ratio}.**")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        return
    unknown = [p for p in args.phases.split(",") if p not in LABELS]
    if unknown:
        raise SystemExit(f"unknown phases {unknown}; choose from {tuple(LABELS)}")
    configs = []
    start = time.perf_counter()
    for frames in args.frames:
        for latent in args.latent:
            print(f"[bench] {frames} frames, latent {latent}x{latent} ...", file=sys.stderr, flush=True)
            configs.append((frames, latent, run_config(args, frames, latent)))
    text = report(args, configs)
    text += f"\n(benchmark wall time {time.perf_counter() - start:.0f} s)\n"
    print(text)
    for path in (args.markdown, args.json):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
    if args.markdown:
        args.markdown.write_text(text)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: (str(v) if isinstance(v, Path) else v)
                                                  for k, v in vars(args).items()},
                                         "configs": [{"frames": f, "latent": l, **r} for f, l, r in configs]}, indent=1))


if __name__ == "__main__":
    main()
