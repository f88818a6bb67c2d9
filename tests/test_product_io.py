"""TokenFlow inversions and correspondences saved to / loaded from safetensors files.

Round trips are exact (every field, dtype and order), an edit with loaded products is bit-identical
to one with the in-memory products, and every way a file can be wrong is refused with a message
naming the file.
"""
from __future__ import annotations

import dataclasses
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import folder_paths
import tiny_models
from comfyui_tokenflow.data import product_io
from comfyui_tokenflow.nodes import product_io_nodes
from comfyui_tokenflow.data.product_io import ProductFileError
from comfyui_tokenflow.data.products import TokenFlowCorrespondences, TokenFlowInversion
from tokenflow_helpers import conds, edit, extract, invert, random_latent

N_FRAMES = 4


@pytest.fixture(scope="module")
def products(tiny_sd15):
    src, pos, neg = conds(tiny_sd15)
    # a tuple and a float option must come back as they were (not "area": TokenFlow refuses area conditioning)
    src[0][1]["tuple_option"] = (8, 8, 0, 0)
    src[0][1]["strength"] = 0.75
    latent = random_latent(N_FRAMES)
    inversion = invert(tiny_sd15, latent, src)
    corr = extract(tiny_sd15, inversion)
    return dict(model=tiny_sd15, latent=latent, pos=pos, neg=neg, inversion=inversion, corr=corr)


@pytest.fixture(scope="module")
def saved(products, tmp_path_factory):
    folder = tmp_path_factory.mktemp("products")
    inv_path = product_io.save_inversion(products["inversion"], folder / "inversion.safetensors")
    corr_path = product_io.save_correspondences(products["corr"], folder / "corr.safetensors")
    return dict(inversion=inv_path, corr=corr_path)


@pytest.fixture
def output_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(folder_paths, "output_directory", str(tmp_path))
    return tmp_path


def assert_same(a, b, where: str = "") -> None:
    """Deep equality: tensors bit-exact with the same dtype and shape; containers, types and order equal."""
    assert type(a) is type(b), f"{where}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def assert_same_product(a, b) -> None:
    assert type(a) is type(b)
    for f in dataclasses.fields(a):
        assert_same(getattr(a, f.name), getattr(b, f.name), f.name)


# ------------------------------------------------------------------ round trips

def test_inversion_round_trip_is_exact(products, saved):
    loaded = product_io.load_inversion(saved["inversion"])
    assert isinstance(loaded, TokenFlowInversion)
    assert_same_product(products["inversion"], loaded)
    assert loaded.conditioning[0][1]["tuple_option"] == (8, 8, 0, 0)


def test_correspondences_round_trip_is_exact(products, saved):
    loaded = product_io.load_correspondences(saved["corr"], products["inversion"])
    assert isinstance(loaded, TokenFlowCorrespondences)
    assert_same_product(products["corr"], loaded)
    assert loaded.fields[("output", 4, 0)].dtype == torch.int16


def test_file_layout_is_plain_safetensors(saved, products):
    with safe_open(saved["corr"], framework="pt") as f:
        meta, names = f.metadata(), set(f.keys())
    assert meta["tokenflow.format"] == "ComfyUI-TokenFlow" and meta["tokenflow.kind"] == "correspondences"
    assert meta["tokenflow.version"] == "1" and json.loads(meta["group_size"]) == products["corr"].group_size
    assert "field.output.4.0" in names and "keyframes" in names
    with safe_open(saved["inversion"], framework="pt") as f:
        meta, names = f.metadata(), set(f.keys())
    assert {"trajectory", "x0", "inverted", "sigmas", "conditioning.0", "conditioning.0.pooled_output"} <= names
    assert json.loads(meta["timesteps"]) == products["inversion"].timesteps
    assert json.loads(meta["model_fingerprint"]) == products["inversion"].model_fingerprint


def test_edit_with_loaded_products_is_bit_identical(products, saved):
    model, pos, neg = products["model"], products["pos"], products["neg"]
    inversion = product_io.load_inversion(saved["inversion"])
    corr = product_io.load_correspondences(saved["corr"], inversion)
    with_corr = edit(model, pos, neg, inversion, corr)
    assert torch.equal(with_corr, edit(model, pos, neg, products["inversion"], products["corr"]))
    on_the_fly = edit(model, pos, neg, inversion)
    assert torch.equal(on_the_fly, edit(model, pos, neg, products["inversion"]))


# ------------------------------------------------------------------ nodes

def test_nodes_save_under_the_output_folder_and_load_back(products, output_dir):
    model, latent = products["model"], products["latent"]
    first = product_io_nodes.TokenFlowSaveInversion.execute(inversion=products["inversion"], filename_prefix="tf/inv")
    (path,) = first.args
    assert path == str(output_dir / "tf" / "inv_00001_.safetensors") and os.path.isfile(path)
    assert first.ui.as_dict() == {"text": (path,)}
    second = product_io_nodes.TokenFlowSaveInversion.execute(inversion=products["inversion"], filename_prefix="tf/inv").args[0]
    assert second.endswith("inv_00002_.safetensors")
    inversion, inverted_latent = product_io_nodes.TokenFlowLoadInversion.execute(
        "tf/inv_00001_.safetensors", model, latent).args
    assert_same_product(products["inversion"], inversion)
    assert inverted_latent["samples"].shape == latent["samples"].shape
    corr_path = product_io_nodes.TokenFlowSaveCorrespondences.execute(correspondences=products["corr"]).args[0]
    assert corr_path == str(output_dir / "tokenflow" / "correspondences_00001_.safetensors")
    (corr,) = product_io_nodes.TokenFlowLoadCorrespondences.execute(corr_path, inversion).args
    assert_same_product(products["corr"], corr)
    assert [n.define_schema().node_id for n in product_io_nodes.NODES] == [
        "TokenFlowSaveInversion", "TokenFlowLoadInversion", "TokenFlowSaveCorrespondences",
        "TokenFlowLoadCorrespondences"]


def test_every_input_and_output_has_a_tooltip():
    for node in product_io_nodes.NODES:
        schema = node.define_schema()
        assert schema.category == "TokenFlow" and schema.description
        assert schema.is_output_node == schema.node_id.startswith("TokenFlowSave")
        node.GET_NODE_INFO_V1()  # ComfyUI's own schema validation and /object_info entry
        for item in schema.inputs + schema.outputs:
            assert item.tooltip, f"{schema.node_id}: {item}"
    for node, kind in ((product_io_nodes.TokenFlowLoadInversion, "inversion"),
                       (product_io_nodes.TokenFlowLoadCorrespondences, "correspondences")):
        path = next(i for i in node.define_schema().inputs if i.id == "path")
        assert f"TokenFlow {kind} file to load" in path.tooltip and f"TokenFlow Save {kind.title()}" in path.tooltip
        assert f"tokenflow/{kind}_00001_.safetensors" in path.tooltip and path.default in path.tooltip


def test_loader_fingerprint_follows_the_file(products, output_dir):
    node = product_io_nodes.TokenFlowLoadCorrespondences
    path = product_io_nodes.TokenFlowSaveCorrespondences.execute(correspondences=products["corr"], filename_prefix="fp").args[0]
    before = node.fingerprint_inputs(path="fp_00001_.safetensors")
    assert before == node.fingerprint_inputs(path=path)  # relative and absolute name the same file
    os.utime(path, ns=(1, 1))
    assert node.fingerprint_inputs(path="fp_00001_.safetensors") != before
    assert node.fingerprint_inputs(path=None) == "linked-path"
    assert node.validate_inputs(path="fp_00001_.safetensors") is True
    assert "does not exist" in node.validate_inputs(path="nope.safetensors")


# ------------------------------------------------------------------ refusals

def test_load_inversion_refuses_another_model(products, saved):
    other = tiny_models.make_unet_model("sd15", seed=1)
    with pytest.raises(ValueError, match="different model") as info:
        product_io_nodes.TokenFlowLoadInversion.execute(saved["inversion"], other, products["latent"])
    assert os.path.basename(saved["inversion"]) in str(info.value)


def test_load_inversion_refuses_other_frames(products, saved):
    for latent in (random_latent(N_FRAMES, seed=1), random_latent(N_FRAMES - 1)):
        with pytest.raises(ValueError, match="other frames") as info:
            product_io_nodes.TokenFlowLoadInversion.execute(saved["inversion"], products["model"], latent)
        assert os.path.basename(saved["inversion"]) in str(info.value)


def test_load_correspondences_refuses_another_inversion(products, saved):
    model = products["model"]
    other = invert(model, random_latent(N_FRAMES, seed=2), conds(model, seeds=(11,))[0])
    with pytest.raises(ValueError, match="different inversion") as info:
        product_io_nodes.TokenFlowLoadCorrespondences.execute(saved["corr"], other)
    assert os.path.basename(saved["corr"]) in str(info.value)


def test_wrong_kind_names_the_right_loader(saved):
    with pytest.raises(ProductFileError, match="TokenFlow Load Correspondences"):
        product_io.load_inversion(saved["corr"])
    with pytest.raises(ProductFileError, match="TokenFlow Load Inversion"):
        product_io.load_correspondences(saved["inversion"])


def _rewrite_metadata(src: str, dst: Path, **changes: str) -> None:
    with safe_open(src, framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(dst), metadata={**meta, **changes})


def test_newer_version_and_foreign_files_are_refused(saved, tmp_path):
    _rewrite_metadata(saved["inversion"], tmp_path / "new.safetensors", **{"tokenflow.version": "99"})
    with pytest.raises(ProductFileError, match="version 99.*update the ComfyUI-TokenFlow"):
        product_io.load_inversion(tmp_path / "new.safetensors")
    save_file({"weight": torch.zeros(3)}, str(tmp_path / "lora.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ProductFileError, match="not a TokenFlow file"):
        product_io.load_inversion(tmp_path / "lora.safetensors")
    (tmp_path / "notes.txt").write_text("hello, this is not a tensor file")
    with pytest.raises(ProductFileError, match="not a readable safetensors file") as info:
        product_io.load_correspondences(tmp_path / "notes.txt")
    assert "notes.txt" in str(info.value)
    with pytest.raises(ProductFileError, match="does not exist"):
        product_io.load_inversion(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("damage", ["truncate", "flip", "syntax", "metadata"])
def test_corrupt_files_are_refused(saved, tmp_path, damage):
    data = bytearray(Path(saved["inversion"]).read_bytes())
    header_len = struct.unpack("<Q", data[:8])[0]
    if damage == "truncate":
        data = data[: len(data) - 100]
    elif damage == "flip":
        data[8 + header_len + 16] ^= 0x40  # one bit inside the first tensor's bytes
    elif damage == "syntax":
        data[8] = ord("x")  # the header is no longer JSON
    else:
        at = data.index(b'\\"tuple_option\\"', 8)  # inside the conditioning metadata value, same length
        data[at + 3] = ord("X")
    path = tmp_path / f"{damage}.safetensors"
    path.write_bytes(bytes(data))
    with pytest.raises(ProductFileError, match="corrupt") as info:
        product_io.load_inversion(path)
    assert str(path) in str(info.value)


def test_any_damaged_header_byte_is_refused(saved, tmp_path):
    original = Path(saved["corr"]).read_bytes()
    header_len = struct.unpack("<Q", original[:8])[0]
    path = tmp_path / "damaged.safetensors"
    for at in range(8, 8 + header_len, 7):
        data = bytearray(original)
        data[at] = ord("}") if data[at] != ord("}") else ord("{")
        path.write_bytes(bytes(data))
        with pytest.raises(ProductFileError, match="corrupt|not a TokenFlow file"):
            product_io.load_correspondences(path)


def test_failed_save_leaves_nothing_behind(products, tmp_path, monkeypatch):
    target = tmp_path / "inv.safetensors"

    def disk_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(product_io, "save_file", disk_full)
    with pytest.raises(ProductFileError, match="No space left.*free disk space") as info:
        product_io.save_inversion(products["inversion"], target)
    assert str(target) in str(info.value)
    assert list(tmp_path.iterdir()) == []
    target.write_bytes(b"previous file")  # an existing file is left untouched by a failed save
    with pytest.raises(ProductFileError):
        product_io.save_correspondences(products["corr"], target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inv.safetensors"] and target.read_bytes() == b"previous file"
    with pytest.raises(ProductFileError, match="does not exist"):
        product_io.save_inversion(products["inversion"], tmp_path / "no" / "such" / "inv.safetensors")


def test_unstorable_conditioning_options_are_dropped_with_a_warning(products, tmp_path, caplog):
    cond, options = products["inversion"].conditioning[0]
    inversion = dataclasses.replace(products["inversion"], conditioning=[[cond, {**options, "control": object()}]])
    path = product_io.save_inversion(inversion, tmp_path / "inv.safetensors")
    assert "control (object)" in caplog.text
    assert_same(product_io.load_inversion(path).conditioning, products["inversion"].conditioning)


def test_ui_error_type_is_a_plain_name():
    import execution

    assert execution.full_type_name(ProductFileError) == "ProductFileError"
