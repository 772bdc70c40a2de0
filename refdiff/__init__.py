"""refdiff: score-based diffusion models, a readable NumPy reference with manual backprop.

Modules: `sde` (forward SDEs and the DDPM chain), `nn` (ops and models), `optim`,
`losses` (DSM, SSM), `samplers` (reverse-time SDE/ODE), `ddpm` (discrete samplers),
`data`, `metrics`, `checkpoint`, `cli`. The accelerated backend is `refdiff_cuda`.
"""
__version__ = "0.1.0"
