"""Train the toy world's TAESD-layout autoencoders: a toy world trained here, not real-weight quality.

The models are ComfyUI's own ``comfy.taesd.taesd.TAESD`` (fixed 64-channel widths, 8x down), one with 4
latent channels and one with 16, trained from scratch on frames of ``devkit/toy_world.py`` (train seeds,
train attribute combinations). TAESD is fully convolutional, so training runs on random crops (32²
first, then 64²) of frames rendered at 64² and 128². The weights are saved as fp16 safetensors under
``devkit/toy_weights/`` in the key layout ComfyUI's VAE loader detects (``taesd_encoder.*``,
``taesd_decoder.*``, ``vae_scale``, ``vae_shift``; ``comfy.sd.VAE`` reads the latent channels off
``taesd_decoder.1.weight``); ``vae_scale`` / ``vae_shift`` make the encoded latents zero-mean,
unit-variance over the training frames.

    bash -c 'source scripts/host_env.sh && "$PYTHON" devkit/train_toy_autoencoder.py --channels 4'
    ... --resume        continue from the checkpoint (model, optimiser, step, random state, CPU time)
    ... --measure       reconstruction PSNR and warp errors on held-out clips of the saved weights

Training is seeded and runs on one thread; it prints the CPU minutes spent.

Measured (``--measure``: 6 held-out clips of 8 frames, 1 or 2 objects; mean ± spread over clips; warp
errors x1e-3 with the exact source flow, metric/warp_error.py). "flicker" is a crude stand-in for
per-frame editing: the same clip with the background texture drawn anew every frame, round-tripped.

=====  =======  ============  ==============  ==============  ==============
AE     size     PSNR (dB)     source          source via AE   flicker via AE
=====  =======  ============  ==============  ==============  ==============
4ch    64²      21.45 ± 2.36  0.541 ± 0.335   0.108 ± 0.087   0.837 ± 0.673
4ch    128²     22.15 ± 2.31  0.233 ± 0.180   0.348 ± 0.245   1.801 ± 1.692
16ch   64²      21.02 ± 2.01  0.541 ± 0.335   0.133 ± 0.103   0.821 ± 0.716
16ch   128²     21.89 ± 1.66  0.233 ± 0.180   0.382 ± 0.435   1.834 ± 1.939
=====  =======  ============  ==============  ==============  ==============

Frame size chosen: 128². At both sizes the source's warp error after the autoencoder is well below the
per-frame stand-in's (128²: 5x, 64²: 6-8x, where the autoencoder's blur hides the texture that the
stand-in changes); 128² gives 16x16 latents, on which an object spans about 6x6 tokens (at 64², 3x3 of
8x8), enough for the tokens TokenFlow matches and for a pattern to survive. Each autoencoder trained
10.3-10.4 CPU minutes (one thread); PSNR is modest (about 22 dB: blurred patterns and textures).
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import host_bootstrap  # noqa: E402  (devkit/host_bootstrap.py: the host first on sys.path)

host_bootstrap.bootstrap(threads=1)

import comfy.sd  # noqa: E402
import comfy.taesd.taesd  # noqa: E402
import comfy.utils  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import toy_world as tw  # noqa: E402

log = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parent / "toy_weights"
LATENT_CHANNELS = (4, 16)
PHASES = ((32, 1500), (64, 100))  # (crop side, steps): cheap small crops first, then context
BATCH = 8
LEARNING_RATE = 1e-3
CHECKPOINT_EVERY = 100


def weights_path(latent_channels: int) -> Path:
    return WEIGHTS_DIR / f"toy_taesd_{latent_channels}ch.safetensors"


def load_vae(latent_channels: int) -> comfy.sd.VAE:
    """The trained autoencoder loaded the way ComfyUI's VAE loader loads a file."""
    path = weights_path(latent_channels)
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: train it with devkit/train_toy_autoencoder.py --channels {latent_channels}")
    return comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(path), safe_load=True))


def build_taesd(latent_channels: int, seed: int) -> comfy.taesd.taesd.TAESD:
    """A TAESD with every weight drawn (ComfyUI's layers leave them empty): PyTorch's default conv init,
    the last conv of each residual block scaled down so the stacked blocks start near identity."""
    torch.manual_seed(seed)
    model = comfy.taesd.taesd.TAESD(latent_channels=latent_channels)
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.Conv2d.reset_parameters(module)
        if isinstance(module, comfy.taesd.taesd.Block):
            module.conv[-1].weight.data.mul_(0.2)
    return model


def frame_pool(seed: int, clips_per_size: int = 240, frames: int = 4) -> list[torch.Tensor]:
    """(N, 3, H, W) training frames at 64² and 128², one, two or three objects per clip."""
    pool = []
    for size in (64, 128):
        batch = []
        for i in range(clips_per_size):
            clip = tw.render_clip(tw.TRAIN_SEEDS[seed * 100_000 + size * 1_000 + i], frames, size, n_objects=1 + i % 3 // 2 + i % 5 // 4)
            batch.append(clip.frames.permute(0, 3, 1, 2))
        pool.append(torch.cat(batch))
    return pool


def random_crops(pool: list[torch.Tensor], crop: int, generator: torch.Generator) -> torch.Tensor:
    """BATCH random crops (and flips) from the pool's frames, drawn with ``generator``."""
    out = []
    for _ in range(BATCH):
        frames = pool[int(torch.randint(len(pool), (1,), generator=generator))]
        frame = frames[int(torch.randint(frames.shape[0], (1,), generator=generator))]
        y, x = (int(torch.randint(frame.shape[-1] - crop + 1, (1,), generator=generator)) for _ in range(2))
        piece = frame[:, y:y + crop, x:x + crop]
        if bool(torch.randint(2, (1,), generator=generator)):
            piece = piece.flip(-1)
        out.append(piece)
    return torch.stack(out)


def learning_rate(step: int, total: int) -> float:
    return LEARNING_RATE * (0.03 + 0.97 * 0.5 * (1 + math.cos(math.pi * step / total)))


def train(latent_channels: int, seed: int, checkpoint: Path, resume: bool) -> comfy.taesd.taesd.TAESD:
    model = build_taesd(latent_channels, seed)
    optimiser = torch.optim.Adam(list(model.taesd_encoder.parameters()) + list(model.taesd_decoder.parameters()),
                                 lr=LEARNING_RATE)
    generator = torch.Generator().manual_seed(seed)
    step, cpu_seconds = 0, 0.0
    if resume and checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=False)
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        generator.set_state(state["generator"])
        step, cpu_seconds = state["step"], state["cpu_seconds"]
        log.info("resumed at step %d after %.1f CPU minutes", step, cpu_seconds / 60)
    started = time.process_time()
    pool = frame_pool(seed)
    total = sum(n for _, n in PHASES)
    while step < total:
        crop = PHASES[0][0] if step < PHASES[0][1] else PHASES[1][0]
        for group in optimiser.param_groups:
            group["lr"] = learning_rate(step, total)
        images = random_crops(pool, crop, generator)
        latents = model.taesd_encoder(images)
        decoded = model.taesd_decoder(latents)
        loss = (decoded - images).square().mean() + 0.5 * (decoded - images).abs().mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        step += 1
        if step % CHECKPOINT_EVERY == 0 or step == total:
            spent = cpu_seconds + time.process_time() - started
            torch.save({"model": model.state_dict(), "optimiser": optimiser.state_dict(), "step": step,
                        "generator": generator.get_state(), "cpu_seconds": spent}, checkpoint)
            log.info("step %d/%d crop %d loss %.5f, %.1f CPU minutes", step, total, crop, loss.item(), spent / 60)
    set_latent_scale(model, pool)
    cpu_minutes = (cpu_seconds + time.process_time() - started) / 60
    print(f"autoencoder {latent_channels}ch: {total} steps, {cpu_minutes:.1f} CPU minutes (one thread)")
    return model


@torch.no_grad()
def set_latent_scale(model: comfy.taesd.taesd.TAESD, pool: list[torch.Tensor]) -> None:
    """vae_scale / vae_shift so that ``encode`` gives zero-mean, unit-variance latents on the pool."""
    raw = torch.cat([model.taesd_encoder(frames[:48]).flatten() for frames in pool])
    std, mean = float(raw.std()), float(raw.mean())
    model.vae_scale.fill_(std)
    model.vae_shift.fill_(-mean / std)


def save_weights(model: comfy.taesd.taesd.TAESD, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"about": "TAESD-layout autoencoder of a toy world trained here"})


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1.0 / (a - b).square().mean().clamp_min(1e-10)))


@torch.no_grad()
def measure(latent_channels: int, seeds: range = range(tw.HELDOUT_SEEDS[0], tw.HELDOUT_SEEDS[0] + 6)) -> None:
    """PSNR of round-trips and warp errors (x1e-3, exact source flow) on held-out clips at 64² and 128²."""
    from comfyui_tokenflow.metric import warp_error as we

    vae = load_vae(latent_channels)
    for size in (64, 128):
        rows = {"psnr": [], "source": [], "source_ae": [], "flicker_ae": []}
        for seed in seeds:
            clip = tw.render_clip(seed, 8, size, n_objects=1 + seed % 2)
            flicker = tw.render_clip(seed, 8, size, n_objects=1 + seed % 2, texture_per_frame=True)
            round_trip = vae.decode(vae.encode(clip.frames)).reshape(clip.frames.shape)
            flicker_trip = vae.decode(vae.encode(flicker.frames)).reshape(clip.frames.shape)
            rows["psnr"].append(psnr(round_trip, clip.frames))
            for name, frames in (("source", clip.frames), ("source_ae", round_trip), ("flicker_ae", flicker_trip)):
                rows[name].append(we.warp_error(frames.permute(0, 3, 1, 2), clip.flow_fwd, clip.flow_bwd).scaled)
        print(f"{latent_channels}ch {size}x{size}: " + " ".join(
            f"{k}={torch.tensor(v).mean():.3f}±{torch.tensor(v).std():.3f}" for k, v in rows.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, choices=LATENT_CHANNELS, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", type=Path, default=None, help="default /tmp/toy_taesd_<c>ch.ckpt")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    parser.add_argument("--measure", action="store_true", help="only measure the saved weights")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    if args.measure:
        measure(args.channels)
        return
    checkpoint = args.checkpoint or Path(f"/tmp/toy_taesd_{args.channels}ch.ckpt")
    model = train(args.channels, args.seed, checkpoint, args.resume)
    save_weights(model, weights_path(args.channels))
    print(f"saved {weights_path(args.channels)}")


if __name__ == "__main__":
    main()
