#!/usr/bin/env python
"""TokenFlow on Flux / SD3 against plain sampling of the same frames: model calls, aten ops and FLOPs per step.

Tiny random-weight ``comfy.model_base.Flux`` / ``SD3`` models (devkit/tiny_dit_models.py) on the CPU,
at a token layout chosen by ``--latent`` (image tokens = (latent / 2)^2) and ``--text-tokens``.
Plain: deterministic Euler from the same start (Flux at cfg 1: one branch; SD3 at cfg 4: two).
TokenFlow: the flow edit (PnP with injection in the first half of the steps, or SDEdit), on the fly and with
correspondences extracted beforehand (the extraction itself is not counted: it is made once per video and reused).
Counts are per step, device-independent; FLOPs by ``torch.utils.flop_counter``. The widths are tiny,
so the attention / projection split (and with it the FLOP ratio) is not a real Flux's: this shows the
structure (calls, branches, ops), not seconds.

    python benchmarks/bench_dit_flops.py --frames 16 --batch-size 8 --latent 16 --steps 2
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _host  # noqa: E402

_host.bootstrap("cpu")

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import comfy.samplers  # noqa: E402
import tiny_dit_models  # noqa: E402
from comfyui_tokenflow.engine.sampling_paths import run_extraction  # noqa: E402
from comfyui_tokenflow.engine.plan.settings import EditSettings  # noqa: E402
from comfyui_tokenflow.engine.flow.edit import prepare_edit as prepare_flow_edit  # noqa: E402
from comfyui_tokenflow.engine.flow.edit import run_edit as run_flow_edit  # noqa: E402
from comfyui_tokenflow.engine.flow.invert import run_inversion as run_flow_inversion  # noqa: E402
from comfyui_tokenflow.engine.flow.samplers import sample_flow  # noqa: E402


_PACK = str(Path(__file__).resolve().parents[1]) + "/"
_PACK_CODE = tuple(_PACK + d + "/" for d in ("engine", "tokenflow_ops"))
_COMFY = str(_host.comfyui_path() / "comfy") + "/"


def _call_site() -> str:
    """Who dispatched the current op: the innermost frame of the pack's engine / tokenflow_ops
    (``file:function``) or of ComfyUI (``comfy``; its attention functions ``comfy attention``)."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if name.startswith(_PACK_CODE):
            return f"{name[len(_PACK):]}:{frame.f_code.co_name}"
        if name.startswith(_COMFY):
            return "comfy attention" if name.endswith("modules/attention.py") else "comfy"
        frame = frame.f_back
    return "comfy"


class _Ops(TorchDispatchMode):
    def __init__(self, breakdown: bool = False) -> None:
        super().__init__()
        self.count = 0
        self.by_site: Counter | None = Counter() if breakdown else None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        if self.by_site is not None:
            self.by_site[(_call_site(), func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def _measure(fn, model, breakdown: bool = False) -> tuple[int, int, float, Counter | None]:
    """(model calls, aten ops, FLOPs) inside the guider's per-step calls only (set-up such as fingerprints and
    cond processing excluded), for plain CFGGuider and TokenFlow guider alike."""
    calls = []
    handle = model.model.diffusion_model.register_forward_pre_hook(lambda *a: calls.append(1))
    ops = _Ops(breakdown)
    flops = [0.0]
    original = comfy.samplers.CFGGuider.outer_predict_noise

    def counted(self, *args, **kwargs):
        counter = FlopCounterMode(display=False)  # entering one resets it: one per call, summed
        with counter, ops:
            out = original(self, *args, **kwargs)
        flops[0] += float(counter.get_total_flops())
        return out

    comfy.samplers.CFGGuider.outer_predict_noise = counted
    try:
        fn()
    finally:
        comfy.samplers.CFGGuider.outer_predict_noise = original
        handle.remove()
    return len(calls), ops.count, flops[0], ops.by_site


def _print_breakdown(family: str, editor: str, steps: int, plain: Counter, ours: Counter, top: int) -> None:
    """Ops per step by call site (the pack's function, or ComfyUI) and aten op, TokenFlow against plain."""
    print(f"\n{family} {editor}: {sum(ours.values()) / steps:g} ops per step (plain {sum(plain.values()) / steps:g}), "
          "by call site")
    sites: Counter = Counter()
    for (site, _), n in ours.items():
        sites[site] += n
    for site, n in sites.most_common():
        print(f"  {n / steps:8.1f}  {site}")
    print("  ComfyUI ops, TokenFlow - 2 x plain (per step; the model runs twice per step):")
    comfy_ours = Counter({op: n for (site, op), n in ours.items() if site.startswith("comfy")})
    comfy_plain = Counter({op: n for (site, op), n in plain.items() if site.startswith("comfy")})
    delta = {op: (comfy_ours[op] - 2 * comfy_plain[op]) / steps for op in comfy_ours | comfy_plain}
    for op, d in sorted(delta.items(), key=lambda kv: -abs(kv[1]))[:top]:
        if d:
            print(f"  {d:+8.1f}  {op}")
    print("  the pack's ops by site and op:")
    for (site, op), n in sorted(((k, v) for k, v in ours.items() if not k[0].startswith("comfy")), key=lambda kv: -kv[1])[:top]:
        print(f"  {n / steps:8.1f}  {op:<28} {site}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--latent", type=int, default=16)
    parser.add_argument("--text-tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--breakdown", type=int, default=0, metavar="N",
                        help="also print ops per step by call site and the N largest (site, op) counts")
    args = parser.parse_args()
    rows = []
    for family, make, cond, cfg in (("flux", tiny_dit_models.make_flux_model, tiny_dit_models.flux_conditioning, 1.0),
                                    ("sd3", tiny_dit_models.make_sd3_model, tiny_dit_models.sd3_conditioning, 4.0)):
        model = make(seed=0)
        src, pos, neg = (cond(seed=s, tokens=args.text_tokens) for s in (1, 2, 3))
        frames = {"samples": torch.randn(args.frames, 16, args.latent, args.latent)}
        inversion = run_flow_inversion(model, frames, src, args.steps, args.steps)
        corr = run_extraction(model, inversion, args.batch_size, "random", 0)
        for editor in ("pnp", "sdedit"):
            settings = EditSettings.of(editor=editor, cfg=cfg, batch_size=args.batch_size, pnp_attn_t=0.5)
            _, levels, start = prepare_flow_edit(model, pos, neg, inversion, settings)
            steps = len(levels) - 1
            breakdown = args.breakdown > 0
            plain = _measure(lambda: sample_flow(model, pos, start, levels, neg, cfg), model, breakdown)
            ours = _measure(lambda: run_flow_edit(model, pos, neg, inversion, settings), model, breakdown)
            rows.append((family, editor, steps, plain, ours))
            if breakdown:
                _print_breakdown(family, editor, steps, plain[3], ours[3], args.breakdown)
            extracted = _measure(lambda: run_flow_edit(model, pos, neg, inversion, settings, correspondences=corr),
                                 model)
            rows.append((family, f"{editor} extracted", steps, plain, extracted))
    print(f"frames {args.frames}, batch_size {args.batch_size}, latent {args.latent} "
          f"({(args.latent // 2) ** 2} image tokens), {args.text_tokens} text tokens; per step")
    print("| family | editor | model calls plain / TokenFlow | aten ops × plain | FLOPs × plain |")
    print("|---|---|---|---|---|")
    for family, editor, steps, plain, ours in rows:
        print(f"| {family} | {editor} | {plain[0] / steps:g} / {ours[0] / steps:g} | {ours[1] / plain[1]:.2f} | "
              f"{ours[2] / plain[2]:.2f} |")


if __name__ == "__main__":
    main()
