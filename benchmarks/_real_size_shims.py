"""Every stand-in the real-size dry run puts in place of a GPU and of weight values, in this one module.

The dry run (``real_size.py``) runs ComfyUI's own model classes, ModelPatcher loading and sampler and the pack's
node functions on fake tensors (``torch._subclasses.fake_tensor.FakeTensorMode``) whose device is a fake
``cuda:0``. Three things cannot come from fake tensors, and only they are replaced here (``SHIMS`` lists them;
the dry run prints the list):

- the device facts ``comfy.model_management`` reads from the driver: total memory (``--vram``), free memory (the
  budget minus the live device bytes the tracker counts), flash attention available, fp16 / bf16 / fp8 support,
  no asynchronous offload streams (casts run on the compute stream, as with ``--disable-async-offload``), no
  page-locking through the CUDA runtime, cache emptying and synchronisation as no-ops;
- the data-dependent reads (``count_nonzero(latent) > 0``, ``float(sigmas[0])``, ...): :class:`SmallValues` keeps
  the real value of every small tensor computed from real inputs (the schedule, the timesteps, the source latents
  moved to the device) and answers a read of a fake tensor from it; host tensors made from host tensors stay real;
- the weight fingerprint (the pack hashes weight values, which fake weights do not have): a hash of names and
  shapes.
"""
from __future__ import annotations

import hashlib
import logging
import sys
import weakref
from typing import Callable

import torch
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.weak import WeakTensorKeyDictionary

from _real_size_track import leaves

log = logging.getLogger(__name__)

GIB = 2**30
SHIMS: list[str] = []
SHADOW_LIMIT = 1 << 25  # elements: the largest result whose real value is kept (a 1000-frame SD latent is 16M)


def _patch(owner, name: str, replacement, why: str) -> None:
    if not hasattr(owner, name):
        return  # this host version has no such function: nothing to stand in for
    setattr(owner, name, replacement)
    SHIMS.append(f"{getattr(owner, '__name__', owner)}.{name}: {why}")


def install_device_facts(vram_bytes: int, ram_bytes: int, live_bytes: Callable[[str], int]) -> None:
    """A CUDA device of ``vram_bytes`` (as torch reports it) and a host of ``ram_bytes`` for comfy.model_management;
    free memory is the budget minus ``live_bytes("cuda")`` / ``live_bytes("cpu")`` (the tracker's count)."""
    import comfy.model_management as mm

    cuda = torch.device("cuda", 0)
    mm.cpu_state = mm.CPUState.GPU
    mm.vram_state = mm.VRAMState.NORMAL_VRAM
    mm.set_vram_to = mm.VRAMState.NORMAL_VRAM
    SHIMS.append("comfy.model_management.cpu_state / vram_state: GPU, NORMAL_VRAM (as on a CUDA card)")

    def is_host(dev) -> bool:
        return dev is not None and getattr(dev, "type", dev) in ("cpu", "mps")

    def total(dev=None, torch_total_too=False):
        value = ram_bytes if is_host(dev) else vram_bytes
        return (value, value) if torch_total_too else value

    def free(dev=None, torch_free_too=False):
        value = ram_bytes - live_bytes("cpu") if is_host(dev) else vram_bytes - live_bytes("cuda")
        return (value, 0) if torch_free_too else value

    _patch(mm, "get_torch_device", lambda: cuda, "cuda:0 (fake tensors)")
    _patch(mm, "get_total_memory", total, f"--vram {vram_bytes / GIB:.2f} GiB, --ram {ram_bytes / GIB:.2f} GiB")
    _patch(mm, "get_free_memory", free, "budget minus the tracked live bytes of that device")
    _patch(mm, "is_nvidia", lambda: True, "an NVIDIA card")
    _patch(mm, "pytorch_attention_flash_attention", lambda: True, "flash attention available")
    _patch(mm, "should_use_fp16", lambda *a, **k: True, "fp16 supported")
    _patch(mm, "should_use_bf16", lambda *a, **k: True, "bf16 supported")
    _patch(mm, "supports_fp8_compute", lambda *a, **k: True, "fp8 supported")
    _patch(mm, "supports_nvfp4_compute", lambda *a, **k: False, "no nvfp4 (a pre-Blackwell card)")
    _patch(mm, "get_offload_stream", lambda *a, **k: None, "no asynchronous offload stream (casts on the compute stream)")
    _patch(mm, "pin_memory", lambda *a, **k: False, "no page-locking through the CUDA runtime")
    _patch(mm, "unpin_memory", lambda *a, **k: False, "no page-locking through the CUDA runtime")
    _patch(mm, "soft_empty_cache", lambda *a, **k: None, "no cache to empty")
    _patch(mm, "synchronize", lambda *a, **k: None, "nothing to wait for")
    _patch(torch.cuda, "synchronize", lambda *a, **k: None, "nothing to wait for")
    _patch(torch.cuda, "empty_cache", lambda *a, **k: None, "no cache to empty")
    _patch(torch.cuda, "Event", _LandedEvent, "events on fake tensors have landed when recorded (no stream)")
    _patch(torch.cuda, "current_stream", lambda *a, **k: None, "no stream (fake tensors)")
    # Set when model_management was imported on this CPU host; on an NVIDIA card partial loading may keep as few
    # weights on the device as the free memory allows (no minimum share).
    mm.MIN_WEIGHT_MEMORY_RATIO = 0.0
    SHIMS.append("comfy.model_management.MIN_WEIGHT_MEMORY_RATIO: 0.0 (its NVIDIA value; partial loading sizing)")


class _LandedEvent:
    """``torch.cuda.Event`` for fake tensors: nothing is queued, so every copy has landed when it is recorded."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def record(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


def install_gpu_attention() -> None:
    """Attention as a CUDA card runs it. ComfyUI picks its attention function when it is imported: on this CPU host
    sub-quadratic or split attention, on an NVIDIA card with torch 2 ``attention_pytorch`` (SDPA, batches of at most
    ``SDP_BATCH_LIMIT`` 2**15). And torch's SDPA on a fake ``cuda`` tensor takes the math path (the whole
    (B, H, N, N) score matrix, in float32), where a card runs a fused kernel (cuDNN / flash / memory-efficient in
    ComfyUI's priority order) that allocates the output and a log-sum-exp row only. So the CPU choice is rebound
    to ``attention_pytorch`` wherever a module imported it, and SDPA on fake device tensors calls the fused op torch
    would pick: flash for float16 / bfloat16 without a mask and head size up to 256, else memory-efficient (which
    takes the mask as a bias). Both ops have fake kernels and FLOP formulas in torch."""
    import comfy.ldm.modules.attention as attention
    import comfy.model_management as mm

    cpu_choice = attention.optimized_attention
    mm.ENABLE_PYTORCH_ATTENTION = True
    attention.SDP_BATCH_LIMIT = 2**15
    rebound = []
    for name, module in list(sys.modules.items()):
        if not name.startswith("comfy") or module is None:
            continue
        for attr in ("optimized_attention", "optimized_attention_masked"):
            if getattr(module, attr, None) is cpu_choice and cpu_choice is not attention.attention_pytorch:
                setattr(module, attr, attention.attention_pytorch)
                rebound.append(f"{name}.{attr}")
    SHIMS.append(f"comfy attention: attention_pytorch, SDP_BATCH_LIMIT 2**15 (NVIDIA's choice; this host's was "
                 f"{cpu_choice.__name__}, {len(rebound)} names rebound)")
    math_sdpa = torch.nn.functional.scaled_dot_product_attention

    def fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if not (_is_fake(query) and query.device.type == "cuda" and query.ndim == 4) or dropout_p or kwargs:
            return math_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                             scale=scale, **kwargs)
        if attn_mask is None and query.dtype in (torch.float16, torch.bfloat16) and query.shape[-1] <= 256:
            return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, 0.0, is_causal,
                                                                       scale=scale)[0]
        bias = attn_mask
        if bias is not None:
            if bias.dtype == torch.bool:  # torch turns a boolean mask into an additive one of the mask's size
                bias = torch.zeros(bias.shape, dtype=query.dtype, device=bias.device).masked_fill(
                    bias.logical_not(), float("-inf"))
            bias = bias.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
        return torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, bias, False, 0.0,
                                                                        is_causal, scale=scale)[0]

    torch.nn.functional.scaled_dot_product_attention = fused_sdpa
    SHIMS.append("torch SDPA on fake device tensors: the fused kernel a card runs (flash: fp16/bf16, no mask, head "
                 "<= 256; else memory-efficient), output + log-sum-exp allocated, not the math path's score matrix")


def install_fake_parameter_moves(fake_mode) -> None:
    """``Module.to`` swaps fake parameters in place (``torch.utils.swap_tensors``), which refuses a tensor that
    has a weak reference, and the fake mode's memo of converted tensors (and :class:`SmallValues`) hold weak
    references; ComfyUI's loading could not move fake weights. Before a swap, the two tensors are dropped from those
    memos (a memo entry is a cache: it is rebuilt when needed)."""
    original = torch.utils.swap_tensors
    memo = fake_mode.fake_tensor_converter.meta_converter.tensor_memo

    def swap_tensors(t1, t2):
        for tensor in (t1, t2):
            for key in [k for k, v in list(memo.items()) if v is tensor]:
                memo.pop(key, None)
            SmallValues._values.pop(tensor, None)
        return original(t1, t2)

    torch.utils.swap_tensors = swap_tensors
    SHIMS.append("torch.utils.swap_tensors: fake parameters leave the fake mode's weak memo before Module.to swaps "
                 "them (a swap refuses tensors with weak references)")


def install_fingerprints() -> None:
    """Replace the pack's weight fingerprint (it hashes weight values) by a hash of names and shapes, and the
    frames' content hash by one that reads host values only (fake device tensors carry none)."""
    from comfyui_tokenflow.engine.families import fingerprints

    def model_fingerprint(model_patcher) -> str:
        unet = model_patcher.model.diffusion_model
        digest = hashlib.sha256(type(unet).__name__.encode())
        for name, param in unet.state_dict().items():
            digest.update(f"{name}{tuple(param.shape)}{param.dtype}".encode())
        return digest.hexdigest()[:16]

    def tensor_fingerprint(tensor: torch.Tensor) -> str:
        digest = hashlib.sha256(str(tuple(tensor.shape)).encode())
        real = SmallValues.value_of(tensor)
        if real is not None:
            digest.update(real.detach().float().contiguous().cpu().numpy().tobytes())
        return digest.hexdigest()[:16]

    replacements = {"model_fingerprint": model_fingerprint, "tensor_fingerprint": tensor_fingerprint}
    originals = {name: getattr(fingerprints, name) for name in replacements}
    for module in [m for name, m in sys.modules.items() if name.startswith("comfyui_tokenflow") and m is not None]:
        for name, replacement in replacements.items():
            if getattr(module, name, None) is originals[name]:
                setattr(module, name, replacement)
    SHIMS.append("pack: model_fingerprint hashes weight names, shapes and dtypes (fake weights have no values)")
    SHIMS.append("pack: tensor_fingerprint hashes the real values where known (the source latents are real)")


def _is_fake(value) -> bool:
    return isinstance(value, FakeTensor)


def _to_cpu(value):
    if isinstance(value, torch.device):
        return torch.device("cpu")
    if isinstance(value, str) and value.startswith("cuda"):
        return "cpu"
    return value


class PinnedBytes:
    """The bytes the pack asked to page-lock (made pageable here), live and at their peak: what PyTorch's caching
    host allocator would keep locked on a card."""

    def __init__(self) -> None:
        self.live = self.peak = self.allocations = 0

    def add(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        nbytes = storage.nbytes()
        self.live += nbytes
        self.allocations += 1
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._release, nbytes)

    def _release(self, nbytes: int) -> None:
        self.live -= nbytes


PINNED = PinnedBytes()


class SmallValues(TorchDispatchMode):
    """Keeps the real values the sampler reads back (above a FakeTensorMode): ops on host tensors only run for
    real; a fake result computed from inputs whose real values are known keeps its real value when it has at most
    ``SHADOW_LIMIT`` elements; ``.item()`` (``_local_scalar_dense``) and data-dependent shapes are answered from it.
"""

    _values: WeakTensorKeyDictionary = WeakTensorKeyDictionary()
    reads: dict[str, int] = {}

    def __init__(self, fake_mode) -> None:
        super().__init__()
        self.fake_mode = fake_mode
        SHIMS.append("data-dependent reads (.item(), bool(), nonzero) of fake tensors answered from the real values "
                     f"of tensors up to {SHADOW_LIMIT} elements computed from real inputs")

    @classmethod
    def forget(cls, *tensors: torch.Tensor) -> None:
        """Drop the real values of ``tensors`` (a stand-in for a result of fake weights, which has none)."""
        for tensor in tensors:
            cls._values.pop(tensor, None)

    @classmethod
    def value_of(cls, tensor):
        if not isinstance(tensor, torch.Tensor):
            return tensor
        if not _is_fake(tensor):
            return tensor
        return cls._values.get(tensor)

    def _real(self, func, args, kwargs):
        values = tree_map(lambda v: self.value_of(v) if isinstance(v, torch.Tensor) else _to_cpu(v), (args, kwargs))
        if any(isinstance(v, torch.Tensor) and v is None for v in tree_flatten(values)[0]):
            return None
        flat = tree_flatten(values)[0]
        if any(v is None for v, orig in zip(flat, tree_flatten((args, kwargs))[0]) if isinstance(orig, torch.Tensor)):
            return None
        with unset_fake_temporarily():
            return func(*values[0], **values[1])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat = leaves((args, kwargs))
        tensors = [v for v in flat if isinstance(v, torch.Tensor)]
        to_device = any(v.type == "cuda" if isinstance(v, torch.device) else v.startswith("cuda")
                        for v in flat if isinstance(v, (str, torch.device)))
        if not to_device and not any(_is_fake(t) for t in tensors):
            if kwargs.get("pin_memory"):  # page-locked host memory needs a driver: the same host bytes, unpinned
                kwargs = {**kwargs, "pin_memory": False}
                self.reads["pinned host allocations made pageable"] = self.reads.get(
                    "pinned host allocations made pageable", 0) + 1
                with unset_fake_temporarily():
                    out = func(*args, **kwargs)
                PINNED.add(out)
                return out
            with unset_fake_temporarily():  # host work on host tensors: real
                return func(*args, **kwargs)
        if func is torch.ops.aten._local_scalar_dense.default:
            real = self.value_of(args[0])
            if real is None:
                raise RuntimeError(f"the dry run cannot read the value of a {tuple(args[0].shape)} device tensor "
                                   f"computed from fake weights (at {_caller()})")
            self.reads[_caller()] = self.reads.get(_caller(), 0) + 1
            with unset_fake_temporarily():
                return func(real)
        values = self._values
        # Most ops take a fake weight or an activation computed from one: no real value, nothing to shadow.
        known = all(t.numel() <= SHADOW_LIMIT and (not _is_fake(t) or values.get(t) is not None) for t in tensors)
        try:
            out = func(*args, **kwargs)
        except (torch._subclasses.fake_tensor.DynamicOutputShapeException,
                torch._subclasses.fake_tensor.DataDependentOutputException):
            real = self._real(func, args, kwargs) if known else None
            if real is None:
                raise
            device = next((t.device for t in tensors if _is_fake(t)), torch.device("cpu"))
            out = tree_map(lambda r: r.to(device) if isinstance(r, torch.Tensor) else r, real)
            tree_map(lambda pair: None, out)
            for fake, value in zip(tree_flatten(out)[0], tree_flatten(real)[0]):
                if isinstance(fake, torch.Tensor):
                    self._values[fake] = value
            return out
        if known:
            outs = [o for o in leaves(out) if isinstance(o, torch.Tensor)]
            if outs and all(o.numel() <= SHADOW_LIMIT for o in outs) and any(_is_fake(o) for o in outs):
                real = self._real(func, args, kwargs)
                if real is not None:
                    for fake, value in zip(tree_flatten(out)[0], tree_flatten(real)[0]):
                        if _is_fake(fake) and isinstance(value, torch.Tensor):
                            self._values[fake] = value
        return out


def _caller() -> str:
    frame = sys._getframe(2)
    while frame is not None and ("torch/" in frame.f_code.co_filename or "/benchmarks/_real_size" in frame.f_code.co_filename):
        frame = frame.f_back
    if frame is None:
        return "?"
    return f"{frame.f_code.co_filename.rsplit('/', 2)[-2:][-1]}:{frame.f_lineno}"
