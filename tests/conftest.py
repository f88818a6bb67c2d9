"""Test bootstrap: a real ComfyUI host on CPU, this repo as the package ``comfyui_tokenflow``, tiny models.

Order matters and is done in :func:`pytest_configure`, before any test module is imported:

1. ``$COMFYUI_PATH`` (default ``~/comfy/ComfyUI``) goes first on ``sys.path`` and the repo root
   is taken off it: ComfyUI has its own top-level ``nodes`` module, and so do we (``nodes/``).
2. ``comfy.cli_args.args`` gets ``cpu = True`` and ``use_pytorch_cross_attention = True`` BEFORE
   any other comfy module is imported, so ``comfy.model_management`` picks the CPU and attention runs
   through PyTorch SDPA.
3. ``torch.set_num_threads($TOKENFLOW_TEST_THREADS, default 1)``.
4. The repo is registered as the package ``comfyui_tokenflow`` WITHOUT running its ``__init__``
   (that imports every node module and the V3 extension): tests import what they use explicitly,
   e.g. ``from comfyui_tokenflow.tokenflow_ops import schedule`` or
   ``from comfyui_tokenflow.nodes import sampler_nodes``. :func:`load_tokenflow_package` runs the
   real ``__init__`` when a test needs the full package (fixture ``tokenflow_package``).

Model fixtures are session-scoped and shared: ``clone()`` a ModelPatcher before patching it.
"""
from __future__ import annotations

import importlib.util
import os
import random
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "comfyui_tokenflow"
DEFAULT_COMFYUI = Path.home() / "comfy" / "ComfyUI"


def _comfyui_path() -> Path:
    root = Path(os.environ.get("COMFYUI_PATH") or DEFAULT_COMFYUI).expanduser()
    if not (root / "comfy" / "model_patcher.py").is_file():
        raise pytest.UsageError(
            f"ComfyUI host not found at {root} (no comfy/model_patcher.py). Set COMFYUI_PATH to a ComfyUI "
            ">= 0.3.64 checkout, or clone one: git clone --depth 1 --branch v0.3.64 "
            f"https://github.com/comfyanonymous/ComfyUI {DEFAULT_COMFYUI}  (bash scripts/test.sh does this for you)."
        )
    return root.resolve()


def _put_host_first(root: Path) -> None:
    def is_repo(entry: str) -> bool:
        try:
            return Path(entry or os.getcwd()).resolve() == REPO
        except OSError:
            return False

    sys.path[:] = [p for p in sys.path if not is_repo(p) and p != str(root)]
    sys.path.insert(0, str(root))
    tests_dir = str(REPO / "tests")  # for `import tiny_models`
    if tests_dir not in sys.path:
        sys.path.insert(1, tests_dir)


def _configure_comfy() -> None:
    loaded = [m for m in sys.modules if m.startswith("comfy.") and m not in ("comfy.cli_args", "comfy.options")]
    if loaded:
        raise pytest.UsageError(f"comfy modules were imported before tests/conftest.py configured the CPU: {loaded[:5]}")
    from comfy.cli_args import args

    args.cpu = True
    args.use_pytorch_cross_attention = True
    # The tiny models' ops are too small to gain from intra-op threads, and on a shared or busy
    # machine OpenMP threads spinning against each other made the suite several times slower.
    import torch

    torch.set_num_threads(int(os.environ.get("TOKENFLOW_TEST_THREADS", "1")))


def _register_package() -> ModuleType:
    """``comfyui_tokenflow`` as a package object whose ``__path__`` is the repo; ``__init__`` not executed."""
    if PACKAGE in sys.modules:
        return sys.modules[PACKAGE]
    spec = importlib.util.spec_from_file_location(PACKAGE, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    assert spec is not None and spec.loader is not None
    package = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = package
    return package


def load_tokenflow_package() -> ModuleType:
    """Run the repo's real ``__init__`` on the registered package (imports every node module)."""
    package = sys.modules[PACKAGE]
    if not getattr(package, "_tokenflow_init_done", False):
        package.__spec__.loader.exec_module(package)
        package._tokenflow_init_done = True
    return package


def pytest_configure(config: pytest.Config) -> None:
    root = _comfyui_path()
    _put_host_first(root)
    _configure_comfy()
    _register_package()


@pytest.fixture(scope="session")
def tokenflow_package() -> ModuleType:
    """The full ``comfyui_tokenflow`` package, its ``__init__`` (node modules, extension) executed."""
    return load_tokenflow_package()


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
