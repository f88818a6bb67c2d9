"""ComfyUI's loop side, shared by both sampling rules: the frame guider (conds and ControlNet copies per frame
subset), the inversion guiders, the extraction loop and the TokenFlow editing step (``edit_guider``)."""
