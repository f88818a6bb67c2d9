"""Edit quality on A TOY WORLD TRAINED HERE (never real-weight quality): TokenFlow against per-frame editing.

benchmarks/quality.py's pipeline in-process, through the pack's node classes, on the trained toy models
(devkit/toy_models.py) and the first :data:`TEST_SEEDS` of its held-out clips (its full workload), PnP:
per-frame editing (each frame a one-frame clip) and TokenFlow (correspondences on the fly). What the paper
claims, on these models:

- the edit changes the attribute: TokenFlow's fidelity (the world's classifier reads the edited attribute
  on the object) is at least the source's plus half of per-frame editing's gain over the source;
- TokenFlow is more consistent in time: its warp error (exact flows and occlusion masks) is below
  per-frame editing's by at least :data:`MARGINS`' warp gap, with fidelity at least 0.8 of per-frame's.

The margins were fixed before these comparisons ran, from the benchmark's own spread over seeds (see
:data:`MARGINS`); a model on which the claim does not hold is an xfail that cites the figures and says
why, never a looser bound.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
TEST_SEEDS = 5
# Two sigma of the spread over seeds of (per-frame warp - TokenFlow warp), x1e-3, PnP, measured by the full
# benchmark (`quality.py --seeds 5`, benchmarks/README.md, "Quality on a toy world") before this file's
# comparisons were first run.
MARGINS: dict[str, dict[str, float]] = {
    # quality.py --models unet --seeds 5 with the retrained toy_unet.safetensors (sha256 78167325...): 2 sigma of the
    # per-seed gaps (PnP)
    "unet": {"warp_gap": 1.390},
    # quality.py --models flux --seeds 5 with the retrained toy_flux.safetensors (sha256 1ebf7ce4...)
    "flux": {"warp_gap": 7.635},
}
# (model, claim) -> why it does not hold there, with the figures; the claim's test is then a strict xfail.
UNET_FIGURES = ("toy UNet, PnP, 5 held-out clips of 8 frames at 64 px: warp error x1e-3 TokenFlow 3.536 +- 4.211, "
                "per-frame 3.576 +- 4.711 (gap 0.040, 2 sigma 1.390), extended attention 3.735, source 0.122; "
                "fidelity TokenFlow 0.775, per-frame 0.750, source 0.000")
FLUX_FIGURES = ("toy flow transformer, PnP, 5 held-out clips of 8 frames at 64 px: warp error x1e-3 TokenFlow "
                "1.196 +- 1.511, per-frame 3.381 +- 5.227 (gap 2.185, 2 sigma of the per-seed gaps 7.635), "
                "extended attention 0.528, source 0.222; fidelity TokenFlow 0.425, per-frame 0.575")
XFAIL: dict[tuple[str, str], str] = {
    ("flux", "consistency"): f"the world's spread over clips and the keyframes' edit: {FLUX_FIGURES}. TokenFlow is "
                             "lower on every clip (per seed 1.917/2.996, 0.405/1.028, 0.018/0.043, 0.113/0.336, "
                             "3.526/12.501), but one clip's gap (8.975) makes 2 sigma of the gaps exceed their mean; "
                             "and TokenFlow keeps 0.74 of per-frame editing's fidelity, not 0.8: every frame takes "
                             "its keyframes' edit, so a clip whose keyframes' PnP edit came out weak stays weak "
                             "(0.12 against 0.38, 0.0 against 0.5).",
    ("unet", "consistency"): f"the model and world size: {UNET_FIGURES}. Trained at 64 px, the UNet attends on 8x8, "
                             "4x4 and 2x2 latents, where an object spans about 3x3, 2x2 and one token: the nearest-"
                             "neighbour correspondences TokenFlow propagates through are too coarse to beat per-frame "
                             "edits of a deterministic inversion, which are already nearly as consistent (per seed "
                             "TokenFlow / per-frame 2.559/2.591, 3.658/2.812, 0.137/0.138, 0.696/0.605, "
                             "10.632/11.735: a mean gap of 0.040 against 2 sigma of 1.390). The world chose 128 px, "
                             "16x16 latents, for this reason; the models were trained at 64 px.",
}


def load_quality():
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    import quality

    return quality


@pytest.fixture(scope="module", params=sorted(MARGINS))
def measured(request) -> tuple[str, dict]:
    """(model, the quality results of the test's seeds: per-frame editing and TokenFlow with PnP)."""
    quality = load_quality()
    workload = quality.Workload(**{**quality.FULL.__dict__, "seeds": TEST_SEEDS})
    results = quality.run_model(request.param, workload, ["pnp"], ["perframe", "tokenflow"], quick=False,
                                classify=quality.classifier())
    return request.param, results


def means(results: dict) -> dict[str, float]:
    pnp, source = results["editors"]["pnp"], results["reference"]["source"]

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    return {"source_fidelity": mean(source["fidelity"]), "perframe_fidelity": mean(pnp["perframe"]["fidelity"]),
            "fidelity": mean(pnp["tokenflow"]["fidelity"]), "perframe_warp": mean(pnp["perframe"]["warp"]),
            "warp": mean(pnp["tokenflow"]["warp"]), "source_warp": mean(source["warp"])}


def expect(request, model: str, claim: str) -> None:
    if (model, claim) in XFAIL:
        request.applymarker(pytest.mark.xfail(reason=XFAIL[model, claim], strict=True))


def test_edit_changes_the_attribute(measured, request) -> None:
    model, results = measured
    expect(request, model, "fidelity")
    m = means(results)
    gain = m["perframe_fidelity"] - m["source_fidelity"]
    assert gain > 0, f"{model}: per-frame editing does not change the attribute at all: {m}"
    assert m["fidelity"] >= m["source_fidelity"] + 0.5 * gain, f"{model}: {m}"


def test_tokenflow_more_consistent_than_per_frame(measured, request) -> None:
    model, results = measured
    expect(request, model, "consistency")
    m = means(results)
    assert m["warp"] <= m["perframe_warp"] - MARGINS[model]["warp_gap"], f"{model}: {m}, margins {MARGINS[model]}"
    assert m["fidelity"] >= 0.8 * m["perframe_fidelity"], f"{model}: {m}"
