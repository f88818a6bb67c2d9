"""Flow inversion (Flux, SD3.x) measured: Euler at 50, 200 and 500 steps against the fixed-point inversion on the
editing grid, by round-trip reconstruction and model evaluations, and what a whole edit costs with each.

Parts (``--parts``, comma-separated):

- ``table``: per family (the tests' tiny random-weight Flux and SD3, ``devkit/tiny_dit_models.py``) and dtype
  (float64, float32 diffusion model): each inversion, then the edit's own sampler (Euler down the editing grid,
  ``--steps`` steps, cfg 1, the inversion prompt, no injection) back to sigma 0; PSNR of the reconstruction against
  the source latents (peak: their range), the largest absolute error, and the images entering the diffusion model
  per frame. Rows: Euler (``ddim``) at 50, 200, 500 steps; fixed point at k = 1, 2, 3, 5 evaluations per step
  (tolerance 0: exactly k), at the defaults (cap and tolerance) and ``auto``; the final residual per step at k = 5;
- ``count``: the whole Flux PnP edit on ``--count-frames`` frames (inversion + ``--steps`` editing steps, B = 8),
  counted in images at the diffusion model's entry, for Euler 500 and ``auto``;
- ``fireflow``: FireFlow's second-order scheme (arXiv 2412.07517: a midpoint step whose half-step velocity is the
  previous step's midpoint velocity, one evaluation per step plus one) inverted and sampled back with itself (its
  matching edit step) at 25, 50, 75 and 150 steps, on the grid of the model's own sigmas: round trip against
  evaluations, for the question whether it is better per evaluation than the fixed point. Not in the engine.

Flux inverts at guidance 1 (what RF-Solver, FireFlow and Stable Flow do; the example and the runner do too).
The trained toy flow model's rows are not here yet (that model does not exist yet).

    bash -c 'source scripts/host_env.sh && "$PYTHON" benchmarks/bench_flow_inversion.py --parts table'
"""
from __future__ import annotations

import argparse
import json
import math
import time

import _host

_host.bootstrap("cpu", threads=1)

import torch  # noqa: E402

import tiny_dit_models  # noqa: E402  (devkit/, through _host's path)
from _counting import ImageCounter  # noqa: E402
from comfyui_tokenflow.engine.flow import edit as flow_edit, invert as flow_invert  # noqa: E402
from comfyui_tokenflow.engine.plan.settings import EditSettings  # noqa: E402
from comfyui_tokenflow.tokenflow_ops import fixed_point  # noqa: E402
from comfyui_tokenflow.tokenflow_ops.flow_inversion import sigma_at  # noqa: E402
from comfyui_tokenflow.tokenflow_ops.schedule import editing_timesteps  # noqa: E402
import comfy.samplers  # noqa: E402

EULER_STEPS = (50, 200, 500)
FP_K = (1, 2, 3, 5)


def _world(family: str, dtype: str):
    make, conditioning, _ = tiny_dit_models.DIT_FAMILIES[family]
    model = make(seed=0)
    torch_dtype = torch.float64 if dtype == "float64" else torch.float32
    if dtype == "float64":
        model = tiny_dit_models.float64_dit(model)
    kwargs = {"guidance": 1.0} if family == "flux" else {}
    return model, conditioning(seed=1, dtype=torch_dtype, **kwargs)


def psnr(rec: torch.Tensor, x0: torch.Tensor) -> float:
    """PSNR in dB with the source latents' range as the peak."""
    mse = float(((rec.double() - x0.double()) ** 2).mean())
    peak = float(x0.max() - x0.min())
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)


def _report(row: dict, rows_file: str) -> None:
    """Print one measured row and append it to ``rows_file`` (JSON lines) when one is given."""
    print(f"{row['family']} {row['dtype']} {row['label']}: PSNR {row['psnr']:.1f} dB, max error "
          f"{row['max_error']:.2e}, {row['evaluations']:.0f} evaluations per frame", flush=True)
    if rows_file:
        with open(rows_file, "a") as fh:
            fh.write(json.dumps(row) + "\n")


def table_rows(family: str, dtype: str, steps: int, frames: int, rows_file: str = "") -> list[dict]:
    model, cond = _world(family, dtype)
    latent = {"samples": torch.randn(frames, 16, 8, 8, generator=torch.Generator().manual_seed(5)) * 0.5}
    rows = []

    def measure(label: str, **kwargs) -> None:
        start = time.perf_counter()
        with ImageCounter(model) as counter:
            inv = flow_invert.run_inversion(model, latent, cond, steps, kwargs.pop("inversion_steps", steps),
                                            **kwargs)
        rec = flow_invert.reconstruct(model, inv)
        rows.append(dict(family=family, dtype=dtype, label=label, evaluations=counter.images / frames,
                         psnr=psnr(rec, inv.x0), max_error=float((rec.double() - inv.x0.double()).abs().max()),
                         residuals=inv.residuals, seconds=time.perf_counter() - start))
        _report(rows[-1], rows_file)

    for n in EULER_STEPS:
        measure(f"euler {n}", inversion_steps=n)
    for k in FP_K:
        measure(f"fixed_point k={k}", method="fixed_point", max_iterations=k, tolerance=0.0)
    measure(f"fixed_point default (cap {fixed_point.DEFAULT_MAX_ITERATIONS}, tol {fixed_point.DEFAULT_TOLERANCE:g})",
            method="fixed_point")
    measure("auto", method="auto")
    return rows


def count_part(frames: int, steps: int) -> dict:
    model = tiny_dit_models.make_flux_model(seed=0)
    src = tiny_dit_models.flux_conditioning(seed=1, guidance=1.0)
    pos, neg = (tiny_dit_models.flux_conditioning(seed=s) for s in (2, 3))
    latent = {"samples": torch.randn(frames, 16, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.5}
    out = {"frames": frames, "steps": steps}
    for label, kwargs in (("euler 500", dict(method="ddim", inversion_steps=500)), ("auto", dict(method="auto"))):
        with ImageCounter(model) as inversion_count:
            inv = flow_invert.run_inversion(model, latent, src, steps, kwargs.pop("inversion_steps", steps), **kwargs)
        with ImageCounter(model) as edit_count:
            flow_edit.run_edit(model, pos, neg, inv, EditSettings(editor="pnp", cfg=1.0, batch_size=8))
        out[label] = dict(inversion=inversion_count.images, edit=edit_count.images,
                          total=inversion_count.images + edit_count.images,
                          per_frame_step=inversion_count.images / (frames * steps))
        print(f"count {frames} frames, {label}: inversion {inversion_count.images}, edit {edit_count.images} images",
              flush=True)
    return out


class FireFlowSampler(comfy.samplers.Sampler):
    """FireFlow's step along ``levels`` (ascending: inversion, descending: sampling): x_mid = x + (d/2) v_prev,
    x <- x + d v(x_mid, s + d/2), v_prev <- that midpoint velocity; the first v_prev is evaluated at the start (at
    half the first level when the start is sigma 0, where a CONST model's velocity cannot be read back)."""

    def __init__(self, levels: list[float]) -> None:
        self.levels = levels

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        x = latent_image
        s_in = x.new_ones([x.shape[0]])

        def v(latent: torch.Tensor, sigma: float) -> torch.Tensor:
            return (latent - model_wrap(latent, torch.tensor(sigma, dtype=torch.float32) * s_in, **extra_args)) / sigma

        first = self.levels[0] or self.levels[1] / 2
        v_prev = v(x, first)
        for s, s_next in zip(self.levels, self.levels[1:]):
            d = s_next - s
            v_prev = v(x + 0.5 * d * v_prev, s + 0.5 * d)
            x = x + d * v_prev
        return x


def _fireflow(model, cond, x_start: torch.Tensor, levels: list[float]) -> torch.Tensor:
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(cond, cond)
    guider.set_cfg(1.0)
    latent_image = model.model.process_latent_out(x_start)
    out = guider.sample(torch.zeros_like(latent_image), latent_image, FireFlowSampler(levels), torch.tensor(levels),
                        seed=0, disable_pbar=True)
    return model.model.process_latent_in(out)


def fireflow_rows(family: str, dtype: str, frames: int, rows_file: str = "") -> list[dict]:
    model, cond = _world(family, dtype)
    latent = {"samples": torch.randn(frames, 16, 8, 8, generator=torch.Generator().manual_seed(5)) * 0.5}
    x0 = model.model.process_latent_in(latent["samples"])
    table = model.get_model_object("model_sampling").sigmas.float().cpu()
    rows = []
    for steps in (25, 50, 75, 150):
        levels = [sigma_at(table, t) for t in editing_timesteps(steps)] + [0.0]  # descending, as the edit samples
        with ImageCounter(model) as counter:
            inverted = _fireflow(model, cond, x0, levels[::-1])
        rec = _fireflow(model, cond, inverted, levels)
        rows.append(dict(family=family, dtype=dtype, label=f"fireflow {steps}", evaluations=counter.images / frames,
                         psnr=psnr(rec, x0), max_error=float((rec.double() - x0.double()).abs().max()), residuals=[]))
        _report(rows[-1], rows_file)
    return rows


def markdown(rows: list[dict], steps: int) -> str:
    columns = list(dict.fromkeys((r["family"], r["dtype"]) for r in rows))
    labels = list(dict.fromkeys(r["label"] for r in rows))
    found = {(r["family"], r["dtype"], r["label"]): r for r in rows}
    lines = ["| inversion | " + " | ".join(f"{f} {d}: evals/frame, PSNR dB, max err" for f, d in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for label in labels:
        cells = []
        for f, d in columns:
            r = found.get((f, d, label))
            cells.append(f"{r['evaluations']:.0f}, {r['psnr']:.1f}, {r['max_error']:.2g}" if r else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", f"Final residual per step at k = 5 (tolerance 0), steps in the order they run (sigma ascending, "
              f"{steps} steps): largest, median, and the first / last step:", "",
              "| family dtype | largest (step) | median | first | last |", "|---|---|---:|---:|---:|"]
    for f, d in columns:
        r = found.get((f, d, "fixed_point k=5"))
        if not r or not r["residuals"]:
            continue
        res = r["residuals"]
        worst = max(range(len(res)), key=res.__getitem__)
        lines.append(f"| {f} {d} | {res[worst]:.2g} ({worst}) | {sorted(res)[len(res) // 2]:.2g} | {res[0]:.2g} | "
                     f"{res[-1]:.2g} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="table,count")
    parser.add_argument("--families", default="flux,sd3")
    parser.add_argument("--dtypes", default="float64,float32")
    parser.add_argument("--steps", type=int, default=50, help="editing steps (the fixed-point grid)")
    parser.add_argument("--frames", type=int, default=2, help="frames of the table's inversions")
    parser.add_argument("--count-frames", type=int, default=40)
    parser.add_argument("--rows", default="", help="append each table row to this file as one JSON line")
    parser.add_argument("--markdown-from", default="", help="print the tables of a --rows file and exit")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    if args.markdown_from:
        with open(args.markdown_from) as fh:
            print(markdown([json.loads(line) for line in fh if line.strip()], args.steps))
        return
    parts = args.parts.split(",")
    result: dict = {"machine": _host.machine_lines(torch.device("cpu"))}
    if "table" in parts:
        rows = [r for f in args.families.split(",") for d in args.dtypes.split(",")
                for r in table_rows(f, d, args.steps, args.frames, args.rows)]
        result["table"] = rows
        print(markdown(rows, args.steps))
    if "fireflow" in parts:
        result["fireflow"] = [r for f in args.families.split(",") for d in args.dtypes.split(",")
                              for r in fireflow_rows(f, d, args.frames, args.rows)]
    if "count" in parts:
        result["count"] = count_part(args.count_frames, args.steps)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "table"}, indent=1))


if __name__ == "__main__":
    main()
