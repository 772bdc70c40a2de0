"""MNIST with a trained DDPM checkpoint: feature FD against NFE for the ODE samplers, and inpainting.

1. For each sampler and step count, n images (seed 0), scored by refdiff.image_scores'
   feature Fréchet distance to the training split (the MNIST classifier's 128-d features; the
   real held-out split against the training split is the floor at 1,000 images): DDIM
   (refdiff.ddpm.ddim), DPM-Solver++(2M) on the chain, EDM Heun and RK45 on its VP SDE
   (refdiff.solvers.sample_from_checkpoint), and optionally ancestral sampling (1,000 NFE).
2. Inpainting: the first n held-out digits with their bottom half masked, completed by
   refdiff.inpaint.inpaint_from_checkpoint (`--inpaint-step` em or heun, `--inpaint-steps`,
   RePaint's `--resample` U and `--jump` J), classified by the classifier: accuracy against
   the true labels, next to the same digits with the bottom half left empty (background, -1)
   and the intact digits.

FD at n images is biased upward for small n (a 128-d covariance from n samples): compare rows
of one run only, all at the same n. Writes benchmarks/results/mnist_fast_samplers.json and
.png (command, machine, commit).

    python benchmarks/mnist_fast_samplers.py --checkpoint C --classifier CLF [--n 200] [--ancestral]
        [--n-inpaint 500 --inpaint-step em --inpaint-steps 100 --resample 5 --jump 10] [--skip-fd]
"""
import argparse
import os
import sys
import time

import numpy as np

from refdiff import ddpm, solvers
from refdiff.checkpoint import load_model
from refdiff.generate import load_generator
from refdiff.image_scores import Evaluator, load_real
from refdiff.inpaint import inpaint_from_checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def fd_rows(model, meta, ev, a):
    schedule = ddpm.schedule_from_meta(meta)
    shape = (a.n,) + ddpm.model_input_shape(model)
    runs = [("ddim", s, lambda s, r: (ddpm.ddim(model, schedule, shape, r, steps=s, spacing="trailing"), s))
            for s in (10, 20, 50, 100)]
    runs += [(name, s, (lambda name: lambda s, r: solvers.sample_from_checkpoint(model, meta, a.n, r, sampler=name,
                                                                                   steps=s))(name))
             for name, steps in (("dpm2m", (10, 20, 50)), ("edm", (10, 18, 30))) for s in steps]
    runs += [("rk45", tol, lambda tol, r: solvers.sample_from_checkpoint(model, meta, a.n, r, sampler="rk45",
                                                                        rtol=tol, atol=tol)) for tol in (1e-3, 1e-4)]
    if a.ancestral:
        runs.append(("ancestral", 1000, lambda s, r: (ddpm.ancestral(model, schedule, shape, r), 1000)))
    rows = []
    for name, setting, run in runs:
        t0 = time.perf_counter()
        x, nfe = run(setting, np.random.default_rng(0))
        x = np.clip(np.asarray(x, dtype=np.float32).reshape((a.n, 1, 28, 28)), -1, 1)
        m, _ = ev.score(x)
        rows.append(dict(sampler=name, setting=setting, nfe=int(nfe), fd_features=m["fd_features"],
                         mml_ratio=m["mml_ratio"], seconds=time.perf_counter() - t0))
        print(f"{name:10s} {setting!s:7s} NFE {nfe:5d}  FD {m['fd_features']:.3f}  ({time.perf_counter() - t0:.0f}s)",
              flush=True)
    return rows


def inpainting(model, meta, ev, a, x_te, y_te):
    y, labels = x_te[:a.n_inpaint].astype(np.float64), np.asarray(y_te[:a.n_inpaint])
    mask = np.ones((1, 28, 28))
    mask[:, 14:] = 0                                         # bottom half unknown
    t0 = time.perf_counter()
    done = inpaint_from_checkpoint(model, meta, y, mask, np.random.default_rng(1), steps=a.inpaint_steps,
                                   step=a.inpaint_step, resample=a.resample, jump=a.jump, batch=a.inpaint_batch)
    empty = np.where(mask == 1, y, -1.0)

    def acc(x):
        logits, _ = ev.logits_features(np.clip(x, -1, 1).astype(np.float32))
        return float(np.mean(logits.argmax(1) == labels))
    out = dict(n=int(len(y)), steps=a.inpaint_steps, step={"em": "euler-maruyama", "heun": "stochastic heun"}[
               a.inpaint_step], resample=a.resample, jump=a.jump, accuracy_inpainted=acc(done),
               accuracy_bottom_empty=acc(empty), accuracy_intact=acc(y), seconds=time.perf_counter() - t0)
    print(f"inpainting n {out['n']}: accuracy {out['accuracy_inpainted']:.3f} (bottom half empty "
          f"{out['accuracy_bottom_empty']:.3f}, intact {out['accuracy_intact']:.3f})", flush=True)
    return out, done, empty


def plot(rows, path):
    from refdiff.figures import pyplot, save_figure
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for name in dict.fromkeys(r["sampler"] for r in rows):
        rr = sorted((r for r in rows if r["sampler"] == name), key=lambda r: r["nfe"])
        ax.semilogx([r["nfe"] for r in rr], [r["fd_features"] for r in rr], "o-", label=name)
    ax.set_xlabel("score evaluations (NFE)")
    ax.set_ylabel("feature FD to the training split")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--classifier", required=True)
    ap.add_argument("--n", type=int, default=200, help="images per sampler row")
    ap.add_argument("--n-inpaint", type=int, default=100)
    ap.add_argument("--inpaint-steps", type=int, default=100)
    ap.add_argument("--inpaint-step", choices=("em", "heun"), default="heun")
    ap.add_argument("--inpaint-batch", type=int, default=256)
    ap.add_argument("--resample", type=int, default=1, help="RePaint's U (1: the plain replacement)")
    ap.add_argument("--jump", type=int, default=1, help="RePaint's J, steps per resampled block")
    ap.add_argument("--ancestral", action="store_true")
    ap.add_argument("--skip-fd", action="store_true")
    ap.add_argument("--backend", default="numba")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "mnist_fast_samplers.json"))
    a = ap.parse_args()
    # through load_generator, as `refdiff sample` loads it: x0- and v-networks and class-conditional
    # ones (the null label) are seen by every sampler as eps-models (refdiff.prediction.as_eps)
    model, meta, _ = load_generator(a.checkpoint, want="eps", use_ema=True, backend=a.backend)
    clf = load_model(a.classifier, expect="classifier", use_ema=True)[0]
    x_tr, y_tr, x_te, y_te = load_real("mnist5k")
    ev = Evaluator(clf, x_tr, x_te, y_te)
    what = "inpainting accuracy" if a.skip_fd else "feature FD vs NFE of the ODE samplers; inpainting accuracy"
    result = dict(benchmark="MNIST: " + what,
                  command=" ".join(["python benchmarks/mnist_fast_samplers.py"] + sys.argv[1:]),
                  checkpoint=dict(path=os.path.abspath(a.checkpoint), epoch=meta.get("epoch"),
                                  model=model.name),
                  fd_floor_heldout_vs_train_1000=ev.fd_floor, classifier_accuracy=ev.accuracy)
    if not a.skip_fd:
        result["n"] = a.n                   # images per sampler row of the FD curve
    from _common import environment, write_json
    result["inpainting"], done, empty = inpainting(model, meta, ev, a, x_te, y_te)
    from refdiff.figures import save_grid
    save_grid(os.path.splitext(a.out)[0] + "_inpainting.png",
              np.concatenate([empty[:16], done[:16], x_te[:16]]).astype(np.float32), nrow=16)
    write_json(a.out, dict(result, environment=environment()))
    if not a.skip_fd:
        result["samplers"] = fd_rows(model, meta, ev, a)
        plot(result["samplers"], os.path.splitext(a.out)[0] + ".png")
    write_json(a.out, dict(result, environment=environment()))


if __name__ == "__main__":
    main()
