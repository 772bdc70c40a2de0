"""Golden end-to-end values of a small UNet's training, from the NumPy reference.

Regenerate (after a deliberate change of the reference's maths) with

    python -m tests.golden.make_golden

which rewrites tests/golden/unet_train_float32.npz and unet_train_float64.npz (and the tiny
float64 one, and unet_ddpm_train_float32/64.npz: the same for unet-ddpm, see DDPM_CONFIG). Each file
holds: `config` (the model's exact make_model("unet", ...) options, JSON), `version`,
the inputs of every step (xt, t, eps), the 10 losses, and every parameter gradient of
every step ("grad/<step>/<name>"). tests/test_backend_golden.py (and the CUDA-simulator
and CuPy test modules) rerun `train` below on each backend and compare.

The step is DDPM eps-prediction training (Ho et al. 2020, Alg. 1) written inline:
x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps with refdiff.sde.DDPMSchedule, the model
fed the continuous time (i + 1) / N of refdiff's UNet convention, loss = MSE(eps_theta, eps)
(refdiff's mse op: mean over the batch of the per-sample sum), refdiff.optim.Adam lr 1e-3.
"""
from __future__ import annotations

import json
import os

import numpy as np

VERSION = 1
STEPS = 10
HERE = os.path.dirname(os.path.abspath(__file__))
# 6 -> 3 -> 1: level 1 is odd (Conv 2x2 + Conv 4x4 down, ConvT 4x4 + ConvT 2x2 up), two blocks
# per stage (first and later blocks), in_channels 1 (enc.0's GroupNorm has one channel).
CONFIG = dict(in_channels=1, image_size=6, channels=[4, 8], blocks=2, mid_channels=4, emb_dim=8,
              time_scale=1000.0, max_groups=8, final_norm=False)
BATCH, LR = 4, 1e-3
# A tinier run for numba's CUDA simulator, which executes every GPU thread as a Python thread
# (the full run above takes minutes there): same structure, 2 -> 4 channels, one block per
# stage, one image, 2 steps. Stored in float64 only.
TINY = dict(config=dict(CONFIG, channels=[2, 4], blocks=1, mid_channels=2, emb_dim=4), batch=1, steps=2)


def path(dtype, tiny=False):
    return os.path.join(HERE, f"unet_train{'_tiny' if tiny else ''}_{np.dtype(dtype).name}.npz")


def make_data(seed=1234, batch=BATCH, steps=STEPS):
    """Inputs of each step, in float64: x_t (steps, B, 1, 6, 6), t (steps, B), eps."""
    from refdiff.sde import DDPMSchedule
    rng = np.random.default_rng(seed)
    sched = DDPMSchedule()
    x0 = rng.uniform(-1, 1, (batch, 1, CONFIG["image_size"], CONFIG["image_size"]))
    xs, ts, es = [], [], []
    for _ in range(steps):
        i = rng.integers(0, sched.num_steps, batch)
        eps = rng.standard_normal(x0.shape)
        mean, std = sched.marginal(x0, i)
        xs.append(mean + std * eps)
        ts.append((i + 1) / sched.num_steps)
        es.append(eps)
    return np.stack(xs), np.stack(ts), np.stack(es)


def _fit(model, xt, t, target, steps, extra=lambda k: ()):
    """`steps` Adam steps (lr LR) of refdiff's mse(model(x_t, t, *extra(k)), target); -> (losses
    (steps,), [{name: grad (host)} per step]). The one loop both golden runs take."""
    from refdiff.optim import Adam
    opt, ops, dtype = Adam(model, lr=LR), model.ops, model.dtype
    losses, grads = [], []
    for k in range(steps):
        model.zero_grad()
        y = model.forward(ops.asarray(xt[k].astype(dtype)), t[k], *extra(k))
        loss, cache = ops.mse_forward(y, ops.asarray(target[k].astype(dtype)))
        model.backward(ops.mse_backward(cache))
        losses.append(float(loss))
        grads.append({n: np.array(ops.to_numpy(g)) for n, g in model.grads.items()})
        opt.step()
    return np.array(losses), grads


def train(backend, dtype, xt, t, eps, steps=STEPS, config=None):
    """Run `steps` training steps; -> (losses (steps,), [{name: grad (host)} per step])."""
    from refdiff.nn import make_model
    return _fit(make_model("unet", dtype=dtype, seed=0, backend=backend, **(config or CONFIG)), xt, t, eps, steps)


def _load(file):
    with np.load(file) as f:
        data = dict(f)
    data["config"] = json.loads(str(data["config"]))
    data["grads"] = [{k.split("/", 2)[2]: v for k, v in data.items() if k.startswith(f"grad/{s}/")}
                     for s in range(len(data["losses"]))]
    return data


def _save(file, config, version, losses, grads, **inputs):
    out = dict(config=json.dumps(config), version=version, losses=losses, command="python -m tests.golden.make_golden",
               **inputs)
    for s, g in enumerate(grads):
        out.update({f"grad/{s}/{n}": v for n, v in g.items()})
    np.savez_compressed(file, **out)
    print(f"wrote {file}: {len(grads[0])} gradient tensors x {len(losses)} steps; losses {losses.round(4)}")


def load(dtype, tiny=False):
    return _load(path(dtype, tiny))


def write(dtype, config, batch, steps, tiny):
    xt, t, eps = make_data(batch=batch, steps=steps)
    losses, grads = train("numpy", dtype, xt, t, eps, steps, config)
    _save(path(dtype, tiny), config, VERSION, losses, grads, xt=xt, t=t, eps=eps)


# --- the second golden run: unet-ddpm (refdiff/nn/unet_ddpm.py) --------------------------------
# 8 -> 4: two levels, a 1x1 skip conv (4 -> 8 channels), two-head attention at level 1 and in
# the middle, upsampling, three classes and the null label, dropout 0.2 whose masks come from
# the seeds [DROPOUT_SEED, step] (drawn on the host, so every backend draws the same), v as the
# target (a fixed v-target stands in for the conversion; what is checked is the network).
# max_groups 2 and zero_init False so that every parameter gets a gradient from step 0.
DDPM_CONFIG = dict(in_channels=1, image_size=8, channels=[4, 8], blocks=1, attention=[1], heads=2, dropout=0.2,
                   num_classes=3, emb_mult=2, max_groups=2, zero_init=False)
DDPM_VERSION, DROPOUT_SEED = 1, 77


def ddpm_path(dtype):
    return os.path.join(HERE, f"unet_ddpm_train_{np.dtype(dtype).name}.npz")


def ddpm_data(seed=4321, batch=BATCH, steps=STEPS):
    """Inputs of each unet-ddpm step, float64: x_t (steps, B, 1, 8, 8), t (steps, B), the
    target (steps, B, 1, 8, 8), labels (steps, B) in [0, 3] (3 = the null label)."""
    rng = np.random.default_rng(seed)
    size = DDPM_CONFIG["image_size"]
    return (rng.standard_normal((steps, batch, 1, size, size)), rng.uniform(0.001, 1.0, (steps, batch)),
            rng.standard_normal((steps, batch, 1, size, size)), rng.integers(0, 4, (steps, batch)))


def train_ddpm(backend, dtype, xt, t, target, labels, steps=STEPS, config=None):
    """`steps` Adam steps of MSE(unet-ddpm(x_t, t, y, dropout), target); -> (losses, grads) as train."""
    from refdiff.nn import make_model
    model = make_model("unet-ddpm", dtype=dtype, seed=0, backend=backend, **(config or DDPM_CONFIG))
    return _fit(model, xt, t, target, steps, lambda k: (labels[k], np.random.default_rng([DROPOUT_SEED, k])))


def write_ddpm(dtype):
    xt, t, target, labels = ddpm_data()
    losses, grads = train_ddpm("numpy", dtype, xt, t, target, labels)
    _save(ddpm_path(dtype), DDPM_CONFIG, DDPM_VERSION, losses, grads, xt=xt, t=t, eps=target, labels=labels)


def load_ddpm(dtype):
    return _load(ddpm_path(dtype))


def main():
    for dtype in (np.float32, np.float64):
        write(dtype, CONFIG, BATCH, STEPS, False)
        write_ddpm(dtype)
    write(np.float64, TINY["config"], TINY["batch"], TINY["steps"], True)


if __name__ == "__main__":
    main()
