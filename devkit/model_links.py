"""The model files the examples and the headless runner name: file name, download URL, ComfyUI's models folder.

One source for the examples' model links (``tests/example_specs.py``: the frontend's "missing models" download
list) and the runner's advice (``scripts/runner_models.py``, ``scripts/runner_messages.py``: where to download a
file that is not found). Standard library only.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelLink:
    name: str  # the file name ComfyUI's own templates use
    url: str
    folder: str  # ComfyUI's models folder name (folder_paths), where the core loader looks for it


_HF = "https://huggingface.co"
SD21_BASE = ModelLink("v2-1_512-ema-pruned.safetensors", f"{_HF}/stabilityai/stable-diffusion-2-1-base/resolve/main/"
                      "v2-1_512-ema-pruned.safetensors", "checkpoints")
SD15 = ModelLink("v1-5-pruned-emaonly-fp16.safetensors", f"{_HF}/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/"
                 "v1-5-pruned-emaonly-fp16.safetensors", "checkpoints")
CANNY_CN = ModelLink("control_v11p_sd15_canny_fp16.safetensors", f"{_HF}/comfyanonymous/ControlNet-v1-1_fp16_safetensors/"
                     "resolve/main/control_v11p_sd15_canny_fp16.safetensors", "controlnet")
# Flux-dev for the core loaders (UNETLoader, DualCLIPLoader type flux, VAELoader), the file names ComfyUI's own
# Flux templates use; FLUX.1-dev is gated on Hugging Face (accept its license first).
FLUX_DEV_PAGE = f"{_HF}/black-forest-labs/FLUX.1-dev"
FLUX_DEV = ModelLink("flux1-dev.safetensors", f"{FLUX_DEV_PAGE}/resolve/main/flux1-dev.safetensors", "diffusion_models")
FLUX_AE = ModelLink("ae.safetensors", f"{FLUX_DEV_PAGE}/resolve/main/ae.safetensors", "vae")
CLIP_L = ModelLink("clip_l.safetensors", f"{_HF}/comfyanonymous/flux_text_encoders/resolve/main/clip_l.safetensors",
                   "text_encoders")
T5XXL = ModelLink("t5xxl_fp16.safetensors", f"{_HF}/comfyanonymous/flux_text_encoders/resolve/main/"
                  "t5xxl_fp16.safetensors", "text_encoders")
# SD3.5 Large as ComfyUI's own SD3.5 template loads it: one all-in-one file (MMDiT + CLIP-L/G + T5-XXL + VAE).
SD35_LARGE = ModelLink("sd3.5_large_fp8_scaled.safetensors", f"{_HF}/Comfy-Org/stable-diffusion-3.5-fp8/resolve/main/"
                       "sd3.5_large_fp8_scaled.safetensors", "checkpoints")

ALL = (SD21_BASE, SD15, CANNY_CN, FLUX_DEV, FLUX_AE, CLIP_L, T5XXL, SD35_LARGE)
