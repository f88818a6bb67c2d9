"""Pure-torch building blocks of TokenFlow (no ComfyUI imports).

Everything here works on plain tensors so it can be unit-tested against brute-force
restatements and reused by any host. "The paper" is Geyer, Bar-Tal, Bagon, Dekel, "TokenFlow:
Consistent Diffusion Features for Consistent Video Editing", ICLR 2024 (arXiv 2307.10373); "the
official code" is its implementation, github.com/omerbt/TokenFlow (preprocess.py,
run_tokenflow_pnp.py, run_tokenflow_sdedit.py, tokenflow_utils.py, util.py).

- :mod:`.schedule`       DDIM timesteps and alpha/sigma conversions (the diffusers DDIMScheduler grids
                         of the official preprocess.py and run_tokenflow_*.py)
- :mod:`.inversion`      the DDIM inversion / denoising update formulas (the official preprocess.py
                         ``ddim_inversion`` / ``ddim_sample``)
- :mod:`.keyframes`      the keyframe plan and the keyframe pairing/blend weights (the paper's keyframe
                         sampling; the official ``batched_denoise_step`` keyframe draw and the blend
                         weights of tokenflow_utils.py ``make_tokenflow_attention_block``)
- :mod:`.correspondence` chunked cosine nearest-neighbour fields (the paper's TokenFlow correspondences;
                         the official ``make_tokenflow_attention_block`` search with util.py
                         ``batch_cosine_sim``)
- :mod:`.propagation`    gathering keyframe attention outputs through the fields (the paper's edit
                         propagation; the gather in the official ``make_tokenflow_attention_block``)
- :mod:`.attention`      extended (joint keyframe) attention on top of a fused kernel (the paper's joint
                         keyframe editing; the official tokenflow_utils.py ``register_extended_attention``
                         / ``register_extended_attention_pnp``)
"""
