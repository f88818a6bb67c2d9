"""Same inputs and seed give bit-identical results on the CPU: inversion, extraction and every editor."""
from __future__ import annotations

import pytest
import torch

from reliability_tools import assert_same_product, run_extraction, run_inversion
from tokenflow_helpers import edit


EDITS = {
    "pnp": dict(editor="pnp"),
    "sdedit": dict(editor="sdedit"),
    "controlnet": dict(editor="controlnet", control=True),
    "pnp-controlnet": dict(editor="pnp", control=True),
    "pnp-extracted": dict(editor="pnp", extracted=True),
    "sdedit-extracted": dict(editor="sdedit", extracted=True),
    "controlnet-extracted": dict(editor="controlnet", control=True, extracted=True),
}


def test_inversion_and_extraction_are_deterministic(tiny_sd15, clip):
    for _ in range(2):
        assert_same_product(clip["inversion"], run_inversion(tiny_sd15, clip))
        assert_same_product(clip["corr"], run_extraction(tiny_sd15, clip))


@pytest.mark.parametrize("name", list(EDITS))
def test_every_editor_is_deterministic(tiny_sd15, clip, name):
    mode = dict(EDITS[name])
    control, extracted = mode.pop("control", False), mode.pop("extracted", False)
    pos, neg = (clip["cpos"], clip["cneg"]) if control else (clip["pos"], clip["neg"])
    corr = clip["corr"] if extracted else None
    first = edit(tiny_sd15, pos, neg, clip["inversion"], correspondences=corr, **mode)
    second = edit(tiny_sd15, pos, neg, clip["inversion"], correspondences=corr, **mode)
    assert torch.isfinite(first).all()
    assert torch.equal(first, second), f"{name}: two runs differ by {(first - second).abs().max()}"

