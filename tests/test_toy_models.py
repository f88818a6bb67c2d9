"""The toy world's trained autoencoders and attribute classifier (devkit/toy_weights/): a toy world trained here.

The autoencoders load through ComfyUI's own VAE detection from the committed fp16 files, on every host;
bounds are the measured figures (module docstrings of devkit/train_toy_autoencoder.py and
devkit/toy_classifier.py) less a margin for the few seeds used here.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import comfy.sd
import comfy.taesd.taesd
import comfy.utils
import toy_classifier as tc
import toy_world as tw
import train_toy_autoencoder as ae
import train_toy_classifier as ttc

SEEDS = range(tw.HELDOUT_SEEDS[0] + 100, tw.HELDOUT_SEEDS[0] + 112)
MIN_PSNR = {4: 20.5, 16: 20.5}  # measured here 21.7 (4ch) and 22.3 (16ch) on these 12 scenes


@pytest.fixture(scope="module")
def scenes() -> list[tw.ToyScene]:
    return [tw.render_scene(seed, 128) for seed in SEEDS]


@pytest.mark.parametrize("channels", ae.LATENT_CHANNELS)
def test_autoencoder_loads_through_comfy_vae_detection(channels: int, scenes: list[tw.ToyScene]) -> None:
    path = ae.weights_path(channels)
    raw = load_file(str(path))
    assert {k.split(".")[0] for k in raw} == {"taesd_encoder", "taesd_decoder", "vae_scale", "vae_shift"}
    assert {v.dtype for v in raw.values()} == {torch.float16}
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(path), safe_load=True))
    assert isinstance(vae.first_stage_model, comfy.taesd.taesd.TAESD)
    assert vae.latent_channels == channels and vae.downscale_ratio == 8
    assert float(vae.first_stage_model.vae_scale.detach()) == pytest.approx(float(raw["vae_scale"]))
    images = torch.stack([s.image for s in scenes])
    latents = vae.encode(images).detach()
    assert latents.shape == (len(scenes), channels, 16, 16)
    assert abs(float(latents.mean())) < 0.25 and 0.75 < float(latents.std()) < 1.33
    decoded = vae.decode(latents).reshape(images.shape)
    assert ae.psnr(decoded, images) > MIN_PSNR[channels]


CLASSIFIER_SEEDS = range(tw.HELDOUT_SEEDS[0] + 100, tw.HELDOUT_SEEDS[0] + 150)
# The least share of right answers per attribute on the 150 images of ``round_trips`` (train combinations),
# with the object mask, through the mask network's predicted mask, and with neither (the whole-frame network).
# Measured (``devkit/train_toy_classifier.py --measure``, 450 images of other held-out seeds): with the mask shape
# 1.000, colour 0.998, pattern 0.956, background 1.000; predicted 0.936, 0.998, 0.922, 1.000; whole-frame 0.844,
# 0.998, 0.824, 1.000 (here: 1.000, 1.000, 0.960, 1.000; 0.947, 1.000, 0.920, 1.000; 0.920, 1.000, 0.853, 1.000).
# With the mask the outline is given, so every shape must be right (the 64²-resize network, now the
# whole-frame one, missed 1 of these 150); the pattern's bound leaves 3 of these images (the crop network's own
# pattern reading, 0.933 here and 0.873 measured, falls below it); the other bounds sit about 2 sigma of a
# 150-image count below the measured rates (the whole-frame network's shape, 0.844, falls below the predicted
# route's). The 98 % aimed at holds with the mask for every attribute but the pattern (its own strict xfail below).
LEAST = {"masks": {"shape": 1.0, "colour": 0.98, "pattern": 0.94, "background": 0.98},
         "predicted": {"shape": 0.89, "colour": 0.97, "pattern": 0.87, "background": 0.98},
         None: {"shape": 0.78, "colour": 0.97, "pattern": 0.76, "background": 0.98}}


@pytest.fixture(scope="module")
def round_trips() -> list[tuple[torch.Tensor, torch.Tensor, dict[str, list[str]]]]:
    """Per frame size (64², 128²), 25 held-out scenes clean and round-tripped through both autoencoders:
    (images, object masks, true values), the way the classifier's own measure reads them."""
    groups = ttc.round_trip_set(CLASSIFIER_SEEDS, (64, 128))
    out = []
    for group in groups.values():
        versions = group["images"].shape[0]
        images = group["images"].flatten(0, 1).float()
        truth = {name: [tc.ATTRIBUTES[name][i] for i in group["labels"][name].repeat(versions).tolist()]
                 for name in tc.ATTRIBUTES}
        out.append((images, group["masks"].repeat(versions, 1, 1), truth))
    return out


def _share_right(model: tc.ToyClassifier, round_trips: list, with_masks: bool,
                 predict_masks: bool = True) -> dict[str, float]:
    right, total = {name: 0 for name in tc.ATTRIBUTES}, 0
    for images, masks, truth in round_trips:
        found = tc.classify(images, masks if with_masks else None, model=model, predict_masks=predict_masks)
        for name in tc.ATTRIBUTES:
            right[name] += sum(a == b for a, b in zip(found[name], truth[name]))
        total += len(images)
    return {name: count / total for name, count in right.items()}


def test_classifier_reads_round_trips_of_held_out_scenes(round_trips: list) -> None:
    model = tc.load_classifier()
    assert sum(len(images) for images, _, _ in round_trips) == 150
    for given in ("masks", "predicted", None):
        shares = _share_right(model, round_trips, with_masks=given == "masks", predict_masks=given is not None)
        for attribute, least in LEAST[given].items():
            assert shares[attribute] >= least, (given, attribute, shares)
    images, masks, _ = round_trips[1]
    probs = tc.probabilities(images, masks, model=model)
    assert set(probs) == set(tc.ATTRIBUTES)
    assert torch.allclose(probs["colour"].sum(1), torch.ones(len(images)))
    # a frame whose mask is empty is read whole, as with no mask predicted, beside frames read through their masks
    emptied = masks.clone()
    emptied[0] = 0
    mixed = tc.probabilities(images[:4], emptied[:4], model=model)
    whole = tc.probabilities(images[:1], model=model, predict_masks=False)
    for name in tc.ATTRIBUTES:
        assert torch.allclose(mixed[name][:1], whole[name], atol=1e-6)
        assert torch.allclose(mixed[name][1:], probs[name][1:4], atol=1e-6)


def test_mask_network_finds_the_object(round_trips: list) -> None:
    # Measured on 90 other held-out scenes: mean IoU 0.945 / 0.802 / 0.864 (64²: clean, 4ch, 16ch round trips)
    # and 0.949 / 0.837 / 0.887 (128²); the bound is the mean's 0.88 less a margin for these 150 images.
    model = tc.load_classifier()
    ious = []
    for images, masks, _ in round_trips:
        with torch.no_grad():
            found = tc.predicted_masks(model.mask, images)
        truth = masks > 0.5
        ious.append((found.bool() & truth).sum((1, 2)) / (found.bool() | truth).sum((1, 2)).clamp(min=1))
    assert float(torch.cat(ious).mean()) >= 0.80, torch.cat(ious).mean()


@pytest.mark.xfail(strict=True, reason="the pattern reads 0.956 with the mask (0.960 here): the toy autoencoders "
                                        "blur dots and stripes away, most on 64² frames (0.933 there, 0.978 on "
                                        "128²): 98 % is not reached")
def test_classifier_reads_the_pattern_at_98_percent_with_the_mask(round_trips: list) -> None:
    assert _share_right(tc.load_classifier(), round_trips, with_masks=True)["pattern"] >= 0.98
