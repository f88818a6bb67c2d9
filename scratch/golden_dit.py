#!/usr/bin/env python
"""Golden check for DiT op cuts: tiny Flux / SD3 edits (PnP, SDEdit; also cfg 1 / 4 both) on fixed seeds.

    python scratch/golden_dit.py save PATH     # at the start commit
    python scratch/golden_dit.py check PATH    # after: torch.equal per output, max abs diff otherwise
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _host  # noqa: E402

_host.bootstrap("cpu")
import torch  # noqa: E402

import tiny_dit_models  # noqa: E402
from comfyui_tokenflow.engine.edit_plan import EditSettings  # noqa: E402
from comfyui_tokenflow.engine.flow_edit_runner import run_flow_edit  # noqa: E402
from comfyui_tokenflow.engine.flow_inversion_runner import run_flow_inversion  # noqa: E402


def outputs() -> dict[str, torch.Tensor]:
    out = {}
    for family, make, cond in (("flux", tiny_dit_models.make_flux_model, tiny_dit_models.flux_conditioning),
                               ("sd3", tiny_dit_models.make_sd3_model, tiny_dit_models.sd3_conditioning)):
        model = make(seed=0)
        src, pos, neg = (cond(seed=s, tokens=16) for s in (1, 2, 3))
        frames = {"samples": torch.randn(7, 16, 8, 8, generator=torch.Generator().manual_seed(5))}
        inversion = run_flow_inversion(model, frames, src, 4, 4)
        for editor in ("pnp", "sdedit"):
            for cfg in (1.0, 4.0):
                for batch in (3, 7):
                    settings = EditSettings.of(editor=editor, cfg=cfg, batch_size=batch, pnp_attn_t=0.5, seed=11)
                    result = run_flow_edit(model, pos, neg, inversion, settings)
                    samples = result["samples"] if isinstance(result, dict) else result
                    if isinstance(samples, tuple):
                        samples = samples[0]
                    if isinstance(samples, dict):
                        samples = samples["samples"]
                    out[f"{family}_{editor}_cfg{cfg:g}_b{batch}"] = samples.detach().clone()
    return out


if __name__ == "__main__":
    mode, path = sys.argv[1], sys.argv[2]
    got = outputs()
    if mode == "save":
        torch.save(got, path)
        print(f"saved {len(got)} outputs")
    else:
        ref = torch.load(path)
        bad = 0
        for name, t in got.items():
            same = torch.equal(t, ref[name])
            bad += not same
            print(f"{name}: {'equal' if same else 'DIFF max %.3g' % (t - ref[name]).abs().max()}")
        print("ALL EQUAL" if not bad else f"{bad} differ")
