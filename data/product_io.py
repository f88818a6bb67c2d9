"""TokenFlow inversions and correspondences on disk, as safetensors files (pure functions, no ComfyUI).

File layout (format version 1). Tensors:

* inversion: ``trajectory``, ``x0``, ``inverted``, ``sigmas`` and, for every conditioning entry ``i``,
  ``conditioning.{i}`` (the cond) plus ``conditioning.{i}.{key}`` for each tensor in its options
  (``pooled_output``...);
* correspondences: ``keyframes`` and one ``field.{kind}.{id}.{index}`` per transformer block
  (e.g. ``field.output.4.0``), in their stored integer type.

Metadata (safetensors allows str -> str only; every value is JSON): ``tokenflow.format``,
``tokenflow.kind``, ``tokenflow.version``, ``tokenflow.checksums`` (sha256 of every tensor's bytes and of the metadata)
and one key per scalar/list field of the dataclass (``steps``, ``timesteps``, ``model_fingerprint``...),
plus ``conditioning`` (the non-tensor options of each entry) or ``fields`` (the block order). An inversion
records its ``method`` ("ddim" or "fixed_point") with ``max_iterations``, ``tolerance``, ``evaluations`` and
``residuals``; a file written before these fields existed loads with the dataclass defaults (DDIM).

Files are written to a temporary file next to the target and moved into place with ``os.replace``;
nothing is left behind when writing fails. Loading checks the header first (format, kind, version,
fingerprints) so a mismatched file is refused before its tensors are read.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .products import TokenFlowCorrespondences, TokenFlowInversion, extracted_from, inversion_fingerprint

log = logging.getLogger(__name__)

FORMAT = "ComfyUI-TokenFlow"
VERSION = 1
INVERSION = "inversion"
CORRESPONDENCES = "correspondences"
LOADERS = {INVERSION: "TokenFlow Load Inversion", CORRESPONDENCES: "TokenFlow Load Correspondences"}
INVERSION_TENSORS = ("trajectory", "x0", "inverted", "sigmas")
_TUPLE_TAG = "__tuple__"
METADATA_CHECKSUM = "__metadata__"  # key of the metadata's own checksum in ``tokenflow.checksums``


class ProductFileError(ValueError):
    """A TokenFlow product file that cannot be used; the message names the file and the fix."""


# ComfyUI's error dialog shows ``module.QualName`` of an exception type; a custom node's module path is the
# pack's folder on disk. Shown as a builtin, the dialog reads "ProductFileError" instead.
ProductFileError.__module__ = "builtins"


# ------------------------------------------------------------------ helpers

def _checksum(tensor: torch.Tensor) -> str:
    raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(raw.numpy()).hexdigest()


def _encode_value(value: Any) -> Any:
    """JSON-ready form of a plain value (tuples tagged so they come back as tuples); TypeError otherwise."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return {_TUPLE_TAG: [_encode_value(v) for v in value]}
    if isinstance(value, list):
        return [_encode_value(v) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value) and _TUPLE_TAG not in value:
        return {k: _encode_value(v) for k, v in value.items()}
    raise TypeError(type(value).__name__)


def _decode_value(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode_value(v) for v in value]
    if isinstance(value, dict):
        if set(value) == {_TUPLE_TAG}:
            return tuple(_decode_value(v) for v in value[_TUPLE_TAG])
        return {k: _decode_value(v) for k, v in value.items()}
    return value


def _block_name(block: tuple[str, int, int]) -> str:
    kind, block_id, index = block
    return f"field.{kind}.{block_id}.{index}"


def _split_conditioning(conditioning: list) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Conditioning -> (tensors, JSON description). Options that are neither tensors nor plain values
    (ControlNets, hooks...) cannot be stored: they are dropped with a warning."""
    tensors: dict[str, torch.Tensor] = {}
    entries: list[dict] = []
    for i, (cond, options) in enumerate(conditioning):
        tensors[f"conditioning.{i}"] = cond
        tensor_keys, values, dropped = [], {}, []
        for key, value in options.items():
            if isinstance(value, torch.Tensor):
                tensors[f"conditioning.{i}.{key}"] = value
                tensor_keys.append(key)
                continue
            try:
                values[key] = _encode_value(value)
            except TypeError:
                dropped.append(f"{key} ({type(value).__name__})")
        if dropped:
            log.warning("TokenFlow: conditioning options %s of the inversion prompt cannot be stored in a file and "
                        "are left out; the saved inversion's source branch runs without them", ", ".join(dropped))
        entries.append({"tensors": tensor_keys, "values": values,
                        "order": [key for key in options if key in values or key in tensor_keys]})
    return tensors, entries


def _join_conditioning(entries: list[dict], tensors: dict[str, torch.Tensor]) -> list:
    conditioning = []
    for i, entry in enumerate(entries):
        found = {key: tensors[f"conditioning.{i}.{key}"] for key in entry["tensors"]}
        found.update(entry["values"])  # already decoded with the rest of the header
        if sorted(entry["order"]) != sorted(found):
            raise KeyError(f"option names {entry['order']} do not match the stored options {sorted(found)}")
        options = {key: found[key] for key in entry["order"]}
        conditioning.append([tensors[f"conditioning.{i}"], options])
    return conditioning


def _metadata_checksum(metadata: dict[str, str]) -> str:
    pairs = sorted((k, v) for k, v in metadata.items() if k != "tokenflow.checksums")
    return hashlib.sha256(json.dumps(pairs).encode()).hexdigest()


def _metadata_fields(product: Any, skip: tuple[str, ...]) -> dict[str, str]:
    meta = {}
    for f in dataclasses.fields(product):
        value = getattr(product, f.name)
        if f.name in skip or isinstance(value, torch.Tensor):
            continue
        meta[f.name] = json.dumps(_encode_value(value))
    return meta


# ------------------------------------------------------------------ writing

def _write(path: str, kind: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """Atomically write a TokenFlow safetensors file; on any error nothing is left at ``path``'s side."""
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise ProductFileError(f"cannot save the TokenFlow {kind} to '{path}': the folder '{folder}' does not exist")
    tensors = _unshared({name: t.detach().to("cpu").contiguous() for name, t in tensors.items()})
    metadata = {**metadata, "tokenflow.format": FORMAT, "tokenflow.kind": kind, "tokenflow.version": str(VERSION)}
    checksums = {name: _checksum(t) for name, t in tensors.items()}
    checksums[METADATA_CHECKSUM] = _metadata_checksum(metadata)
    metadata["tokenflow.checksums"] = json.dumps(checksums)
    fd, temp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        save_file(tensors, temp, metadata=metadata)
        _fsync(temp)
        os.replace(temp, path)
    except BaseException as e:
        try:
            os.remove(temp)
        except OSError:
            pass
        if isinstance(e, (OSError, SafetensorError)):
            raise ProductFileError(f"cannot save the TokenFlow {kind} to '{path}': {e}; check the free disk space "
                                   "and the folder's permissions") from e
        raise
    size = os.path.getsize(path)
    log.info("TokenFlow: saved the %s to '%s' (%.1f MiB)", kind, path, size / 2**20)
    return path


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (e.g. views of one conditioning batch): copy those."""
    seen: set[int] = set()
    out = {}
    for name, tensor in tensors.items():
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen and tensor.numel():
            tensor = tensor.clone()
        seen.add(ptr)
        out[name] = tensor
    return out


def _fsync(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_inversion(inversion: TokenFlowInversion, path: str | os.PathLike) -> str:
    """Write ``inversion`` to ``path`` (a .safetensors file); returns the absolute path."""
    tensors = {name: getattr(inversion, name) for name in INVERSION_TENSORS}
    cond_tensors, entries = _split_conditioning(inversion.conditioning)
    tensors.update(cond_tensors)
    metadata = _metadata_fields(inversion, skip=("conditioning",))
    metadata["conditioning"] = json.dumps(entries)
    return _write(os.fspath(path), INVERSION, tensors, metadata)


def save_correspondences(corr: TokenFlowCorrespondences, path: str | os.PathLike) -> str:
    """Write ``corr`` to ``path`` (a .safetensors file); returns the absolute path."""
    tensors = {"keyframes": corr.keyframes}
    tensors.update({_block_name(block): field for block, field in corr.fields.items()})
    metadata = _metadata_fields(corr, skip=("fields",))
    metadata["fields"] = json.dumps([list(block) for block in corr.fields])
    return _write(os.fspath(path), CORRESPONDENCES, tensors, metadata)


# ------------------------------------------------------------------ reading

@dataclasses.dataclass
class ProductHeader:
    """What a TokenFlow file's header says, read without loading its tensors."""

    path: str
    kind: str
    version: int
    fields: dict[str, Any]  # every JSON metadata value, decoded
    tensor_names: list[str]
    checksums: dict[str, str]


def _corrupt(path: str, kind: str, why: str) -> ProductFileError:
    return ProductFileError(f"'{path}' is corrupt ({why}); the file was probably truncated or damaged while being "
                            f"copied. Save the {kind} again (or copy the file again).")


def read_header(path: str | os.PathLike, kind: str) -> ProductHeader:
    """Open ``path``, check that it is a TokenFlow ``kind`` file of a readable version; tensors are not read."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isfile(path):
        raise ProductFileError(f"TokenFlow {kind} file '{path}' does not exist; check the path (relative paths are "
                               "inside ComfyUI's output folder)")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            names = list(f.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise ProductFileError(f"'{path}' is not a readable safetensors file ({e}): either it is not a TokenFlow "
                               f"{kind} file or it is truncated/corrupt. Save the {kind} again with "
                               f"TokenFlow Save {kind.capitalize()}.") from e
    if metadata.get("tokenflow.format") != FORMAT:
        raise ProductFileError(f"'{path}' is a safetensors file but not a TokenFlow file (no TokenFlow metadata; is "
                               f"it a checkpoint or a LoRA?). Choose a file written by TokenFlow Save "
                               f"{kind.capitalize()}.")
    try:
        version = int(metadata.get("tokenflow.version", ""))
    except ValueError:
        raise _corrupt(path, kind, f"unreadable format version {metadata.get('tokenflow.version')!r}") from None
    if version > VERSION:
        raise ProductFileError(f"'{path}' uses TokenFlow file format version {version}, newer than this "
                               f"ComfyUI-TokenFlow reads ({VERSION}); update the ComfyUI-TokenFlow node pack, or "
                               f"save the {kind} again with this version.")
    if version < 1:
        raise _corrupt(path, kind, f"format version {version}")
    try:
        checksums = json.loads(metadata["tokenflow.checksums"])
        if not isinstance(checksums, dict) or checksums.get(METADATA_CHECKSUM) != _metadata_checksum(metadata):
            raise _corrupt(path, kind, "checksum of the metadata does not match")
        fields = {key: _decode_value(json.loads(value)) for key, value in metadata.items()
                  if not key.startswith("tokenflow.")}
    except (KeyError, json.JSONDecodeError) as e:
        raise _corrupt(path, kind, f"unreadable metadata: {e}") from None
    found = metadata.get("tokenflow.kind")
    if found != kind:
        loader = LOADERS.get(found, "the matching TokenFlow loader")
        raise ProductFileError(f"'{path}' holds a TokenFlow {found}, not a {kind}; load it with {loader}, or choose a "
                               f"{kind} file here.")
    return ProductHeader(path, kind, version, fields, names, checksums)


def _load_tensors(header: ProductHeader, expected: list[str]) -> dict[str, torch.Tensor]:
    missing = [name for name in expected if name not in header.tensor_names]
    if missing:
        raise _corrupt(header.path, header.kind, f"tensors {missing} are missing")
    tensors = {}
    try:
        with safe_open(header.path, framework="pt", device="cpu") as f:
            for name in expected:
                tensors[name] = f.get_tensor(name)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise _corrupt(header.path, header.kind, str(e)) from e
    for name, tensor in tensors.items():
        if header.checksums.get(name) != _checksum(tensor):
            raise _corrupt(header.path, header.kind, f"checksum of tensor '{name}' does not match")
    return tensors


def _has_default(f: dataclasses.Field) -> bool:
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


def _build(header: ProductHeader, cls: type, values: dict[str, Any]) -> Any:
    """The dataclass from ``values`` and the header; a field with a default (added after files existed) may be absent."""
    fields = dataclasses.fields(cls)
    missing = [f.name for f in fields if f.name not in values and f.name not in header.fields and not _has_default(f)]
    if missing:
        raise _corrupt(header.path, header.kind, f"fields {missing} are missing")
    try:
        return cls(**{f.name: values[f.name] if f.name in values else header.fields[f.name] for f in fields
                      if f.name in values or f.name in header.fields})
    except (TypeError, ValueError) as e:
        raise _corrupt(header.path, header.kind, str(e)) from e


def _check(header: ProductHeader, ok: bool, why: str) -> None:
    if not ok:
        raise _corrupt(header.path, header.kind, why)


def check_inversion_header(header: ProductHeader, model_fp: str | None, frames_fp: str | None) -> None:
    """Refuse an inversion file made with another model or from other frames (before reading tensors)."""
    saved_model, saved_frames = header.fields.get("model_fingerprint"), header.fields.get("frames_fingerprint")
    if model_fp is not None and saved_model != model_fp:
        raise ProductFileError(f"'{header.path}' holds an inversion made with a different model (fingerprint "
                               f"{saved_model}; the connected model is {model_fp}). Connect the checkpoint it was "
                               "inverted with (LoRAs may differ: only the base weights count), or invert again.")
    if frames_fp is not None and saved_frames != frames_fp:
        raise ProductFileError(f"'{header.path}' holds the inversion of other frames (frames fingerprint "
                               f"{saved_frames}; the connected latent is {frames_fp}). Connect the same video frames "
                               "(same frame selection, size and VAE), or invert these frames again.")


def load_inversion(path: str | os.PathLike, model_fingerprint: str | None = None,
                   frames_fingerprint: str | None = None) -> TokenFlowInversion:
    """Read an inversion file; with fingerprints given, a file of another model/frames is refused first."""
    header = read_header(path, INVERSION)
    check_inversion_header(header, model_fingerprint, frames_fingerprint)
    entries = header.fields.get("conditioning")
    _check(header, isinstance(entries, list), "no conditioning description")
    try:
        cond_names = [f"conditioning.{i}{suffix}" for i, entry in enumerate(entries)
                      for suffix in [""] + [f".{key}" for key in entry["tensors"]]]
        tensors = _load_tensors(header, list(INVERSION_TENSORS) + cond_names)
        conditioning = _join_conditioning(entries, tensors)
    except (KeyError, TypeError) as e:
        raise _corrupt(header.path, header.kind, f"bad conditioning description: {e}") from None
    inversion = _build(header, TokenFlowInversion, {**{n: tensors[n] for n in INVERSION_TENSORS},
                                                   "conditioning": conditioning})
    steps, n = inversion.steps, inversion.x0.shape[0]
    _check(header, len(inversion.timesteps) == steps and inversion.sigmas.shape == (steps + 1,),
           "the schedule does not match the step count")
    _check(header, inversion.method in ("ddim", "fixed_point"), f"unknown inversion method {inversion.method!r}")
    _check(header, inversion.trajectory.shape == (steps,) + tuple(inversion.x0.shape)
           and inversion.inverted.shape == inversion.x0.shape, "the latent shapes do not agree")
    log.info("TokenFlow: loaded the inversion from '%s' (%d frames, %d steps, method %s)", header.path, n, steps,
             inversion.method)
    return inversion


def load_correspondences(path: str | os.PathLike, inversion: TokenFlowInversion | None = None
                         ) -> TokenFlowCorrespondences:
    """Read a correspondences file; with ``inversion`` given, a file extracted from another one is refused first."""
    header = read_header(path, CORRESPONDENCES)
    if inversion is not None:
        expected = inversion_fingerprint(inversion)
        saved = header.fields.get("inversion_fingerprint")
        if not extracted_from(saved, header.fields.get("model_fingerprint"), inversion):
            raise ProductFileError(f"'{header.path}' holds correspondences extracted from a different inversion "
                                   f"({saved}; the connected inversion is {expected}: model, frames and steps must "
                                   "match). Connect the inversion they were extracted from, or extract them again.")
    blocks = header.fields.get("fields")
    _check(header, isinstance(blocks, list), "no block list")
    try:
        keys = [(str(kind), int(block_id), int(index)) for kind, block_id, index in blocks]
    except (TypeError, ValueError) as e:
        raise _corrupt(header.path, header.kind, f"bad block list: {e}") from None
    tensors = _load_tensors(header, ["keyframes"] + [_block_name(k) for k in keys])
    corr = _build(header, TokenFlowCorrespondences, {
        "keyframes": tensors["keyframes"], "fields": {k: tensors[_block_name(k)] for k in keys}})
    steps = len(corr.timesteps)
    _check(header, corr.keyframes.ndim == 2 and corr.keyframes.shape[0] == steps,
           "the keyframe plan does not match the step count")
    _check(header, all(f.ndim == 4 and f.shape[0] == steps and f.shape[2] == 2 for f in corr.fields.values()),
           "a field has the wrong shape")
    if inversion is not None:
        _check(header, corr.timesteps == list(inversion.timesteps) and
               all(f.shape[1] == inversion.n_frames for f in corr.fields.values()),
               "its fields do not fit the connected inversion")
    log.info("TokenFlow: loaded correspondences from '%s' (%d blocks, %.1f MiB)", header.path, len(corr.fields),
             corr.nbytes() / 2**20)
    return corr

