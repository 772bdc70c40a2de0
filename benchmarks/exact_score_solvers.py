"""Likelihood and fast-sampler accuracy with the EXACT score of a Gaussian mixture.

GaussianMixture.default() (eight components of std 0.15 on a circle of radius 2), VP(0.1, 20).

1. Likelihood (refdiff.likelihood.log_likelihood, exact divergence, rtol = atol = 1e-5,
   t_min = 1e-5) of `--points` data points against the mixture's analytic log-density:
   mean |error| in nats per dimension, and the NFE. Then `--runs` Hutchinson runs (one
   Rademacher probe each) on the same points: the mean of (Hutchinson - exact) over points and
   runs, with its standard error (all probes independent).
2. Samplers (refdiff.solvers, refdiff.samplers): n points each, Fréchet distance and sliced W1
   to `--pairs` independent real sets, each divided by the real-vs-real floor averaged over as
   many pairs (as benchmarks/exact_score.py), each of `--pairs` generated sets (one seed each)
   against its own real set, at several step counts: the FD-vs-NFE curve. The ratios depend
   on n: the floor falls as 1/n while a sampler's bias does not.

Writes benchmarks/results/exact_score_solvers.json (command, machine, commit) and
benchmarks/results/exact_score_solvers.png (the ratios against NFE).

    python benchmarks/exact_score_solvers.py [--points 1000] [--runs 20] [--n 20000] [--pairs 8]

(8 pairs: a Fréchet distance between two samples has a long right tail, and with 4 pairs a
ratio still moved by +-50 % between seeds. The JSON is rewritten after every row.)
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

from refdiff import likelihood, metrics, samplers, solvers
from refdiff.data.toy import GaussianMixture
from refdiff.sde import VP

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def likelihood_rows(gmm, sde, a):
    rng = np.random.default_rng(0)
    x = gmm.sample(a.points, rng)
    true = logsumexp([math.log(w) + multivariate_normal(m, c).logpdf(x)
                      for w, m, c in zip(gmm.weights, gmm.means, gmm.covs)], axis=0)
    sf = likelihood.mixture_score(gmm, sde)
    opts = dict(rtol=1e-5, atol=1e-5, t_min=1e-5)
    exact, nfe = likelihood.log_likelihood(sde, sf, x, rng, divergence="exact", **opts)
    D = x.shape[1]
    out = dict(points=a.points, rtol=1e-5, atol=1e-5, t_min=1e-5, nfe_exact=nfe,
               exact_abs_error_nats_per_dim=float(np.mean(np.abs(exact - true)) / D),
               exact_mean_error_nats_per_dim=float(np.mean(exact - true) / D))
    runs, nfes = [], []
    for _ in range(a.runs):
        lp, n = likelihood.log_likelihood(sde, sf, x, rng, divergence="hutchinson", probes=1, **opts)
        runs.append(lp - exact)
        nfes.append(n)
    diff = np.stack(runs)                                              # (runs, points)
    out.update(hutchinson_runs=a.runs, hutchinson_probe="rademacher", hutchinson_nfe_mean=float(np.mean(nfes)),
               hutchinson_minus_exact_mean=float(diff.mean()),
               hutchinson_minus_exact_se=float(diff.std(ddof=1) / math.sqrt(diff.size)),
               hutchinson_per_sample_std=float(diff.std(ddof=1)))
    print(f"likelihood: exact |err| {out['exact_abs_error_nats_per_dim']:.2e} nats/dim (NFE {nfe}); "
          f"hutchinson - exact {out['hutchinson_minus_exact_mean']:.4f} +- {out['hutchinson_minus_exact_se']:.4f}",
          flush=True)
    return out


def sampler_rows(gmm, sde, a, save):
    sf = lambda x, t: gmm.score(x, t, sde)   # noqa: E731
    shape = (a.n, 2)
    runs = {
        "rk45 (tol)": ([1e-3, 1e-5], lambda tol, r: solvers.rk45_ode(sde, sf, shape, None, r, rtol=tol, atol=tol,
                                                                     return_nfe=True)),
        "dpm-solver++-2m": ([10, 20, 40], lambda N, r: (solvers.dpm_solver_pp(sde, sf, shape, N, r), N)),
        "edm-heun": ([10, 18, 30], lambda N, r: (solvers.edm_sampler(sde, sf, shape, N, r), 2 * N - 1)),
        "pf-ode-heun (samplers)": ([18], lambda N, r: (samplers.probability_flow_heun(sde, sf, shape, N, r), 2 * N)),
        "edm-stochastic (S_churn 10)": ([18], lambda N, r: (solvers.edm_sampler(sde, sf, shape, N, r,
                                                                                  s_churn=10.0), 2 * N - 1)),
        "reverse-heun": ([100], lambda N, r: (solvers.reverse_heun(sde, sf, shape, N, r), 2 * N)),
    }
    rng = np.random.default_rng(1)
    refs = [gmm.sample(a.n, rng) for _ in range(a.pairs)]
    floor_pairs = [(gmm.sample(a.n, rng), gmm.sample(a.n, rng)) for _ in range(a.pairs)]
    sw = lambda p, q: metrics.sliced_wasserstein(p, q, 256, np.random.default_rng(2))   # noqa: E731
    fd_floor = float(np.mean([metrics.frechet_distance(p, q) for p, q in floor_pairs]))
    sw_floor = float(np.mean([sw(p, q) for p, q in floor_pairs]))
    rows = []
    for name, (settings, run) in runs.items():
        for s in settings:
            # `pairs` generated sets (seeds 100..), each against its own real set: a generated
            # set's own sampling noise is averaged as the floor's is
            t0 = time.perf_counter()
            xs = [run(s, np.random.default_rng(100 + i)) for i in range(a.pairs)]
            secs = (time.perf_counter() - t0) / a.pairs
            nfe = max(k for _, k in xs)
            fd = float(np.mean([metrics.frechet_distance(x, r) for (x, _), r in zip(xs, refs)]))
            w1 = float(np.mean([sw(x, r) for (x, _), r in zip(xs, refs)]))
            rows.append(dict(sampler=name, setting=s, nfe=int(nfe), frechet_distance=fd, sliced_w1=w1,
                             fd_ratio=fd / fd_floor, sw_ratio=w1 / sw_floor, seconds=secs))
            print(f"{name:28s} {s!s:7s} NFE {nfe:5d}  FD ratio {fd / fd_floor:6.2f}  SW ratio {w1 / sw_floor:5.2f}",
                  flush=True)
            save(dict(n=a.n, pairs=a.pairs, frechet_floor=fd_floor, sliced_w1_floor=sw_floor, rows=rows))
    return dict(n=a.n, pairs=a.pairs, frechet_floor=fd_floor, sliced_w1_floor=sw_floor, rows=rows)


def plot(result, path):
    """FD ratio and sliced-W1 ratio against NFE, one line per sampler (log-log)."""
    from refdiff.figures import pyplot, save_figure
    plt = pyplot()
    rows = result["samplers"]["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, name in ((axes[0], "fd_ratio", "Fréchet distance"), (axes[1], "sw_ratio", "sliced W1")):
        for sampler in dict.fromkeys(r["sampler"] for r in rows):
            rr = sorted((r for r in rows if r["sampler"] == sampler), key=lambda r: r["nfe"])
            ax.loglog([r["nfe"] for r in rr], [r[key] for r in rr], "o-", label=sampler)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(1.5, color="k", lw=0.8, ls=":")
        ax.set_xlabel("score evaluations (NFE)")
        ax.set_ylabel(f"{name} / real-vs-real floor")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"exact Gaussian-mixture score, n = {result['samplers']['n']}, {result['samplers']['pairs']} pairs")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--points", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "exact_score_solvers.json"))
    ap.add_argument("--plot-only", action="store_true", help="redraw the PNG from an existing --out JSON")
    a = ap.parse_args()
    png = os.path.splitext(a.out)[0] + ".png"
    if a.plot_only:
        with open(a.out) as f:
            plot(json.load(f), png)
        return
    from _common import environment, write_json
    gmm, sde = GaussianMixture.default(), VP()
    result = dict(benchmark="exact Gaussian-mixture score: PF-ODE likelihood error, fast samplers' FD and "
                            "sliced W1 over the real-vs-real floor",
                  command=" ".join(["python benchmarks/exact_score_solvers.py"] + sys.argv[1:]),
                  likelihood=likelihood_rows(gmm, sde, a), environment=environment())

    def save(samplers_part):
        result["samplers"] = samplers_part
        write_json(a.out, result)
    sampler_rows(gmm, sde, a, save)
    plot(result, png)


if __name__ == "__main__":
    main()
