#!/usr/bin/env python3
"""Find a flow transformer's "vital layers" (Stable Flow's procedure) and print them as a pnp_attention_blocks value.

    bash -c 'source scripts/host_env.sh && "$PYTHON" scripts/find_vital_layers.py \\
        --unet flux1-dev.safetensors --clip-l clip_l.safetensors --t5 t5xxl_fp16.safetensors --vae ae.safetensors'

Stable Flow (Avrahami et al., CVPR 2025) finds the blocks of a DiT that matter for image formation by
bypassing one block at a time: each prompt and seed is rendered by the whole model and by the model
without that block, and the blocks whose bypass changes the image most are its vital layers, where
its edits swap the source's image keys and values. Here a block is bypassed through the host's
``patches_replace["dit"]`` (the replacement returns the block's input unchanged), every render runs
the model's own text encoders, sampler (Euler, the simple schedule) and VAE, and the blocks are
ranked by the mean similarity of the bypassed renders to the whole model's, least similar first.

Similarity: Stable Flow measures it with DINOv2. ``--dinov2 DIR`` uses a DINOv2 model the user has
(a Hugging Face folder, loaded with transformers, which ComfyUI already requires: the CLS embeddings'
cosine). Without it the stated fallback runs: the Pearson correlation of the decoded images' pixels
(the cosine of the mean-centred RGB values), a pixel-space measure that follows layout and colour,
not semantics as DINOv2 does.

The printed list (e.g. ``double_block:0-1:kv, single_block:34-35:kv``) goes into the TokenFlow Sampler's
``pnp_attention_blocks``: with its ``:kv`` suffixes it injects image keys and values there, as the
``stable_flow`` preset does, on Flux and SD3.x alike. Exit codes: 0 done, 2 bad arguments, 1 failed.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "devkit"))  # before the runner's modules, which read devkit/model_links.py
import pack_import  # noqa: E402  (devkit/pack_import.py: outside ComfyUI the pack is the package comfyui_tokenflow)
import runner_models as models  # noqa: E402  (scripts/runner_models.py, beside this file)
import runner_support as support  # noqa: E402  (scripts/runner_support.py, beside this file)

if TYPE_CHECKING:  # pragma: no cover  (torch is imported with the host, after the arguments are read)
    import torch

PROMPTS = (
    "a photo of a red fox in a snowy forest", "a city street at night with neon signs, rain on the ground",
    "a bowl of fruit on a wooden table, soft window light", "a portrait of an old fisherman, dramatic lighting",
    "a sailing boat on a calm lake at sunset", "a cozy living room with a fireplace and a cat on the sofa",
    "an astronaut riding a horse on the moon", "a watercolor painting of a mountain village in spring",
)
DEFAULT_PROMPTS, DEFAULT_STEPS, DEFAULT_SIZE = 8, 15, 512  # Stable Flow renders its vital-layer images in 15 steps
# Stable Flow's Flux-dev vital layers: 9 of 57 blocks; --count defaults to the same share of the model's blocks.
STABLE_FLOW_VITAL, FLUX_DEV_BLOCKS = 9, 57

# The time estimate of --help, derived (not measured): Flux-dev has 11.9e9 parameters, 57 blocks, width 3072; a
# render at 512x512 has 1024 image and up to 256 text tokens; one evaluation is ~2 * params * tokens + 4 * tokens^2 *
# width * blocks = 3.2e13 FLOP; an RTX 4090 (24 GB) does 165 TFLOPS dense bf16 (NVIDIA Ada whitepaper), at an assumed
# 50% of it ~0.4 s per evaluation. Partial weight offloading on a 24 GB card makes it slower.
SECONDS_PER_EVALUATION_24GB_512 = 0.4


def _estimate(blocks: int, prompts: int, seeds: int, steps: int, seconds: float) -> tuple[int, float]:
    evaluations = (blocks + 1) * prompts * seeds * steps  # the whole model once, then one render per bypassed block
    return evaluations, evaluations * seconds / 3600


def build_parser() -> argparse.ArgumentParser:
    evaluations, hours = _estimate(FLUX_DEV_BLOCKS, DEFAULT_PROMPTS, 1, DEFAULT_STEPS, SECONDS_PER_EVALUATION_24GB_512)
    paper_evaluations, paper_hours = _estimate(FLUX_DEV_BLOCKS, 64, 1, 28, 1.5)
    p = argparse.ArgumentParser(
        prog="find_vital_layers.py", formatter_class=support.DefaultsFormatter,
        description="Rank a Flux / SD3.x model's blocks by how much bypassing each changes its images (Stable Flow's "
                    "vital layers) and print the most vital as a pnp_attention_blocks value.",
        epilog=f"Cost: (blocks + 1) x prompts x seeds x steps model evaluations. The default set on Flux-dev (57 "
               f"blocks, {DEFAULT_PROMPTS} prompts, 1 seed, {DEFAULT_STEPS} steps, {DEFAULT_SIZE}x{DEFAULT_SIZE}) is "
               f"{evaluations:,} evaluations: about {hours:.1f} h on a 24 GB card (an ESTIMATE, not a measurement: "
               f"~{SECONDS_PER_EVALUATION_24GB_512} s per evaluation derived from Flux-dev's 11.9e9 parameters x "
               "1280 tokens against an RTX 4090's 165 TFLOPS bf16 at 50% use; weight offloading makes it longer). "
               f"A study-sized run (e.g. 64 prompt/seed pairs, 28 steps, 1024x1024, ~1.5 s per evaluation) is "
               f"{paper_evaluations:,} evaluations, about {paper_hours:.0f} h. --blocks, --prompts, --seeds and "
               "--steps bound it.")
    p.add_argument("--checkpoint", help="an all-in-one Flux / SD3.x checkpoint: a path or a file name in "
                   "ComfyUI/models/checkpoints (or Flux's --unet --clip-l --t5 --vae)")
    models.add_arguments(p)
    p.add_argument("--blocks", default="all", help="blocks to bypass, as pnp_attention_blocks lists them, e.g. "
                   "'single_block:0-37' (all: every block)")
    p.add_argument("--prompts", type=int, default=DEFAULT_PROMPTS, help=f"how many of the built-in prompts to render "
                   f"(1 to {len(PROMPTS)})")
    p.add_argument("--prompt-file", help="render these prompts instead, one a line")
    p.add_argument("--seeds", type=int, default=1, help="seeds per prompt (0, 1, ...)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="sampling steps per render")
    p.add_argument("--size", type=int, default=DEFAULT_SIZE, help="render width and height in pixels (a multiple of 16)")
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance (default: 1 on Flux, 4 on SD3.x)")
    p.add_argument("--count", type=int, default=0, help="how many blocks to print (0: Stable Flow's share, 9 of "
                   "Flux-dev's 57 blocks, of this model's)")
    p.add_argument("--dinov2", help="a DINOv2 model folder (Hugging Face format) to measure similarity with, as "
                   "Stable Flow does; without it the pixel correlation runs")
    p.add_argument("--cpu", action="store_true", help="run on the CPU (for tests: very slow on real models)")
    p.add_argument("--comfyui", help="ComfyUI folder (default: $COMFYUI_PATH, the ComfyUI holding this pack, "
                   "~/comfy/ComfyUI)")
    p.add_argument("--verbose", action="store_true", help="show ComfyUI's log")
    return p


def check_args(args: argparse.Namespace) -> str | None:
    problem = models.check_model_args(args)
    if problem:
        return problem
    if not args.checkpoint and not models.flux_files_given(args):
        return "error: no model given: pass --checkpoint FILE, or Flux's --unet --clip-l --t5 --vae."
    if not 1 <= args.prompts <= len(PROMPTS):
        return f"error: --prompts {args.prompts}: take 1 to {len(PROMPTS)} (or --prompt-file)."
    for flag, value, low in (("--seeds", args.seeds, 1), ("--steps", args.steps, 1), ("--count", args.count, 0)):
        if value < low:
            return f"error: {flag} {value}: take {low} or more."
    if args.size < 16 or args.size % 16:
        return f"error: --size {args.size}: take a multiple of 16, e.g. 512."
    return None


# ----------------------------------------------------------------------------------------- the procedure (host loaded)

def bypass_block(args: dict, extra: dict) -> dict:
    """A ``patches_replace["dit"]`` entry that skips its block: the block's input streams come out unchanged."""
    return {key: args[key] for key in ("img", "txt") if key in args}


def bypassed(model, block: tuple[str, int]):
    """A clone of ``model`` with ``block`` (kind, id) bypassed."""
    clone = model.clone()
    clone.set_model_patch_replace(bypass_block, "dit", block[0], block[1])
    return clone


def render(model, positive, negative, cfg: float, steps: int, seed: int, latent) -> "torch.Tensor":
    """One image latent by the host's own sampler (Euler, simple schedule) from ``seed``'s noise."""
    import comfy.sample

    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", positive, negative, latent,
                               disable_pbar=True, seed=seed)


def pixel_similarity(a: "torch.Tensor", b: "torch.Tensor") -> float:
    """The fallback measure: the Pearson correlation of two images (or latents), per item, averaged."""
    a, b = (t.double().flatten(1) for t in (a, b))
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return float((a * b).sum(1).div(a.norm(dim=1) * b.norm(dim=1) + 1e-12).mean())


def rank_blocks(model, renders: list[tuple], blocks: list[tuple[str, int]], steps: int, cfg: float, latent,
                look=lambda samples: samples, similarity=pixel_similarity, progress=None) -> list[tuple[tuple, float]]:
    """Each block with the mean similarity of its bypassed renders to the whole model's, least similar first
    (ties in the model's block order). ``renders``: (positive, negative, seed) triples; ``look`` maps a sampled
    latent to what is compared (decoded pixels, an embedding)."""
    reference = [look(render(model, pos, neg, cfg, steps, seed, latent)) for pos, neg, seed in renders]
    scores = []
    for i, block in enumerate(blocks):
        clone = bypassed(model, block)
        values = [similarity(look(render(clone, pos, neg, cfg, steps, seed, latent)), ref)
                  for (pos, neg, seed), ref in zip(renders, reference)]
        scores.append((block, sum(values) / len(values)))
        if progress is not None:
            progress(i + 1, len(blocks), block, scores[-1][1])
    order = {block: i for i, block in enumerate(blocks)}
    return sorted(scores, key=lambda item: (item[1], order[item[0]]))


def vital_count(total_blocks: int, requested: int) -> int:
    """--count, or Stable Flow's share of vital layers (9 of Flux-dev's 57) of this model's blocks, at least 1."""
    return requested if requested else max(1, round(total_blocks * STABLE_FLOW_VITAL / FLUX_DEV_BLOCKS))


def as_block_list(blocks: list[tuple[str, int]], injects: str = "kv") -> str:
    """``blocks`` as a pnp_attention_blocks value, consecutive ids merged: 'double_block:0-1:kv, single_block:6:kv'."""
    parts: list[str] = []
    for kind in dict.fromkeys(kind for kind, _ in sorted(blocks)):
        ids = sorted(i for k, i in blocks if k == kind)
        start = prev = ids[0]
        for i in ids[1:] + [None]:
            if i is not None and i == prev + 1:
                prev = i
                continue
            parts.append(f"{kind}:{start}" + (f"-{prev}" if prev != start else "") + f":{injects}")
            start = prev = i
    return ", ".join(parts)


def _dinov2_look(folder: str, vae):
    """Decoded pixels -> DINOv2 CLS embeddings (224 x 224, ImageNet normalisation), the model on the VAE's device."""
    import torch
    from transformers import AutoModel

    net = AutoModel.from_pretrained(folder).eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def look(samples):
        pixels = vae.decode(samples).float().cpu().movedim(-1, 1)
        pixels = torch.nn.functional.interpolate(pixels, size=(224, 224), mode="bicubic", align_corners=False)
        with torch.no_grad():
            return net(pixel_values=(pixels - mean) / std).last_hidden_state[:, 0]

    def cosine(a, b):
        return float(torch.nn.functional.cosine_similarity(a.double(), b.double()).mean())

    return look, cosine


def _load(args: argparse.Namespace, folder_paths) -> tuple:
    """(model, clip, vae, family) through the runner's loader nodes (scripts/runner_models.py)."""
    import nodes

    if args.checkpoint:
        name = support.register_model("checkpoints", args.checkpoint, folder_paths)
        if name is None:
            raise SystemExit(f"error: --checkpoint {args.checkpoint}: no such file.")
        flux_names, path = None, folder_paths.get_full_path("checkpoints", name)
    else:
        flux_names, problem = models.register_flux_files(args, folder_paths, support.register_model)
        if problem:
            raise SystemExit(problem)
        name, path = None, folder_paths.get_full_path("diffusion_models", flux_names["unet"])
    loaders, *links = models.loader_nodes(name, flux_names)
    outputs = {}
    for node_id, node in loaders.items():
        cls = nodes.NODE_CLASS_MAPPINGS[node["class_type"]]
        outputs[node_id] = getattr(cls(), cls.FUNCTION)(**node["inputs"])
    model, clip, vae = (outputs[node_id][index] for node_id, index in links)
    return model, clip, vae, models.detect_family(path, whole_checkpoint=name is not None)


def _run(args: argparse.Namespace, host: Path) -> int:
    script_dir = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if p not in ("", script_dir, str(REPO))]
    sys.path.insert(0, str(host))
    support.setup_logging(args.verbose)
    from comfy.cli_args import args as comfy_args

    if args.cpu or not support.accelerator_available():
        comfy_args.cpu = True
        comfy_args.use_pytorch_cross_attention = True
    import folder_paths
    import utils.extra_config  # noqa: F401  (as main.py: ComfyUI's utils package before any node module)
    import node_helpers
    import nodes
    import torch

    pack_import.import_pack()
    from comfyui_tokenflow.engine.families.base import FLOW
    from comfyui_tokenflow.engine.families.block_lists import parse_block_list
    from comfyui_tokenflow.engine.families.registry import check_supported

    t0 = time.monotonic()
    args.flux_route = models.flux_files_given(args)
    model, clip, vae, family = _load(args, folder_paths)
    problem = models.resolve_family_settings(args, family, 1.0)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    try:
        layout = check_supported(model, sampling=FLOW)
        chosen = layout.transformer_blocks if args.blocks.strip().lower() == "all" else \
            parse_block_list(args.blocks, layout, layout.transformer_blocks)
    except ValueError as e:
        print(f"error: {str(e).replace('pnp_attention_blocks', '--blocks', 1)}", file=sys.stderr)
        return 2
    blocks = list(dict.fromkeys(b[:2] for b in chosen))
    texts = Path(args.prompt_file).read_text().splitlines() if args.prompt_file else PROMPTS[:args.prompts]
    texts = [t.strip() for t in texts if t.strip()]

    def encode(text: str):
        cond = nodes.CLIPTextEncode().encode(clip, text)[0]
        return node_helpers.conditioning_set_values(cond, {"guidance": args.guidance}) \
            if family is not None and family.guidance_distilled else cond

    negative = encode("")
    renders = [(encode(text), negative, seed) for text in texts for seed in range(args.seeds)]
    channels = model.get_model_object("latent_format").latent_channels
    latent = torch.zeros(1, channels, args.size // 8, args.size // 8)
    look, similarity = _dinov2_look(args.dinov2, vae) if args.dinov2 else (lambda s: vae.decode(s), pixel_similarity)
    evaluations = (len(blocks) + 1) * len(renders) * args.steps
    print(f"{layout.family}: bypassing {len(blocks)} blocks over {len(renders)} renders of {args.steps} steps: "
          f"{evaluations:,} model evaluations; similarity: {'DINOv2' if args.dinov2 else 'pixel correlation'}",
          flush=True)

    def progress(done: int, total: int, block: tuple, score: float) -> None:
        print(f"[{done}/{total}] {block[0]} {block[1]}: similarity {score:.4f} ({time.monotonic() - t0:.0f} s)",
              flush=True)

    ranking = rank_blocks(model, renders, blocks, args.steps, args.cfg, latent, look, similarity, progress)
    vital = [block for block, _ in ranking[:vital_count(len(blocks), args.count)]]
    print("\nranking (least similar first):")
    for block, score in ranking:
        print(f"  {block[0]} {block[1]}: {score:.4f}")
    print(f"\npnp_attention_blocks: {as_block_list(vital)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problem = check_args(args)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    host = support.find_host(args.comfyui, REPO)
    if host is None:
        print("error: ComfyUI not found: pass --comfyui /path/to/ComfyUI or set COMFYUI_PATH.", file=sys.stderr)
        return 2
    try:
        return _run(args, host)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
