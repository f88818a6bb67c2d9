"""DDIM inversion against fixed-point inversion on the editing grid, measured: how closely each maps back to the
source, and what it costs in model evaluations and time.

Parts (``--parts``, comma-separated):

- ``table``: per family (SD1.x eps, SD2.x v, SDXL eps; tests' tiny random-weight models) and dtype
  (float64, float32): reconstruction error ``|x0_rec - x0| / |x0|`` (the 50-step editing sampler, cfg 1,
  inversion prompt, run back from each inversion to x0) and UNet image-evaluations of the inversion,
  for DDIM at 50, 200, 500, 999 inversion steps and fixed point at k = 1, 2, 3, 5 evaluations per step
  (tolerance 0: exactly k) plus the defaults (cap and tolerance), and the residual per step at k = 5;
- ``count``: a whole PnP edit (inversion + 50 editing steps, B = 8) counted in images at the UNet entry
  (a forward pre-hook on ``diffusion_model``), both methods, against the official code's count;
- ``wall``: CPU wall time of the whole edit (pack: inversion + edit) against the official restatement
  (``devkit/official_reference.py``: 500-step inversion, the 500-step reconstruction pass its preprocess.py
  runs, the edit), in one process, as a ratio.

Sizes (small for a shared 2-core machine): one frame, latent 8x8 for ``table``; ``--count-frames``
(default 40) frames at latent 8 for ``count``; ``--wall-frames`` (default 8) at latent 8 for ``wall``.

    $PYTHON benchmarks/bench_inversion.py --parts table --families sd15 --dtypes float64
"""
from __future__ import annotations

import argparse
import json
import time

import _host

_host.bootstrap("cpu", threads=1)

import torch  # noqa: E402

import tiny_models  # noqa: E402  (devkit/tiny_models.py, through _host's path)
from _counting import ImageCounter  # noqa: E402
from tiny_models import double, float64_copy, random_latent  # noqa: E402
from comfyui_tokenflow.engine.ddpm import edit as ddpm_edit, invert as ddpm_invert  # noqa: E402
from comfyui_tokenflow.engine.plan.settings import EditSettings  # noqa: E402
from comfyui_tokenflow.tokenflow_ops import fixed_point  # noqa: E402

DDIM_STEPS = (50, 200, 500, 999)
FP_K = (1, 2, 3, 5)
STEPS = 50


def _model(family: str, dtype: str):
    model = tiny_models.make_unet_model(family, seed=0)
    cond = tiny_models.make_conditioning(model, seed=11)
    if dtype == "float64":
        model, cond = float64_copy(model), double(cond)
    return model, cond


def _error(model, inversion) -> float:
    rec = ddpm_invert.reconstruct(model, inversion).double()
    return float((rec - inversion.x0.double()).norm() / inversion.x0.double().norm())


def table_rows(family: str, dtype: str, rows_file: str = "") -> dict:
    model, cond = _model(family, dtype)
    latent = random_latent(1, seed=5)
    rows = []

    def measure(label: str, **kwargs) -> None:
        start = time.perf_counter()
        with ImageCounter(model) as counter:
            inv = ddpm_invert.run_inversion(model, latent, cond, STEPS, kwargs.pop("inversion_steps", 500),
                                            **kwargs)
        rows.append(dict(label=label, evaluations=counter.images, error=_error(model, inv),
                         residuals=inv.residuals, seconds=time.perf_counter() - start))
        print(f"{family} {dtype} {label}: error {rows[-1]['error']:.3e}, {counter.images} evaluations", flush=True)
        if rows_file:  # one JSON line per row as it is measured (a long run's partial results survive)
            with open(rows_file, "a") as fh:
                fh.write(json.dumps(dict(family=family, dtype=dtype, **rows[-1])) + "\n")

    measure(f"fixed_point default (cap {fixed_point.DEFAULT_MAX_ITERATIONS}, tol {fixed_point.DEFAULT_TOLERANCE:g})",
            method="fixed_point")
    for k in FP_K:
        measure(f"fixed_point k={k}", method="fixed_point", max_iterations=k, tolerance=0.0)
    for steps in DDIM_STEPS:
        measure(f"ddim {steps}", inversion_steps=steps)
    return dict(family=family, dtype=dtype, rows=rows)


def _edit_inputs(frames: int):
    model = tiny_models.make_unet_model("sd15", seed=0)
    src, pos, neg = (tiny_models.make_conditioning(model, seed=s) for s in (11, 12, 13))
    return model, random_latent(frames, seed=5), src, pos, neg


def _pack_edit(model, latent, src, pos, neg, method: str):
    kwargs = {} if method == "ddim" else dict(method="fixed_point")
    inv = ddpm_invert.run_inversion(model, latent, src, STEPS, 500, **kwargs)
    settings = EditSettings(batch_size=8)
    return inv, ddpm_edit.run_edit(model, pos, neg, inv, settings)["samples"]


def count_part(frames: int, methods: list[str]) -> dict:
    model, latent, src, pos, neg = _edit_inputs(frames)
    out = {"frames": frames}
    for method in methods:
        with ImageCounter(model) as counter:
            inv, _ = _pack_edit(model, latent, src, pos, neg, method)
        inversion_images = int(sum(inv.evaluations) * frames) if method == "fixed_point" else 500 * frames
        out[method] = dict(total=counter.images, inversion=inversion_images, edit=counter.images - inversion_images,
                           per_frame_step=(sum(inv.evaluations) / len(inv.evaluations)) if inv.evaluations else None)
        print(f"count {frames} frames, {method}: {counter.images} images at the UNet entry", flush=True)
    keyframes = -(-frames // 8)
    out["official"] = 500 * frames + 500 * frames + STEPS * (3 * keyframes + 3 * frames)
    return out


def wall_part(frames: int) -> dict:
    from official_reference import official_timesteps, reference_edit, reference_inversion

    from comfyui_tokenflow.engine.families.registry import check_supported
    from comfyui_tokenflow.tokenflow_ops.keyframes import keyframe_plan

    model, latent, src, pos, neg = _edit_inputs(frames)
    unet = model.model.diffusion_model
    sigmas = model.get_model_object("model_sampling").sigmas.float()
    x0 = model.model.process_latent_in(latent["samples"].float())
    keep = official_timesteps(STEPS)
    start = time.perf_counter()
    pack_inv, _ = _pack_edit(model, latent, src, pos, neg, "fixed_point")
    pack = time.perf_counter() - start

    start = time.perf_counter()
    with torch.no_grad():
        saved, inverted, inverted_t = reference_inversion(unet, sigmas, x0, src[0][0], 500, keep)
        x = inverted  # preprocess.py's reconstruction pass: 500 DDIM steps back from x_T
        ratio = 1000 // 500
        for t in reversed(range(1, 1000, ratio)):
            abar, abar_prev = (float(1 / (1 + sigmas[s].double() ** 2)) for s in (t, max(t - ratio, 0)))
            eps = unet(x, torch.full((frames,), float(t)), context=src[0][0].repeat(frames, 1, 1))
            pred = (x - (1 - abar) ** 0.5 * eps) / abar ** 0.5
            x = abar_prev ** 0.5 * pred + (1 - abar_prev) ** 0.5 * eps
        layout = check_supported(model)
        plan = keyframe_plan(frames, 8, STEPS, 1, "random")
        reference_edit(unet, sigmas, layout.transformer_blocks, x0, saved, inverted, inverted_t, src[0][0],
                       pos[0][0], neg[0][0], plan, steps=STEPS)
    official = time.perf_counter() - start
    print(f"wall {frames} frames: pack {pack:.1f} s, official restatement {official:.1f} s", flush=True)
    return dict(frames=frames, pack_seconds=pack, official_seconds=official, ratio=pack / official,
                pack_evaluations_per_step=sum(pack_inv.evaluations) / len(pack_inv.evaluations))


def markdown(rows: list[dict]) -> str:
    """The item-2 tables from table rows (``--rows`` lines): reconstruction error per inversion, residuals per step."""
    columns = sorted({(r["family"], r["dtype"]) for r in rows}, key=lambda c: (tiny_models.FAMILIES.index(c[0]), c[1]),
                     reverse=False)
    labels = list(dict.fromkeys(r["label"] for r in sorted(rows, key=_label_order)))
    found = {(r["family"], r["dtype"], r["label"]): r for r in rows}
    lines = ["| inversion | evaluations per frame | " + " | ".join(f"{f} {d}" for f, d in columns) + " |",
             "|---|---:|" + "---:|" * len(columns)]
    for label in labels:
        cells, evals = [], set()
        for f, d in columns:
            r = found.get((f, d, label))
            cells.append(f"{r['error']:.3g}" if r else "")
            if r:
                evals.add(r["evaluations"])
        shown = "–".join(str(e) for e in sorted(evals)) if evals else ""
        lines.append(f"| {label} | {shown} | " + " | ".join(cells) + " |")
    lines += ["", "Final residual per step at k = 5 (tolerance 0), editing timesteps t (the 3 slowest steps, then "
              "t = 1, 21, 481, 961, 981):", "", "| family dtype | slowest steps (t: residual) | t=1 | t=21 | t=481 | "
              "t=961 | t=981 |", "|---|---|---:|---:|---:|---:|---:|"]
    timesteps = list(range(1, 1000, 20))
    for f, d in columns:
        r = found.get((f, d, "fixed_point k=5"))
        if not r:
            continue
        res = dict(zip(timesteps, r["residuals"]))
        slow = sorted(res.items(), key=lambda kv: -kv[1])[:3]
        lines.append(f"| {f} {d} | " + ", ".join(f"{t}: {v:.2g}" for t, v in slow) + " | " +
                     " | ".join(f"{res[t]:.2g}" for t in (1, 21, 481, 961, 981)) + " |")
    return "\n".join(lines)


def _label_order(row: dict) -> tuple:
    label = row["label"]
    if label.startswith("ddim"):
        return (0, int(label.split()[1]))
    if "k=" in label:
        return (1, int(label.split("k=")[1]))
    return (2, 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="table,count,wall")
    parser.add_argument("--families", default=",".join(tiny_models.FAMILIES))
    parser.add_argument("--dtypes", default="float64,float32")
    parser.add_argument("--count-frames", type=int, default=40)
    parser.add_argument("--wall-frames", type=int, default=8)
    parser.add_argument("--count-methods", default="fixed_point", help="inversion methods whose whole edit is counted "
                        "(ddim,fixed_point; ddim's 500 x frames inversion images are known exactly)")
    parser.add_argument("--json", default="")
    parser.add_argument("--rows", default="", help="append each table row to this file as one JSON line")
    parser.add_argument("--markdown-from", default="", help="print the item-2 tables of a --rows file and exit")
    args = parser.parse_args()
    if args.markdown_from:
        with open(args.markdown_from) as fh:
            print(markdown([json.loads(line) for line in fh if line.strip()]))
        return
    parts = args.parts.split(",")
    result: dict = {"machine": _host.machine_lines(torch.device("cpu"))}
    if "table" in parts:
        result["table"] = [table_rows(f, d, args.rows) for f in args.families.split(",") for d in args.dtypes.split(",")]
    if "count" in parts:
        result["count"] = count_part(args.count_frames, args.count_methods.split(","))
    if "wall" in parts:
        result["wall"] = wall_part(args.wall_frames)
    text = json.dumps(result, indent=1)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(text)
    print(text)


if __name__ == "__main__":
    main()
