"""How much an eps-model's output mean follows its input's mean: the measurement behind
docs/mnist.md (the report's UNet cannot see the brightness of x_t).

    python benchmarks/dc_response.py runs/ddpm-seed/checkpoint.npz runs/ddpm-skip/checkpoint.npz \
        [--out benchmarks/results/dc_response.json]

For 32 held-out mnist5k digits x0 and fixed noise eps, x_t = sqrt(abar_i) x0 + sqrt(1 - abar_i) eps
at steps i = 999, 900, 700, 500, 300, and the response

    r_i = (mean eps_theta(x_t + c, t_i) - mean eps_theta(x_t, t_i)) / c,   c = 0.1,

(means over all pixels of the batch). Adding c to every pixel of x_t is what a shift of the
noise mean does to x_t; the eps that explains it grows by c / sqrt(1 - abar_i), so r_i should be
about 1 / sqrt(1 - abar_i) (~1 at high noise). Also the invariance the report's network has:
max |eps_theta(3 x_t + 0.7) - eps_theta(x_t)| at i = 500.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def measure(path, steps=(999, 900, 700, 500, 300), c=0.1, backend="numpy"):
    from refdiff.checkpoint import load_model
    from refdiff.data.images import load_images
    from refdiff.ddpm import model_time, schedule_from_meta

    model, _, meta = load_model(path, backend=backend, use_ema=True)
    s = schedule_from_meta(meta)
    x0 = load_images("mnist5k", "test")[0][:32].astype(np.float64)
    eps = np.random.default_rng(0).standard_normal(x0.shape)
    F = model.ops

    def run(x, i):
        t = F.asarray(np.full(len(x), model_time(i, s.num_steps), dtype=model.dtype))
        return np.asarray(F.to_numpy(model.forward(F.asarray(x.astype(model.dtype)), t)), dtype=np.float64)

    out = {"checkpoint": path, "model": model.name, "config": model.config, "steps": [], "response": [],
           "ideal": []}
    for i in steps:
        ab = s.alpha_bars[i]
        xt = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps
        out["steps"].append(int(i))
        out["response"].append(float((run(xt + c, i) - run(xt, i)).mean() / c))
        out["ideal"].append(float(1 / np.sqrt(1 - ab)))
    ab = s.alpha_bars[500]
    xt = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps
    out["affine_invariance_max_diff_i500"] = float(np.abs(run(3 * xt + 0.7, 500) - run(xt, 500)).max())
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--backend", default="numpy")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "dc_response.json"))
    a = ap.parse_args(argv)
    from _common import environment, write_json
    res = [measure(p, backend=a.backend) for p in a.checkpoints]
    for r in res:
        print(f"{r['checkpoint']}: response {np.round(r['response'], 3).tolist()} at i = {r['steps']} "
              f"(ideal {np.round(r['ideal'], 3).tolist()}); max |eps(3x + 0.7) - eps(x)| = "
              f"{r['affine_invariance_max_diff_i500']:.3g}")
    write_json(a.out, dict(benchmark="mean response of eps-models", results=res, environment=environment()))


if __name__ == "__main__":
    main()
