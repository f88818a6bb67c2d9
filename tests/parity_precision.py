"""The tolerance method of the parity tests, shared by the UNet (test_tokenflow_vs_official.py) and the
Flux / SD3 (test_dit_vs_reference.py) comparisons with their independent restatements.

Each reference runs twice: plainly (float64) and as its float32 twin, rounding to float32 exactly where the
host does. Their difference, the SPREAD, is what that rounding does to this model and input, measured at run
time with no floor; the pack rounds at the same points with its own float64 values, so its distance from the
plain reference is of the same size. tests/FP_THRESHOLDS.md lists every threshold, its derivation and the CPU
matrix it was measured on.
"""
from __future__ import annotations

import os

import torch

# Bound on |ours - ref| / |ref32 - ref|: two realisations of the same float32 rounding at the same points.
# Measured over the CPU matrix (tests/FP_THRESHOLDS.md): UNet edits 0.9-1.3, UNet inversion up to 3.7 (the pack
# also rounds its intermediate products there), DiT 0.87-1.03; the semantic mutations are >= 3.7e4 x the spread.
SLACK = 8.0
# Smallest allowed (top-1 - top-2 similarity) / (max |similarity ours - reference|): a nearest-neighbour decision
# with this margin cannot be flipped by rounding of that size. Measured: UNet >= 7.2e7, DiT >= 1.66e10.
MARGIN_FACTOR = 1e3
FLOAT64_EPS = torch.finfo(torch.float64).eps


def report(line: str) -> None:
    if os.environ.get("TOKENFLOW_FP_REPORT"):  # with pytest -s: the measured ratios (tests/FP_THRESHOLDS.md)
        print("FPREPORT", line)


def assert_within_precision(ours: torch.Tensor, ref: torch.Tensor, ref32: torch.Tensor,
                            against: str = "reference") -> float:
    """|ours - ref| <= SLACK x |ref32 - ref|: the pack is as close to ``against`` as float32 rounding allows.

    Returns the ratio |ours - ref| / spread."""
    spread = (ref32 - ref).abs().max().item()
    assert spread > 0, "the float32 twin equals the reference: the spread measures nothing"
    tolerance = SLACK * spread  # cause: the host's float32 state and casts, emulated by the twin
    diff = (ours.double() - ref).abs().max().item()
    twin = (ours.double() - ref32).abs().max().item()
    report(f"diff={diff:.3g} spread={spread:.3g} ratio={diff / spread:.3g} |ours - ref32|={twin:.3g}")
    assert diff <= tolerance, (f"max |ours - {against}| = {diff:.3g} > {tolerance:.3g} "
                               f"({diff / spread:.3g} x the float32 rounding spread {spread:.3g})")
    return diff / spread
