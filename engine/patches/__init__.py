"""What runs inside a model call: TokenFlow's patches on a clone of the user's model.

``contract`` (the one key, the pass of a call and its bank: shared by every patch), ``unet`` (the UNet's
``attn1`` patches), ``dit_kernel`` / ``dit`` / ``dit_joint`` (the DiT attention override), ``wrappers`` (the
per-call wrappers) and ``install`` (the one clone-and-patch site).
"""
