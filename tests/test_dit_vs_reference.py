"""The pack's Flux / SD3 inversion and edit agree with an independent restatement of TokenFlow for joint attention.

tests/dit_reference.py shares no code with the pack. "Agree" is the method of
test_tokenflow_vs_official.py (tests/FP_THRESHOLDS.md lists every threshold):

- The models run in float64. What stays float32 is the host's and the products': a flow edit's
  sampling state is float32 whatever the model's dtype (the start latent is a float32 LATENT,
  ``BaseModel._apply_model`` returns ``model_output.float()``, CFG and the Euler step then run on
  float32 tensors), and so is the inversion's (it inverts float32 latents). The products are used
  as they are: the pack's edit reads them into its float32 state either way.
- Tolerance: the reference runs twice, plainly (float64 throughout) and as its float32 twin
  (``host_dtype``: that state and those casts in float32, with the host's expressions). Their
  difference, the SPREAD, is what the host's float32 rounding does to this model and input,
  measured at run time, with no floor. The pack rounds at the same points with its own float64
  values, so its distance from the plain reference is of the same size; SLACK bounds the ratio.
- Nearest-neighbour decisions: both sides' similarities are recorded; the pack's fields must be
  the reference's argmax everywhere (every step, attention, frame and keyframe slot), and every
  decision's top-1/top-2 margin must exceed MARGIN_FACTOR x the measured difference between the
  two sides' similarities (float64 rounding: the source branch's input is the same float32
  trajectory on both sides), so no decision is a tie that summation order could decide.
- The same tolerance function rejects the pack with one semantic change (rolled fields, no
  propagation, no PnP injection, PnP in one of the reference's two blocks, swapped blend weights,
  SD3.5's second attention not extended): test_parity_check_fails_on_a_semantic_error.
- Text-token queries attend as in plain sampling, in both passes:
  test_text_queries_attend_as_in_plain_sampling.
"""
from __future__ import annotations

import math

import pytest
import torch

import tiny_dit_models
from comfyui_tokenflow.engine.families import FLOW, registry
from comfyui_tokenflow.engine.patches import contract, dit
from comfyui_tokenflow.engine.plan.settings import EditSettings
from comfyui_tokenflow.engine.flow.edit import run_edit as run_flow_edit
from comfyui_tokenflow.engine.flow.invert import run_inversion as run_flow_inversion
from comfyui_tokenflow.tokenflow_ops import keyframes, schedule
from comfyui_tokenflow.tokenflow_ops.flow_inversion import sigma_at
from dit_reference import reference_flow_edit, reference_flow_inversion
from parity_precision import FLOAT64_EPS, MARGIN_FACTOR, SLACK, assert_within_precision, report

STEPS, INVERSION_STEPS, N, GROUP = 4, 8, 5, 2
@pytest.fixture(scope="module", params=list(tiny_dit_models.DIT_FAMILIES))
def setup(request):
    world = tiny_dit_models.dit_world(request.param, N)
    model = world["model"]
    inversion = run_flow_inversion(model, {"samples": world["frames"]}, world["src"], STEPS, INVERSION_STEPS)
    layout = registry.check_supported(model, sampling=FLOW)
    table = model.get_model_object("model_sampling").sigmas.float().cpu()
    return dict(world, inversion=inversion, layout=layout, table=table, references={})


def test_inversion_matches_the_independent_restatement(setup):
    model, inv, table = setup["model"], setup["inversion"], setup["table"]
    inversion_ts = schedule.inversion_timesteps(INVERSION_STEPS)
    assert inv.trajectory.dtype == inv.x0.dtype == inv.inverted.dtype == torch.float32  # the product's dtype
    x0 = model.model.process_latent_in(setup["frames"].float())
    assert torch.equal(inv.x0, x0) and inv.inverted_timestep == inversion_ts[-1]
    kwargs = dict(x0=x0, cond=setup["src"], levels=[sigma_at(table, t) for t in inversion_ts])
    path = reference_flow_inversion(model, **kwargs)
    path32 = reference_flow_inversion(model, host_dtype=torch.float32, **kwargs)
    for k, t in enumerate(inv.timesteps):
        i = inversion_ts.index(t)
        assert_within_precision(inv.trajectory[k], path[i], path32[i])
    assert_within_precision(inv.inverted, path[-1], path32[-1])


# -- the edit -----------------------------------------------------------------------------------------------

def _edit_timesteps(editor: str) -> list[int]:
    return schedule.sdedit_timesteps(STEPS, 0.9) if editor == "sdedit" else schedule.editing_timesteps(STEPS)


def _two_pnp_blocks(layout) -> tuple[set, str]:
    """The default PnP attentions plus every attention of the first block: the set and its pnp_attention_blocks text."""
    first, last = layout.transformer_blocks[0], layout.default_pnp_attention[-1]
    assert first[:2] != last[:2]
    chosen = {b for b in layout.transformer_blocks if b[:2] == first[:2]} | set(layout.default_pnp_attention)
    return chosen, f"{first[0]}:{first[1]}, {last[0]}:{last[1]}"


def _references(setup, editor: str, pnp_attn_t: float, pnp: set | None = None) -> dict:
    """The plain reference, its float32 twin and both runs' nearest-neighbour similarities (cached per setting)."""
    pnp = set(setup["layout"].default_pnp_attention) if pnp is None else pnp
    key = (editor, pnp_attn_t, tuple(sorted(pnp)))
    if key not in setup["references"]:
        model, inv, layout, table = setup["model"], setup["inversion"], setup["layout"], setup["table"]
        timesteps = _edit_timesteps(editor)
        kwargs = dict(
            x0=inv.x0, inverted=inv.inverted, sigma_inv=sigma_at(table, inv.inverted_timestep),
            trajectory={t: inv.trajectory[k] for k, t in enumerate(inv.timesteps)}, timesteps=timesteps,
            sigmas={t: sigma_at(table, t) for t in inv.timesteps}, src=setup["src"], pos=setup["pos"],
            neg=setup["neg"], cfg=setup["cfg"], keyframe_plan=keyframes.keyframe_plan(N, GROUP, len(timesteps), 1),
            group=GROUP, n_img=layout.adapter.image_token_count(model, inv.latent_shape),
            blocks=list(dict.fromkeys((b[0], b[1]) for b in layout.transformer_blocks)),
            pnp=pnp, pnp_t=pnp_attn_t if editor == "pnp" else 0.0,
            injects=layout.adapter.pnp_injects)
        records = {"plain": {}, "float32": {}}
        ref = reference_flow_edit(model, record=records["plain"], **kwargs)
        ref32 = reference_flow_edit(model, host_dtype=torch.float32, record=records["float32"], **kwargs)
        setup["references"][key] = dict(ref=ref, ref32=ref32, records=records)
    return setup["references"][key]


def _current_attention(monkeypatch) -> dict:
    """Wraps the attention override the pack installs: ``current`` names the attention call being run."""
    current: dict = {}
    original = dit.dit_attention_override

    def override(func, q, k, v, heads, *args, **kwargs):
        options = kwargs.get("transformer_options") or {}
        ctx = options.get(contract.KEY)
        tag = ctx.dit_block if ctx is not None else None
        if tag is not None:
            current.update(block=(*tag["block"], tag["calls"]), sigma=float(options["sigmas"][0]))
        return original(func, q, k, v, heads, *args, **kwargs)

    monkeypatch.setattr(dit, "dit_attention_override", override)
    return current


def _record_pack_fields(monkeypatch, levels: list[float]) -> list[dict]:
    """Every nearest-neighbour search of the pack: its fields and the tokens and keys it decided them from."""
    current = _current_attention(monkeypatch)
    original = dit.frame_fields
    records: list[dict] = []

    def frame_fields(tokens, frames, keyframe_tokens, pairing, *args, **kwargs):
        fields = original(tokens, frames, keyframe_tokens, pairing, *args, **kwargs)
        step = min(range(len(levels)), key=lambda i: abs(levels[i] - current["sigma"]))
        units = tokens.double() / tokens.double().norm(dim=-1, keepdim=True)
        records.append(dict(step=step, block=current["block"], frames=frames.tolist(), fields=fields.clone(),
                            units=units, keys=keyframe_tokens.double().clone(), slots=pairing.slots[frames].clone()))
        return fields

    monkeypatch.setattr(dit, "frame_fields", frame_fields)
    return records


def _check_decisions(pack_records: list[dict], references: dict, n_attentions: int, steps: int) -> float:
    """The pack's fields are the reference's argmax, every margin far above the two sides' rounding difference."""
    ref, twin = references["records"]["plain"], references["records"]["float32"]
    assert ref.keys() == twin.keys() and all(torch.equal(ref[k].argmax(-1), twin[k].argmax(-1)) for k in ref), \
        "the float32 twin decided a nearest neighbour differently: its spread would include a flip"
    seen = set()
    margin, rounding = float("inf"), 0.0
    for r in pack_records:
        for i, frame in enumerate(r["frames"]):
            for slot in (0, 1):
                key = (r["step"], r["block"], frame, slot)
                sim = ref[key]
                ours = r["units"][i] @ r["keys"][r["slots"][i, slot]].T
                assert torch.equal(r["fields"][i, slot], sim.argmax(-1)), f"nearest neighbours differ at {key}"
                rounding = max(rounding, (ours - sim).abs().max().item())
                top = sim.topk(2, dim=-1).values
                margin = min(margin, (top[:, 0] - top[:, 1]).min().item())
                seen.add(key)
    assert seen == set(ref), f"{len(set(ref) - seen)} reference decisions have no counterpart in the pack"
    assert len({k[:2] for k in seen}) == n_attentions * steps
    ratio = margin / max(rounding, FLOAT64_EPS)
    assert ratio >= MARGIN_FACTOR, (f"a nearest-neighbour near-tie: margin {margin:.3g} vs similarity rounding "
                                    f"{rounding:.3g}; rounding could decide it (choose another seed or input)")
    report(f"margin={margin:.3g} rounding={rounding:.3g} ratio={ratio:.3g}")
    return ratio


def _run_pack(setup, editor: str, pnp_attn_t: float, **settings) -> torch.Tensor:
    model = setup["model"]
    out = run_flow_edit(model, setup["pos"], setup["neg"], setup["inversion"], EditSettings.of(
        editor=editor, cfg=setup["cfg"], batch_size=GROUP, seed=1, pnp_attn_t=pnp_attn_t, **settings))["samples"]
    ours = model.model.process_latent_in(out).double()
    assert torch.isfinite(ours).all()
    return ours


def _levels(setup, editor: str) -> list[float]:
    return [sigma_at(setup["table"], t) for t in _edit_timesteps(editor)]


@pytest.mark.parametrize("editor,pnp_attn_t,blocks", [("pnp", 0.5, "default"), ("pnp", 0.0, "default"),
                                                      ("pnp", 1.0, "default"), ("pnp", 0.5, "two"),
                                                      ("sdedit", 0.0, "default")])
def test_edit_matches_the_independent_restatement(setup, editor, pnp_attn_t, blocks, monkeypatch):
    """Same inversion products and keyframe plan, fields on the fly: the reference's latents and fields."""
    pnp, settings = None, {}
    if blocks == "two":  # PnP in the default attention and in the first block's
        pnp, settings["pnp_attention_blocks"] = _two_pnp_blocks(setup["layout"])
    pack_records = _record_pack_fields(monkeypatch, _levels(setup, editor))
    ours = _run_pack(setup, editor, pnp_attn_t, **settings)
    monkeypatch.undo()
    references = _references(setup, editor, pnp_attn_t, pnp)
    _check_decisions(pack_records, references, len(setup["layout"].transformer_blocks), len(_edit_timesteps(editor)))
    assert_within_precision(ours, references["ref"], references["ref32"])


# -- the same check fails on semantic errors ------------------------------------------------------------------

MUTATIONS = ["rolled fields", "no propagation", "no PnP injection", "no PnP injection in one of two blocks",
             "blend weights", "second attention not extended"]


def _mutate(setup, mutation: str, monkeypatch) -> dict:
    """Installs one semantic change into the pack; returns the edit settings it needs."""
    if mutation == "rolled fields":
        original_fields = dit.frame_fields

        def rolled(tokens, *args, **kwargs):
            return (original_fields(tokens, *args, **kwargs) + 1) % tokens.shape[1]  # every token takes its neighbour's
        monkeypatch.setattr(dit, "frame_fields", rolled)
    elif mutation == "no propagation":
        original = dit.dit_attention_override

        def plain_frames(func, q, k, v, heads, *args, **kwargs):
            ctx = (kwargs.get("transformer_options") or {}).get(contract.KEY)
            if ctx is not None and ctx.phase is contract.Phase.FRAMES:
                ctx.dit_block["reached"] = True  # inside TokenFlow's override, as a wrong kernel there would be
                return func(q, k, v, heads, *args, **kwargs)  # every frame attends to itself alone
            return original(func, q, k, v, heads, *args, **kwargs)
        monkeypatch.setattr(dit, "dit_attention_override", plain_frames)
    elif mutation == "blend weights":
        original_weights = contract.blend_weights
        monkeypatch.setattr(contract, "blend_weights",
                            lambda weights, dtype: original_weights(weights.flip(-1), dtype))  # w <-> 1 - w
    elif mutation == "second attention not extended":
        _plain_keyframes_in_second_attention(monkeypatch)
    elif mutation == "no PnP injection":  # in the default attentions (one block in the tiny models)
        return {"pnp_attention_blocks": "none"}
    else:  # the reference injects in two blocks (_two_pnp_blocks), the pack in the first only
        first = setup["layout"].transformer_blocks[0]
        return {"pnp_attention_blocks": f"{first[0]}:{first[1]}"}
    return {}


def _plain_keyframes_in_second_attention(monkeypatch) -> None:
    """SD3.5's image-only second attention (call 1 of a block) attends plainly in the keyframe pass."""
    current = _current_attention(monkeypatch)
    wrapped = dit.dit_attention_override

    def override(func, q, k, v, heads, *args, **kwargs):
        out = wrapped(func, q, k, v, heads, *args, **kwargs)
        options = kwargs.get("transformer_options") or {}
        ctx = options.get(contract.KEY)
        if ctx is None or ctx.phase is not contract.Phase.KEYFRAMES or current.get("block", (0, 0, 0))[2] != 1:
            return out
        plain = func(q, k, v, heads, *args, **kwargs)
        segments = ctx.bank.keyframe_outputs[current["block"]]
        segments[-1] = (plain[:, -segments[-1][0].shape[1]:], segments[-1][1])  # what propagation gathers
        return plain
    monkeypatch.setattr(dit, "dit_attention_override", override)


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_parity_check_fails_on_a_semantic_error(setup, mutation, monkeypatch):
    """The unchanged tolerance function rejects the pack with one semantic change against the unchanged reference."""
    if mutation == "second attention not extended" and not any(b[2] == 1 for b in setup["layout"].transformer_blocks):
        pytest.skip("this family has no second attention in a block (SD3.5 has)")
    settings = _mutate(setup, mutation, monkeypatch)
    ours = _run_pack(setup, "pnp", 0.5, **settings)
    monkeypatch.undo()
    two = mutation == "no PnP injection in one of two blocks"
    references = _references(setup, "pnp", 0.5, _two_pnp_blocks(setup["layout"])[0] if two else None)
    with pytest.raises(AssertionError, match="float32 rounding spread"):
        assert_within_precision(ours, references["ref"], references["ref32"])


# -- text-token queries -------------------------------------------------------------------------------------

def _explicit_attention(q, k, v, heads: int, skip_reshape: bool) -> torch.Tensor:
    """Matmul-softmax attention of one call, float64, (B, T, H*D) out: the host kernel's rounding is measured on it."""
    q, k, v = (t if skip_reshape else t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
    weights = torch.softmax(q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1]), -1)
    return (weights @ v.double()).transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def test_text_queries_attend_as_in_plain_sampling(setup, monkeypatch):
    """In every attention call of both passes (PnP on in every step), the text-token rows of the pack's output are
    plain attention of the call's own tokens (each frame's own text and image tokens); its image rows are not.

    Bound: SLACK x the host kernel's own float64 rounding on these calls (|kernel - matmul softmax|, measured
    here); the image rows, which TokenFlow changes, must exceed it by far, so the comparison can fail."""
    calls = []
    original = dit.dit_attention_override

    def override(func, q, k, v, heads, *args, **kwargs):
        out = original(func, q, k, v, heads, *args, **kwargs)
        options = kwargs.get("transformer_options") or {}
        ctx = options.get(contract.KEY)
        if ctx is not None and ctx.dit_block is not None:
            plain = func(q, k, v, heads, *args, **kwargs)
            explicit = _explicit_attention(q, k, v, heads, bool(kwargs.get("skip_reshape", False)))
            n_txt = out.shape[1] - int(ctx.image_tokens)
            calls.append(dict(phase=ctx.phase, n_txt=n_txt, text=(out - plain)[:, :n_txt].abs().max().item() if n_txt
                              else 0.0, image=(out - plain)[:, n_txt:].abs().max().item(),
                              kernel=(plain.double() - explicit).abs().max().item()))
        return out

    monkeypatch.setattr(dit, "dit_attention_override", override)
    _run_pack(setup, "pnp", 1.0)
    monkeypatch.undo()
    phases = {c["phase"] for c in calls if c["n_txt"] > 0}
    assert phases == {contract.Phase.KEYFRAMES, contract.Phase.FRAMES}
    kernel = max(c["kernel"] for c in calls)
    assert kernel > 0, "the host kernel equals the matmul softmax: the rounding bound measures nothing"
    text = max(c["text"] for c in calls)
    report(f"text rows vs plain: {text:.3g} (kernel rounding {kernel:.3g}, ratio {text / kernel:.3g})")
    assert text <= SLACK * kernel, f"text-token queries differ from plain attention by {text:.3g} > {SLACK} x {kernel:.3g}"
    for phase in phases:
        image = max(c["image"] for c in calls if c["phase"] is phase)
        report(f"{phase.value} image rows vs plain: {image:.3g} ({image / kernel:.3g} x the kernel rounding)")
        assert image > 1e3 * SLACK * kernel, f"{phase}: image rows are plain attention ({image:.3g}); the check sees nothing"
