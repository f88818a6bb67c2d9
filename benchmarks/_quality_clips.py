"""The clips of the quality benchmark and their measure (a toy world trained here, never real-weight quality).

A held-out seed gives a scene of ``toy_world.HELDOUT_COMBOS`` and its edit (one attribute changed); the world
renders the source clip and the clip a perfect edit gives (same seed, motion and background, the edited
object). :func:`prepare_clip` encodes the source, makes the :class:`~_quality_edit.ClipEditor` with the
captions' conditionings and the :class:`ClipMeasure` that scores any edited frames of it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace

log = logging.getLogger("quality")

ATTRIBUTES = ("colour", "pattern")


@dataclass(frozen=True)
class Workload:
    """The clips every model edits: their count, length and size (0: the size the model was trained at), and
    the edited attribute."""

    seeds: int = 5
    frames: int = 8
    size: int = 0
    attribute: str = "colour"

    def for_model(self, model_name: str) -> "Workload":
        """This workload with its size resolved: the frame size ``model_name`` was trained at when it is 0."""
        if self.size:
            return self
        import toy_models

        return replace(self, size=int(toy_models.training_info(model_name).get("size", 64)))


FULL = Workload()
QUICK = Workload(seeds=1, frames=6)


def recipe_for(model_name: str, quick: bool = False):
    """The edit settings of a trained model: the flow transformer inverts with the pack's default for flows
    (``auto``: the fixed point on the editing grid), the UNet with DDIM on a finer grid."""
    from _quality_edit import EditRecipe

    flow = "flux" in model_name
    recipe = EditRecipe(steps=8 if flow else 10, inversion_steps=8 if flow else 50, cfg=4.0)
    return replace(recipe, steps=recipe.steps // 2, inversion_steps=recipe.inversion_steps // 2) if quick else recipe


def edit_of(seed: int, attribute: str):
    """The held-out scene of ``seed`` and its edit: (source object, edited object, background)."""
    import numpy as np

    import toy_world

    rng = np.random.default_rng(seed)
    source = toy_world.HELDOUT_COMBOS[int(rng.integers(len(toy_world.HELDOUT_COMBOS)))]
    background = toy_world.BACKGROUNDS[int(rng.integers(len(toy_world.BACKGROUNDS)))]
    values = tuple(toy_world.COLOURS if attribute == "colour" else toy_world.PATTERNS)
    others = [v for v in values if v != getattr(source, attribute)]
    edited = replace(source, **{attribute: others[int(rng.integers(len(others)))]})
    return source, edited, background


def render_pair(seed: int, workload: Workload):
    """The source clip and the clip a perfect edit gives: same seed, motion and background, the edited object."""
    import toy_world

    source, edited, background = edit_of(seed, workload.attribute)
    clips = [toy_world.render_clip(seed, workload.frames, workload.size, objects=[obj], background=background,
                                   split="heldout") for obj in (source, edited)]
    return clips[0], clips[1], edited


def classifier():
    """The world's attribute classifier as ``classify(images, masks=...)``."""
    import toy_classifier

    model = toy_classifier.load_classifier()
    return lambda images, masks=None: toy_classifier.classify(images, masks=masks, model=model)


class ClipMeasure:
    """The metrics of any edited frames of one source clip (its exact products, the perfect edit's region)."""

    def __init__(self, source_clip, source_rt, ideal_rt, edited_object, attribute: str, classify):
        from _quality_metrics import changed_region

        self.clip, self.source_rt = source_clip, source_rt
        self.target = getattr(edited_object, attribute)
        self.attribute, self.classify = attribute, classify
        self.masks = source_clip.object_masks[:, 0]
        self.ideal_region = changed_region(ideal_rt, source_rt)

    def __call__(self, frames) -> dict[str, float]:
        import _quality_metrics as qm

        return {"warp": qm.temporal_warp_error(frames, self.clip.flow_fwd, self.clip.flow_bwd, self.clip.occlusion),
                "fidelity": qm.attribute_fidelity(self.classify, frames, self.masks, self.attribute, self.target),
                "iou": qm.mask_iou(qm.changed_region(frames, self.source_rt), self.ideal_region),
                "bg_psnr": qm.background_psnr(frames, self.clip.frames, self.masks)}


def prepare_clip(loaded, seed: int, workload: Workload, recipe, classify):
    """(editor of the clip, its measure, the source round trip, the reference rows' metrics)."""
    from _quality_edit import ClipEditor, decode_frames, encode_frames, encode_text
    import toy_world

    model, clip, vae = loaded
    source_clip, ideal_clip, edited_object = render_pair(seed, workload)
    latent = encode_frames(vae, source_clip.frames)
    source_rt = decode_frames(vae, latent)
    ideal_rt = decode_frames(vae, encode_frames(vae, ideal_clip.frames))
    measure = ClipMeasure(source_clip, source_rt, ideal_rt, edited_object, workload.attribute, classify)
    prompts = (source_clip.caption, toy_world.caption([edited_object], source_clip.background), "")
    editor = ClipEditor(model, vae, latent, *(encode_text(clip, text) for text in prompts), recipe)
    log.info("seed %d: %r -> %r", seed, prompts[0], prompts[1])
    return editor, measure, source_rt, {"source": measure(source_rt), "ideal": measure(ideal_rt)}


def heldout_seeds():
    import toy_world

    return toy_world.HELDOUT_SEEDS
