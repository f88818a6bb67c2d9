"""What newer hosts exercise in the DiT path, checked on whichever host runs the suite.

- ``TorchCompileModel`` on v0.8.0 passes a ``guard_filter_fn`` that drops every guard on
  ``transformer_options``, where the DiT override reads the pass, its image-token count and the block tag.
  A compiled Flux edit under that filter (the core node's own, where the host has it; the same filter
  through ``set_torch_compile_wrapper`` on older hosts) must give the eager edit: the call key, passed
  outside ``transformer_options``, keeps a graph from being replayed for a call that branches otherwise.
  Recompiles are counted: one graph per distinct call key.
- Flux on v0.8.0 writes ``transformer_options["block_index"]`` per block (kernel nodes such as
  SageAttention3's read it): TokenFlow's block replacement must keep it in the options every attention
  call of the block sees, as in plain sampling.
- An attention override a node sets AFTER TokenFlow's (a kernel-swapping node applied to the Keyframe
  Joint Edit's model) that does not chain TokenFlow's would silently drop the extended attention; the
  block replacement sees no attention call reach TokenFlow and says so, naming the block.
- Block hooks read ``extra_options`` keys with ``.get()`` (later hosts leave some out): a self-attention
  patch call without a ``block`` key passes through outside TokenFlow's passes and is named inside them.
"""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import comfy_extras.nodes_torch_compile as core_compile
import tiny_dit_models
from comfy_api.torch_helpers import set_torch_compile_wrapper
from comfyui_tokenflow.engine.flow.edit import run_edit as run_flow_edit
from comfyui_tokenflow.engine.flow.invert import run_inversion as run_flow_inversion
from comfyui_tokenflow.engine.patches import contract
from comfyui_tokenflow.engine.plan.settings import EditSettings

OVERRIDE = "optimized_attention_override"
# float64 tiny Flux: compiled and eager differ by reordered float64 rounding only (measured below 1e-12 on
# outputs of scale ~1); a stale branch moves the result by more than 1e-2.
TOLERANCE = 1e-8


@pytest.fixture(scope="module")
def flux_world():
    world = tiny_dit_models.dit_world("flux", 3)
    world["inversion"] = run_flow_inversion(world["model"], {"samples": world["frames"]}, world["src"], 2, 4)
    world["settings"] = EditSettings.of(editor="pnp", cfg=world["cfg"], batch_size=2)
    world["eager"] = flux_edit(world, world["model"])
    return world


def flux_edit(world, model) -> torch.Tensor:
    return run_flow_edit(model, world["pos"], world["neg"], world["inversion"], world["settings"])["samples"]


def host_guard_filter():
    """The host's own filter (``skip_torch_compile_dict``, v0.8.0), else the same rule written here."""
    own = getattr(core_compile, "skip_torch_compile_dict", None)
    if own is not None:
        return own, True
    return (lambda entries: [("transformer_options" not in entry.name) for entry in entries]), False


def compiled_flux(model, backend: str = "eager"):
    guard_filter, from_host = host_guard_filter()
    if from_host:  # the core node as a user applies it
        return core_compile.TorchCompileModel.execute(model, backend).args[0]
    compiled = model.clone()
    set_torch_compile_wrapper(compiled, backend=backend, options={"guard_filter_fn": guard_filter})
    return compiled


def test_compiled_flux_edit_under_the_guard_filter_equals_eager(flux_world, monkeypatch):
    keys: set[str] = set()
    original = contract.PassContext.call_key

    def recording(self, options):
        keys.add(key := original(self, options))
        return key

    monkeypatch.setattr(contract.PassContext, "call_key", recording)
    compiled = compiled_flux(flux_world["model"])
    torch._dynamo.reset()
    counters.clear()
    try:
        out = flux_edit(flux_world, compiled)
        graphs = int(counters["stats"]["unique_graphs"])
        breaks = int(sum(counters["graph_break"].values()))
    finally:
        torch._dynamo.reset()
    difference = (out - flux_world["eager"]).abs().max().item()
    assert difference < TOLERANCE, f"compiled edit differs from eager by {difference:.3g}: a stale graph replayed"
    assert len(keys) >= 3  # keyframe and propagation passes, with and without injection
    # Every distinct call compiled once, none more (recompiles = graphs - 1; measured 4 keys, 4 graphs on both
    # hosts), and no graph break inside the blocks.
    assert graphs == len(keys), (graphs, sorted(keys))
    assert breaks == 0


class BlockIndexRecorder:
    """A pass-through override recording the ``block_index`` each attention call's options carry."""

    def __init__(self) -> None:
        self.seen: list[int | None] = []

    def __deepcopy__(self, memo: dict) -> "BlockIndexRecorder":
        return self

    def __call__(self, func, *args, **kwargs):
        self.seen.append((kwargs.get("transformer_options") or {}).get("block_index"))
        return func(*args, **kwargs)


def test_block_index_reaches_every_attention_call_as_in_plain_sampling(flux_world):
    import nodes

    recorder = BlockIndexRecorder()
    model = flux_world["model"].clone()
    model.model_options.setdefault("transformer_options", {})[OVERRIDE] = recorder
    latent = {"samples": flux_world["frames"][:1].float()}
    nodes.common_ksampler(model, 1, 1, 1.0, "euler", "simple", flux_world["pos"], flux_world["neg"], latent,
                          denoise=1.0)
    plain = set(recorder.seen)
    if plain == {None}:
        pytest.skip("this host's Flux writes no block_index")
    recorder.seen.clear()
    out = flux_edit(flux_world, model)
    assert torch.equal(out, flux_world["eager"])
    assert recorder.seen and set(recorder.seen) == plain, (sorted(plain, key=str), sorted(set(recorder.seen), key=str))


def test_an_override_set_after_tokenflows_that_drops_it_is_named(flux_world):
    """A node applied to the Keyframe Joint Edit's model that overwrites the override slot (no chaining)."""
    import nodes
    from comfyui_tokenflow.nodes.joint_edit_nodes import TokenFlowKeyframeJointEdit

    joint = TokenFlowKeyframeJointEdit.execute(flux_world["model"]).result[0]
    overwritten = joint.clone()

    def plain_kernel(func, *args, **kwargs):
        return func(*args, **kwargs)

    overwritten.model_options["transformer_options"][OVERRIDE] = plain_kernel
    batch = {"samples": flux_world["frames"].float()}
    with pytest.raises(RuntimeError, match=r"no attention of block (double|single)_block \d+ reached") as caught:
        nodes.common_ksampler(overwritten, 1, 1, 1.0, "euler", "simple", flux_world["pos"], flux_world["neg"],
                              batch, denoise=0.5)
    assert "\n" not in str(caught.value)
    # chained instead (the slot's previous override kept and called), the joint edit runs
    chained = joint.clone()
    kept = chained.model_options["transformer_options"][OVERRIDE]

    def chaining_kernel(func, *args, **kwargs):
        return kept(func, *args, **kwargs)

    chained.model_options["transformer_options"][OVERRIDE] = chaining_kernel
    nodes.common_ksampler(chained, 1, 1, 1.0, "euler", "simple", flux_world["pos"], flux_world["neg"], batch,
                          denoise=0.5)


def test_self_attention_patch_reads_optional_extra_options_with_get(tiny_sd15):
    """Outside a TokenFlow pass a call without ``block`` passes through; inside one it is named, not a KeyError."""
    from comfyui_tokenflow.engine.patches.unet import tokenflow_attn1_patch

    n = torch.randn(2, 4, 8)
    out = tokenflow_attn1_patch(n, n, n, {"cond_or_uncond": [0, 1]})
    assert all(t is n for t in out)
    ctx = contract.PassContext.__new__(contract.PassContext)
    ctx.phase = contract.Phase.KEYFRAMES
    with pytest.raises(RuntimeError, match="without naming its block"):
        tokenflow_attn1_patch(n, n, n, {contract.KEY: ctx, "cond_or_uncond": [0, 1]})
