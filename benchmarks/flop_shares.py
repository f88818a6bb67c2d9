#!/usr/bin/env python
"""Where a UNet evaluation's FLOPs go, and the TokenFlow / plain CFG FLOP ratio that follows from it.

Counts FLOPs with ``torch.utils.flop_counter`` on the META device (no weights, no compute: runs in
seconds even for the full SD1.5 UNet at 64x64 latents) for one frame, split into self-attention
(core QK^T/AV and q/k/v projections: what a propagated frame skips), and the decoder after
``output_blocks.4`` (what a PnP source pass that only feeds residual injection does not need: the
pack stops propagated source passes there when the correspondences are extracted).

From those shares it projects the per-step FLOP ratio TokenFlow / plain CFG for each editor over a
``--mix-steps`` edit (PnP: q/k injection in the first half of the steps, residuals in the first 80%),
with ``K = ceil(n / B)`` keyframes whose edit branches attend over all K keyframes' tokens:

- plain CFG: 2n frame evaluations;
- keyframe pass: K source frames (when the step needs the source) + 2K edit frames whose
  self-attention core is K times larger (extended attention);
- propagation: n source frames (when needed) + 2n edit frames, each without self-attention core and
  q/k/v projections.

    python benchmarks/flop_shares.py                         # mid @ 16/24/32 and full @ 64, 40 frames
    python benchmarks/flop_shares.py --model full --latent 64 --frames 40 --batch-size 8

These are FLOPs, not seconds: small batches, kernel efficiency and Python overhead come on top
(bench_tokenflow.py measures those).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _host  # noqa: E402


def shares(size: str, latent: int) -> dict[str, float]:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import models

    meta = torch.device("meta")
    unet = models._model_config(size, torch.float32, None).get_model({}, device=meta).diffusion_model
    context = models.MODELS[size]["context_dim"]
    x = torch.empty(1, 4, latent, latent, device=meta)
    counter = FlopCounterMode(display=False, depth=None)
    with torch.no_grad(), counter:
        unet(x, torch.full((1,), 500.0, device=meta), torch.empty(1, 77, context, device=meta))
    flops = counter.get_flop_counts()
    total = sum(flops["Global"].values())

    def module_sum(match) -> float:
        return sum(sum(v.values()) for k, v in flops.items() if match(k))

    attn1 = module_sum(lambda k: k.endswith(".attn1"))
    core = sum(d.get(torch.ops.aten.bmm, 0) for k, d in flops.items() if k.endswith(".attn1"))
    out_proj = module_sum(lambda k: k.endswith(".attn1.to_out.0"))

    def after_output_4(key: str) -> bool:
        parts = key.split(".")
        return (len(parts) == 4 and parts[1] == "output_blocks" and int(parts[2]) >= 5) or key == "UNetModel.out"

    return {"gflop": total / 1e9, "core": core / total, "qkv": (attn1 - core - out_proj) / total,
            "self_attention": attn1 / total, "after_output_4": module_sum(after_output_4) / total}


def step_kinds(editor: str, steps: int) -> list[tuple[bool, bool]]:
    """(q/k injection, residual injection) for every step of an edit with the editor's declared defaults (the
    official 0.5 / 0.8 for PnP, sdedit_start 0.9): ``_phases.step_kinds``, read as flags."""
    import _phases  # after _host.bootstrap (it imports ComfyUI)

    return [(kind.startswith("attn+"), kind.endswith("res")) for kind in _phases.step_kinds(editor, steps)]


def projected_ratio(s: dict[str, float], editor: str, on_the_fly: bool, n: int, batch: int, steps: int,
                    stop_frames: bool = True, stop_keyframes: bool = False) -> float:
    """TokenFlow FLOPs per step / plain CFG FLOPs per step (frame evaluation = 1).

    ``stop_frames``: with extracted fields, a propagated source pass stops after the last PnP ResBlock
    (output_blocks.4), as the pack does since commit a3b88ee. ``stop_keyframes``: the same for the
    keyframes' source pass on steps without q/k injection (not done by the pack).
    """
    k = math.ceil(n / batch)
    propagated = 1 - s["core"] - s["qkv"]
    extended = 1 + (k - 1) * s["core"]
    prefix = 1 - s["after_output_4"]
    total = 0.0
    for attn, res in step_kinds(editor, steps):
        need_source_keyframes = on_the_fly or attn or res
        need_source_frames = on_the_fly or res
        source_kf = prefix if stop_keyframes and not on_the_fly and not attn else 1
        source_fr = prefix if stop_frames and not on_the_fly else 1
        step = 2 * k * extended + 2 * n * propagated
        step += k * source_kf if need_source_keyframes else 0
        step += n * propagated * source_fr if need_source_frames else 0
        total += step / (2 * n)
    return total / len(step_kinds(editor, steps))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="mid:16,mid:24,mid:32,full:64", help="model:latent pairs")
    p.add_argument("--frames", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--mix-steps", type=int, default=50)
    args = p.parse_args()
    _host.bootstrap("cpu", 1)
    n, b, steps = args.frames, args.batch_size, args.mix_steps
    print(f"### UNet FLOP shares and projected TokenFlow / plain CFG FLOP ratios ({n} frames, B={b}, "
          f"{math.ceil(n / b)} keyframes, {steps}-step mix)\n")
    print("| model | latent | GFLOP/frame | self-attn core | q/k/v proj | after output_blocks.4 | PnP on the fly | "
          "PnP extracted, full source passes | PnP extracted (pack: propagated source stops after output_blocks.4) | "
          "… and keyframe source too (when no q/k injection) | SDEdit / ControlNet* extracted |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for config in args.configs.split(","):
        size, latent = config.split(":")
        s = shares(size, int(latent))
        print(f"| {size} | {latent} | {s['gflop']:.1f} | {s['core']:.1%} | {s['qkv']:.1%} | {s['after_output_4']:.1%} | "
              f"{projected_ratio(s, 'pnp', True, n, b, steps):.2f} | "
              f"{projected_ratio(s, 'pnp', False, n, b, steps, stop_frames=False):.2f} | "
              f"{projected_ratio(s, 'pnp', False, n, b, steps):.2f} | "
              f"{projected_ratio(s, 'pnp', False, n, b, steps, stop_keyframes=True):.2f} | "
              f"{projected_ratio(s, 'sdedit', False, n, b, steps):.2f} |")
    print("\n*ControlNet: the ControlNet's own FLOPs come on top for both TokenFlow and plain CFG.")


if __name__ == "__main__":
    main()
