#!/usr/bin/env python
"""Where a TokenFlow phase spends its time: cProfile (Python functions) and torch.profiler (operators).

    python benchmarks/profile_tokenflow.py --phase sdedit_extracted --frames 8 --latent 16
    python benchmarks/profile_tokenflow.py --phase plain --torch      # operator table as well

Builds the same workload as bench_tokenflow.py (random-weight ``--model``), warms up, runs every
phase named by ``--phase`` once unprofiled (products, caches), once timed, then once under cProfile
(process CPU time as its clock, like the benchmark's default) and, with ``--torch``, once under
torch.profiler.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _host  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phase", default="sdedit_extracted", help="comma-separated phases (see bench_tokenflow.py)")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--latent", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--model", default="mid")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--sort", default="tottime", help="cProfile sort key (tottime, cumulative)")
    p.add_argument("--torch", action="store_true", help="also print torch.profiler's operator table")
    p.add_argument("--filter", default="", help="only print cProfile rows whose location contains this")
    args = p.parse_args()
    _host.bootstrap(args.device, args.threads or None)
    import torch

    import _phases

    work = _phases.Workload(args.model, args.device, args.frames, args.latent, args.steps, args.steps,
                            batch_size=args.batch_size)
    work.warm_up()
    for phase in args.phase.split(","):
        run, _ = _phases._phase_call(work, phase)
        with torch.no_grad():
            run()  # unprofiled: products, first-call costs
            start = time.process_time()
            run()
            plain_s = time.process_time() - start
            profiler = cProfile.Profile(time.process_time)
            profiler.enable()
            run()
            profiler.disable()
        out = io.StringIO()
        stats = pstats.Stats(profiler, stream=out).sort_stats(args.sort)
        if args.filter:
            stats.print_stats(args.filter, args.top)
        else:
            stats.print_stats(args.top)
        print(f"==== {phase}: {plain_s:.3f} CPU s unprofiled ({args.frames} frames, latent {args.latent}, {args.steps} steps)")
        print(out.getvalue())
        if args.torch:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
            with torch.no_grad(), profile(activities=activities) as prof:
                run()
            key = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
            print(prof.key_averages().table(sort_by=key, row_limit=args.top))


if __name__ == "__main__":
    main()
