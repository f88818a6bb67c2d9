"""devkit/golden_run.py's comparison: equal runs pass, and a run that moved by one value, lost a tensor or changed a
shape fails naming it (the golden run itself is run by hand before and after a refactor, not in the suite)."""
from __future__ import annotations

import torch

import golden_run  # devkit/golden_run.py


def _run() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"sd15/sample/pnp": torch.randn(2, 4, 8, 8, generator=g), "metric/0": torch.tensor(1.5, dtype=torch.float64)}


def test_equal_runs_compare_equal():
    lines: list[str] = []
    assert golden_run.compare(_run(), _run(), lines.append)
    assert lines == ["2 tensors compared; all equal"]


def test_a_moved_missing_or_reshaped_tensor_fails():
    moved = _run()
    moved["sd15/sample/pnp"][1, 2, 3, 4] = torch.nextafter(moved["sd15/sample/pnp"][1, 2, 3, 4], torch.tensor(9.0))
    lines: list[str] = []
    assert not golden_run.compare(_run(), moved, lines.append)
    assert lines[0].startswith("differs: sd15/sample/pnp")
    missing = _run()
    del missing["metric/0"]
    assert not golden_run.compare(_run(), missing, lines.append)
    assert "only in before: metric/0" in lines
    reshaped = _run()
    reshaped["metric/0"] = torch.tensor([1.5], dtype=torch.float64)
    assert not golden_run.compare(_run(), reshaped, lines.append)


def test_every_kind_of_output_is_flattened_into_tensors():
    """Products (dataclasses), node outputs (tuples), dicts and numbers all end up as named tensors."""
    from dataclasses import dataclass

    @dataclass
    class Product:
        trajectory: torch.Tensor
        timesteps: list
        family: str

    out: dict = {}
    golden_run.flatten_tensors("x", (Product(torch.ones(2), [801, 601], "sd1/sd2"), {"samples": torch.zeros(1)}, 0.25), out)
    assert sorted(out) == ["x/0/timesteps/0", "x/0/timesteps/1", "x/0/trajectory", "x/1/samples", "x/2"]
    assert out["x/0/timesteps/1"].item() == 601 and out["x/2"].dtype == torch.float64
