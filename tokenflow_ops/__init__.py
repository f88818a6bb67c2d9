"""Pure-torch building blocks of TokenFlow (no ComfyUI imports).

Everything here works on plain tensors so it can be unit-tested against brute-force
restatements and reused by any host:

- :mod:`.schedule`       DDIM timesteps and alpha/sigma conversions (spec section 1)
- :mod:`.inversion`      the DDIM inversion / denoising update formulas (spec section 2)
- :mod:`.keyframes`      the keyframe plan and the keyframe pairing/blend weights (spec 3.1, 3.3)
- :mod:`.correspondence` chunked cosine nearest-neighbour fields (spec 3.3)
- :mod:`.propagation`    gathering keyframe attention outputs through the fields (spec 3.3)
- :mod:`.attention`      extended (joint keyframe) attention on top of a fused kernel (spec 3.2)
"""
