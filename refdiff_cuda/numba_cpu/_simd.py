"""Register-blocked SIMD micro-kernel for the implicit-GEMM conv (conv2d version 5), written
in LLVM IR and compiled at run time by llvmlite (numba's own compiler; no C toolchain).

Why not plain @njit: the kernel needs MR x NV accumulators (rows of output channels x
vectors of pixels) to stay in registers across the whole sum over taps. Written as numba
loops, LLVM either vectorised the wrong loop (the sum, with gathers) or kept everything
scalar: 5-20 GFLOP/s per core measured, against ~95 for this kernel. LLVM IR states the
vectors and the fused multiply-adds (llvm.fma) outright, and LLVM picks the instructions
for the host CPU (AVX-512, AVX2 or SSE).

    ukernel(x, off, K, w, ldw, y, ldy, npix)      (all pointers to one dtype; off: int64)

      y[r, n] = sum_k w[r, k] * x[off[k] + n]      r < MR, n < npix rounded up to NV L,
                                                    L = 16 float32 / 8 float64 lanes

x is read at off[k] + n for every n < npix rounded up (callers leave that much slack past
the data), and y gets whole vectors (callers give it ldy >= npix rounded up). The sum over
k runs in order k = 0, 1, ..., one fused multiply-add per term, per output entry.
"""
from __future__ import annotations

import ctypes
import functools

import numpy as np

LANES = {np.dtype(np.float32): 16, np.dtype(np.float64): 8}
_TY = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
_SIG = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                        ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64)


def _ir(MR, NV, dtype):
    """IR text of the kernel for MR rows x NV vectors of L lanes."""
    t = _TY[np.dtype(dtype)]
    L = LANES[np.dtype(dtype)]
    v = f"<{L} x {t}>"
    acc = [(r, j) for r in range(MR) for j in range(NV)]
    zero = "zeroinitializer"
    lines = [f"declare {v} @llvm.fma.v{L}{'f32' if t == 'float' else 'f64'}({v}, {v}, {v})",
             f"define void @uk({t}* noalias %x, i64* noalias %off, i64 %K, {t}* noalias %w, i64 %ldw, "
             f"{t}* noalias %y, i64 %ldy, i64 %npix) #0 {{",
             "entry:",
             "  br label %nloop",
             "nloop:",
             "  %n0 = phi i64 [0, %entry], [%n0next, %nstore]",
             "  br label %kloop",
             "kloop:",
             "  %k = phi i64 [0, %nloop], [%knext, %kloop]"]
    for r, j in acc:
        lines.append(f"  %a{r}_{j} = phi {v} [{zero}, %nloop], [%f{r}_{j}, %kloop]")
    lines += ["  %offp = getelementptr i64, i64* %off, i64 %k",
              "  %o = load i64, i64* %offp",
              "  %xb = add i64 %o, %n0"]
    for j in range(NV):
        lines += [f"  %xi{j} = add i64 %xb, {j * L}",
                  f"  %xp{j} = getelementptr {t}, {t}* %x, i64 %xi{j}",
                  f"  %xq{j} = bitcast {t}* %xp{j} to {v}*",
                  f"  %xv{j} = load {v}, {v}* %xq{j}, align 4"]
    for r in range(MR):
        lines += [f"  %wr{r} = mul i64 %ldw, {r}",
                  f"  %wi{r} = add i64 %wr{r}, %k",
                  f"  %wp{r} = getelementptr {t}, {t}* %w, i64 %wi{r}",
                  f"  %ws{r} = load {t}, {t}* %wp{r}",
                  f"  %wv0_{r} = insertelement {v} undef, {t} %ws{r}, i32 0",
                  f"  %wv{r} = shufflevector {v} %wv0_{r}, {v} undef, <{L} x i32> zeroinitializer"]
        for j in range(NV):
            lines.append(f"  %f{r}_{j} = call {v} @llvm.fma.v{L}{'f32' if t == 'float' else 'f64'}"
                         f"({v} %wv{r}, {v} %xv{j}, {v} %a{r}_{j})")
    lines += ["  %knext = add i64 %k, 1",
              "  %kdone = icmp sge i64 %knext, %K",
              "  br i1 %kdone, label %nstore, label %kloop",
              "nstore:"]
    for r, j in acc:
        lines += [f"  %yr{r}_{j} = mul i64 %ldy, {r}",
                  f"  %yi{r}_{j} = add i64 %yr{r}_{j}, %n0",
                  f"  %yj{r}_{j} = add i64 %yi{r}_{j}, {j * L}",
                  f"  %yp{r}_{j} = getelementptr {t}, {t}* %y, i64 %yj{r}_{j}",
                  f"  %yq{r}_{j} = bitcast {t}* %yp{r}_{j} to {v}*",
                  f"  store {v} %f{r}_{j}, {v}* %yq{r}_{j}, align 4"]
    lines += [f"  %n0next = add i64 %n0, {NV * L}",
              "  %ndone = icmp sge i64 %n0next, %npix",
              "  br i1 %ndone, label %exit, label %nloop",
              "exit:",
              "  ret void",
              "}",
              'attributes #0 = { "prefer-vector-width"="512" "min-legal-vector-width"="512" nounwind }']
    return "\n".join(lines)


@functools.lru_cache(maxsize=None)
def _engine():
    import llvmlite.binding as ll
    ll.initialize_native_target()
    ll.initialize_native_asmprinter()
    target = ll.Target.from_default_triple()
    tm = target.create_target_machine(cpu=ll.get_host_cpu_name(), features=ll.get_host_cpu_features().flatten(),
                                      opt=3)
    engine = ll.create_mcjit_compiler(ll.parse_assembly(""), tm)
    return ll, tm, engine


@functools.lru_cache(maxsize=None)
def kernel(MR, NV, dtype):
    """Address of the compiled kernel (K >= 1 and npix >= 1 required: the loops run at least once)."""
    ll, tm, engine = _engine()
    mod = ll.parse_assembly(_ir(MR, NV, dtype).replace("@uk(", f"@uk_{MR}_{NV}_{np.dtype(dtype).char}("))
    mod.verify()
    pto = ll.create_pipeline_tuning_options(speed_level=3)
    pb = ll.create_pass_builder(tm, pto)
    pb.getModulePassManager().run(mod, pb)
    engine.add_module(mod)
    engine.finalize_object()
    return engine.get_function_address(f"uk_{MR}_{NV}_{np.dtype(dtype).char}")


def call(MR, NV, x, off, K, w, ldw, y, ldy, npix):
    """Python-level call (for tests and timing; numba code calls the address directly)."""
    f = _SIG(kernel(MR, NV, x.dtype))
    f(x.ctypes.data, off.ctypes.data, K, w.ctypes.data, ldw, y.ctypes.data, ldy, npix)
