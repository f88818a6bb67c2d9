"""ComfyUI-TokenFlow: TokenFlow (Geyer et al., ICLR 2024) video editing as ComfyUI nodes.

ComfyUI loads this folder and calls :func:`comfy_entrypoint`, which imports the node classes
(``nodes/``, and through them ComfyUI). Importing the package itself imports nothing, so the pure
layers (``tokenflow_ops/``, ``metric/``, ``data/video_decode``) work without ComfyUI;
outside ComfyUI the package is ``comfyui_tokenflow`` (``devkit/pack_import.py``). Other packs reach
the pack's API through the door on the host, never through this folder's name (``engine/door.py``).
"""


async def comfy_entrypoint():
    """The V3 extension (ComfyUI >= 0.3.64 calls this once when it loads the pack)."""
    try:
        from .nodes import comfy_entrypoint as entrypoint
    except Exception:  # ComfyUI logs only the message of an entrypoint's error: keep the traceback in the log
        import logging

        logging.getLogger(__name__).exception("TokenFlow: importing the nodes failed")
        raise
    return await entrypoint()


__all__ = ["comfy_entrypoint"]
