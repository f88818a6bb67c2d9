"""Every output of the pack's node classes on the tiny models, written to one safetensors file, and a comparison.

A refactor must not move a result on the CPU: run this before and after it on the same machine and compare
every tensor with ``torch.equal``::

    python devkit/golden_run.py write before.safetensors      # at the base commit
    python devkit/golden_run.py write after.safetensors       # at the new commit
    python devkit/golden_run.py compare before.safetensors after.safetensors

(with the host's python, e.g. ``~/comfy/venv/bin/python``; the host is found as the tests find it:
``$COMFYUI_PATH`` or ``~/comfy/ComfyUI``). It calls the node classes' ``execute`` (never the engine), so it runs
unchanged on any layout of the engine: TokenFlow DDIM Inversion (ddim and fixed_point on the SD UNet; flow
inversion on Flux and SD3), Extract Correspondences with its preview, the TokenFlow Sampler with every editor on
the fly and extracted (ControlNet with a tiny core ControlNet), the Keyframe Joint Edit model sampled by the core
KSampler, and the Temporal Consistency node, for a tiny SD1.x UNet, a tiny SDXL UNet, a tiny Flux and a tiny SD3.
One thread, fixed seeds: the run is deterministic on one machine (a few minutes on a CPU).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import host_bootstrap  # noqa: E402  (devkit/host_bootstrap.py, beside this file)

N_FRAMES, STEPS, INVERSION_STEPS = 5, 4, 8


def flatten_tensors(prefix: str, value: Any, out: dict) -> None:
    """Every tensor (and number) inside ``value``, flattened under ``prefix``."""
    import torch

    if isinstance(value, torch.Tensor):
        out[prefix] = value.detach().cpu().clone(memory_format=torch.contiguous_format)
    elif isinstance(value, bool) or value is None or isinstance(value, str):
        return
    elif isinstance(value, (int, float)):
        out[prefix] = torch.tensor(value, dtype=torch.float64)
    elif isinstance(value, dict):
        for key, item in value.items():
            flatten_tensors(f"{prefix}/{key}", item, out)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            flatten_tensors(f"{prefix}/{i}", item, out)
    elif hasattr(value, "__dataclass_fields__"):
        for name in value.__dataclass_fields__:
            flatten_tensors(f"{prefix}/{name}", getattr(value, name), out)


def _run_family(name: str, model, src, pos, neg, latent: dict, cfg: float, out: dict,
                controlnet=None, fixed_point: bool = False) -> Any:
    """Inversion, extraction, every editor on the fly and extracted, the joint edit: through the node classes."""
    import nodes as comfy_nodes
    import torch
    from comfyui_tokenflow.nodes.correspondence_nodes import TokenFlowExtractCorrespondences
    from comfyui_tokenflow.nodes.inversion_nodes import TokenFlowInvert
    from comfyui_tokenflow.nodes.joint_edit_nodes import TokenFlowKeyframeJointEdit
    from comfyui_tokenflow.nodes.sampler_nodes import TokenFlowSampler

    # the method named, so these entries stay the DDIM / Euler inversion (the default, auto, is the fixed point on flows)
    inversion, inverted = TokenFlowInvert.execute(model, latent, src, STEPS, INVERSION_STEPS, 2, "ddim").result
    flatten_tensors(f"{name}/invert", {"inversion": inversion, "inverted_latent": inverted}, out)
    if fixed_point:
        fixed = TokenFlowInvert.execute(model, latent, src, STEPS, INVERSION_STEPS, 2, "fixed_point", 3, 1e-3).result
        flatten_tensors(f"{name}/invert_fixed_point", fixed, out)
    corr, preview = TokenFlowExtractCorrespondences.execute(model, inversion, 2, "random", 1).result
    flatten_tensors(f"{name}/extract", {"correspondences": corr, "preview": preview}, out)

    def sample(tag: str, editor: str, positive=pos, negative=neg, correspondences=None, **options) -> None:
        (latent_out,) = TokenFlowSampler.execute(model, positive, negative, inversion, editor, cfg, 2, "random", 1,
                                                 correspondences, **options).result
        out[f"{name}/sample/{tag}"] = latent_out["samples"].cpu().clone(memory_format=torch.contiguous_format)

    pnp = dict(pnp_attn_t=0.5, pnp_f_t=0.8)
    for tag, correspondences in (("on_the_fly", None), ("extracted", corr)):
        sample(f"pnp_{tag}", "pnp", correspondences=correspondences, **pnp)
        sample(f"sdedit_{tag}", "sdedit", correspondences=correspondences, sdedit_start=0.9)
        if controlnet is not None:
            hints = torch.rand(N_FRAMES, 64, 64, 3, generator=torch.Generator().manual_seed(3))
            positive, negative = comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(pos, neg, controlnet, hints,
                                                                                        1.0, 0.0, 1.0)
            sample(f"controlnet_{tag}", "controlnet", positive, negative, correspondences)
            sample(f"pnp_controlnet_{tag}", "pnp", positive, negative, correspondences, **pnp)
    sample("pnp_paper_blend", "pnp", blend="paper", **pnp)
    (fixed,) = TokenFlowSampler.execute(model, pos, neg, inversion, "pnp", cfg, 2, "fixed", 1, **pnp).result
    out[f"{name}/sample/pnp_fixed_keyframes"] = fixed["samples"].cpu().clone(memory_format=torch.contiguous_format)
    sample("pnp_capped_keyframes", "pnp", max_keyframes=1, **pnp)
    sample("pnp_no_injection", "pnp", pnp_attention_blocks="none", pnp_residual_blocks="none", **pnp)
    (joint,) = TokenFlowKeyframeJointEdit.execute(model).result
    batch = {"samples": latent["samples"][:3].clone(), "batch_index": [0, 0, 0]}
    (joint_out,) = comfy_nodes.KSampler().sample(joint, 7, 2, cfg, "euler", "simple", pos, neg, batch, denoise=0.5)
    out[f"{name}/joint_edit_ksampler"] = joint_out["samples"].cpu().clone(memory_format=torch.contiguous_format)
    return inversion


def _metric(out: dict, vae, latent: dict) -> None:
    import torch
    from comfyui_tokenflow.nodes.consistency_nodes import TokenFlowTemporalConsistency

    edited = vae.decode(out["sd15/sample/pnp_on_the_fly"]).float().clamp(0, 1)
    source = vae.decode(latent["samples"]).float().clamp(0, 1)
    output = TokenFlowTemporalConsistency.execute(edited.reshape(-1, *edited.shape[-3:]),
                                                  source.reshape(-1, *source.shape[-3:]), "fast")
    flatten_tensors("metric", output.result, out)
    out["metric/inputs"] = torch.cat([edited, source]).contiguous()


def run() -> dict:
    """Every output, name -> tensor."""
    host_bootstrap.bootstrap(cpu=True, threads=1)
    host_bootstrap.load_package()
    import torch

    import tiny_dit_models
    import tiny_models

    torch.manual_seed(0)
    out: dict = {}
    sd15 = tiny_models.make_unet_model("sd15", seed=0)
    src, pos, neg = (tiny_models.make_conditioning(sd15, seed=s) for s in (11, 12, 13))
    latent = tiny_models.random_latent(N_FRAMES, seed=0)
    _run_family("sd15", sd15, src, pos, neg, latent, 7.5, out, controlnet=tiny_models.make_controlnet("sd15", seed=0),
                fixed_point=True)
    sdxl = tiny_models.make_unet_model("sdxl", seed=0)
    xl = [tiny_models.make_conditioning("sdxl", seed=s) for s in (11, 12, 13)]
    _run_family("sdxl", sdxl, *xl, tiny_models.random_latent(N_FRAMES, seed=1), 7.5, out)
    for family, cfg in (("flux", 1.0), ("sd3", 4.0)):
        make, conditioning, _ = tiny_dit_models.DIT_FAMILIES[family]
        model = make(seed=0)
        prompts = [conditioning(seed=s) for s in (1, 2, 3)]
        frames = {"samples": torch.randn(N_FRAMES, 16, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.5}
        controlnet = tiny_dit_models.make_flux_controlnet() if family == "flux" else None
        _run_family(family, model, *prompts, frames, cfg, out, controlnet=controlnet)
    _metric(out, tiny_models.make_vae(seed=0), latent)
    return out


def compare(before: dict, after: dict, report: Callable[[str], None] = print) -> bool:
    """True when both hold the same names and every tensor is ``torch.equal``; reports every difference."""
    import torch

    ok = True
    for name in sorted(set(before) | set(after)):
        if name not in before or name not in after:
            report(f"only in {'after' if name not in before else 'before'}: {name}")
            ok = False
        elif not torch.equal(before[name], after[name]):
            a, b = before[name], after[name]
            gap = (a.double() - b.double()).abs().max().item() if a.shape == b.shape else float("nan")
            report(f"differs: {name} (shapes {tuple(a.shape)} / {tuple(b.shape)}, max |diff| {gap:.3g})")
            ok = False
    report(f"{len(set(before) & set(after))} tensors compared; {'all equal' if ok else 'NOT all equal'}")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    write = commands.add_parser("write", help="run every node on the tiny models and save the outputs")
    write.add_argument("path", type=Path)
    check = commands.add_parser("compare", help="compare two saved runs with torch.equal")
    check.add_argument("before", type=Path)
    check.add_argument("after", type=Path)
    args = parser.parse_args(argv)
    from safetensors.torch import load_file, save_file

    if args.command == "write":
        tensors = run()
        save_file(tensors, str(args.path))
        print(f"wrote {len(tensors)} tensors to {args.path}")
        return 0
    return 0 if compare(load_file(str(args.before)), load_file(str(args.after))) else 1


if __name__ == "__main__":
    sys.exit(main())
