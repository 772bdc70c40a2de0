"""Page faults and system time per call, with glibc's malloc defaults and with the settings the
numba backend makes (refdiff_cuda.numba_cpu.configure_memory), numba and PyTorch.

    python benchmarks/page_faults.py [--threads 2] [--out FILE]

Each case runs in a fresh process holding only its own library (as train_step.py's workers):
numba through refdiff (its settings on, or off with REFDIFF_KEEP_MALLOC=1), PyTorch through
benchmarks/torch_unet.py (glibc's defaults, or the same settings through glibc's environment
variables, train_step.MALLOC_ENV). After two untimed calls, three calls are measured with
getrusage: minor page faults (a page the kernel maps and zero-fills on first touch) and
system CPU time, per call, with the wall time beside them. Cases: unet-seed's training step
without the optimizer (forward and backward, batch 128) on numba; the inference forward
(numba's predict, PyTorch's no_grad forward) of unet-seed and unet-ddpm at batch 64.
Writes results/page_faults.json (machine, commit and date inside).
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

_MEASURE = r"""
import resource, time
def measure(call):
    for _ in range(2):
        call()
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(3):
        call()
    r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    print(json.dumps(dict(faults=(r1.ru_minflt - r0.ru_minflt) / 3, system_s=(r1.ru_stime - r0.ru_stime) / 3,
                          wall_s=(t1 - t0) / 3)))
"""

_NUMBA = r"""
import json, sys
import numpy as np
from refdiff.nn import make_model
name, B, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
m = make_model(name, backend="numba")
x, t = np.random.default_rng(0).standard_normal((B, 1, 28, 28)).astype(np.float32), np.full(B, 0.5)
def call():
    if mode == "predict":
        m.predict(x, t)
    else:
        y = m.forward(x, t)
        m.backward(np.ones_like(y))
""" + _MEASURE + "measure(call)\n"

_TORCH = r"""
import json, pickle, sys
import numpy as np, torch
from torch_unet import TorchUNet, TorchUNetDDPM
torch.set_num_threads(int(sys.argv[3]))
plan, state, emb_dim = pickle.load(open(sys.argv[1], "rb"))
B = int(sys.argv[2])
net = (TorchUNetDDPM if "layout" in plan else TorchUNet)(plan, state).eval()
x, emb = torch.randn(B, 1, 28, 28), torch.randn(B, emb_dim)
def call():
    with torch.no_grad():
        net(x, emb)
""" + _MEASURE + "measure(call)\n"


def _run(code, args, env):
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=HERE, env=env, capture_output=True,
                          text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "page_faults.json"))
    a = ap.parse_args(argv)
    import importlib.util

    from _common import environment, write_json
    from train_step import MALLOC_ENV
    base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "REFDIFF_KEEP_MALLOC"}
    base["PYTHONPATH"] = ROOT + os.pathsep + HERE + os.pathsep + base.get("PYTHONPATH", "")
    numba_env = dict(base, NUMBA_NUM_THREADS=str(a.threads), OPENBLAS_NUM_THREADS=str(a.threads))
    rows = []
    for name, B, mode in (("unet-seed", 128, "train"), ("unet-seed", 64, "predict"), ("unet-ddpm", 64, "predict")):
        for setting, extra in (("glibc defaults", {"REFDIFF_KEEP_MALLOC": "1"}), ("configure_memory", {})):
            r = _run(_NUMBA, (name, B, mode), dict(numba_env, **extra))
            rows.append(dict(library="numba", model=name, batch=B, call=mode, malloc=setting, **r))
            print(f"numba  {name:9s} {mode:7s} b{B:<4d} {setting:16s} {r['faults']:9.0f} faults "
                  f"{r['system_s'] * 1e3:7.1f} ms system {r['wall_s'] * 1e3:8.1f} ms wall", flush=True)
    if importlib.util.find_spec("torch") is not None:
        from sampling import model_for
        from torch_unet import plan_of, plan_of_ddpm
        with tempfile.TemporaryDirectory() as tmp:
            for name in ("unet-seed", "unet-ddpm"):
                ref = model_for(name)
                plan = (plan_of_ddpm if name == "unet-ddpm" else plan_of)(ref)
                emb_dim = ref.config["channels"][0] if name == "unet-ddpm" else ref.config["emb_dim"]
                path = os.path.join(tmp, f"{name}.pkl")
                with open(path, "wb") as f:
                    pickle.dump((plan, {k: np.asarray(v) for k, v in ref.state().items()}, emb_dim), f)
                for setting, extra in (("glibc defaults", {}), ("configure_memory", MALLOC_ENV)):
                    r = _run(_TORCH, (path, 64, a.threads), dict(base, **extra))
                    rows.append(dict(library="torch", model=name, batch=64, call="predict", malloc=setting, **r))
                    print(f"torch  {name:9s} predict b64   {setting:16s} {r['faults']:9.0f} faults "
                          f"{r['system_s'] * 1e3:7.1f} ms system {r['wall_s'] * 1e3:8.1f} ms wall", flush=True)
    write_json(a.out, dict(benchmark="page faults and system time per call, glibc malloc defaults vs "
                                     "configure_memory's settings", threads=a.threads, rows=rows,
                           environment=environment()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
