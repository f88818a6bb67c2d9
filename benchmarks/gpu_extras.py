"""The GPU checks of TokenFlow's cost beyond the per-phase table (``bench_gpu_full.sh``): host-device syncs,
long clips under a memory ballast, and a short profile of how busy the GPU is during TokenFlow steps.

    python benchmarks/gpu_extras.py --device cuda --model full --latent 64 \
        --sync-frames 40 --long 240:2,1000:1 --ballast-free-gib 24 --profile-frames 40 --markdown results/extras.md
    python benchmarks/gpu_extras.py --device cpu --model tiny --latent 8 --sync-frames 9 --long 20:1 \
        --profile-frames 9        # the code path on a CPU (no syncs to see, no ballast)

- **sync**: a 2-step edit per phase (PnP on the fly, PnP / SDEdit / ControlNet with extracted
  correspondences) with ``torch.cuda.set_sync_debug_mode("warn")`` active inside the guider's steps
  only; each synchronisation is attributed to the innermost frame of the pack or of ComfyUI.
- **long**: PnP on the fly at each ``frames:steps`` under a ballast that leaves ``--ballast-free-gib``
  free (ComfyUI sizes calls from ``torch.cuda.mem_get_info``, which ``set_per_process_memory_fraction``
  does not change); peak = ``max_memory_allocated`` minus the ballast.
- **profile**: 3 PnP steps under ``torch.profiler``: the share of a step's wall time the GPU is busy.
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import _host


def _ints_pairs(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in part.split(":")) for part in text.split(",") if part]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    p.add_argument("--model", choices=("tiny", "mid", "full"), default="full")
    p.add_argument("--latent", type=int, default=64)
    p.add_argument("--sync-frames", type=int, default=40, help="frames of the sync check (0: skip)")
    p.add_argument("--long", type=_ints_pairs, default=[], help="frames:steps of PnP runs, e.g. 240:2,1000:1")
    p.add_argument("--ballast-free-gib", type=float, default=0.0, help="CUDA: leave this much free for the long runs")
    p.add_argument("--profile-frames", type=int, default=0, help="frames of the 3-step profile (0: skip)")
    p.add_argument("--markdown", type=Path)
    return p.parse_args(argv)


def _origin(stack) -> str:
    """The innermost frame of the pack (outside benchmarks/) or of ComfyUI that led to a warning."""
    pack, host = str(_host.REPO), str(_host.comfyui_path())
    for frame in reversed(stack):
        name = frame.filename
        if name.startswith(pack) and "/benchmarks/" not in name:
            return f"pack {Path(name).name}:{frame.lineno} {frame.name}"
        if name.startswith(host):
            return f"ComfyUI {Path(name).name}:{frame.lineno} {frame.name}"
    return "other"


def sync_check(torch, _phases, work, lines: list[str]) -> None:
    from comfyui_tokenflow.engine.sampling.edit_guider import TokenFlowGuider

    lines += ["## Host-device synchronisations inside TokenFlow steps", "",
              "| phase | syncs per step | where (count) |", "|---|---:|---|"]
    original = TokenFlowGuider.predict_noise
    for phase in ("pnp", "pnp_extracted", "sdedit_extracted", "controlnet_extracted"):
        seen: Counter = Counter()
        steps = [0]

        def checked(self, *args, **kwargs):
            steps[0] += 1
            if work.torch_device.type == "cuda":
                torch.cuda.set_sync_debug_mode("warn")
            try:
                return original(self, *args, **kwargs)
            finally:
                if work.torch_device.type == "cuda":
                    torch.cuda.set_sync_debug_mode("default")

        def record(message, category, filename, lineno, file=None, line=None):
            if "synchroniz" in str(message).lower():
                seen[_origin(traceback.extract_stack()[:-1])] += 1

        TokenFlowGuider.predict_noise = checked
        previous = warnings.showwarning
        warnings.showwarning = record
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                warnings.showwarning = record
                run, _ = _phases._phase_call(work, phase)
                with torch.no_grad():
                    run()
        finally:
            warnings.showwarning = previous
            TokenFlowGuider.predict_noise = original
        total = sum(seen.values())
        where = "; ".join(f"{k} ({v})" for k, v in seen.most_common(6)) or "none"
        lines.append(f"| {phase} | {total / max(1, steps[0]):.1f} | {where} |")
    lines.append("")


def long_runs(torch, _phases, args, lines: list[str]) -> None:
    lines += ["## Long clips, PnP on the fly", "",
              "| frames | steps | s/step | peak GiB (ballast excluded) | UNet calls/step (images) |", "|---:|---:|---:|---:|---|"]
    for frames, steps in args.long:
        work = _phases.Workload(args.model, args.device, frames, args.latent, steps, steps)
        work.warm_up()
        work.ensure_inversion()
        ballast = None
        if work.torch_device.type == "cuda" and args.ballast_free_gib > 0:
            free, _ = torch.cuda.mem_get_info()
            extra = free - int(args.ballast_free_gib * 2**30)
            if extra > 0:
                ballast = torch.empty(extra, dtype=torch.uint8, device="cuda")
            torch.cuda.reset_peak_memory_stats()
        batches: list[int] = []
        handle = work.model.model.diffusion_model.register_forward_pre_hook(lambda m, a: batches.append(a[0].shape[0]))
        try:
            run, _ = _phases._phase_call(work, "pnp")
            _host.synchronize(work.torch_device)
            start = time.perf_counter()
            with torch.no_grad():
                run()
            _host.synchronize(work.torch_device)
            seconds = (time.perf_counter() - start) / steps
        finally:
            handle.remove()
        peak = "n/a (CPU)"
        if work.torch_device.type == "cuda":
            peak = f"{(torch.cuda.max_memory_allocated() - (ballast.numel() if ballast is not None else 0)) / 2**30:.1f}"
        del ballast
        lines.append(f"| {frames} | {steps} | {seconds:.2f} | {peak} | {len(batches) / steps:.1f} ({'+'.join(map(str, batches[:4]))}...) |")
    lines.append("")


def profile(torch, _phases, args, lines: list[str]) -> None:
    work = _phases.Workload(args.model, args.device, args.profile_frames, args.latent, 3, 3)
    work.warm_up()
    run, _ = _phases._phase_call(work, "pnp")
    activities = [torch.profiler.ProfilerActivity.CPU]
    if work.torch_device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    _host.synchronize(work.torch_device)
    start = time.perf_counter()
    with torch.no_grad(), torch.profiler.profile(activities=activities) as prof:
        run()
        _host.synchronize(work.torch_device)
    wall = time.perf_counter() - start
    events = prof.key_averages()
    device_us = sum(getattr(e, "self_device_time_total", 0) or 0 for e in events)
    lines += ["## Profile, 3 PnP steps", "",
              f"- wall {wall:.2f} s; device busy {device_us / 1e6:.2f} s "
              f"({100 * device_us / 1e6 / wall:.0f}% of the wall time)" if device_us else
              f"- wall {wall:.2f} s (no device timeline on the CPU)", ""]


def main(argv=None) -> None:
    args = parse_args(argv)
    _host.bootstrap(args.device, None if args.device == "cuda" else 1)
    import torch

    import _phases

    lines = [f"# GPU extras ({args.model} model, latent {args.latent}, {args.device}, commit {_host.git_commit()})", ""]
    if args.sync_frames:
        work = _phases.Workload(args.model, args.device, args.sync_frames, args.latent, 2, 2)
        work.warm_up()
        sync_check(torch, _phases, work, lines)
    if args.long:
        long_runs(torch, _phases, args, lines)
    if args.profile_frames:
        profile(torch, _phases, args, lines)
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
