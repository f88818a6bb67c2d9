"""Test bootstrap: a real ComfyUI host on CPU, this repo as the package ``comfyui_tokenflow``, tiny models.

:func:`pytest_configure` runs ``devkit/host_bootstrap.py`` (the recipe the benchmarks share) before any
test module is imported: the host first on ``sys.path``, ``cpu`` and ``use_pytorch_cross_attention``
set before any other comfy import, ``torch.set_num_threads($TOKENFLOW_TEST_THREADS, default 1)``, and
the repo imported as ``comfyui_tokenflow``, the pack's one name outside ComfyUI
(``devkit/pack_import.py``; its ``__init__`` imports nothing): tests import what they use explicitly,
e.g. ``from comfyui_tokenflow.nodes import sampler_nodes``. The fixture ``tokenflow_package`` also
imports the node modules when a test needs the full package. ``devkit/`` is on ``sys.path`` for
``tiny_models``.

Model fixtures are session-scoped and shared: ``clone()`` a ModelPatcher before patching it.
"""
from __future__ import annotations

import os
import random
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

if str(Path(__file__).resolve().parent) not in sys.path:  # pytest's default import mode puts it there already
    sys.path.insert(0, str(Path(__file__).resolve().parent))
_DEVKIT = str(Path(__file__).resolve().parents[1] / "devkit")
if _DEVKIT not in sys.path:
    sys.path.insert(1, _DEVKIT)
import host_bootstrap  # noqa: E402  (devkit/host_bootstrap.py)

REPO = host_bootstrap.REPO


def pytest_configure(config: pytest.Config) -> None:
    # The tiny models' ops are too small to gain from intra-op threads, and on a shared or busy
    # machine OpenMP threads spinning against each other made the suite several times slower.
    try:
        host_bootstrap.bootstrap(cpu=True, threads=int(os.environ.get("TOKENFLOW_TEST_THREADS", "1")))
    except host_bootstrap.HostBootstrapError as exc:
        raise pytest.UsageError(str(exc)) from None


@pytest.fixture(scope="session")
def tokenflow_package() -> ModuleType:
    """The full ``comfyui_tokenflow`` package, its node modules (and the V3 extension) imported."""
    return host_bootstrap.load_package()


@pytest.fixture(scope="session")
def video_file(tmp_path_factory) -> Path:
    """The short test clip of ``input_files.write_test_clip`` as an mp4 file, written once for the runner tests."""
    import input_files

    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    input_files.write_test_clip(path)
    return path


@pytest.fixture(autouse=True)
def _reset_seeds() -> None:
    """Every test starts from the same global RNG state."""
    import torch

    torch.manual_seed(0)
    random.seed(0)


@pytest.fixture(scope="session")
def tiny_sd15() -> Any:
    """Tiny SD1.x eps ModelPatcher (context_dim 32), seed 0. Shared: clone() before patching."""
    import tiny_models

    return tiny_models.make_unet_model("sd15", seed=0)


@pytest.fixture(scope="session")
def tiny_sd2v() -> Any:
    """Tiny SD2.x v-prediction ModelPatcher (context_dim 32), seed 0."""
    import tiny_models

    return tiny_models.make_unet_model("sd2v", seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl() -> Any:
    """Tiny SDXL eps ModelPatcher (context_dim 64, pooled 32, 70 transformer blocks), seed 0."""
    import tiny_models

    return tiny_models.make_unet_model("sdxl", seed=0)


@pytest.fixture(scope="session")
def tiny_vae() -> Any:
    """Tiny comfy.sd.VAE: 8x downscale, 4 latent channels (64x64 IMAGE <-> 8x8 latent)."""
    import tiny_models

    return tiny_models.make_vae(seed=0)


@pytest.fixture(scope="session")
def tiny_clip() -> Any:
    """Tiny SD1-style comfy.sd.CLIP whose cond width (32) matches ``tiny_sd15``."""
    import tiny_models

    return tiny_models.make_clip(seed=0)


@pytest.fixture(scope="session")
def tiny_controlnet() -> Any:
    """Tiny comfy.controlnet.ControlNet for ``tiny_sd15`` (hint: IMAGE, 8x the latent size)."""
    import tiny_models

    return tiny_models.make_controlnet("sd15", seed=0)


@pytest.fixture(scope="session")
def test_artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory for files worth looking at after a run: ``<repo>/test-artifacts`` (gitignored).

    ``$TOKENFLOW_TEST_ARTIFACTS`` overrides it; a read-only checkout falls back to a temp dir.
    """
    path = Path(os.environ.get("TOKENFLOW_TEST_ARTIFACTS") or REPO / "test-artifacts")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-probe"
        probe.touch()
        probe.unlink()
    except OSError:
        path = tmp_path_factory.mktemp("test-artifacts")
    return path


# -- the reliability tests (test_bad_inputs, test_interrupts, test_determinism, test_errors_in_pass) ------------

@pytest.fixture(scope="module")
def clip(tiny_sd15: Any, tiny_controlnet: Any) -> dict:
    """The reliability tests' 3-frame clip, its inversion, correspondences and tracked ControlNet conditioning
    (``tests/reliability_tools.py``); one per test module."""
    import reliability_tools

    return reliability_tools.make_clip(tiny_sd15, tiny_controlnet)


@pytest.fixture(scope="module")
def clean(tiny_sd15: Any, clip: dict) -> dict:
    """Results of clean runs of the reliability stages on ``clip``: the reference for every rerun after an interrupt
    or a failure."""
    import reliability_tools

    return reliability_tools.clean_results(tiny_sd15, clip)
