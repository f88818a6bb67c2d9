"""An attribute classifier for the toy world: a toy world trained here, not real-weight quality.

A small CNN that reads a frame of ``devkit/toy_world.py`` (ComfyUI IMAGE layout, any size: it is
resized to 64²) and, optionally, the mask of the object to read, and predicts the object's shape,
colour and pattern and the background kind. It was trained on autoencoder round-trips of rendered
single-object scenes (both toy autoencoders, frames at 64² and 128², train seeds and train attribute
combinations) plus clean renders, with the mask given half of the time, so that it judges what a
model trained here decodes. Figures of the saved weights are in ``ACCURACY`` (``--measure``).

    bash -c 'source scripts/host_env.sh && "$PYTHON" devkit/toy_classifier.py'            # train
    bash -c 'source scripts/host_env.sh && "$PYTHON" devkit/toy_classifier.py --measure'  # accuracy

Loading and classifying need torch and safetensors only; training and measuring need a ComfyUI host
(the autoencoders load through ``comfy.sd.VAE``).
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import toy_world as tw

log = logging.getLogger(__name__)

ATTRIBUTES: dict[str, tuple[str, ...]] = {"shape": tw.SHAPES, "colour": tw.COLOURS, "pattern": tw.PATTERNS,
                                          "background": tw.BACKGROUNDS}
INPUT_SIZE = 64
WEIGHTS = Path(__file__).resolve().parent / "toy_weights" / "toy_classifier.safetensors"
SEED = 0
EPOCHS = 25


class AttributeNet(torch.nn.Module):
    """RGB + mask (4 channels, 64²) -> one logit vector per attribute."""

    def __init__(self) -> None:
        super().__init__()
        widths = (4, 16, 32, 64, 96)
        layers: list[torch.nn.Module] = []
        for n_in, n_out in zip(widths, widths[1:]):
            layers += [torch.nn.Conv2d(n_in, n_out, 3, padding=1), torch.nn.BatchNorm2d(n_out), torch.nn.ReLU(),
                       torch.nn.Conv2d(n_out, n_out, 3, padding=1, stride=2), torch.nn.BatchNorm2d(n_out), torch.nn.ReLU()]
        self.features = torch.nn.Sequential(*layers)
        self.heads = torch.nn.ModuleDict({name: torch.nn.Linear(2 * widths[-1], len(values))
                                          for name, values in ATTRIBUTES.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(x)
        pooled = torch.cat((f.mean((2, 3)), f.amax((2, 3))), 1)
        return {name: head(pooled) for name, head in self.heads.items()}


def prepare(images: torch.Tensor, masks: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(N, H, W, 3) images in [0, 1] and optional (N, H, W) masks -> (N, 4, 64, 64) network input."""
    if images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be (N, H, W, 3) in ComfyUI's IMAGE layout, got {tuple(images.shape)}")
    if masks is not None and masks.shape != images.shape[:3]:
        raise ValueError(f"masks must be (N, H, W) = {tuple(images.shape[:3])}, got {tuple(masks.shape)}")
    rgb = images.permute(0, 3, 1, 2).float()
    mask = torch.zeros_like(rgb[:, :1]) if masks is None else masks[:, None].float()
    x = torch.cat((rgb, mask), 1)
    if x.shape[-1] != INPUT_SIZE or x.shape[-2] != INPUT_SIZE:
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", antialias=True, align_corners=False)
    return x


def load_classifier(path: Path = WEIGHTS) -> AttributeNet:
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: train it with devkit/toy_classifier.py")
    model = AttributeNet()
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()})
    return model.eval()


@torch.no_grad()
def probabilities(images: torch.Tensor, masks: Optional[torch.Tensor] = None,
                  model: Optional[AttributeNet] = None) -> dict[str, torch.Tensor]:
    """Per attribute, (N, len(values)) probabilities in the order of ``ATTRIBUTES[attribute]``."""
    model = model or load_classifier()
    logits = [model(chunk) for chunk in prepare(images, masks).split(256)]
    return {name: torch.cat([l[name] for l in logits]).softmax(1) for name in ATTRIBUTES}


def classify(images: torch.Tensor, masks: Optional[torch.Tensor] = None,
             model: Optional[AttributeNet] = None) -> dict[str, list[str]]:
    """Per attribute, the most probable value for each image."""
    probs = probabilities(images, masks, model)
    return {name: [ATTRIBUTES[name][i] for i in p.argmax(1).tolist()] for name, p in probs.items()}


def labels_of(scenes: list[tw.ToyScene]) -> dict[str, torch.Tensor]:
    return {"shape": torch.tensor([tw.SHAPES.index(s.objects[0].shape) for s in scenes]),
            "colour": torch.tensor([tw.COLOURS.index(s.objects[0].colour) for s in scenes]),
            "pattern": torch.tensor([tw.PATTERNS.index(s.objects[0].pattern) for s in scenes]),
            "background": torch.tensor([tw.BACKGROUNDS.index(s.background) for s in scenes])}


# ------------------------------------------------------------------ data, training, measuring


@torch.no_grad()
def round_trip_set(seeds: range, sizes: tuple[int, ...], split: str = "train",
                   channels: tuple[int, ...] = (4, 16), clean: bool = True) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Single-object scenes of ``seeds`` (cycling through ``sizes``), each as a round-trip through every
    autoencoder in ``channels`` (and clean when ``clean``): 64² network inputs without masks, the masks
    and the labels, repeated per version."""
    import train_toy_autoencoder as ae  # needs the ComfyUI host

    scenes = [tw.render_scene(seed, sizes[i % len(sizes)], split=split) for i, seed in enumerate(seeds)]
    inputs, masks = [], []
    versions = [None, *channels] if clean else list(channels)
    for channel in versions:
        vae = None if channel is None else ae.load_vae(channel)
        for size in sizes:
            group = [s for s in scenes if s.image.shape[0] == size]
            images = torch.stack([s.image for s in group])
            if vae is not None:
                images = torch.cat([vae.decode(vae.encode(chunk)).reshape(chunk.shape) for chunk in images.split(64)])
            inputs.append(prepare(images.clamp(0, 1))[:, :3])
            masks.append(prepare(images, torch.stack([s.masks[0] for s in group]))[:, 3:])
    ordered = [s for size in sizes for s in scenes if s.image.shape[0] == size]
    labels = {k: v.repeat(len(versions)) for k, v in labels_of(ordered).items()}
    return torch.cat(inputs), torch.cat(masks), labels


def train(inputs: torch.Tensor, masks: torch.Tensor, labels: dict[str, torch.Tensor]) -> AttributeNet:
    torch.manual_seed(SEED)
    model = AttributeNet()
    optimiser = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(SEED)
    batches = (len(inputs) + 63) // 64
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=2e-3, total_steps=EPOCHS * batches)
    for epoch in range(EPOCHS):
        order = torch.randperm(len(inputs), generator=generator)
        for index in order.split(64):
            keep = (torch.rand(len(index), 1, 1, 1, generator=generator) < 0.5).float()
            x = torch.cat((inputs[index], masks[index] * keep), 1)
            if bool(torch.rand(1, generator=generator) < 0.5):
                x = x.flip(-1)
            logits = model(x)
            loss = sum(F.cross_entropy(logits[k], labels[k][index]) for k in ATTRIBUTES)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
        log.info("epoch %d loss %.4f", epoch, loss.item())
    return model.eval()


@torch.no_grad()
def accuracy(model: AttributeNet, inputs: torch.Tensor, masks: torch.Tensor, labels: dict[str, torch.Tensor],
             with_masks: bool) -> dict[str, float]:
    x = torch.cat((inputs, masks if with_masks else torch.zeros_like(masks)), 1)
    logits = model(x)
    return {k: float((logits[k].argmax(1) == labels[k]).float().mean()) for k in ATTRIBUTES}


def main() -> None:
    import host_bootstrap

    host_bootstrap.bootstrap(threads=1)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", action="store_true", help="only measure the saved weights")
    parser.add_argument("--data-cache", type=Path, default=None, help="keep the round-trip training set in this file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    if not args.measure:
        started = time.process_time()
        if args.data_cache is not None and args.data_cache.is_file():
            train_set = torch.load(args.data_cache)
        else:
            train_set = round_trip_set(range(tw.TRAIN_SEEDS[500_000], tw.TRAIN_SEEDS[500_000] + 1000), (64, 128))
            if args.data_cache is not None:
                torch.save(train_set, args.data_cache)
        log.info("training set %d images, %.1f CPU minutes", len(train_set[0]), (time.process_time() - started) / 60)
        model = train(*train_set)
        WEIGHTS.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.half().contiguous() for k, v in model.state_dict().items() if v.is_floating_point()} |
                  {k: v.contiguous() for k, v in model.state_dict().items() if not v.is_floating_point()}, str(WEIGHTS),
                  metadata={"about": "attribute classifier of a toy world trained here"})
        print(f"classifier: {(time.process_time() - started) / 60:.1f} CPU minutes (one thread), saved {WEIGHTS}")
    model = load_classifier()
    start = tw.HELDOUT_SEEDS[0] + 5_000
    for split in ("train", "heldout"):
        held = round_trip_set(range(start, start + 150), (64, 128), split=split)
        for with_masks in (False, True):
            acc = accuracy(model, *held, with_masks=with_masks)
            print(f"held-out seeds, {split} combos, masks={with_masks}: " + " ".join(f"{k}={v:.4f}" for k, v in acc.items()))


if __name__ == "__main__":
    main()
