"""pytest plugin (``-p fp_report``): how close every closeness check of the run came to its threshold.

For each call site of ``torch.testing.assert_close``, ``torch.allclose`` and
``numpy.testing.assert_allclose`` it records ``max |a - b| / (atol + rtol |b|)`` (1 is the
threshold; a passing assert_close is <= 1, an ``assert not torch.allclose`` needs > 1) and prints
the worst and best value per site at the end. tests/FP_THRESHOLDS.md was measured with it.
"""
from __future__ import annotations

import sys
from collections import defaultdict

import pytest

_ratios: dict[str, list[float]] = defaultdict(list)
_current = {"test": ""}


def _site() -> str:
    frame = sys._getframe(2)
    return f"{frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.f_lineno}"


def _ratio(a, b, rtol, atol) -> float | None:
    import numpy as np
    import torch

    try:
        a = a.detach().double().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a, dtype=np.float64)
        b = b.detach().double().cpu().numpy() if isinstance(b, torch.Tensor) else np.asarray(b, dtype=np.float64)
        bound = atol + rtol * np.abs(b)
        diff = np.abs(a - b)
        if not diff.size:
            return None
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.where(bound > 0, diff / bound, np.where(diff > 0, np.inf, 0.0))
        return float(np.nanmax(r))
    except Exception:  # a non-numeric comparison: not a threshold
        return None


def pytest_configure(config):
    import numpy as np
    import torch

    close, allclose, np_close = torch.testing.assert_close, torch.allclose, np.testing.assert_allclose

    def assert_close(actual, expected, *args, rtol=None, atol=None, **kwargs):
        if rtol is None or atol is None:  # torch's defaults for the dtype
            dtype = getattr(expected, "dtype", torch.float32)
            defaults = {torch.float64: (1e-7, 1e-7), torch.float16: (1e-3, 1e-5), torch.bfloat16: (1.6e-2, 1e-5)}
            d_rtol, d_atol = defaults.get(dtype, (1.3e-6, 1e-5))
            r = _ratio(actual, expected, d_rtol if rtol is None else rtol, d_atol if atol is None else atol)
        else:
            r = _ratio(actual, expected, rtol, atol)
        if r is not None:
            _ratios[f"{_site()} ({_current['test']})"].append(r)
        return close(actual, expected, *args, rtol=rtol, atol=atol, **kwargs)

    def torch_allclose(a, b, rtol=1e-5, atol=1e-8, equal_nan=False):
        r = _ratio(a, b, rtol, atol)
        if r is not None:
            _ratios[f"{_site()} ({_current['test']})"].append(r)
        return allclose(a, b, rtol=rtol, atol=atol, equal_nan=equal_nan)

    def np_assert_allclose(actual, desired, rtol=1e-7, atol=0, *args, **kwargs):
        r = _ratio(actual, desired, rtol, atol)
        if r is not None:
            _ratios[f"{_site()} ({_current['test']})"].append(r)
        return np_close(actual, desired, rtol, atol, *args, **kwargs)

    torch.testing.assert_close, torch.allclose, np.testing.assert_allclose = assert_close, torch_allclose, np_assert_allclose


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    _current["test"] = item.nodeid.rsplit("/", 1)[-1]
    yield


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line("FP_REPORT site (test): worst  best  calls   [ratio of the observed difference to the threshold]")
    for site, values in sorted(_ratios.items()):
        terminalreporter.write_line(f"FP_REPORT {site}: {max(values):.3g}  {min(values):.3g}  {len(values)}")
