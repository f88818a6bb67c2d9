#!/usr/bin/env python
"""Golden check that tokenflow_ops changes keep UNet edits bit-identical (PnP / SDEdit on the fly, and with
extracted correspondences). ``save PATH`` at the start code, ``check PATH`` after."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _host  # noqa: E402

_host.bootstrap("cpu")
import torch  # noqa: E402

import tiny_models  # noqa: E402
import tokenflow_helpers as h  # noqa: E402

model = tiny_models.make_unet_model("sd15", seed=0)
src, pos, neg = h.conds(model)
inv = h.invert(model, h.random_latent(7, seed=3), src)
corr = h.extract(model, inv, batch_size=3)
got = {}
for editor in ("pnp", "sdedit"):
    got[f"{editor}_fly"] = h.edit(model, pos, neg, inv, editor=editor, batch_size=3)
    got[f"{editor}_extracted"] = h.edit(model, pos, neg, inv, correspondences=corr, editor=editor, batch_size=3)
mode, path = sys.argv[1], sys.argv[2]
if mode == "save":
    torch.save(got, path)
    print("saved", len(got))
else:
    ref = torch.load(path)
    bad = [n for n in got if not torch.equal(got[n], ref[n])]
    print({n: torch.equal(got[n], ref[n]) for n in got})
    print("ALL EQUAL" if not bad else f"DIFFER: {bad}")
