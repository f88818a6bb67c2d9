"""Inversion and editing agree with an independent restatement of the official code.

What "agree" means, and why it holds on any CPU (tests/FP_THRESHOLDS.md lists every threshold):

- The UNet runs in float64 here (in float32 the tiny UNet's 1x1-pixel GroupNorms turn
  batch-layout rounding into visible differences). The edit is fed the pack's own inversion
  products WIDENED to float64 (same values): ComfyUI's sampling state takes the latents' dtype,
  so the pack's edit then runs in float64 too, and what is left in float32 is the host's, not
  the algorithm's: ``BaseModel._apply_model`` returns ``model_output.float()`` and
  ``CFGGuider.sample`` returns float32 samples (plus the pack sampler's float32 sigma ratio).
  With float32 products (the old set-up) the source branch's UNet input was rounded to float32
  twice in the pack (trajectory / sqrt(abar), then ComfyUI's c_in) and not in the reference:
  the nearest-neighbour similarities of the two sides then differed by up to 4.9e-6 while the
  smallest top-1/top-2 margin was 8.6e-6 (a ratio of 1.75: one flip away from a failure), and
  the edit latents carried the float32 rounding of the state at every step, which the old
  spread (a 1e-7 perturbation of x0 only) did not measure: the sdedit case failed by 28x that
  spread on an AVX-512 EPYC, pnp-0.0-0.8 with ATEN_CPU_CAPABILITY=default.
- Tolerance: the reference is run twice, plainly and as its float32 twin (``host_dtype``: it
  rounds to float32 exactly where the host does). Their difference, the SPREAD, is what that
  float32 rounding does to this model and input, measured at test run time. The pack rounds at
  the same points with its own (slightly different) float64 values, so its distance from the
  plain reference is of the same size (measured: 0.9-1.3x the spread); SLACK bounds that ratio.
  A semantic difference (another field, a dropped injection block, other blend weights) is
  far larger: the mutation tests below prove the same check fails for each.
- Nearest-neighbour decisions: both sides' similarities are recorded; the pack's fields must be
  the reference's argmax everywhere, and every decision's top-1/top-2 margin must exceed
  MARGIN_FACTOR x the measured difference between the two sides' similarities (float64
  rounding, about 1e-13 against margins of about 1e-5), so no decision is a tie that
  summation order could decide.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from comfyui_tokenflow.engine.families import registry
from comfyui_tokenflow.engine.patches import contract, unet
from comfyui_tokenflow.tokenflow_ops import keyframes, schedule
from official_reference import reference_edit, reference_inversion
from parity_precision import FLOAT64_EPS, MARGIN_FACTOR, assert_within_precision, report
from tokenflow_helpers import INVERSION_STEPS, STEPS, conds, double, edit, float64_copy, invert, random_latent

def _float64_products(inversion):
    """The pack's inversion with its float32 latents widened to float64 (identical values)."""
    return dataclasses.replace(inversion, trajectory=inversion.trajectory.double(), x0=inversion.x0.double(),
                               inverted=inversion.inverted.double())


@pytest.fixture(scope="module")
def setup(tiny_sd15):
    model = float64_copy(tiny_sd15)
    src, pos, neg = (double(c) for c in conds(model))
    latent = random_latent(5)
    inversion = invert(model, latent, src)
    unet = model.model.diffusion_model
    sigmas = model.get_model_object("model_sampling").sigmas
    return dict(model=model, src=src, pos=pos, neg=neg, inversion=inversion, unet=unet, sigmas=sigmas,
                x0=model.model.process_latent_in(latent["samples"]).double(), layout=registry.check_supported(model),
                references={})


def test_inversion_follows_the_spec_formula(setup):
    inv, sigmas = setup["inversion"], setup["sigmas"]
    assert inv.timesteps == schedule.editing_timesteps(STEPS) == [801, 601, 401, 201, 1]
    assert torch.equal(inv.sigmas[:-1], sigmas[inv.timesteps].float()) and inv.sigmas[-1] == sigmas[0]
    assert inv.trajectory.dtype == inv.x0.dtype == inv.inverted.dtype == torch.float32  # the product's dtype
    keep = set(inv.timesteps)
    args = (setup["unet"], sigmas, setup["x0"], setup["src"][0][0], INVERSION_STEPS, keep)
    saved, final, final_t = reference_inversion(*args)
    saved32, final32, _ = reference_inversion(*args, host_dtype=torch.float32)  # the pack inverts in float32
    assert inv.inverted_timestep == final_t == 901
    torch.testing.assert_close(inv.x0.double(), setup["x0"])
    for k, t in enumerate(inv.timesteps):
        assert_within_precision(inv.trajectory[k], saved[t], saved32[t], "official")
    assert_within_precision(inv.inverted, final, final32, "official")


# -- the edit -----------------------------------------------------------------------------------------------

def _edit_timesteps(editor: str) -> list[int]:
    return schedule.sdedit_timesteps(STEPS, 0.9) if editor == "sdedit" else schedule.editing_timesteps(STEPS)


def _references(setup, editor: str, pnp_attn_t: float, pnp_f_t: float) -> dict:
    """The plain reference, its float32 twin and the plain run's nearest-neighbour records (cached per setting)."""
    key = (editor, pnp_attn_t, pnp_f_t)
    if key not in setup["references"]:
        layout, inv = setup["layout"], _float64_products(setup["inversion"])
        plan = keyframes.keyframe_plan(5, 2, len(_edit_timesteps(editor)), 1)
        saved = {t: inv.trajectory[k] for k, t in enumerate(inv.timesteps)}
        ref_editor = "pnp" if editor != "sdedit" else "sdedit"
        attn_t, f_t = (pnp_attn_t, pnp_f_t) if editor == "pnp" else (0.0, 0.0)
        records = {"plain": [], "float32": []}
        runs = {name: reference_edit(setup["unet"], setup["sigmas"], layout.transformer_blocks, inv.x0, saved,
                                     inv.inverted, inv.inverted_timestep, setup["src"][0][0], setup["pos"][0][0],
                                     setup["neg"][0][0], plan, steps=STEPS, editor=ref_editor, batch_size=2,
                                     pnp_blocks=layout.default_pnp_attention, pnp_attn_t=attn_t, pnp_f_t=f_t,
                                     record=records[name], host_dtype=dtype)
                for name, dtype in (("plain", None), ("float32", torch.float32))}
        setup["references"][key] = dict(ref=runs["plain"], ref32=runs["float32"], records=records)
    return setup["references"][key]


def _record_pack_fields(monkeypatch, sigmas: torch.Tensor) -> list[dict]:
    """Wraps the pack's attn1 patch to record, per propagation call and block, its fields and the similarities
    it decided them from (its own source tokens against its own keyframe tokens)."""
    original = unet.tokenflow_attn1_patch
    records: list[dict] = []

    def recording(n, context, value, extra):
        out = original(n, context, value, extra)
        ctx = extra.get(contract.KEY)
        if ctx is not None and ctx.phase is contract.Phase.FRAMES:
            block = (extra["block"][0], int(extra["block"][1]), int(extra.get("block_index", 0)))
            src, _ = ctx.roles(extra)
            if src is not None and block in ctx.bank.fields:  # computed on the fly in this call
                tokens = n.chunk(len(extra.get("cond_or_uncond", [0])))[src]
                t = int((sigmas.double() - float(extra["sigmas"][0])).abs().argmin())
                records.append(dict(t=t, block=block, frames=ctx.frames.tolist(), fields=ctx.bank.fields[block].clone(),
                                    tokens=tokens / tokens.norm(dim=-1, keepdim=True),
                                    keys=ctx.bank.keyframe_tokens[block].clone(),
                                    slots=ctx.pairing.slots[ctx.frames].clone()))
        return out

    monkeypatch.setattr(unet, "tokenflow_attn1_patch", recording)
    return records


def _decisions(records: list[dict]) -> dict:
    """Reference records as {(t, block, frame, slot): (N, M) similarity rows}; slot 0: own keyframe, 1: previous."""
    out = {}
    for r in records:
        for slot, sim in enumerate(r["sims"]):
            rows = sim.view(r["frames"], -1, sim.shape[-1])
            for j in range(r["frames"]):
                out[(r["t"], r["block"], 2 * r["batch"] + j, slot)] = rows[j]
    return out


def _check_decisions(pack_records: list[dict], references: dict, n_blocks: int, steps: int) -> tuple[float, float]:
    """The pack's fields are the reference's argmax, every margin far above the two sides' rounding difference.

    Returns (smallest margin, largest |similarity ours - reference|)."""
    ref = _decisions(references["records"]["plain"])
    twin = _decisions(references["records"]["float32"])
    assert ref.keys() == twin.keys() and all(torch.equal(ref[k].argmax(-1), twin[k].argmax(-1)) for k in ref), \
        "the float32 twin decided a nearest neighbour differently: its spread would include a flip"
    seen = set()
    margin, rounding = float("inf"), 0.0
    for r in pack_records:
        for i, frame in enumerate(r["frames"]):
            for slot in (0, 1):
                key = (r["t"], r["block"], frame, slot)
                if key not in ref:  # the first group has one keyframe: its second slot repeats the first
                    continue
                sim = ref[key]
                ours = r["tokens"][i] @ r["keys"][r["slots"][i, slot]].T
                assert torch.equal(r["fields"][i, slot], sim.argmax(-1)), f"nearest neighbours differ at {key}"
                rounding = max(rounding, (ours - sim).abs().max().item())
                if sim.shape[-1] > 1:
                    top = sim.topk(2, dim=-1).values
                    margin = min(margin, (top[:, 0] - top[:, 1]).min().item())
                seen.add(key)
    assert seen == set(ref), f"{len(set(ref) - seen)} reference decisions have no counterpart in the pack"
    assert len({k[:2] for k in seen}) == n_blocks * steps
    assert margin >= MARGIN_FACTOR * max(rounding, FLOAT64_EPS), (
        f"a nearest-neighbour near-tie: margin {margin:.3g} vs similarity rounding {rounding:.3g}; "
        "rounding could decide it (choose another seed or input)")
    report(f"margin={margin:.3g} rounding={rounding:.3g} ratio={margin / max(rounding, FLOAT64_EPS):.3g}")
    return margin, rounding


def _run_pack(setup, editor, pnp_attn_t, pnp_f_t, **settings):
    out = edit(setup["model"], setup["pos"], setup["neg"], _float64_products(setup["inversion"]), editor=editor,
               batch_size=2, seed=1, pnp_attn_t=pnp_attn_t, pnp_f_t=pnp_f_t, **settings)
    ours = setup["model"].model.process_latent_in(out.double())
    assert torch.isfinite(ours).all()
    return ours


@pytest.mark.parametrize("editor,pnp_attn_t,pnp_f_t", [
    ("pnp", 0.5, 0.8), ("pnp", 0.5, 0.0), ("pnp", 0.0, 0.8), ("sdedit", 0.5, 0.8), ("controlnet", 0.5, 0.8)])
def test_edit_matches_official_restatement(setup, editor, pnp_attn_t, pnp_f_t, monkeypatch):
    """Same inversion products and keyframe plan in on-the-fly mode: the official loop's latents and fields."""
    pack_records = _record_pack_fields(monkeypatch, setup["sigmas"])
    ours = _run_pack(setup, editor, pnp_attn_t, pnp_f_t)
    monkeypatch.undo()
    references = _references(setup, editor, pnp_attn_t, pnp_f_t)
    _check_decisions(pack_records, references, len(setup["layout"].transformer_blocks), len(_edit_timesteps(editor)))
    assert_within_precision(ours, references["ref"], references["ref32"], "official")


# -- the same check fails on semantic errors ------------------------------------------------------------------

def _rolled_fields(original):
    def frame_fields(*args, **kwargs):
        fields = original(*args, **kwargs)
        return (fields + 1) % args[0].shape[1]  # every token takes its neighbour's match
    return frame_fields


def _rolled_fields_in(original, block):
    def tokenflow_attn1_patch(n, context, value, extra):
        out = original(n, context, value, extra)
        ctx = extra.get(contract.KEY)
        key = (extra["block"][0], int(extra["block"][1]), int(extra.get("block_index", 0)))
        if ctx is not None and ctx.phase is contract.Phase.FRAMES and key == block and block in ctx.bank.fields:
            fields = ctx.bank.fields[block]
            ctx.bank.fields[block] = (fields + 1) % fields.shape[-1]  # this block only
        return out
    return tokenflow_attn1_patch


def _swapped_weights(original):
    def blend_weights(weights, dtype):
        return original(weights.flip(-1), dtype)  # w <-> 1 - w (frames with one keyframe keep theirs: same row twice)
    return blend_weights


@pytest.mark.parametrize("mutation", ["propagation", "propagation in the last block", "one PnP attention block",
                                      "blend weights"])
def test_parity_check_fails_on_a_semantic_error(setup, mutation, monkeypatch):
    """The unchanged tolerance function rejects the pack with one semantic change against the unchanged reference."""
    settings = {}
    if mutation == "propagation":
        monkeypatch.setattr(unet, "frame_fields", _rolled_fields(unet.frame_fields))
    elif mutation == "propagation in the last block":
        last = setup["layout"].transformer_blocks[-1]
        assert last == ("output", 11, 0)
        monkeypatch.setattr(unet, "tokenflow_attn1_patch",
                            _rolled_fields_in(unet.tokenflow_attn1_patch, last))
    elif mutation == "blend weights":
        monkeypatch.setattr(contract, "blend_weights", _swapped_weights(contract.blend_weights))
    else:  # the default output:4-11 less its last block
        assert setup["layout"].default_pnp_attention[-1] == ("output", 11, 0)
        settings["pnp_attention_blocks"] = "output:4-10"
    ours = _run_pack(setup, "pnp", 0.5, 0.8, **settings)
    monkeypatch.undo()
    references = _references(setup, "pnp", 0.5, 0.8)
    with pytest.raises(AssertionError, match="float32 rounding spread"):
        assert_within_precision(ours, references["ref"], references["ref32"], "official")
