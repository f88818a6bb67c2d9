"""Train and measure the toy world's attribute classifier (``devkit/toy_classifier.py``: the design, the training
cost and the accuracy table are in its docstring): a toy world trained here, not real-weight quality.

    bash -c 'source scripts/host_env.sh && "$PYTHON" devkit/train_toy_classifier.py'                 # train all
    bash -c 'source scripts/host_env.sh && "$PYTHON" devkit/train_toy_classifier.py --only pattern'  # one part
    bash -c 'source scripts/host_env.sh && "$PYTHON" devkit/train_toy_classifier.py --measure'       # accuracy

Needs a ComfyUI host (the autoencoders load through ``comfy.sd.VAE``).
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import toy_world as tw
from toy_classifier import (ATTRIBUTES, WEIGHTS, WHOLE_SIZE, AttributeNet, MaskNet, PatternHead, ToyClassifier,
                            WholeFrameNet, colour_statistics, labels_of, load_classifier, predicted_masks, prepare,
                            prepare_whole, probabilities, without_mask_channel)

log = logging.getLogger(__name__)

SEED = 0
EPOCHS = 30
WHOLE_EPOCHS = 25
PATTERN_STEPS = 2000
MASK_EPOCHS = 12
PARTS = ("crop", "whole", "pattern", "mask", "pixels")  # in training order: the pixel network reads predicted masks
NO_MASK_SHARE = 0.2  # crop-network inputs read whole without a mask, so that it still answers without one

Groups = dict[int, dict]  # frame size -> {"images": (versions, N, H, W, 3) fp16, "masks": (N, H, W), "labels"}


@torch.no_grad()
def round_trip_set(seeds: range, sizes: tuple[int, ...], split: str = "train",
                   channels: tuple[int, ...] = (4, 16), clean: bool = True) -> Groups:
    """Single-object scenes of ``seeds`` (cycling through ``sizes``), each clean (when ``clean``) and as a
    round-trip through every autoencoder in ``channels``, kept at full size (fp16) with their object masks and
    labels, grouped by frame size."""
    import train_toy_autoencoder as ae  # needs the ComfyUI host

    scenes = [tw.render_scene(seed, sizes[i % len(sizes)], split=split) for i, seed in enumerate(seeds)]
    groups: Groups = {}
    for size in sizes:
        group = [s for s in scenes if s.image.shape[0] == size]
        images = torch.stack([s.image for s in group])
        versions = [images] if clean else []
        for channel in channels:
            vae = ae.load_vae(channel)
            versions.append(torch.cat([vae.decode(vae.encode(chunk)).reshape(chunk.shape)
                                       for chunk in images.split(64)]).clamp(0, 1))
        groups[size] = {"images": torch.stack(versions).half(), "masks": torch.stack([s.masks[0] for s in group]),
                        "labels": labels_of(group)}
    return groups


def network_inputs(groups: Groups, whole: bool = False) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """The crops around the masks, the whole frames without a mask, and the labels, over every version; with
    ``whole``, the whole frames at ``WHOLE_SIZE``² with their mask channel instead of the crops."""
    with_masks, without, labels = [], [], {name: [] for name in ATTRIBUTES}
    for group in groups.values():
        for images in group["images"]:
            if whole:
                with_masks.append(prepare_whole(images.float(), group["masks"]))
            else:
                with_masks.append(prepare(images.float(), group["masks"]))
                without.append(prepare(images.float()))
            for name in ATTRIBUTES:
                labels[name].append(group["labels"][name])
    return (torch.cat(with_masks), torch.cat(without) if without else torch.empty(0),
            {name: torch.cat(v) for name, v in labels.items()})


def attribute_loss(logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> torch.Tensor:
    """The attributes' cross-entropies summed."""
    return sum(F.cross_entropy(logits[k], labels[k]) for k in ATTRIBUTES)


def fit(model: torch.nn.Module, count: int, lr: float, epochs: int,
        batch: Callable[[torch.Tensor, torch.Generator], tuple[torch.Tensor, Any]],
        loss_of: Callable[[Any, Any], torch.Tensor] = attribute_loss) -> torch.nn.Module:
    """AdamW with a one-cycle schedule over ``epochs`` of shuffled batches of 64 (``batch``: the inputs and targets
    of the rows ``index``, drawing its augmentations from the generator; ``loss_of(outputs, targets)``)."""
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(SEED)
    batches = (count + 63) // 64
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=epochs * batches)
    for epoch in range(epochs):
        for index in torch.randperm(count, generator=generator).split(64):
            inputs, targets = batch(index, generator)
            loss = loss_of(model(inputs), targets)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
        log.info("epoch %d loss %.4f", epoch, loss.item())
    return model.eval()


def labelled(batch_input: Callable[[torch.Tensor, torch.Generator], torch.Tensor], labels: dict[str, torch.Tensor]
             ) -> Callable[[torch.Tensor, torch.Generator], tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """``batch_input``'s inputs with the attributes' labels of the same rows."""
    return lambda index, generator: (batch_input(index, generator), {k: v[index] for k, v in labels.items()})


def train(with_masks: torch.Tensor, without: torch.Tensor, labels: dict[str, torch.Tensor]) -> AttributeNet:
    """The crop network, ``NO_MASK_SHARE`` of its inputs read whole."""
    torch.manual_seed(SEED)

    def batch_input(index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        whole = torch.rand(len(index), 1, 1, 1, generator=generator) < NO_MASK_SHARE
        x = torch.where(whole, without[index], with_masks[index])
        if bool(torch.rand(1, generator=generator) < 0.5):
            x = x.flip(-1)
        # objects turn freely in the world, so any quarter turn is another scene of it
        return torch.rot90(x, int(torch.randint(4, (1,), generator=generator)), (2, 3))

    return fit(AttributeNet(), len(with_masks), 1e-3, EPOCHS, labelled(batch_input, labels))


def train_whole(inputs: torch.Tensor, labels: dict[str, torch.Tensor]) -> WholeFrameNet:
    """The whole-frame network, the mask channel given half of the time (the first classifier's recipe)."""
    torch.manual_seed(SEED)

    def batch_input(index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        keep = (torch.rand(len(index), 1, 1, 1, generator=generator) < 0.5).float()
        x = torch.cat((inputs[index, :3], inputs[index, 3:] * keep), 1)
        return x.flip(-1) if bool(torch.rand(1, generator=generator) < 0.5) else x

    return fit(WholeFrameNet(), len(inputs), 2e-3, WHOLE_EPOCHS, labelled(batch_input, labels))


def train_pattern(with_masks: torch.Tensor, pattern: torch.Tensor) -> PatternHead:
    """Full-batch Adam on the statistics of every crop (quarter turns and flips leave them unchanged)."""
    torch.manual_seed(SEED)
    head = PatternHead()
    with torch.no_grad():
        stats = torch.cat([colour_statistics(chunk) for chunk in with_masks.split(512)])
        head.centre.copy_(stats.mean(0))
        head.scale.copy_(stats.std(0) + 1e-4)
        standardised = (stats - head.centre) / head.scale
    optimiser = torch.optim.Adam(head.mlp.parameters(), lr=3e-3, weight_decay=1e-4)
    for step in range(PATTERN_STEPS):
        loss = F.cross_entropy(head.mlp(standardised), pattern)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    log.info("pattern head loss %.4f", loss.item())
    return head.eval()


def train_mask(groups: Groups) -> MaskNet:
    """The mask network on every version of every frame at ``WHOLE_SIZE``², binary cross-entropy against the
    exact masks (resized the same way), with flips and quarter turns."""
    torch.manual_seed(SEED)
    frames, targets = [], []
    for group in groups.values():
        mask = F.interpolate(group["masks"][:, None].float(), size=(WHOLE_SIZE, WHOLE_SIZE), mode="bilinear",
                             antialias=True, align_corners=False)[:, 0]
        for images in group["images"]:
            frames.append(prepare_whole(images.float())[:, :3])
            targets.append(mask)
    frames, targets = torch.cat(frames), torch.cat(targets)

    def batch(index: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        both = torch.cat((frames[index], targets[index, None]), 1)
        if bool(torch.rand(1, generator=generator) < 0.5):
            both = both.flip(-1)
        both = torch.rot90(both, int(torch.randint(4, (1,), generator=generator)), (2, 3))
        return both[:, :3], both[:, 3]

    return fit(MaskNet(), len(frames), 3e-3, MASK_EPOCHS, batch, F.binary_cross_entropy_with_logits)


def train_pixels(groups: Groups, mask_net: MaskNet) -> AttributeNet:
    """The pixel network: the crop network's recipe on crops around the mask network's own masks (what it reads
    at use), their mask channel emptied, so that it reads the shape from the pixels."""
    torch.manual_seed(SEED)
    crops, labels = [], {name: [] for name in ATTRIBUTES}
    with torch.no_grad():
        for group in groups.values():
            for images in group["images"]:
                for chunk in images.float().split(256):
                    crops.append(without_mask_channel(prepare(chunk, predicted_masks(mask_net, chunk))))
                for name in ATTRIBUTES:
                    labels[name].append(group["labels"][name])
    inputs, labels = torch.cat(crops), {name: torch.cat(v) for name, v in labels.items()}

    def batch_input(index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = inputs[index]
        if bool(torch.rand(1, generator=generator) < 0.5):
            x = x.flip(-1)
        return torch.rot90(x, int(torch.randint(4, (1,), generator=generator)), (2, 3))

    return fit(AttributeNet(), len(inputs), 1e-3, EPOCHS, labelled(batch_input, labels))


@torch.no_grad()
def accuracy(model: ToyClassifier, groups: Groups, with_masks: bool, predict_masks: bool = True
             ) -> dict[str, float]:
    """Share of right answers per attribute over every image of ``groups`` (without the exact masks: through
    the predicted ones, or the whole-frame network when ``predict_masks`` is off)."""
    right = {name: 0 for name in ATTRIBUTES}
    total = 0
    for group in groups.values():
        for images in group["images"]:
            found = probabilities(images.float(), group["masks"] if with_masks else None, model, predict_masks)
            for name in ATTRIBUTES:
                right[name] += int((found[name].argmax(1) == group["labels"][name]).sum())
            total += len(images)
    return {name: count / total for name, count in right.items()}


def main() -> None:
    import host_bootstrap

    host_bootstrap.bootstrap(threads=1)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", action="store_true", help="only measure the saved weights")
    parser.add_argument("--data-cache", type=Path, default=None, help="keep the round-trip training set in this file")
    parser.add_argument("--only", action="append", choices=PARTS, help="keep the saved networks but this one "
                        "(repeatable; pattern: seconds); default: train every part")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    if not args.measure:
        started = time.process_time()
        if args.data_cache is not None and args.data_cache.is_file():
            groups = torch.load(args.data_cache)
        else:
            groups = round_trip_set(range(tw.TRAIN_SEEDS[500_000], tw.TRAIN_SEEDS[500_000] + 1000), (64, 128))
            if args.data_cache is not None:
                torch.save(groups, args.data_cache)
        train_set = network_inputs(groups)
        log.info("training set %d images, %.1f CPU minutes", len(train_set[0]), (time.process_time() - started) / 60)
        parts = args.only or PARTS
        model = load_classifier() if args.only else ToyClassifier()
        for part in parts:
            if part == "crop":
                model.crop = train(*train_set)
            elif part == "whole":
                whole, _, labels = network_inputs(groups, whole=True)
                model.whole = train_whole(whole, labels)
            elif part == "pattern":
                model.pattern = train_pattern(train_set[0], train_set[2]["pattern"])
            elif part == "mask":
                model.mask = train_mask(groups)
            else:
                model.pixels = train_pixels(groups, model.mask)
            log.info("%s: %.1f CPU minutes so far", part, (time.process_time() - started) / 60)
        WEIGHTS.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.half().contiguous() for k, v in model.state_dict().items() if v.is_floating_point()} |
                  {k: v.contiguous() for k, v in model.state_dict().items() if not v.is_floating_point()}, str(WEIGHTS),
                  metadata={"about": "attribute classifier of a toy world trained here"})
        print(f"classifier: {(time.process_time() - started) / 60:.1f} CPU minutes (one thread), saved {WEIGHTS}")
    model = load_classifier()
    start = tw.HELDOUT_SEEDS[0] + 5_000
    for split in ("train", "heldout"):
        held = round_trip_set(range(start, start + 150), (64, 128), split=split)
        for masks, with_masks, predict in (("none", False, False), ("predicted", False, True), ("exact", True, True)):
            acc = accuracy(model, held, with_masks=with_masks, predict_masks=predict)
            print(f"held-out seeds, {split} combos, masks={masks}: " + " ".join(f"{k}={v:.4f}" for k, v in acc.items()))
            if with_masks:
                for size, group in held.items():
                    acc = accuracy(model, {size: group}, with_masks=True)
                    print(f"    frames {size}²: " + " ".join(f"{k}={v:.4f}" for k, v in acc.items()))


if __name__ == "__main__":
    main()
