"""Measured orders of convergence of the SDE and ODE solvers, on equations with exact solutions.

Strong error  E|X^h_N - X_T|  over M Brownian paths (the same path, refined: the coarse
increments are sums of the fine ones; X_T exact on that path). Weak error  |E f(X^h_N) - E f(X_T)|
computed exactly, without Monte Carlo: both test equations are linear, so one step of EM or Heun
is a polynomial in x and dW whose expectation Gauss-Hermite quadrature gives exactly, applied to
the step functions of refdiff.solvers themselves (a Monte Carlo estimate could not resolve
Heun's O(h^2) weak error below ~1e-4 at any affordable M). The slope of log error against
log h, fitted by least squares over N = 16..512 steps, is the measured order.

1. Geometric Brownian motion (multiplicative noise, Ito): dX = lam X dt + mu X dW, X_0 = 1,
   X_T = exp((lam - mu^2/2) T + mu W_T) (Higham 2001). f(x) = x, E X_T = e^{lam T}.
   Euler-Maruyama: strong 1/2, weak 1 (Kloeden & Platen thms. 10.2.2, 14.5.1). Stochastic Heun
   on the Stratonovich form (drift lam - mu^2/2): strong 1 (scalar noise, Rümelin 1982), weak 1.
2. Ornstein-Uhlenbeck (additive noise, as the reverse diffusion SDE): dX = -th X dt + s dW.
   Exact on the fine grid by the joint Gaussian law of (dW_j, int e^{-th(t_{j+1}-u)} dW_u);
   f(x) = x^2. With additive noise EM's strong order is 1 (the Milstein term vanishes), weak 1;
   stochastic Heun strong 1, weak 2.
3. Probability-flow ODEs of VP(0.1, 20) for data N(m, c^2), whose flow keeps
   (x - gamma_t m) / sqrt(gamma_t^2 c^2 + std_t^2): error at t_min against that exact map.
   refdiff.samplers.probability_flow_heun (Heun in t, order 2), DPM-Solver++ order 1 (= DDIM)
   and 2M, EDM Heun (order 2; reference: the exact state at sigma_min, then the method's last
   Euler step to sigma = 0, as tests/test_solvers.py).

Writes benchmarks/results/solver_order.json (slopes, theory, errors per step count; command,
machine, commit) and benchmarks/results/solver_order.png (log-log).

    python benchmarks/solver_order.py [--paths 40000] [--fine 10]
"""
import argparse
import math
import os
import sys

import numpy as np

from refdiff import samplers, solvers
from refdiff.sde import VP

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def slope(h, err):
    """Least-squares slope of log err against log h."""
    return float(np.polyfit(np.log(h), np.log(err), 1)[0])


def refine_increments(dW_fine, N):
    """Sum the fine increments (M, F) in groups: the same path on N steps -> (M, N)."""
    M, F = dW_fine.shape
    return dW_fine.reshape(M, N, F // N).sum(axis=2)


def integrate(step, b, sig, x0, dW, T):
    x, N = np.full(dW.shape[0], x0, dtype=np.float64), dW.shape[1]
    h = T / N
    for k in range(N):
        x = step(b, sig, x, k * h, (k + 1) * h, dW[:, k])
    return x


def gbm(args, rng):
    lam, mu, T, x0 = 2.0, 1.0, 1.0, 1.0                      # Higham 2001's example
    F = 2 ** args.fine
    Ns = [2 ** k for k in range(4, 10)]
    steppers = {"euler-maruyama": (solvers.em_step, lambda x, t: lam * x),
                "stochastic-heun": (solvers.stochastic_heun_step, lambda x, t: (lam - 0.5 * mu * mu) * x)}
    sums = {m: {"strong": np.zeros(len(Ns))} for m in steppers}
    done = 0
    while done < args.paths:
        M = min(args.chunk, args.paths - done)
        dW = math.sqrt(T / F) * rng.standard_normal((M, F))
        exact = x0 * np.exp((lam - 0.5 * mu * mu) * T + mu * dW.sum(axis=1))
        for name, (step, b) in steppers.items():
            for i, N in enumerate(Ns):
                x = integrate(step, b, lambda x, t: mu * x, x0, refine_increments(dW, N), T)
                sums[name]["strong"][i] += np.abs(x - exact).sum()
        done += M
    # weak error of f(x) = x, exactly: a step is linear in x, so E X_N = x0 (E step(1, dW))^N
    weak = {name: [abs(x0 * gauss_expectation(lambda w: step(b, lambda x, t: mu * x, 1.0, 0.0, T / N, w), T / N) ** N
                       - x0 * math.exp(lam * T)) for N in Ns] for name, (step, b) in steppers.items()}
    theory = {"euler-maruyama": (0.5, 1.0), "stochastic-heun": (1.0, 1.0)}
    return _rows("gbm", Ns, T, sums, args.paths, theory, weak)


def ou(args, rng):
    th, s, T, x0 = 2.0, 1.0, 1.0, 1.0
    F = 2 ** args.fine
    d = T / F
    Ns = [2 ** k for k in range(4, 10)]
    # joint law per fine interval of (dW, I = int e^{-th (t_{j+1} - u)} dW_u)
    vW, vI, cWI = d, -math.expm1(-2 * th * d) / (2 * th), -math.expm1(-th * d) / th
    L = np.linalg.cholesky(np.array([[vW, cWI], [cWI, vI]]))
    steppers = {"euler-maruyama": solvers.em_step, "stochastic-heun": solvers.stochastic_heun_step}
    sums = {m: {"strong": np.zeros(len(Ns))} for m in steppers}
    done = 0
    while done < args.paths:
        M = min(args.chunk, args.paths - done)
        z = rng.standard_normal((M, F, 2)) @ L.T
        dW, I = z[..., 0], z[..., 1]
        exact = np.full(M, x0)
        for j in range(F):
            exact = math.exp(-th * d) * exact + s * I[:, j]
        for name, step in steppers.items():
            for i, N in enumerate(Ns):
                x = integrate(step, lambda x, t: -th * x, lambda x, t: s, x0, refine_increments(dW, N), T)
                sums[name]["strong"][i] += np.abs(x - exact).sum()
        done += M
    # weak error of f(x) = x^2, exactly: a step is affine, x' = A x + c dW (A, c read off the step
    # function itself), so the numerical law is Gaussian with mean A^N x0, variance sum c^2 h A^2j
    weak = {}
    for name, step in steppers.items():
        weak[name] = []
        for N in Ns:
            h = T / N
            A = float(step(lambda x, t: -th * x, lambda x, t: s, np.array([1.0]), 0.0, h, 0.0)[0])
            c = float(step(lambda x, t: -th * x, lambda x, t: s, np.array([0.0]), 0.0, h, 1.0)[0])
            mean, var = A ** N * x0, c * c * h * sum(A ** (2 * j) for j in range(N))
            exact2 = math.exp(-2 * th * T) * x0 ** 2 - s * s * math.expm1(-2 * th * T) / (2 * th)
            weak[name].append(abs(mean * mean + var - exact2))
    theory = {"euler-maruyama": (1.0, 1.0), "stochastic-heun": (1.0, 2.0)}
    return _rows("ou", Ns, T, sums, args.paths, theory, weak)


def _rows(problem, Ns, T, sums, M, theory, weak):
    rows = []
    for name, acc in sums.items():
        h = T / np.array(Ns, dtype=float)
        strong = acc["strong"] / M
        rows.append(dict(problem=problem, method=name, kind="strong", steps=Ns, h=h.tolist(), error=strong.tolist(),
                         slope=slope(h, strong), theory=theory[name][0], paths=M))
        rows.append(dict(problem=problem, method=name, kind="weak", steps=Ns, h=h.tolist(), error=weak[name],
                         slope=slope(h, np.array(weak[name])), theory=theory[name][1], paths="exact expectation"))
    return rows


def gauss_expectation(f, h, nodes=8):
    """E f(dW), dW ~ N(0, h), by Gauss-Hermite quadrature (exact for polynomials of degree < 16:
    one step of EM or Heun is a polynomial of degree <= 2 in dW)."""
    z, w = np.polynomial.hermite_e.hermegauss(nodes)
    return float(np.sum(w * np.array([f(math.sqrt(h) * zi) for zi in z])) / math.sqrt(2 * math.pi))


def ode(args):
    sde, m, c, t_min = VP(), 0.5, 0.3, 1e-3
    n = 500

    def sf(x, t):
        gamma, std = sde.marginal_coeffs(np.asarray(t, dtype=float))
        return -(x - gamma[:, None] * m) / (gamma[:, None] ** 2 * c * c + std[:, None] ** 2)

    def exact_flow(x_T, t_end):
        (g0, s0), (g1, s1) = (sde.marginal_coeffs(np.float64(t)) for t in (sde.T, t_end))
        return g1 * m + (x_T - g0 * m) * math.sqrt((g1 ** 2 * c * c + s1 ** 2) / (g0 ** 2 * c * c + s0 ** 2))

    x_T = sde.prior_sample((n, 1), np.random.default_rng(0))
    sig0, smin = 80.0, solvers._sigma_of_t(sde, t_min)
    x_min = m + (sig0 * x_T - m) * math.sqrt(c * c + smin ** 2) / math.sqrt(c * c + sig0 ** 2)
    edm_exact = m + (x_min - m) * c * c / (c * c + smin ** 2)
    t_pf = 1e-5                                                # probability_flow_heun's default floor
    methods = {
        "probability-flow-heun": (lambda N: samplers.probability_flow_heun(sde, sf, (n, 1), N,
                                                                           np.random.default_rng(0)),
                                  exact_flow(x_T, t_pf), 2, lambda N: 2 * N),
        "dpm-solver++-1 (ddim)": (lambda N: solvers.dpm_solver_pp(sde, sf, (n, 1), N, None, order=1, x_T=x_T),
                                  exact_flow(x_T, t_min), 1, lambda N: N),
        "dpm-solver++-2m": (lambda N: solvers.dpm_solver_pp(sde, sf, (n, 1), N, None, x_T=x_T),
                            exact_flow(x_T, t_min), 2, lambda N: N),
        "edm-heun": (lambda N: solvers.edm_sampler(sde, sf, (n, 1), N, None, x_T=x_T), edm_exact, 2,
                     lambda N: 2 * N - 1),
    }
    rows = []
    for name, (run, exact, th, nfe) in methods.items():
        Ns = [32, 64, 128, 256, 512] if name == "probability-flow-heun" else [32, 64, 128, 256]
        err = [float(np.mean(np.abs(run(N) - exact))) for N in Ns]
        h = 1.0 / np.array(Ns, dtype=float)
        rows.append(dict(problem="pf-ode-gaussian", method=name, kind="global", steps=Ns, nfe=[nfe(N) for N in Ns],
                         h=h.tolist(), error=err, slope=slope(h, err), theory=th))
    return rows


def plot(rows, path):
    from refdiff.figures import pyplot, save_figure
    plt = pyplot()
    panels = [("gbm", "strong"), ("gbm", "weak"), ("ou", "strong"), ("ou", "weak"), ("pf-ode-gaussian", "global")]
    titles = {"gbm": "geometric BM (multiplicative)", "ou": "OU (additive)", "pf-ode-gaussian": "PF-ODE, Gaussian data"}
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4))
    for ax, (prob, kind) in zip(axes, panels):
        for r in (r for r in rows if r["problem"] == prob and r["kind"] == kind):
            ax.loglog(r["h"], r["error"], "o-", label=f"{r['method']}: {r['slope']:.2f} (theory {r['theory']:g})")
        ax.set_title(f"{titles[prob]}: {kind} error")
        ax.set_xlabel("step h (1 / steps)")
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("error")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--paths", type=int, default=40000, help="Brownian paths for the SDE errors")
    ap.add_argument("--chunk", type=int, default=10000)
    ap.add_argument("--fine", type=int, default=10, help="log2 of the fine grid's steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "solver_order.json"))
    a = ap.parse_args()
    rng = np.random.default_rng(a.seed)
    rows = gbm(a, rng) + ou(a, rng) + ode(a)
    for r in rows:
        print(f"{r['problem']:16s} {r['method']:24s} {r['kind']:6s} slope {r['slope']:.3f} (theory {r['theory']})")
    from _common import environment, write_json
    write_json(a.out, dict(benchmark="measured orders of convergence (slope of log error vs log step)",
                           command=" ".join(["python benchmarks/solver_order.py"] + sys.argv[1:]),
                           paths=a.paths, fine_steps=2 ** a.fine, results=rows, environment=environment()))
    plot(rows, os.path.splitext(a.out)[0] + ".png")


if __name__ == "__main__":
    main()
