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
TEST_SEEDS = 1
# Two sigma of the spread over seeds of (per-frame warp - TokenFlow warp), x1e-3, PnP, measured by the full
# benchmark (`quality.py --seeds 5`, benchmarks/README.md, "Quality on a toy world") before this file's
# comparisons were first run.
MARGINS: dict[str, dict[str, float]] = {
    # quality.py --seeds 5 at d75ce2d (toy_unet.safetensors sha256 fc618b6b...): 2 sigma of the per-seed gaps (PnP)
    "unet": {"warp_gap": 1.510},
    # quality.py --models flux --seeds 5 at the merge of 28ff06d (toy_flux.safetensors sha256 b529bd21...)
    "flux": {"warp_gap": 1.146},
}
# (model, claim) -> why it does not hold there, with the figures; the claim's test is then a strict xfail.
UNET_FIGURES = ("toy UNet, PnP, 5 held-out clips of 8 frames at 64 px: warp error x1e-3 TokenFlow 1.482 +- 2.011, "
                "per-frame 1.326 +- 1.307 (gap -0.155, 2 sigma 1.510), extended attention 1.276, source 0.122; "
                "fidelity TokenFlow 0.200, per-frame 0.250, source 0.000")
FLUX_FIGURES = ("toy flow transformer, PnP, 5 held-out clips of 8 frames at 64 px: warp error x1e-3 TokenFlow "
                "0.452 +- 0.463, per-frame 0.833 +- 1.011 (gap 0.381, 2 sigma of the per-seed gaps 1.146), "
                "extended attention 0.272, source 0.222; fidelity TokenFlow 0.400, per-frame 0.400")
XFAIL: dict[tuple[str, str], str] = {
    ("flux", "consistency"): f"the world's spread over clips: {FLUX_FIGURES}. TokenFlow halves the mean and is lower "
                             "on 4 of 5 clips (per seed 0.977/1.890, 0.900/1.986, 0.006/0.012, 0.043/0.092; "
                             "0.336/0.186), but the clips' warp errors range from 0.006 to 1.99, so the margin exceeds "
                             "the gap; on the test's clip the gap is 0.913 < 1.146.",
    ("unet", "fidelity"): f"the model: {UNET_FIGURES}. Its PnP edit restyles the whole frame (background PSNR 18.6 dB "
                          "against the round trip's 26.7) and turns the object a pale tint the classifier does not read "
                          "as the new colour on most clips (TokenFlow reads it on 1 clip of 5, per-frame on that one and "
                          "on 2 of 8 frames of another, so over 5 clips TokenFlow keeps 0.200 of a 0.250 gain); on the "
                          "test's clip neither does: there is no gain to keep half of.",
    ("unet", "consistency"): f"the model and world size: {UNET_FIGURES}. Trained at 64 px, the UNet works on 8x8 "
                             "latents where an object spans about 3x3 tokens. TokenFlow is lower on 4 of the 5 clips "
                             "(per seed 0.958/1.036, 1.000/1.344, 0.242/0.254, 0.193/0.468) but by less than the "
                             "margin, and one clip (a dotted square on grass, 5.014 against 3.530) decides the mean: "
                             "the correspondences are too coarse to beat per-frame edits of a deterministic inversion "
                             "by a margin (the world chose 128 px, 16x16 latents, for this reason; the models were "
                             "trained at 64 px).",
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
