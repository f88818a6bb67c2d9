"""Save / load TokenFlow inversions and correspondences as safetensors files in ComfyUI's output folder.

A saved inversion lets a long clip be inverted once and edited in later sessions (or after a
restart freed the RAM); the loaders refuse files made from another model, other frames or
another inversion.
"""
from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io, ui

from ..data import product_io
from ..engine.sampling_paths import path_for
from ..engine.families.fingerprints import frames_fingerprint, model_fingerprint
from ..engine.families.registry import check_supported
from ..data.products import CorrespondencesType, InversionType
from ..engine.checks import check_latent_frames
from .common import CATEGORY, clean_path


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
    raw = clean_path(path)
    if not raw:
        raise ValueError("path: empty; enter the file written by the TokenFlow Save node (relative to the output "
                         "folder, e.g. 'tokenflow/inversion_00001_.safetensors', or absolute)")
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


def latent_fingerprint(model, latent: dict) -> str:
    """The fingerprint TokenFlow DDIM Inversion gives these frames."""
    return frames_fingerprint(model, check_latent_frames(latent, "latent", model.model.latent_format.latent_channels))


def product_schema(kind: str, verb: str, description: str, inputs: list, outputs: list, **extra) -> io.Schema:
    """The schema of TokenFlow {verb} {Kind} (``verb``: Save / Load)."""
    title = kind.title()
    return io.Schema(node_id=f"TokenFlow{verb}{title}", display_name=f"TokenFlow {verb} {title}", category=CATEGORY,
                     description=description, inputs=inputs, outputs=outputs, **extra)


class _SaveProduct(io.ComfyNode):
    """Save node of one product kind; subclasses set the class attributes."""

    KIND = ""  # "inversion" | "correspondences": the input's name and the files' stem
    TYPE: io.Custom
    MADE_BY = ""  # the node whose output it saves
    WHAT = ""  # what the file holds, for the description

    SAVE: staticmethod  # product_io's writer for this kind: (product, path) -> path

    @classmethod
    def define_schema(cls) -> io.Schema:
        title = cls.KIND.title()
        return product_schema(
            cls.KIND, "Save",
            f"Saves {cls.WHAT} as a safetensors file in ComfyUI's output folder, so a later session can reuse it "
            f"(TokenFlow Load {title}).",
            [cls.TYPE.Input(cls.KIND, tooltip=f"Output of {cls.MADE_BY}."),
             io.String.Input("filename_prefix", default=f"tokenflow/{cls.KIND}", tooltip="File name prefix inside the "
                             "output folder; may contain subfolders. A counter and .safetensors are appended (e.g. "
                             f"tokenflow/{cls.KIND}_00001_.safetensors).")],
            [io.String.Output(display_name="path", tooltip="Absolute path of the written file (connect it to "
                              f"TokenFlow Load {title}'s path, or copy it into a later workflow).")],
            is_output_node=True)

    @classmethod
    def execute(cls, filename_prefix: str = "", **product) -> io.NodeOutput:
        """``product``: the one product input, named after :attr:`KIND`."""
        path = cls.SAVE(product[cls.KIND], output_path(filename_prefix or f"tokenflow/{cls.KIND}"))
        return io.NodeOutput(path, ui=ui.PreviewText(path))


class _LoadProduct(io.ComfyNode):
    """Load node of one product kind: a path plus what the product must match; subclasses set the rest."""

    KIND = ""
    DESCRIPTION = ""
    MATCH: tuple = ()  # the inputs the loaded product must match (beside the path)
    OUTPUTS: tuple = ()

    @classmethod
    def define_schema(cls) -> io.Schema:
        path = io.String.Input("path", default=f"tokenflow/{cls.KIND}_00001_.safetensors",
                               tooltip=path_tooltip(cls.KIND))
        return product_schema(cls.KIND, "Load", cls.DESCRIPTION, [path, *cls.MATCH], list(cls.OUTPUTS))

    @classmethod
    def fingerprint_inputs(cls, path=None, **kwargs) -> str:
        return file_fingerprint(path)

    @classmethod
    def validate_inputs(cls, path=None) -> bool | str:
        return validate_path(path)


class TokenFlowSaveInversion(_SaveProduct):
    KIND, TYPE, MADE_BY = "inversion", InversionType, "TokenFlow DDIM Inversion"
    WHAT = ("a TokenFlow inversion (trajectory, schedule, inversion prompt and fingerprints); the video can then be "
            "edited without inverting it again")
    SAVE = staticmethod(product_io.save_inversion)


class TokenFlowLoadInversion(_LoadProduct):
    KIND = "inversion"
    DESCRIPTION = ("Loads an inversion written by TokenFlow Save Inversion. It is refused unless the connected model "
                   "and source latent are the ones it was made from (checked by fingerprint).")

    MATCH = (io.Model.Input("model", tooltip="The model the inversion was made with (LoRAs may differ: only the base "
                            "weights are compared)."),
             io.Latent.Input("latent", tooltip="The source video frames encoded with VAE Encode, exactly as they were "
                             "connected to TokenFlow DDIM Inversion (same frames, size and VAE)."))
    OUTPUTS = (InversionType.Output(display_name="inversion", tooltip="The loaded inversion, as TokenFlow DDIM "
                                    "Inversion outputs it."),
               io.Latent.Output(display_name="inverted_latent", tooltip="The fully inverted latent x_T (with leftover "
                                "noise, as from KSampler Advanced)."))

    @classmethod
    def execute(cls, path, model, latent) -> io.NodeOutput:
        sampling_path = path_for(model)  # SD UNets: DDIM; Flux / SD3.x: flow
        check_supported(model, sampling=sampling_path.sampling)
        inversion = product_io.load_inversion(resolve_path(path), model_fingerprint(model),
                                              latent_fingerprint(model, latent))
        return io.NodeOutput(inversion, sampling_path.inverted_latent(model, inversion))


class TokenFlowSaveCorrespondences(_SaveProduct):
    KIND, TYPE, MADE_BY = "correspondences", CorrespondencesType, "TokenFlow Extract Correspondences"
    WHAT = "extracted TokenFlow correspondences (keyframe plan and nearest-neighbour fields of every block)"
    SAVE = staticmethod(product_io.save_correspondences)


class TokenFlowLoadCorrespondences(_LoadProduct):
    KIND = "correspondences"
    DESCRIPTION = ("Loads correspondences written by TokenFlow Save Correspondences. They are refused unless they "
                   "were extracted from the connected inversion (same model, frames and step count).")

    MATCH = (InversionType.Input("inversion", tooltip="The inversion the correspondences were extracted from (from "
                                 "TokenFlow DDIM Inversion or TokenFlow Load Inversion)."),)
    OUTPUTS = (CorrespondencesType.Output(display_name="correspondences", tooltip="The loaded correspondences, as "
                                          "TokenFlow Extract Correspondences outputs them."),)

    @classmethod
    def execute(cls, path, inversion) -> io.NodeOutput:
        return io.NodeOutput(product_io.load_correspondences(resolve_path(path), inversion))


NODES = [TokenFlowSaveInversion, TokenFlowLoadInversion, TokenFlowSaveCorrespondences, TokenFlowLoadCorrespondences]
