"""refdiff's DPM-Solver++(2M), EDM Heun and likelihood against diffusers and score_sde's recipe.

Run OUTSIDE refdiff's dependencies, in a scratch environment holding torch and diffusers
(refdiff never imports either):

    python -m venv /tmp/xv && /tmp/xv/bin/pip install torch diffusers numpy scipy
    PYTHONPATH=. /tmp/xv/bin/python benchmarks/crosscheck_diffusers.py

Both sides are driven by the same oracle, the exact denoiser of GaussianMixture.default()
(eps for the DDPM chain, x0 for EDM's sigma), and the same initial noise, in float64:

1. DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, linear betas
   1e-4 -> 0.02 over 1000, timestep_spacing="trailing", final_sigmas_type="zero") against
   refdiff.solvers.dpm_solver_pp_ddpm(spacing="trailing") on refdiff.sde.DDPMSchedule.
2. HeunDiscreteScheduler(use_karras_sigmas=True, same betas) against refdiff.solvers.edm_sampler
   (S_churn = 0) on a VE SDE spanning the scheduler's sigmas, with sigma_max and t_min set to
   its Karras grid's ends and x_T scaled to its init_noise_sigma.

3. refdiff.likelihood.log_likelihood against score_sde's likelihood.py recipe written here in
   torch: the drift's divergence by autograd (v^T grad(v . drift), the same Rademacher probe;
   and the full autograd Jacobian's trace for "exact"), the mixture's score by autograd of its
   log-density (independent of refdiff's analytic score and JVP), the same solve_ivp call.

Prints and writes benchmarks/results/crosscheck_diffusers.json: the largest and the median
absolute difference of the outputs (points of size ~2) per step count, with diffusers' schedule
as it builds it (betas in float32) and rebuilt in float64. DPMSolverMultistepScheduler.step
also casts the state and its sigmas to float32 whatever the input's dtype, so that comparison
agrees to float32 rounding (amplified where the mixture's posterior is sharp); the Heun
scheduler keeps float64 and agrees to float64 rounding.
"""
import json
import os
import sys

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler, HeunDiscreteScheduler

from refdiff import solvers
from refdiff.data.toy import GaussianMixture
from refdiff.ddpm import ddim_timesteps
from refdiff.sde import VE, DDPMSchedule

HERE = os.path.dirname(os.path.abspath(__file__))


class Marginal:
    """An object with marginal_coeffs(t) -> (gamma, std) for GaussianMixture.score."""

    def __init__(self, gamma, std):
        self.g, self.s = gamma, std

    def marginal_coeffs(self, t):
        n = np.shape(t)
        return np.broadcast_to(self.g, n).astype(float), np.broadcast_to(self.s, n).astype(float)


def float64_schedule(s):
    """diffusers builds its betas in float32; redo the schedule's tensors in float64 so that only
    the algorithms are compared (set_timesteps then derives its sigmas from these)."""
    s.betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    s.alphas = 1.0 - s.betas
    s.alphas_cumprod = torch.cumprod(s.alphas, dim=0)
    if hasattr(s, "alpha_t"):
        s.alpha_t, s.sigma_t = torch.sqrt(s.alphas_cumprod), torch.sqrt(1 - s.alphas_cumprod)
        s.lambda_t = torch.log(s.alpha_t) - torch.log(s.sigma_t)
    return s


def dpm(gmm, steps, z, f64):
    sch = DDPMSchedule()
    N = sch.num_steps

    def eps(x, i):
        ab = sch.alpha_bars[i]
        return -np.sqrt(1 - ab) * gmm.score(x, np.zeros(len(x)), Marginal(np.sqrt(ab), np.sqrt(1 - ab)))

    class Oracle:
        name, kind, dtype = "oracle", "eps", np.dtype(np.float64)
        from refdiff.backend import get_ops
        ops = get_ops(None)

        def forward(self, x, t):
            return eps(x, int(round(float(np.asarray(t)[0]) * N)) - 1)

    ours = solvers.dpm_solver_pp_ddpm(Oracle(), sch, z.shape, None, steps=steps, spacing="trailing", x_T=z)
    s = DPMSolverMultistepScheduler(num_train_timesteps=N, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                                    algorithm_type="dpmsolver++", solver_order=2, prediction_type="epsilon",
                                    timestep_spacing="trailing", final_sigmas_type="zero", lower_order_final=True)
    if f64:
        float64_schedule(s)
    s.set_timesteps(steps)
    assert list(s.timesteps.numpy()) == list(ddim_timesteps(N, steps, "trailing")), "timesteps differ"
    x = torch.from_numpy(z.copy())
    for t in s.timesteps:
        e = torch.from_numpy(eps(x.numpy(), int(t)))
        x = s.step(e, t, x).prev_sample
    d = np.abs(ours - x.numpy())
    return float(np.max(d)), float(np.median(d))


def heun(gmm, steps, z, f64):
    s = HeunDiscreteScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                              use_karras_sigmas=True, prediction_type="epsilon")
    if f64:
        float64_schedule(s)
    s.set_timesteps(steps)
    sig = s.sigmas.numpy().astype(np.float64)
    smax, smin = float(sig[0]), float(sig[sig > 0].min())

    def denoise(xh, sigma):                       # E[x0 | x0 + sigma n = xh]
        return xh + sigma ** 2 * gmm.score(xh, np.zeros(len(xh)), Marginal(1.0, sigma))

    x = torch.from_numpy(z * float(s.init_noise_sigma))
    for t in s.timesteps:
        s.scale_model_input(x, t)                 # sets the step index
        sigma = float(s.sigmas[s.step_index])
        xh = x.numpy()
        e = torch.from_numpy((xh - denoise(xh, sigma)) / sigma)
        x = s.step(e, t, x).prev_sample
    sde = VE(1e-4, 2 * smax)
    x_T = z * float(s.init_noise_sigma) / smax * sde.prior_std()      # edm_sampler starts at smax x_T / prior_std
    ours = solvers.edm_sampler(sde, lambda y, t: gmm.score(y, t, sde), z.shape, steps, None,
                               t_min=solvers.t_of_sigma(sde, smin), sigma_max=smax, x_T=x_T)
    d = np.abs(ours - x.numpy())
    return float(np.max(d)), float(np.median(d))


def score_sde_recipe(gmm, sde, x, probe, exact):
    """score_sde's get_likelihood_fn (likelihood.py) with torch autograd: log p per point."""
    from scipy import integrate
    means = torch.from_numpy(gmm.means)
    var0 = torch.from_numpy(gmm.covs[:, 0, 0])             # isotropic components
    logw = torch.log(torch.from_numpy(gmm.weights))
    B, D = x.shape

    def drift(y, t):
        y = y.requires_grad_(True) if not y.requires_grad else y
        gamma, std = (float(c) for c in sde.marginal_coeffs(np.float64(t)))
        v = gamma ** 2 * var0 + std ** 2                   # (K,)
        d2 = ((y[:, None, :] - gamma * means[None]) ** 2).sum(-1)
        logp = torch.logsumexp(logw - 0.5 * D * torch.log(2 * np.pi * v) - 0.5 * d2 / v, dim=1)
        score = torch.autograd.grad(logp.sum(), y, create_graph=True)[0]
        g2 = float(sde.diffusion(np.float64(t))) ** 2
        return -float(sde.a(np.float64(t))) * y - 0.5 * g2 * score

    def ode_func(t, z):
        y = torch.from_numpy(z[:-B].reshape(B, D).copy()).requires_grad_(True)
        f = drift(y, t)
        if exact:
            div = sum(torch.autograd.grad(f[:, i].sum(), y, retain_graph=True)[0][:, i] for i in range(D))
        else:
            div = (torch.autograd.grad((f * probe).sum(), y)[0] * probe).sum(1)
        return np.concatenate([f.detach().numpy().ravel(), div.detach().numpy()])

    init = np.concatenate([x.ravel(), np.zeros(B)])
    sol = integrate.solve_ivp(ode_func, (1e-5, sde.T), init, rtol=1e-5, atol=1e-5, method="RK45")
    z = sol.y[:-B, -1].reshape(B, D)
    return sde.prior_logp(z) + sol.y[-B:, -1]


def likelihood_check(gmm):
    from refdiff import likelihood
    from refdiff.sde import VP
    sde = VP()
    x = gmm.sample(200, np.random.default_rng(1))
    rows = []
    for exact in (True, False):
        rng = np.random.default_rng(2)
        ours, _ = likelihood.log_likelihood(sde, likelihood.mixture_score(gmm, sde), x, rng,
                                            divergence="exact" if exact else "hutchinson")
        probe = likelihood.sample_probes((1,) + x.shape, np.random.default_rng(2))[0]   # the same probe
        theirs = score_sde_recipe(gmm, sde, x, torch.from_numpy(probe), exact)
        rows.append(dict(check="refdiff.likelihood.log_likelihood vs score_sde's recipe (torch autograd)",
                         divergence="exact" if exact else "hutchinson (same Rademacher probe)", points=len(x),
                         max_abs_diff_nats=float(np.max(np.abs(ours - theirs))),
                         median_abs_diff_nats=float(np.median(np.abs(ours - theirs)))))
    return rows


def main():
    torch.set_default_dtype(torch.float64)
    gmm = GaussianMixture.default()
    z = np.random.default_rng(0).standard_normal((2000, 2))
    rows = []
    for f64 in (False, True):
        sched = "float64" if f64 else "float32 (as diffusers builds it)"
        rows += [dict(check="DPMSolverMultistepScheduler dpmsolver++ 2M vs refdiff.solvers.dpm_solver_pp_ddpm",
                      schedule=sched, steps=n, abs_diff=dpm(gmm, n, z, f64)) for n in (10, 20, 50)]
        rows += [dict(check="HeunDiscreteScheduler Karras vs refdiff.solvers.edm_sampler (S_churn 0)",
                      schedule=sched, steps=n, abs_diff=heun(gmm, n, z, f64)) for n in (10, 18, 50)]
    lik = likelihood_check(gmm)
    for r in lik:
        print(f"{r['check']}, {r['divergence']}: |diff| max {r['max_abs_diff_nats']:.3g} nats, "
              f"median {r['median_abs_diff_nats']:.3g}")
    for r in rows:
        r["max_abs_diff"], r["median_abs_diff"] = r.pop("abs_diff")
        print(f"{r['check']}, {r['schedule']} schedule: {r['steps']} steps, |diff| max {r['max_abs_diff']:.3g} "
              f"median {r['median_abs_diff']:.3g}")
    import diffusers
    out = dict(command="PYTHONPATH=. /tmp/xv/bin/python benchmarks/crosscheck_diffusers.py", points=len(z),
               torch=torch.__version__, diffusers=diffusers.__version__, results=rows, likelihood=lik)
    path = os.path.join(HERE, "results", "crosscheck_diffusers.json")
    with open(path + ".tmp", "w") as f:
        json.dump(out, f, indent=2)
        f.write("\n")
    os.replace(path + ".tmp", path)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
