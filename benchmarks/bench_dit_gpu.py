#!/usr/bin/env python
"""TokenFlow on Flux / SD3.5 against plain Euler sampling of the same frames: seconds per step and peak memory.

Random-weight ``comfy.model_base.Flux`` / ``SD3`` built from ComfyUI's classes. ``--size real`` uses the real
widths (Flux-dev: hidden 3072, 24 heads, T5-XXL context 4096 x 512 tokens, CLIP-L pooled 768; SD3.5 Large:
depth 38, so hidden 2432 and 38 heads, context 4096 x 333 tokens, pooled 2048) with fewer blocks than the real
models (``--flux-blocks`` double/single, default 4/8 of 19/38; ``--sd3-blocks``, default 8 of 38), so that a
model builds in seconds and fits beside 40 frames; every block of a kind costs the same, so the ratios to plain
sampling are those of the whole model up to the embedders. ``--size tiny`` is the test suite's tiny models (the
code path on a CPU).

Timed per family (CUDA: synchronised around each run; the first run of a model is a warm-up and not timed):
flow inversion, plain Euler sampling at the edit's cfg (Flux 1: one branch; SD3.5 4: two), TokenFlow PnP on the
fly, and SDEdit with correspondences extracted beforehand (the extraction timed on its own).

    python benchmarks/bench_dit_gpu.py --device cuda --frames 40 --latent 64 --steps 4 --markdown results/dit.md
    python benchmarks/bench_dit_gpu.py --device cpu --size tiny --frames 4 --latent 8 --steps 2   # the code path
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _host  # noqa: E402

REAL_FLUX = {"hidden_size": 3072, "num_heads": 24, "mlp_ratio": 4.0, "context_in_dim": 4096, "vec_in_dim": 768,
             "axes_dim": [16, 56, 56]}
REAL_SD3 = {"depth": 38, "pos_embed_max_size": 192, "num_patches": 192 * 192, "adm_in_channels": 2048,
            "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096,
                                                                                "out_features": 64 * 38}}}
TEXT_TOKENS = {"flux": 512, "sd3": 333}  # T5 tokens of Flux-dev; SD3's 77 CLIP + 256 T5
CFG = {"flux": 1.0, "sd3": 4.0}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    p.add_argument("--size", choices=("tiny", "real"), default="real")
    p.add_argument("--families", default="flux,sd3")
    p.add_argument("--flux-blocks", default="4,8", help="double,single blocks of the real-width Flux")
    p.add_argument("--sd3-blocks", type=int, default=8, help="joint blocks of the real-width SD3.5 Large")
    p.add_argument("--frames", type=int, default=40)
    p.add_argument("--latent", type=int, default=64, help="latent side (64: 512x512 frames)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--markdown", type=Path)
    return p.parse_args(argv)


def build(family: str, args, torch, device):
    """(ModelPatcher on ``device``, source / positive / negative conditioning)."""
    import comfy.model_patcher
    import comfy.supported_models

    import tiny_dit_models

    if family == "flux":
        config = tiny_dit_models.flux_config()
        if args.size == "real":
            double, single = (int(v) for v in args.flux_blocks.split(","))
            config.update(REAL_FLUX, depth=double, depth_single_blocks=single)
        model_config = comfy.supported_models.Flux(config)
        context, pooled = config["context_in_dim"], config["vec_in_dim"]
    else:
        config = dict(tiny_dit_models.SD3_CONFIG)
        if args.size == "real":
            config.update(REAL_SD3, num_blocks=args.sd3_blocks, x_block_self_attn_layers=[])
        model_config = comfy.supported_models.SD3(config)
        context = config["context_embedder_config"]["params"]["in_features"]
        pooled = config["adm_in_channels"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({}, device=torch.device("cpu"))
    tiny_dit_models.init_dit_weights(model.diffusion_model, seed=0)
    model.diffusion_model.to(dtype)
    model.eval()
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))
    tokens = TEXT_TOKENS[family] if args.size == "real" else 8
    g = torch.Generator().manual_seed(1)

    def cond(scale: float) -> list:
        extra = {"pooled_output": torch.randn(1, pooled, generator=g) * scale}
        if family == "flux":
            extra["guidance"] = 3.5
        return [[torch.randn(1, tokens, context, generator=g) * scale, extra]]

    params = sum(p.numel() for p in model.diffusion_model.parameters())
    return patcher, (cond(1.0), cond(1.0), cond(1.0)), params


def timed(fn, torch, device) -> tuple[float, float]:
    """(seconds, peak GiB above the start) of ``fn()``; CUDA synchronised before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start_bytes = torch.cuda.memory_allocated()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() - start_bytes) / 2**30 if device.type == "cuda" else float("nan")
    return seconds, peak


def run_family(family: str, args, torch, device) -> list[tuple]:
    from comfyui_tokenflow.engine.plan.settings import EditSettings
    from comfyui_tokenflow.engine.flow.edit import prepare_edit as prepare_flow_edit, run_edit as run_flow_edit
    from comfyui_tokenflow.engine.flow.invert import run_inversion as run_flow_inversion
    from comfyui_tokenflow.engine.flow.samplers import sample_flow
    from comfyui_tokenflow.engine.sampling_paths import run_extraction

    model, (src, pos, neg), params = build(family, args, torch, device)
    cfg, steps = CFG[family], args.steps
    frames = {"samples": torch.randn(args.frames, 16, args.latent, args.latent, generator=torch.Generator().manual_seed(0))}
    box: dict = {}

    def invert():
        box["inversion"] = run_flow_inversion(model, frames, src, steps, steps)

    invert()  # warm-up: loads the model onto the device
    rows = [(family, "flow inversion", *timed(invert, torch, device))]
    inversion = box["inversion"]
    pnp = EditSettings.of(editor="pnp", cfg=cfg, batch_size=args.batch_size, pnp_attn_t=0.5)
    sdedit = EditSettings.of(editor="sdedit", cfg=cfg, batch_size=args.batch_size, sdedit_start=1.0)
    _, levels, start = prepare_flow_edit(model, pos, neg, inversion, pnp)
    rows.append((family, f"plain Euler (cfg {cfg:g})",
                 *timed(lambda: sample_flow(model, pos, start, levels, neg, cfg), torch, device)))

    def extract():
        box["corr"] = run_extraction(model, inversion, args.batch_size, "random", 0)

    rows.append((family, "TokenFlow PnP, on the fly",
                 *timed(lambda: run_flow_edit(model, pos, neg, inversion, pnp), torch, device)))
    rows.append((family, "extraction (once per video)", *timed(extract, torch, device)))
    rows.append((family, "TokenFlow SDEdit, extracted",
                 *timed(lambda: run_flow_edit(model, pos, neg, inversion, sdedit, correspondences=box["corr"]),
                        torch, device)))
    return [(f, phase, seconds / steps, peak, params) for f, phase, seconds, peak in rows]


def main(argv=None) -> int:
    args = parse_args(argv)
    _host.bootstrap(args.device)
    import torch

    import comfy.model_management

    device = torch.device("cpu") if args.device == "cpu" else comfy.model_management.get_torch_device()
    rows = []
    for family in args.families.split(","):
        rows += run_family(family.strip(), args, torch, device)
    lines = [f"{args.frames} frames, latent {args.latent} ({(args.latent // 2) ** 2} image tokens), {args.steps} steps, "
             f"B {args.batch_size}, size {args.size}, device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}",
             "", "| family | params | phase | s/step | × plain | peak GiB |", "|---|---:|---|---:|---:|---:|"]
    plain = {f: s for f, phase, s, _, _ in rows if phase.startswith("plain")}
    for family, phase, seconds, peak, params in rows:
        ratio = "" if phase.startswith("plain") else f"{seconds / plain[family]:.2f}"
        lines.append(f"| {family} | {params / 1e9:.2f}B | {phase} | {seconds:.3f} | {ratio} | {peak:.2f} |")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
