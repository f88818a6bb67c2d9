"""Save / load TokenFlow inversions and correspondences as safetensors files in ComfyUI's output folder.

A saved inversion lets a long clip be inverted once and edited in later sessions (or after a
restart freed the RAM); the loaders refuse files made from another model, other frames or
another inversion.
"""
from __future__ import annotations

import logging
import os

import folder_paths
from comfy_api.latest import io, ui

from ..data import product_io
from ..engine.inversion_runner import inverted_latent_output
from ..engine.model_support import check_supported, model_fingerprint, tensor_fingerprint
from ..data.products import CorrespondencesType, InversionType
from ..engine.validation import check_latent_frames

log = logging.getLogger(__name__)

CATEGORY = "TokenFlow"
EXTENSION = ".safetensors"


def path_tooltip(kind: str) -> str:
    """Tooltip of a Load node's path: which file it loads (``kind``: inversion / correspondences)."""
    return (f"The TokenFlow {kind} file to load, as written by TokenFlow Save {kind.title()}: a path relative to "
            f"ComfyUI's output folder (as the Save node shows it, e.g. 'tokenflow/{kind}_00001_.safetensors') or an "
            "absolute path.")


def output_path(filename_prefix: str) -> str:
    """A new numbered file under ComfyUI's output folder, like the core save nodes (prefix may hold folders)."""
    folder, filename, counter, _subfolder, _prefix = folder_paths.get_save_image_path(
        filename_prefix, folder_paths.get_output_directory())
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, f"{filename}_{counter:05}_{EXTENSION}")


def resolve_path(path: str) -> str:
    """``path`` as an absolute file name: relative paths are inside ComfyUI's output folder."""
    raw = (path or "").strip().strip('"').strip("'").strip()
    if not raw:
        raise ValueError("path: empty; enter the file written by the TokenFlow Save node (relative to the output "
                         "folder, e.g. 'tokenflow/inversion_00001_.safetensors', or absolute)")
    raw = os.path.expanduser(raw)
    if not os.path.isabs(raw):
        raw = os.path.join(folder_paths.get_output_directory(), raw)
    return os.path.abspath(raw)


def file_fingerprint(path: str | None) -> str:
    """Changes whenever the file at ``path`` is rewritten, so ComfyUI loads it again."""
    if path is None:  # linked: the upstream node decides
        return "linked-path"
    try:
        resolved = resolve_path(path)
        stat = os.stat(resolved)
    except (OSError, ValueError) as e:
        return f"unavailable:{path}:{e}"
    return f"{resolved}:{stat.st_size}:{stat.st_mtime_ns}"


def validate_path(path: str | None) -> bool | str:
    if path is None:  # linked: checked when it runs
        return True
    try:
        resolved = resolve_path(path)
    except ValueError as e:
        return str(e)
    if not os.path.isfile(resolved):
        return (f"path: '{resolved}' does not exist; enter a file written by a TokenFlow Save node (relative paths "
                "are inside ComfyUI's output folder)")
    return True


def frames_fingerprint(model, latent: dict) -> str:
    """The fingerprint TokenFlow DDIM Inversion gives these frames (same scaling, same hash)."""
    samples = check_latent_frames(latent, "latent", model.model.latent_format.latent_channels)
    return tensor_fingerprint(model.model.process_latent_in(samples.float()).cpu())


class TokenFlowSaveInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TokenFlowSaveInversion",
            display_name="TokenFlow Save Inversion",
            category=CATEGORY,
            description="Saves a TokenFlow inversion (trajectory, schedule, inversion prompt and fingerprints) as a "
                        "safetensors file in ComfyUI's output folder, so a later session can edit the video without "
                        "inverting it again (TokenFlow Load Inversion).",
            is_output_node=True,
            inputs=[
                InversionType.Input("inversion", tooltip="Output of TokenFlow DDIM Inversion."),
                io.String.Input("filename_prefix", default="tokenflow/inversion", tooltip="File name prefix inside "
                                "the output folder; may contain subfolders. A counter and .safetensors are appended "
                                "(e.g. tokenflow/inversion_00001_.safetensors)."),
            ],
            outputs=[io.String.Output(display_name="path", tooltip="Absolute path of the written file (connect it to "
                                      "TokenFlow Load Inversion's path, or copy it into a later workflow).")],
        )

    @classmethod
    def execute(cls, inversion, filename_prefix="tokenflow/inversion") -> io.NodeOutput:
        path = product_io.save_inversion(inversion, output_path(filename_prefix))
        return io.NodeOutput(path, ui=ui.PreviewText(path))


class TokenFlowLoadInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TokenFlowLoadInversion",
            display_name="TokenFlow Load Inversion",
            category=CATEGORY,
            description="Loads an inversion written by TokenFlow Save Inversion. It is refused unless the connected "
                        "model and source latent are the ones it was made from (checked by fingerprint).",
            inputs=[
                io.String.Input("path", default="tokenflow/inversion_00001_.safetensors",
                                tooltip=path_tooltip("inversion")),
                io.Model.Input("model", tooltip="The model the inversion was made with (LoRAs may differ: only the "
                               "base weights are compared)."),
                io.Latent.Input("latent", tooltip="The source video frames encoded with VAE Encode, exactly as they "
                                "were connected to TokenFlow DDIM Inversion (same frames, size and VAE)."),
            ],
            outputs=[
                InversionType.Output(display_name="inversion", tooltip="The loaded inversion, as TokenFlow DDIM "
                                     "Inversion outputs it."),
                io.Latent.Output(display_name="inverted_latent", tooltip="The fully inverted latent x_T (with leftover "
                                 "noise, as from KSampler Advanced)."),
            ],
        )

    @classmethod
    def execute(cls, path, model, latent) -> io.NodeOutput:
        check_supported(model)
        inversion = product_io.load_inversion(resolve_path(path), model_fingerprint(model),
                                              frames_fingerprint(model, latent))
        return io.NodeOutput(inversion, inverted_latent_output(model, inversion))

    @classmethod
    def fingerprint_inputs(cls, path=None, **kwargs) -> str:
        return file_fingerprint(path)

    @classmethod
    def validate_inputs(cls, path=None) -> bool | str:
        return validate_path(path)


class TokenFlowSaveCorrespondences(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TokenFlowSaveCorrespondences",
            display_name="TokenFlow Save Correspondences",
            category=CATEGORY,
            description="Saves extracted TokenFlow correspondences (keyframe plan and nearest-neighbour fields of "
                        "every block) as a safetensors file in ComfyUI's output folder, for TokenFlow Load "
                        "Correspondences in a later session.",
            is_output_node=True,
            inputs=[
                CorrespondencesType.Input("correspondences", tooltip="Output of TokenFlow Extract Correspondences."),
                io.String.Input("filename_prefix", default="tokenflow/correspondences", tooltip="File name prefix "
                                "inside the output folder; may contain subfolders. A counter and .safetensors are "
                                "appended (e.g. tokenflow/correspondences_00001_.safetensors)."),
            ],
            outputs=[io.String.Output(display_name="path", tooltip="Absolute path of the written file (connect it to "
                                      "TokenFlow Load Correspondences' path, or copy it into a later workflow).")],
        )

    @classmethod
    def execute(cls, correspondences, filename_prefix="tokenflow/correspondences") -> io.NodeOutput:
        path = product_io.save_correspondences(correspondences, output_path(filename_prefix))
        return io.NodeOutput(path, ui=ui.PreviewText(path))


class TokenFlowLoadCorrespondences(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TokenFlowLoadCorrespondences",
            display_name="TokenFlow Load Correspondences",
            category=CATEGORY,
            description="Loads correspondences written by TokenFlow Save Correspondences. They are refused unless "
                        "they were extracted from the connected inversion (same model, frames and step count).",
            inputs=[
                io.String.Input("path", default="tokenflow/correspondences_00001_.safetensors",
                                tooltip=path_tooltip("correspondences")),
                InversionType.Input("inversion", tooltip="The inversion the correspondences were extracted from "
                                    "(from TokenFlow DDIM Inversion or TokenFlow Load Inversion)."),
            ],
            outputs=[CorrespondencesType.Output(display_name="correspondences", tooltip="The loaded correspondences, "
                                                "as TokenFlow Extract Correspondences outputs them.")],
        )

    @classmethod
    def execute(cls, path, inversion) -> io.NodeOutput:
        return io.NodeOutput(product_io.load_correspondences(resolve_path(path), inversion))

    @classmethod
    def fingerprint_inputs(cls, path=None, **kwargs) -> str:
        return file_fingerprint(path)

    @classmethod
    def validate_inputs(cls, path=None) -> bool | str:
        return validate_path(path)


NODES = [TokenFlowSaveInversion, TokenFlowLoadInversion, TokenFlowSaveCorrespondences, TokenFlowLoadCorrespondences]
