"""Train the toy-world diffusion models (a toy world trained here, never real-weight quality).

    python devkit/train_toy_models.py unet --minutes 32 --warm-start W    # the SD1.x-layout UNet (epsilon)
    python devkit/train_toy_models.py flux --minutes 32 --warm-start W    # the Flux-schnell-layout flow transformer
    python devkit/train_toy_models.py measure                             # the saved models' figures

Each model (configs: ``devkit/toy_model_configs.py``) learns on latents of rendered train-split scenes
(``devkit/toy_latents.py``; one object each by default, ``--two-object-fraction`` for more), encoded once by the
toy autoencoder, conditioned by its frozen random text encoder, with 10 % of the captions dropped to the empty
prompt so that cfg > 1 works:

* ``unet``: epsilon prediction on the SD1.x discrete schedule (a timestep drawn uniformly from the 1000), the
  per-sample loss weighted by Min-SNR (``--min-snr``, gamma 5): unweighted, the easy low-noise levels drowned
  the high-noise ones that decide layout and colour, and the first UNet ignored its caption.
* ``flux``: rectified flow (x_s = (1 - s) x0 + s noise, target noise - x0) at levels s = the host's
  ``ModelSamplingFlux.sigma`` (Flux-schnell's shift) of a logit-normal draw, as Flux was trained.

The loss is computed through ComfyUI's own ``BaseModel.apply_model`` (its input scaling, timestep mapping and
conditioning), so training and sampling share one code path. Training is seeded, runs on one CPU thread, stops
after ``--minutes`` of this process's CPU time, keeps an EMA of the weights and saves a resumable state to
``--work`` every ``--save-every`` minutes; rerunning the same command resumes. ``--warm-start`` starts from a
training state or a saved toy checkpoint (its recorded training is kept in the new one's metadata). At the end
it writes the EMA weights as an all-in-one fp16 checkpoint (diffusion model + text encoder + the toy TAESD, the
layout ``CheckpointLoaderSimple`` reads) to ``devkit/toy_weights/toy_<model>.safetensors`` and prints the CPU
minutes. ``measure`` prints the figures of the saved models (needs ``devkit/toy_classifier.py``).

Figures of the committed weights (a toy world trained here; one CPU thread each, the two models side by side on
the shared 2-core machine; 64 px frames, 8x8 latents: the world's chosen 128 px would cost four times as much
per step). Three phases: on the latents of early snapshots of the autoencoders (step 400 of the 4-channel one,
step 100 of the 16-channel one); on the committed autoencoders (scenes 40 % with two objects, the UNet's loss
unweighted); then, warm-started from that checkpoint, on 6000 one-object scenes (the UNet with Min-SNR 5):

=====  ======================  ======================  ========================  =========  ======  ==============
model  1: AE snapshot          2: committed AE         3: one object, weighted   total CPU  params  recon. PSNR
=====  ======================  ======================  ========================  =========  ======  ==============
unet   863 steps, 1.7 + 8.5    694 steps, 1.9 + 5.0    5791 steps, 2.0 + 32.0    51.1 min   3.25 M  23.29 (AE 23.44)
flux   2460 steps, 1.7 + 10.0  1076 steps, 1.8 + 4.5   9461 steps, 2.2 + 32.0    52.2 min   1.78 M  22.50 (AE 22.54)
=====  ======================  ======================  ========================  =========  ======  ==============

(steps of batch 32; "a + b": CPU minutes encoding the scenes + training. Phase 1 of the UNet spent 8.5 training
minutes of which the 6.0 up to its last save were used; restarted runs lost about 1 minute each.) The two models trained
side by side in every phase, one core each: about 53 minutes of the 2-core machine, after the autoencoders'
10.3 + 10.4 CPU minutes. Counted in one core's minutes, the total (124) exceeds the 90-minute budget; counted as
the machine's time it is within it. Reconstruction: the pack's DDIM /
Euler inversion (50 steps) then its editing sampler (25 steps, cfg 1) on 4 held-out clips x 4 frames, mean
PSNR against the rendered frames, beside the autoencoder's own round trip.

Attribute accuracy (``measure``: ``devkit/toy_classifier.py`` without a mask, i.e. through its predicted mask,
on plain samples, KSampler path, 20 Euler steps, cfg 4, 64 px, 96 one-object captions from held-out seeds;
chance: shape 0.33, colour 0.25, pattern 0.33, background 0.25; the ceiling: what the classifier reads on the
autoencoder's own 64² round trips of rendered scenes, train combinations):

=====================  =====  ======  =======  ==========
model, captions        shape  colour  pattern  background
=====================  =====  ======  =======  ==========
unet, seen combos      0.646  0.917   0.760    1.000
unet, unseen combos    0.458  0.823   0.479    1.000
unet, phase 2          0.344  0.323   0.354    0.448
4ch AE ceiling         0.87   1.00    0.96     1.00
flux, seen combos      0.646  0.917   0.573    1.000
flux, unseen combos    0.417  0.812   0.385    1.000
flux, phase 2          0.344  0.625   0.469    1.000
16ch AE ceiling        0.93   0.98    0.76     1.00
=====================  =====  ======  =======  ==========

("phase 2": the previous checkpoints, read by the same classifier, seen combinations.) Background and colour
reach the 90 % bound on both models; shape and pattern do not. The pattern is bounded by the autoencoders (the
16-channel one's 64² round trips keep it in 76 % of scenes); the shape by the 8x8 latents, where the models
draw rounded blobs (the samples' squares and triangles lose their corners). On unseen combinations every
attribute but the background is lower: the models partly learnt the combinations, not the attributes.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Callable

DEVKIT = Path(__file__).resolve().parent
if str(DEVKIT) not in sys.path:
    sys.path.insert(0, str(DEVKIT))
import host_bootstrap  # noqa: E402

log = logging.getLogger("train_toy_models")

WEIGHTS = DEVKIT / "toy_weights"
AE_FILES = {"unet": WEIGHTS / "toy_taesd_4ch.safetensors", "flux": WEIGHTS / "toy_taesd_16ch.safetensors"}
CAPTION_DROPOUT = 0.1
EMA_DECAY = 0.998


def checkpoint_path(name: str) -> Path:
    return WEIGHTS / f"toy_{name}.safetensors"


def _build(name: str, seed: int):
    import toy_model_configs as configs

    if name == "unet":
        return configs.new_unet(seed), configs.new_sd_clip(seed + 1)
    return configs.new_flux(seed), configs.new_flux_clip(seed + 1)


def load_ae(path: str):
    """The toy autoencoder as ``comfy.sd.VAE`` (``random4`` / ``random16``: a random TAESD, to debug the pipeline)."""
    import comfy.sd
    import comfy.taesd.taesd
    import comfy.utils
    import tiny_models

    if path.startswith("random"):
        taesd = comfy.taesd.taesd.TAESD(latent_channels=int(path[len("random"):]))
        tiny_models.init_weights(taesd, 7, skip=("vae_scale", "vae_shift"))
        return comfy.sd.VAE(sd={k: v.detach().clone() for k, v in taesd.state_dict().items()})
    if path.endswith(".ckpt"):  # a training state of devkit/train_toy_autoencoder.py (its "model" entry)
        import torch

        state = torch.load(path, weights_only=False, map_location="cpu")["model"]
    else:
        state = comfy.utils.load_torch_file(path)
    return comfy.sd.VAE(sd={k: v.float() for k, v in state.items()})


def level_sampler(name: str, model_sampling) -> Callable:
    """Draws (B,) noise levels: the SD1.x table at uniform timesteps, or Flux-schnell's shifted logit-normal."""
    import torch

    if name == "unet":
        table = model_sampling.sigmas.float()
        return lambda b, g: table[torch.randint(0, len(table), (b,), generator=g)]
    return lambda b, g: model_sampling.sigma(torch.sigmoid(torch.randn(b, generator=g))).float().clamp(1e-3, 1.0)


def _clone_saved(t):
    # ComfyUI's Flux blocks add to their input in place (inference code); clones of the tensors autograd
    # saves keep the backward pass valid without touching the host's model code.
    import torch

    return t if isinstance(t, torch.nn.Parameter) else t.clone()


def min_snr_weight(sigma, gamma: float):
    """Per-sample weights of the epsilon loss, min(SNR, gamma) / SNR with SNR = 1 / sigma^2 (Min-SNR weighting):
    the low-noise levels, where epsilon is easy and says nothing of the caption, stop drowning the high-noise
    levels that decide layout and colour. ``gamma`` 0: no weighting."""
    import torch

    if gamma <= 0:
        return torch.ones_like(sigma)
    snr = 1.0 / sigma.square()
    return snr.clamp(max=gamma) / snr


def warm_weights(path: Path) -> tuple[dict, dict]:
    """(diffusion-model weights, what they record of their training) from a training state (``--work``'s
    ``train_*.pt``: its EMA) or from a saved toy checkpoint (its ``model.diffusion_model.*`` weights, in fp32)."""
    import torch

    import comfy.utils

    if path.suffix == ".safetensors":
        state, metadata = comfy.utils.load_torch_file(str(path), return_metadata=True)
        prefix = "model.diffusion_model."
        weights = {k[len(prefix):]: v.float() for k, v in state.items() if k.startswith(prefix)}
        return weights, {"warm_start": path.name, "earlier_training": json.loads((metadata or {})["training"])}
    state = torch.load(path)
    return state["ema"], {"warm_start_steps": state["step"],
                          "warm_start_cpu_minutes": round(state["cpu_seconds"] / 60, 1)}


def train(name: str, minutes: float, work: Path, ae: str, n_scenes: int, size: int, seed: int, batch: int,
          lr: float, save_every: float, warm_start: Path | None = None, two_object_fraction: float = 0.0,
          min_snr: float = 0.0) -> dict:
    import torch

    import toy_latents

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    patcher, clip = _build(name, seed)
    model = patcher.model
    vae = load_ae(ae)
    data = toy_latents.latent_set(vae, ae, n_scenes, size, seed, work, two_object_fraction)
    table = toy_latents.caption_table(clip, data.captions)
    net = model.diffusion_model
    ema = {k: v.detach().clone() for k, v in net.state_dict().items()}
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    state_file = work / f"train_{name}_{toy_latents.file_key(ae)}_{size}_{seed}.pt"
    step, cpu_used, warm = 0, 0.0, {}
    if not state_file.is_file() and warm_start is not None:
        # Weights learnt earlier (on an earlier snapshot of the autoencoder, or an earlier recipe): training goes
        # on from them, and their CPU time is counted in the total.
        weights, warm = warm_weights(warm_start)
        net.load_state_dict(weights)
        ema = {k: v.detach().clone() for k, v in net.state_dict().items()}
        log.info("%s: warm start from %s", name, warm_start)
    if state_file.is_file():
        state = torch.load(state_file)
        net.load_state_dict(state["net"])
        ema, step, cpu_used, warm = state["ema"], state["step"], state["cpu_seconds"], state.get("warm", {})
        opt.load_state_dict(state["opt"])
        generator.set_state(state["generator"])
        log.info("%s: resumed at step %d after %.1f CPU minutes", name, step, cpu_used / 60)
    levels = level_sampler(name, model.model_sampling)
    model.train()
    started, last_save, losses = time.process_time(), time.process_time(), []

    def save() -> None:
        torch.save({"net": net.state_dict(), "ema": ema, "opt": opt.state_dict(), "step": step, "generator":
                    generator.get_state(), "cpu_seconds": cpu_used + time.process_time() - started, "warm": warm},
                   state_file)

    while cpu_used + time.process_time() - started < minutes * 60:
        rows = torch.randint(0, len(data.latents), (batch,), generator=generator)
        x0 = data.latents[rows]
        captions = table.index[rows].clone()
        captions[torch.rand(batch, generator=generator) < CAPTION_DROPOUT] = 0
        noise = torch.randn(x0.shape, generator=generator)
        sigma = levels(batch, generator)
        xt = model.model_sampling.noise_scaling(sigma.view(-1, 1, 1, 1), noise, x0)
        target = noise if name == "unet" else noise - x0
        extra = {"y": table.pooled[captions]} if name == "flux" else {}
        with torch.autograd.graph.saved_tensors_hooks(_clone_saved, lambda t: t):
            denoised = model.apply_model(xt, sigma, c_crossattn=table.conds[captions], **extra)
            prediction = (xt - denoised) / sigma.view(-1, 1, 1, 1)
            per_sample = (prediction - target).square().mean(dim=(1, 2, 3))
            loss = (per_sample * min_snr_weight(sigma, min_snr)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        progress = (cpu_used + time.process_time() - started) / (minutes * 60)
        for group in opt.param_groups:  # linear warm-up over 200 steps, then cosine down to a tenth over the budget
            cosine = 0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0)))
            group["lr"] = lr * min(1.0, (step + 1) / 200) * cosine
        opt.step()
        step += 1
        decay = min(EMA_DECAY, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in net.state_dict().items():
                ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay) if v.is_floating_point() else ema[k].copy_(v)
        losses.append(per_sample.mean().item())  # unweighted, comparable across recipes
        if step % 100 == 0:
            log.info("%s step %d loss %.4f (mean of 100) %.1f CPU min", name, step, sum(losses[-100:]) / 100,
                     (cpu_used + time.process_time() - started) / 60)
        if time.process_time() - last_save > save_every * 60:
            save()
            last_save = time.process_time()
    save()
    cpu_minutes = (cpu_used + time.process_time() - started) / 60
    net.load_state_dict(ema)
    model.eval()
    toy_latents.standardise_vae(vae, data.raw_mean, data.raw_std, model.latent_format.process_in)
    info = {"model": name, "steps": step, "batch": batch, "cpu_minutes": round(cpu_minutes, 1), "scenes": n_scenes,
            "size": size, "seed": seed, "encode_cpu_minutes": round(data.encode_cpu_seconds / 60, 1),
            "two_object_fraction": two_object_fraction, "min_snr_gamma": min_snr, "lr": lr,
            "final_loss": round(sum(losses[-200:]) / max(1, len(losses[-200:])), 4),
            "autoencoder": Path(ae).name, "raw_latent_mean": data.raw_mean, "raw_latent_std": data.raw_std, **warm}
    write_checkpoint(checkpoint_path(name), patcher, clip, vae, info)
    print(f"trained {name}: {step} steps of {batch}, {cpu_minutes:.1f} CPU minutes (1 thread), "
          f"final loss {info['final_loss']}")
    return info


def write_checkpoint(path: Path, patcher, clip, vae, info: dict) -> None:
    """The all-in-one checkpoint in ComfyUI's own saved layout (``state_dict_for_saving``), every float fp16."""
    import torch

    import comfy.utils

    sd = patcher.model.state_dict_for_saving(clip.get_sd(), vae.get_sd(), None)
    sd = {k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"tokenflow_toy_world": "a toy world trained here (devkit/train_toy_models.py), not real weights",
                "training": json.dumps(info)}
    comfy.utils.save_torch_file(sd, str(path), metadata=metadata)
    log.info("wrote %s (%.1f MB)", path, path.stat().st_size / 2**20)


def measure(samples: int, clips: int, size: int | None, names: tuple[str, ...]) -> None:
    """Print the figures of the saved toy models: attribute accuracy of plain samples (seen and unseen attribute
    combinations) and the PSNR of inversion followed by sampling on held-out clips, at ``size`` (default: the
    training frame size)."""
    import toy_models

    for name in names:
        model, clip, vae = toy_models.load_toy_model(name)
        size = size or int(toy_models.training_info(name).get("size", 64))
        print(f"toy {name}: frames of {size} px")
        settings = toy_models.SAMPLING[name]
        for split in ("train", "heldout"):
            accuracy = toy_models.attribute_accuracy(model, clip, vae, samples, size, split)
            print(f"toy {name}: {split}-combination captions, {samples} samples, {settings}: "
                  + " ".join(f"{k}={v:.3f}" for k, v in accuracy.items()))
        rec, ae = toy_models.reconstruction_psnr(model, clip, vae, clips, size)
        print(f"toy {name}: {clips} held-out clips, inversion then sampling {rec:.2f} dB PSNR, "
              f"the autoencoder alone {ae:.2f} dB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", choices=("unet", "flux", "measure"), help="the model to train, or measure: print "
                        "the saved models' figures")
    parser.add_argument("--samples", type=int, default=96, help="measure: samples per caption split")
    parser.add_argument("--clips", type=int, default=4, help="measure: held-out clips to reconstruct")
    parser.add_argument("--only", action="append", choices=("unet", "flux"), help="measure: this model only")
    parser.add_argument("--measure-size", type=int, default=None, help="measure: frame size (default: the trained one)")
    parser.add_argument("--minutes", type=float, default=22.0, help="CPU minutes of training (this process)")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "tokenflow_toy_training",
                        help="resumable training state and the encoded dataset")
    parser.add_argument("--ae", default=None, help="the toy TAESD file (default: devkit/toy_weights' one for the "
                        "model's latent channels; random4 / random16 for a random TAESD)")
    parser.add_argument("--scenes", type=int, default=5000)
    parser.add_argument("--size", type=int, default=64, help="frame size in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warm-start", type=Path, default=None, help="a training state (--work's train_*.pt) whose "
                        "EMA weights start this run, e.g. one trained on an earlier snapshot of the autoencoder, "
                        "or a saved toy checkpoint (devkit/toy_weights/toy_<model>.safetensors)")
    parser.add_argument("--two-object-fraction", type=float, default=0.0, help="share of two-object training scenes "
                        "(the checks and the quality clips have one object)")
    parser.add_argument("--min-snr", type=float, default=5.0, help="unet: Min-SNR gamma of the epsilon loss's "
                        "weights (0: unweighted); the flow model's loss is never weighted")
    parser.add_argument("--save-every", type=float, default=3.0, help="minutes between resumable saves")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    host_bootstrap.bootstrap(cpu=True, threads=1)
    import toy_model_configs

    toy_model_configs.register()
    if args.model == "measure":
        measure(args.samples, args.clips, args.measure_size, tuple(args.only or ("unet", "flux")))
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    train(args.model, args.minutes, args.work, args.ae or str(AE_FILES[args.model]), args.scenes, args.size,
          args.seed, args.batch, args.lr, args.save_every, args.warm_start, args.two_object_fraction,
          args.min_snr if args.model == "unet" else 0.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
