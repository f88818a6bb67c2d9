"""Planning before any model call: the sampler's settings (``settings``, ComfyUI-free), an edit's timesteps,
keyframes and per-step needs (``edit_plan``), and how many frames one model call may hold (``call_sizing``)."""
