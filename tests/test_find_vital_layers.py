"""scripts/find_vital_layers.py on the tiny Flux and SD3: a bypassed block is skipped, the ranking is deterministic and
its printed list is a pnp_attention_blocks value naming those blocks (image keys and values)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tiny_dit_models
import tiny_models
from comfyui_tokenflow.engine.families import FLOW
from comfyui_tokenflow.engine.families.block_lists import parse_attention_injection
from comfyui_tokenflow.engine.families.registry import check_supported

REPO = Path(__file__).resolve().parents[1]
STEPS = 2


@pytest.fixture(scope="module")
def script():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import find_vital_layers
    finally:
        sys.path.remove(str(REPO / "scripts"))
    return find_vital_layers


@pytest.fixture(scope="module", params=["flux", "sd3"])
def world(request):
    make, conditioning, cfg = tiny_dit_models.DIT_FAMILIES[request.param]
    model = make(seed=0)
    renders = [(conditioning(seed=s), conditioning(seed=9), seed) for s, seed in ((1, 0), (2, 1))]
    return dict(family=request.param, model=model, renders=renders, cfg=cfg, latent=torch.zeros(1, 16, 8, 8),
                layout=check_supported(model, sampling=FLOW))


def _without_block(world, kind: str, index: int):
    """The same tiny model built again (same seed, same weights), its ``kind`` block ``index`` removed from its list."""
    model = tiny_dit_models.DIT_FAMILIES[world["family"]][0](seed=0)
    dm = model.model.diffusion_model
    blocks = dm.joint_blocks if hasattr(dm, "joint_blocks") else \
        dm.double_blocks if kind == "double_block" else dm.single_blocks
    del blocks[index]
    return model


def _render(script, world, model, render=0):
    pos, neg, seed = world["renders"][render]
    return script.render(model, pos, neg, world["cfg"], STEPS, seed, world["latent"])


def test_a_bypassed_block_is_skipped(script, world):
    blocks = [("double_block", 0), ("single_block", 1)] if world["family"] == "flux" else [("double_block", 0)]
    whole = _render(script, world, world["model"])
    for block in blocks:
        bypassed = _render(script, world, script.bypassed(world["model"], block))
        assert torch.equal(bypassed, _render(script, world, _without_block(world, *block))), block
        assert not torch.equal(bypassed, whole), block
    assert torch.equal(_render(script, world, world["model"]), whole)  # the input model is untouched


def test_the_ranking_is_deterministic_and_least_similar_first(script, world):
    blocks = list(dict.fromkeys(b[:2] for b in world["layout"].transformer_blocks))
    rank = [script.rank_blocks(world["model"], world["renders"], blocks, STEPS, world["cfg"], world["latent"])
            for _ in range(2)]
    assert rank[0] == rank[1]
    assert sorted(b for b, _ in rank[0]) == sorted(blocks)
    scores = [score for _, score in rank[0]]
    assert scores == sorted(scores) and all(score < 1 - 1e-6 for score in scores)
    # A score is the mean correlation of the bypassed renders with the whole model's.
    block, score = rank[0][0]
    mean = sum(script.pixel_similarity(_render(script, world, script.bypassed(world["model"], block), i),
                                       _render(script, world, world["model"], i)) for i in range(2)) / 2
    assert score == pytest.approx(mean, rel=1e-12)


def test_the_printed_list_is_a_pnp_attention_blocks_value(script, world):
    blocks = list(dict.fromkeys(b[:2] for b in world["layout"].transformer_blocks))
    ranking = script.rank_blocks(world["model"], world["renders"][:1], blocks, STEPS, world["cfg"], world["latent"])
    vital = [b for b, _ in ranking[:script.vital_count(len(blocks), 2)]]
    parsed = parse_attention_injection(script.as_block_list(vital), world["layout"])
    assert parsed == {b: "kv" for b in world["layout"].transformer_blocks if b[:2] in vital}  # every call of a block


def test_the_count_defaults_to_stable_flows_share(script):
    assert script.vital_count(57, 0) == 9 and script.vital_count(4, 0) == 1 and script.vital_count(4, 3) == 3


def test_dinov2_similarity_runs_on_a_local_model_folder(script, tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             patch_size=14, image_size=224)).save_pretrained(tmp_path)
    look, similarity = script._dinov2_look(str(tmp_path), tiny_models.make_vae())
    a, b = (torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(s)) for s in (1, 2))
    assert similarity(look(a), look(a)) == pytest.approx(1.0, abs=1e-12)
    assert similarity(look(a), look(b)) < 1 - 1e-6


def test_help_states_the_cost_estimate_and_bad_flags_are_refused():
    run = [sys.executable, str(REPO / "scripts" / "find_vital_layers.py")]
    out = subprocess.run(run + ["--help"], capture_output=True, text=True, check=True).stdout
    assert "6,960" in out and "ESTIMATE" in out and "24 GB" in out
    bad = subprocess.run(run + ["--checkpoint", "x.safetensors", "--size", "500"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--size 500: take a multiple of 16" in bad.stderr
