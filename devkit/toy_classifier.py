"""An attribute classifier for the toy world: a toy world trained here, not real-weight quality.

Reads the object of a frame of ``devkit/toy_world.py`` (ComfyUI IMAGE layout, any size) and predicts its shape,
colour and pattern and the background kind. With the object's mask, a small CNN reads a square crop around the
mask's bounding box (a quarter of the box's side of background on each side) resized to 48², with the mask as
a fourth channel, for shape, colour and background; a small MLP reads the pattern from statistics of the colour
inside the mask (per channel mean, spread and 10/50/90 % quantiles). Without a mask (a model's plain samples),
a mask network predicts the object's mask from the frame; the crop around it goes to a pixel network (the crop
network's design, trained on such crops with the mask channel empty: the predicted outline is too rough to
read a shape from) for shape, colour and background, and to the pattern MLP. Where no mask is found, a
whole-frame CNN reads the frame resized to 64² (the first classifier of this module, unchanged). All were
trained on autoencoder round-trips of rendered single-object scenes (both toy autoencoders, frames at 64² and
128², train seeds and train attribute combinations) plus clean renders, 1000 scenes x clean / 4ch / 16ch =
3000 images, so that they judge what a model trained here decodes. CPU minutes, one thread: making the images
6.1, the crop network 3.1 (30 epochs, 20 % of its inputs whole frames without the mask), the pattern MLP 0.1
(2000 full-batch steps), the whole-frame network 5.0 (25 epochs on its own 64² inputs, the mask given half of
the time), the mask network 5.8 (12 epochs, binary cross-entropy at 64²), the pixel network 2.8 (30 epochs);
23 in all from scratch (``--only`` trains one part on the saved others).

Accuracy (``devkit/train_toy_classifier.py --measure``) on 150 held-out-seed scenes x (clean, 4ch, 16ch
round-trips) = 450 images, frames at 64² and 128², with the object mask / through the predicted mask / the
whole-frame network:

=======================  =====================  =====================  =====================  =====================
attribute combinations   shape                  colour                 pattern                background
=======================  =====================  =====================  =====================  =====================
train combinations       1.000 / 0.936 / 0.844  0.998 / 0.998 / 0.998  0.956 / 0.922 / 0.824  1.000 / 1.000 / 1.000
HELDOUT_COMBOS           0.998 / 0.638 / 0.478  0.993 / 0.998 / 0.996  0.936 / 0.844 / 0.718  1.000 / 1.000 / 1.000
=======================  =====================  =====================  =====================  =====================

Through the predicted mask on 90 other held-out scenes, train combinations, per version (clean / 4ch / 16ch):
64² shape 1.00 / 0.87 / 0.93, pattern 0.98 / 0.96 / 0.76; 128² shape 1.00 / 0.91 / 0.93, pattern 1.00 / 0.91 /
0.96; colour and background 0.98-1.00. These are the ceilings of any check of a model's plain samples at that
size: the 4-channel AE's 64² round trips read the shape right 87 % of the time, the 16-channel one's the pattern
76 %. The mask network's IoU with the exact mask: 0.95 / 0.80 / 0.86 (64²), 0.95 / 0.84 / 0.89 (128²).

With the mask (the quality benchmark always has the exact one), shape, colour and background reach the 98 %
aimed at; the pattern does not (0.933 on 64² frames, 0.978 on 128²): the toy autoencoders (about 22 dB) blur
dots and stripes away, on 64² frames (8x8 latents) almost wholly, and the 16-channel one most (about 0.85 of its
64² round-trips read right, against 1.00 clean). The ink still darkens the object's colour (half of it inked by
stripes, about a quarter by dots), which the statistics read; the crop network trained with them as inputs read
0.873, and the trials on the same data (pattern, train combinations) stayed at 0.93-0.96: mean and spread alone
0.962 (0.931 on HELDOUT_COMBOS, against 0.944 with the quantiles), with quantiles at three erosions, a luminance
histogram or the high-pass energy 0.944-0.949 (more fit, less held-out), with the background's colour
0.931-0.942, with the crop network's features 0.909-0.931 (and 0.62 on HELDOUT_COMBOS: it reads the pattern from
the combination), five seeds averaged 0.953; with 1500 more 64² scenes (3.3 CPU minutes more) 0.960-0.976 but
0.91-0.93 on HELDOUT_COMBOS, not kept: within the 0.01 spread of a 450-image count. Without a mask, the shape on
HELDOUT_COMBOS (0.638) shows the pixel network partly reads the shape from the combination.

Training and measuring: ``devkit/train_toy_classifier.py``.

Loading and classifying need torch and safetensors only; training and measuring need a ComfyUI host
(the autoencoders load through ``comfy.sd.VAE``).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import toy_world as tw

log = logging.getLogger(__name__)

ATTRIBUTES: dict[str, tuple[str, ...]] = {"shape": tw.SHAPES, "colour": tw.COLOURS, "pattern": tw.PATTERNS,
                                          "background": tw.BACKGROUNDS}
INPUT_SIZE = 48  # side of the square crop the network reads
WHOLE_SIZE = 64  # side of the whole frame the mask-free network reads
CROP_MARGIN = 0.25  # background kept on each side of the mask's box, in units of the box's longer side
WEIGHTS = Path(__file__).resolve().parent / "toy_weights" / "toy_classifier.safetensors"


class AttributeNet(torch.nn.Module):
    """RGB + mask (4 channels, a crop of ``INPUT_SIZE``²) -> one logit vector per attribute.

    Besides the mean and max of the last features, it pools the features over the mask and reads the mean and
    spread of the colour inside the (eroded) mask: the round-trips blur dots and stripes away, but the ink they
    put on the object still darkens and spreads its colour, and a mean over the mask keeps that."""

    def __init__(self) -> None:
        super().__init__()
        widths = (4, 16, 32, 64, 96)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Conv2d(n_in, n_out, 3, padding=1), torch.nn.BatchNorm2d(n_out), torch.nn.ReLU(),
                                torch.nn.Conv2d(n_out, n_out, 3, padding=1, stride=2), torch.nn.BatchNorm2d(n_out),
                                torch.nn.ReLU())
            for n_in, n_out in zip(widths, widths[1:]))
        n_pooled = 6 + widths[1] + 3 * widths[-1]
        self.trunk = torch.nn.Sequential(torch.nn.Linear(n_pooled, 128), torch.nn.ReLU())
        self.heads = torch.nn.ModuleDict({name: torch.nn.Linear(128, len(values)) for name, values in ATTRIBUTES.items()})

    @staticmethod
    def _masked_mean(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        weight = F.adaptive_avg_pool2d(mask, features.shape[-2:])
        return (features * weight).sum((2, 3)) / (weight.sum((2, 3)) + 1e-3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        mask = x[:, 3:]
        inner = -F.max_pool2d(-mask, 3, 1, 1)  # eroded: the outline's blend with the background left out
        mean = self._masked_mean(x[:, :3], inner)
        spread = (self._masked_mean((x[:, :3] - mean[..., None, None]).square(), inner) + 1e-6).sqrt()
        pooled = [(mean - 0.5) * 4, spread * 10]  # fixed scales that bring both to about unit range
        f = x
        for i, block in enumerate(self.blocks):
            f = block(f)
            if i == 0:
                pooled.append(self._masked_mean(f, mask))
        pooled += [f.mean((2, 3)), f.amax((2, 3)), self._masked_mean(f, mask)]
        shared = self.trunk(torch.cat(pooled, 1))
        return {name: head(shared) for name, head in self.heads.items()}


def _crop(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """(4, H, W) -> (4, INPUT_SIZE, INPUT_SIZE): the square around ``mask``'s box (the whole frame without one)."""
    if mask is not None and bool(mask.any()):
        rows, cols = torch.nonzero(mask.any(1)).flatten(), torch.nonzero(mask.any(0)).flatten()
        y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        half = max(y1 - y0, x1 - x0) * (0.5 + CROP_MARGIN)
        side = max(4, int(round(2 * half)))
        top, left = int(round((y0 + y1) / 2 - half)), int(round((x0 + x1) / 2 - half))
        height, width = x.shape[-2:]
        pad = max(0, -top, -left, top + side - height, left + side - width)
        if pad:  # an object at the frame's edge: repeat the edge rather than invent black
            x = F.pad(x[None], (pad,) * 4, mode="replicate")[0]
            top, left = top + pad, left + pad
        x = x[:, top:top + side, left:left + side]
    return F.interpolate(x[None], size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", antialias=True,
                         align_corners=False)[0]


def prepare(images: torch.Tensor, masks: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(N, H, W, 3) images in [0, 1] and optional (N, H, W) masks -> (N, 4, INPUT_SIZE, INPUT_SIZE) network input.

    With a mask, the crop is the square around the mask's bounding box widened by ``CROP_MARGIN`` on each side
    (some background to read), so that a small object is read at about full resolution; without one (or with an
    empty one) the whole frame is read with an empty mask channel."""
    if images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be (N, H, W, 3) in ComfyUI's IMAGE layout, got {tuple(images.shape)}")
    if masks is not None and masks.shape != images.shape[:3]:
        raise ValueError(f"masks must be (N, H, W) = {tuple(images.shape[:3])}, got {tuple(masks.shape)}")
    rgb = images.permute(0, 3, 1, 2).float()
    if masks is None:
        return torch.stack([_crop(torch.cat((x, torch.zeros_like(x[:1]))), None) for x in rgb])
    masks = masks.float()
    return torch.stack([_crop(torch.cat((x, m[None] if bool(m.any()) else torch.zeros_like(m[None]))), m > 0.5)
                        for x, m in zip(rgb, masks)])


def prepare_whole(images: torch.Tensor, masks: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(N, H, W, 3) images and optional (N, H, W) masks -> (N, 4, WHOLE_SIZE, WHOLE_SIZE): the whole frame."""
    rgb = images.permute(0, 3, 1, 2).float()
    mask = torch.zeros_like(rgb[:, :1]) if masks is None else masks[:, None].float()
    return F.interpolate(torch.cat((rgb, mask), 1), size=(WHOLE_SIZE, WHOLE_SIZE), mode="bilinear", antialias=True,
                         align_corners=False)


class WholeFrameNet(torch.nn.Module):
    """The mask-free reading: RGB + mask (4 channels, the whole frame resized to ``WHOLE_SIZE``²) -> logits.

    The crop network reads a whole frame poorly (it learnt the crop: shape 0.58 there), so frames without a mask
    go to this network, the first classifier of this module (trained on whole frames, the mask given half of
    the time)."""

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


N_STATISTICS = 15


def colour_statistics(x: torch.Tensor) -> torch.Tensor:
    """(N, 4, S, S) crops -> (N, 15): per channel the mean, spread and 10/50/90 % quantiles of the colour inside
    the mask eroded by a pixel (the outline's blend with the background left out).

    The round-trips blur dots and stripes away, but the ink they put on the object still darkens and spreads its
    colour (about half of it inked by stripes, a quarter by dots), and these read that share of ink."""
    rgb, inner = x[:, :3], -F.max_pool2d(-(x[:, 3:] > 0.5).float(), 3, 1, 1)
    count = inner.sum((2, 3)).clamp(min=1)
    mean = (rgb * inner).sum((2, 3)) / count
    spread = (((rgb - mean[..., None, None]).square() * inner).sum((2, 3)) / count + 1e-6).sqrt()
    values = torch.where(inner > 0, rgb, torch.nan).flatten(2)
    quantiles = torch.nanquantile(values, torch.tensor([0.1, 0.5, 0.9], dtype=x.dtype), dim=2).permute(1, 0, 2)
    return torch.cat((mean, spread, torch.nan_to_num(quantiles.flatten(1), 0.0)), 1)


class PatternHead(torch.nn.Module):
    """The pattern with the mask: a small MLP on ``colour_statistics`` (standardised by the training set's).

    Trained apart from the crop network: trained jointly, the network left this reading mostly unlearnt
    (pattern 0.873, against 0.96 for these statistics alone)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("centre", torch.zeros(N_STATISTICS))
        self.register_buffer("scale", torch.ones(N_STATISTICS))
        self.mlp = torch.nn.Sequential(torch.nn.Linear(N_STATISTICS, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64),
                                       torch.nn.ReLU(), torch.nn.Linear(64, len(tw.PATTERNS)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp((colour_statistics(x) - self.centre) / self.scale)


class MaskNet(torch.nn.Module):
    """RGB (the whole frame resized to ``WHOLE_SIZE``²) -> the object mask's logits at that size.

    Frames without a mask (a model's plain samples) are read from a crop around a predicted mask: the
    whole-frame network reads a 64² frame's shape and pattern poorly (about 0.84).
    Dilated convolutions at half size see a whole object; a full-size skip keeps its outline."""

    def __init__(self) -> None:
        super().__init__()

        def conv(n_in: int, n_out: int, **kwargs) -> torch.nn.Module:
            return torch.nn.Sequential(torch.nn.Conv2d(n_in, n_out, 3, padding=kwargs.get("dilation", 1), **kwargs),
                                       torch.nn.BatchNorm2d(n_out), torch.nn.ReLU())

        self.full_size = torch.nn.Sequential(conv(3, 16), conv(16, 16))
        self.half_size = torch.nn.Sequential(conv(16, 32, stride=2), conv(32, 32, dilation=2),
                                             conv(32, 32, dilation=4), conv(32, 32, dilation=8))
        self.out = torch.nn.Sequential(conv(48, 16), torch.nn.Conv2d(16, 1, 1))

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        full = self.full_size(rgb)
        half = F.interpolate(self.half_size(full), size=full.shape[-2:], mode="bilinear", align_corners=False)
        return self.out(torch.cat((full, half), 1))[:, 0]


def predicted_masks(net: MaskNet, images: torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) images -> (N, H, W) masks in {0, 1}: ``net``'s reading, brought back to the frame's size."""
    logits = net(prepare_whole(images)[:, :3])
    return (F.interpolate(logits[:, None], size=images.shape[1:3], mode="bilinear", align_corners=False)[:, 0]
            > 0).float()


def without_mask_channel(x: torch.Tensor) -> torch.Tensor:
    """Crops with their mask channel emptied: what the pixel network reads."""
    return torch.cat((x[:, :3], torch.zeros_like(x[:, 3:])), 1)


class ToyClassifier(torch.nn.Module):
    """The crop network and the pattern head for frames with a mask; for frames without one, the pixel network
    (shape, colour, background) and the pattern head on the crop around the mask network's mask; the
    whole-frame network where no mask is found."""

    def __init__(self) -> None:
        super().__init__()
        self.crop, self.whole, self.pattern = AttributeNet(), WholeFrameNet(), PatternHead()
        self.mask: Optional[MaskNet] = MaskNet()
        # The crop network reads the shape off the given mask's outline; the predicted one is too rough for that
        # (IoU 0.80-0.89 on 64² round trips), so predicted crops go to a network that never saw a mask channel.
        self.pixels: Optional[AttributeNet] = AttributeNet()

    def read(self, images: torch.Tensor, masks: Optional[torch.Tensor] = None,
             predict_masks: bool = True) -> dict[str, torch.Tensor]:
        """(N, H, W, 3) images and optional (N, H, W) masks -> per attribute (N, len(values)) logits. Without
        ``masks``, the mask network's masks (``predict_masks``) or none (the whole-frame network's reading)."""
        predicted = masks is None and predict_masks and self.mask is not None and self.pixels is not None
        if predicted:
            masks = predicted_masks(self.mask, images)
        masked = torch.zeros(len(images), dtype=torch.bool) if masks is None else (masks > 0.5).flatten(1).any(1)
        out = {name: torch.empty(len(images), len(values)) for name, values in ATTRIBUTES.items()}
        if bool(masked.any()):
            x = prepare(images[masked], masks[masked])
            reader = self.pixels(without_mask_channel(x)) if predicted else self.crop(x)
            logits = reader | {"pattern": self.pattern(x)}
            for name in ATTRIBUTES:
                out[name][masked] = logits[name]
        if not bool(masked.all()):
            logits = self.whole(prepare_whole(images[~masked]))
            for name in ATTRIBUTES:
                out[name][~masked] = logits[name]
        return out


def load_classifier(path: Path = WEIGHTS) -> ToyClassifier:
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: train it with devkit/toy_classifier.py")
    model = ToyClassifier()
    stored = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
    if not any(k.startswith("mask.") for k in stored):  # saved before the mask network: masks never predicted
        model.mask = None
    if not any(k.startswith("pixels.") for k in stored):
        model.pixels = None
    model.load_state_dict(stored)
    return model.eval()


@torch.no_grad()
def probabilities(images: torch.Tensor, masks: Optional[torch.Tensor] = None,
                  model: Optional[ToyClassifier] = None, predict_masks: bool = True) -> dict[str, torch.Tensor]:
    """Per attribute, (N, len(values)) probabilities in the order of ``ATTRIBUTES[attribute]`` (without
    ``masks``, read through the predicted masks unless ``predict_masks`` is off)."""
    model = model or load_classifier()
    if images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be (N, H, W, 3) in ComfyUI's IMAGE layout, got {tuple(images.shape)}")
    if masks is not None and masks.shape != images.shape[:3]:
        raise ValueError(f"masks must be (N, H, W) = {tuple(images.shape[:3])}, got {tuple(masks.shape)}")
    logits = [model.read(images[i:i + 256], None if masks is None else masks[i:i + 256], predict_masks)
              for i in range(0, len(images), 256)]
    return {name: torch.cat([l[name] for l in logits]).softmax(1) for name in ATTRIBUTES}


def classify(images: torch.Tensor, masks: Optional[torch.Tensor] = None,
             model: Optional[ToyClassifier] = None, predict_masks: bool = True) -> dict[str, list[str]]:
    """Per attribute, the most probable value for each image."""
    probs = probabilities(images, masks, model, predict_masks)
    return {name: [ATTRIBUTES[name][i] for i in p.argmax(1).tolist()] for name, p in probs.items()}


def labels_of(scenes: list[tw.ToyScene]) -> dict[str, torch.Tensor]:
    return {"shape": torch.tensor([tw.SHAPES.index(s.objects[0].shape) for s in scenes]),
            "colour": torch.tensor([tw.COLOURS.index(s.objects[0].colour) for s in scenes]),
            "pattern": torch.tensor([tw.PATTERNS.index(s.objects[0].pattern) for s in scenes]),
            "background": torch.tensor([tw.BACKGROUNDS.index(s.background) for s in scenes])}
