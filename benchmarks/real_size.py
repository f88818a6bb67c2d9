#!/usr/bin/env python
"""Real-size dry run: does a TokenFlow edit fit a card and a host, without a GPU and without weights?

ComfyUI's own model class for the named checkpoint (config from ComfyUI's model detection, weights on fake tensors:
``torch._subclasses.fake_tensor.FakeTensorMode``, device a fake ``cuda:0``), the ModelPatcher's loading through
``comfy.model_management.load_models_gpu`` (partial loading included) and the pack's node functions (TokenFlow DDIM
Inversion, Extract Correspondences, TokenFlow Sampler: guiders, patches, banks, planner) run each phase for a few
steps. Live device and host bytes are counted at every allocation, by holder (``_real_size_track.py``); FLOPs per
model evaluation by ``FlopCounterMode`` on the same run, against plain sampling of the same frames. The only
stand-ins are in ``_real_size_shims.py`` and are printed. Memory that grows with the step count (the inversion's
trajectory, extracted fields) is scaled from the steps run to ``--steps`` (per-step bytes measured).

    python benchmarks/real_size.py --model flux-dev --dtype bf16 --size 1024 --frames 40 --vram 23.99 --ram 64 --editor pnp

The last line is one of ``verdict: fits ...``, ``verdict: oom ...``, ``verdict: refused: <message>``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _host  # noqa: E402

GIB = 2**30


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sd15",
                   choices=("sd15", "sd21", "sdxl", "flux-dev", "flux-schnell", "sd35-large", "sd35-medium"))
    p.add_argument("--dtype", default="fp16", choices=("fp16", "bf16", "fp8"))
    p.add_argument("--editor", default="pnp", choices=("pnp", "sdedit", "controlnet"))
    p.add_argument("--extracted", action="store_true", help="edit with extracted correspondences (extraction first)")
    p.add_argument("--size", type=int, default=512, help="frame width = height in pixels")
    p.add_argument("--frames", type=int, default=40)
    p.add_argument("--vram", type=float, default=23.99, help="the device's total GiB as torch reports it")
    p.add_argument("--reserve", type=float, default=None, help="GiB kept free (default: ComfyUI's minimum inference "
                   "memory)")
    p.add_argument("--ram", type=float, default=64.0, help="host GiB")
    p.add_argument("--steps", type=int, default=50, help="editing steps the memory is counted for (sampler default)")
    p.add_argument("--run-steps", type=int, default=3, help="steps actually run per phase (the edit's must include "
                   "every kind of step of a --steps edit: PnP's default 0.5 / 0.8 injection needs 3)")
    p.add_argument("--no-replay", dest="replay", action="store_false",
                   help="run every model call (by default a call layout seen to keep nothing in two checked runs is "
                   "replayed from its recorded memory instead of run again: _real_size_replay.py)")
    p.add_argument("--check", choices=("tiny", "mid"), default=None,
                   help="instead of the dry run: its memory accounting on the CPU with real tensors and a real "
                   "random-weight UNet of this size, against torch.profiler's allocation events of the same run")
    return p.parse_args(argv)


def main(argv=None) -> str:
    args = parse(argv)
    _host.bootstrap("cpu")
    if args.check:
        import _real_size_check

        check = _real_size_check.accounting_check(args.check)
        line = (f"accounting check {check.size} (cpu, real tensors): tracker peak {check.tracker_peak / 2**20:.2f} MiB, "
                f"profiler peak {check.profiler_peak / 2**20:.2f} MiB, difference {100 * check.difference:.2f}%")
        print(line)
        return line
    import _real_size_run

    return _real_size_run.dry_run(args)


if __name__ == "__main__":
    main()
