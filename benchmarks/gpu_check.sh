#!/usr/bin/env bash
# GPU check for refdiff_cuda, one command, < 8 minutes:  bash benchmarks/gpu_check.sh
#   1. installs what is missing, from wheels only: refdiff[test,numba], cupy-cuda12x and
#      numba-cuda[cu12] (NVIDIA's CUDA target for numba, with NVVM/NVRTC from wheels: no
#      CUDA toolkit needed, only the driver);
#   2. runs the GPU agreement tests (cupy and numba-cuda on the real device: every op and
#      version by hypothesis, Adam, sampler steps, the full 10-step golden in float32+float64);
#   3. `python -m benchmarks`: one unet-seed training step (batch 128) and DDPM sampling on
#      every backend available (numpy, numba, cupy, numba-cuda) and PyTorch where installed;
#   4. writes benchmarks/results/gpu_check.json (device, versions, test counts, timings).
# It has not yet run on a real GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=benchmarks/results
mkdir -p "$OUT"
START=$(date +%s)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/gpu_check_device.txt" 2>&1 \
  || echo "nvidia-smi failed: no NVIDIA driver?" > "$OUT/gpu_check_device.txt"

$PY -c "import refdiff, hypothesis, numba" 2>/dev/null || $PY -m pip install -q -e ".[test,numba]"
$PY -c "import cupy" 2>/dev/null || $PY -m pip install -q --only-binary=:all: cupy-cuda12x
$PY -c "import numba_cuda" 2>/dev/null || $PY -m pip install -q --only-binary=:all: "numba-cuda[cu12]"

unset NUMBA_ENABLE_CUDASIM
timeout 150 $PY -m pytest -q -p no:cacheprovider --junitxml="$OUT/gpu_check_tests.xml" \
  tests/test_backend_ops.py tests/test_backend_registry.py \
  > "$OUT/gpu_check_tests.log" 2>&1
TESTS_RC=$?
tail -3 "$OUT/gpu_check_tests.log"

# the CPU-vs-GPU report: every backend available here (numpy, numba, cupy, numba-cuda) and PyTorch if installed
timeout 240 $PY -m benchmarks --out "$OUT/gpu_bench.json" > "$OUT/gpu_bench.log" 2>&1
BENCH_RC=$?

$PY - "$TESTS_RC" "$BENCH_RC" "$START" <<'PYEOF'
import json, os, sys, time
import xml.etree.ElementTree as ET
out = "benchmarks/results"
tests_rc, bench_rc, start = map(int, sys.argv[1:])
rep = {"device": open(f"{out}/gpu_check_device.txt").read().strip(), "seconds": time.time() - start,
       "exit_codes": {"tests": tests_rc, "bench": bench_rc}}
try:
    root = ET.parse(f"{out}/gpu_check_tests.xml").getroot()
    suite = root if root.tag == "testsuite" else root[0]
    rep["tests"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    rep["failed"] = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                     if c.find("failure") is not None or c.find("error") is not None]
except Exception as exc:  # noqa: BLE001
    rep["tests"] = f"no junit report: {exc}"
for name in ("gpu_bench",):
    try:
        rep[name] = json.load(open(f"{out}/{name}.json"))
    except Exception as exc:  # noqa: BLE001
        rep[name] = f"missing: {exc}"
try:
    import cupy, numba
    rep["versions"] = {"cupy": cupy.__version__, "numba": numba.__version__}
except Exception:  # noqa: BLE001
    pass
json.dump(rep, open(f"{out}/gpu_check.json", "w"), indent=2, default=str)
print(json.dumps({k: rep[k] for k in ("device", "seconds", "exit_codes", "tests")}, indent=1, default=str))
PYEOF
[ "$TESTS_RC" -eq 0 ]
