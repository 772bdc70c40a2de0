"""refdiff: score-based diffusion models, a readable NumPy reference with manual backprop.

The numerical core: `sde` (forward SDEs and the DDPM chain), `nn` (op pairs, their tangent
pairs, and the models), `losses` (DSM, SSM), `samplers` (reverse-time SDE/ODE),
`solvers` (DPM-Solver++, EDM, adaptive RK45, stochastic Heun), `ddpm` (ancestral, DDIM),
`likelihood` (log p(x) through the probability-flow ODE), `inpaint`, `metrics`, `optim`,
`data`. The application layer built on it: `objectives`, `train`, `ring`, `generate`,
`image_scores`, `compare`, `figures`, `checkpoint`, `io`, and the command line in `cli`
and `commands/` (which the library never imports). The accelerated backend is
`refdiff_cuda`; docs/architecture.md maps one onto the other.
"""
__version__ = "0.1.0"
