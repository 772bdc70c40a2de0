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
from numba import types
from numba.core.datamodel.models import OpaqueModel, register_default

LANES = {np.dtype(np.float32): 16, np.dtype(np.float64): 8}
_TY = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
_SIG = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                        ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64)


def _vec(op, name, t, v, ptr, index, value=None):
    """IR lines that load (op "load") a vector into %name, or store (op "store") value, at ptr[index]."""
    lines = [f"  %{name}_p = getelementptr {t}, {t}* %{ptr}, i64 {index}",
             f"  %{name}_q = bitcast {t}* %{name}_p to {v}*"]
    if op == "load":
        return lines + [f"  %{name} = load {v}, {v}* %{name}_q, align 4"]
    return lines + [f"  store {v} {value}, {v}* %{name}_q, align 4"]


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
        lines += [f"  %xi{j} = add i64 %xb, {j * L}"] + _vec("load", f"xv{j}", t, v, "x", f"%xi{j}")
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
                  f"  %yj{r}_{j} = add i64 %yi{r}_{j}, {j * L}"] + _vec("store", f"y{r}_{j}", t, v, "y", f"%yj{r}_{j}",
                                                                         f"%f{r}_{j}")
    lines += [f"  %n0next = add i64 %n0, {NV * L}",
              "  %ndone = icmp sge i64 %n0next, %npix",
              "  br i1 %ndone, label %exit, label %nloop",
              "exit:",
              "  ret void",
              "}",
              'attributes #0 = { "prefer-vector-width"="512" "min-legal-vector-width"="512" nounwind }']
    return "\n".join(lines)


def _ir_dw(MR, KR, dtype):
    """IR text of the weight-gradient kernel for MR rows x KR taps (see dw_kernel)."""
    t = _TY[np.dtype(dtype)]
    L = LANES[np.dtype(dtype)]
    v = f"<{L} x {t}>"
    sfx = f"v{L}{'f32' if t == 'float' else 'f64'}"
    acc = [(r, j) for r in range(MR) for j in range(KR)]
    lines = [f"declare {v} @llvm.fma.{sfx}({v}, {v}, {v})",
             f"declare {t} @llvm.vector.reduce.fadd.{sfx}({t}, {v})",
             f"define void @ukdw({t}* noalias %dy, i64 %lddy, {t}* noalias %x, i64* noalias %off, "
             f"{t}* noalias %dw, i64 %lddw, i64 %npix, i64 %ns, i64 %sdy, i64 %sx) #0 {{",
             "entry:"]
    for j in range(KR):
        lines += [f"  %op{j} = getelementptr i64, i64* %off, i64 {j}",
                  f"  %o{j} = load i64, i64* %op{j}"]
    lines += ["  br label %sloop", "sloop:", "  %s = phi i64 [0, %entry], [%snext, %send]"]
    for r, j in acc:
        lines.append(f"  %b{r}_{j} = phi {v} [zeroinitializer, %entry], [%f{r}_{j}, %send]")
    lines += ["  %dys = mul i64 %s, %sdy", "  %xs = mul i64 %s, %sx",
              "  br label %nloop", "nloop:", "  %n = phi i64 [0, %sloop], [%nnext, %nloop]"]
    for r, j in acc:
        lines.append(f"  %a{r}_{j} = phi {v} [%b{r}_{j}, %sloop], [%f{r}_{j}, %nloop]")
    for r in range(MR):
        lines += [f"  %dr{r} = mul i64 %lddy, {r}",
                  f"  %ds{r} = add i64 %dr{r}, %dys",
                  f"  %di{r} = add i64 %ds{r}, %n"] + _vec("load", f"dv{r}", t, v, "dy", f"%di{r}")
    for j in range(KR):
        lines += [f"  %xo{j} = add i64 %o{j}, %xs",
                  f"  %xi{j} = add i64 %xo{j}, %n"] + _vec("load", f"xv{j}", t, v, "x", f"%xi{j}")
    for r, j in acc:
        lines.append(f"  %f{r}_{j} = call {v} @llvm.fma.{sfx}({v} %dv{r}, {v} %xv{j}, {v} %a{r}_{j})")
    lines += [f"  %nnext = add i64 %n, {L}",
              "  %ndone = icmp sge i64 %nnext, %npix",
              "  br i1 %ndone, label %send, label %nloop",
              "send:",
              "  %snext = add i64 %s, 1",
              "  %sdone = icmp sge i64 %snext, %ns",
              "  br i1 %sdone, label %store, label %sloop",
              "store:"]
    for r, j in acc:
        lines += [f"  %s{r}_{j} = call reassoc {t} @llvm.vector.reduce.fadd.{sfx}({t} 0.0, {v} %f{r}_{j})",
                  f"  %wr{r}_{j} = mul i64 %lddw, {r}",
                  f"  %wi{r}_{j} = add i64 %wr{r}_{j}, {j}",
                  f"  %wp{r}_{j} = getelementptr {t}, {t}* %dw, i64 %wi{r}_{j}",
                  f"  %wo{r}_{j} = load {t}, {t}* %wp{r}_{j}",
                  f"  %wn{r}_{j} = fadd {t} %wo{r}_{j}, %s{r}_{j}",
                  f"  store {t} %wn{r}_{j}, {t}* %wp{r}_{j}"]
    lines += ["  ret void", "}",
              'attributes #0 = { "prefer-vector-width"="512" "min-legal-vector-width"="512" nounwind }']
    return "\n".join(lines)


# Cephes' expf: exp(a) = 2^n p(r), n = round(a / ln 2), r = a - n ln 2 (ln 2 in two parts,
# so r is exact), p a degree-7 polynomial; about 1 ulp over the clamped range.
_EXP_P = ["1.9875691500E-4", "1.3981999507E-3", "8.3334519073E-3", "4.1665795894E-2",
          "1.6666665459E-1", "5.0000001201E-1"]


def _f32(c):
    """A float32 constant as LLVM IR spells it (the double with the same value, in hex)."""
    import struct
    return "0x" + struct.pack(">d", float(np.float32(c))).hex().upper()   # inf: 0x7FF0000000000000


def _ir_silu(in_place=False):
    """IR text of silu32(x, y, s, n): s = sigmoid(x) = 1 / (1 + exp(-x)), y = x s, float32,
    n a multiple of 16. in_place: bsilu32(x, n, b) instead, x <- silu(x + b) (b a float32
    scalar), the same arithmetic on x + b, s not stored (the fused convolution's epilogue)."""
    v = "<16 x float>"

    def splat(c):
        return "<" + ", ".join([f"float {_f32(c)}"] * 16) + ">"
    lines = [f"declare {v} @llvm.minnum.v16f32({v}, {v})",
             f"declare {v} @llvm.maxnum.v16f32({v}, {v})",
             f"declare {v} @llvm.rint.v16f32({v})",
             f"declare {v} @llvm.fma.v16f32({v}, {v}, {v})",
             ("define void @bsilu32(float* noalias %x, i64 %n, float %b) #0 {" if in_place else
              "define void @silu32(float* noalias %x, float* noalias %y, float* noalias %s, i64 %n) #0 {"),
             "entry:",
             *([f"  %bv0 = insertelement {v} undef, float %b, i32 0",
                f"  %bv = shufflevector {v} %bv0, {v} undef, <16 x i32> zeroinitializer"] if in_place else []),
             "  %empty = icmp sle i64 %n, 0",
             "  br i1 %empty, label %exit, label %loop",
             "loop:",
             "  %i = phi i64 [0, %entry], [%inext, %loop]",
             *_vec("load", "xv0" if in_place else "xv", "float", v, "x", "%i"),
             *([f"  %xv = fadd {v} %xv0, %bv"] if in_place else []),
             f"  %na = fneg {v} %xv",
             f"  %a0 = call {v} @llvm.minnum.v16f32({v} %na, {v} {splat(88.0)})",
             f"  %a = call {v} @llvm.maxnum.v16f32({v} %a0, {v} {splat(-87.0)})",
             f"  %t = fmul {v} %a, {splat(1.44269504088896341)}",
             f"  %nf = call {v} @llvm.rint.v16f32({v} %t)",
             f"  %r0 = call {v} @llvm.fma.v16f32({v} %nf, {v} {splat(-0.693359375)}, {v} %a)",
             f"  %r = call {v} @llvm.fma.v16f32({v} %nf, {v} {splat(2.12194440e-4)}, {v} %r0)",
             f"  %p0 = call {v} @llvm.fma.v16f32({v} {splat(_EXP_P[0])}, {v} %r, {v} {splat(_EXP_P[1])})"]
    for k, c in enumerate(_EXP_P[2:], start=1):
        lines.append(f"  %p{k} = call {v} @llvm.fma.v16f32({v} %p{k - 1}, {v} %r, {v} {splat(c)})")
    last = len(_EXP_P) - 2
    lines += [f"  %rr = fmul {v} %r, %r",
              f"  %q0 = call {v} @llvm.fma.v16f32({v} %p{last}, {v} %rr, {v} %r)",
              f"  %q = fadd {v} %q0, {splat(1.0)}",
              "  %ni = fptosi <16 x float> %nf to <16 x i32>",
              "  %nb = add <16 x i32> %ni, " + "<" + ", ".join(["i32 127"] * 16) + ">",
              "  %bits = shl <16 x i32> %nb, " + "<" + ", ".join(["i32 23"] * 16) + ">",
              f"  %pw = bitcast <16 x i32> %bits to {v}",
              f"  %e0 = fmul {v} %q, %pw",
              f"  %big = fcmp ogt {v} %na, {splat(88.0)}",               # exp(-x) overflows: s = 0
              f"  %e = select <16 x i1> %big, {v} {splat(np.inf)}, {v} %e0",
              f"  %den = fadd {v} %e, {splat(1.0)}",
              f"  %s0 = fdiv {v} {splat(1.0)}, %den",
              f"  %nan = fcmp uno {v} %xv, %xv",                         # NaN in, NaN out (as tanh)
              f"  %sv = select <16 x i1> %nan, {v} %xv, {v} %s0",
              f"  %yv = fmul {v} %xv, %sv",
              *_vec("store", "yst", "float", v, "x" if in_place else "y", "%i", "%yv"),
              *([] if in_place else _vec("store", "sst", "float", v, "s", "%i", "%sv")),
              "  %inext = add i64 %i, 16",
              "  %done = icmp sge i64 %inext, %n",
              "  br i1 %done, label %exit, label %loop",
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


def _compile(ir, name):
    ll, tm, engine = _engine()
    mod = ll.parse_assembly(ir)
    mod.verify()
    pb = ll.create_pass_builder(tm, ll.create_pipeline_tuning_options(speed_level=3))
    pb.getModulePassManager().run(mod, pb)
    engine.add_module(mod)
    engine.finalize_object()
    address = engine.get_function_address(name)
    ll.add_symbol(name, address)     # numba code calls it by this name (kernel_function)
    return address


# Calls from numba code go by symbol name (types.ExternalFunction), not through a ctypes
# pointer: the compiled caller then holds no address, so the loops calling these kernels are
# cached (cache=True) like any other kernel. The IR itself is compiled in every process
# (0.1-0.3 s in all) and registered under its name before a cached caller is loaded.
_P, _I = types.voidptr, types.int64
_SIGNATURES = {"uk": types.void(_P, _P, _I, _P, _I, _P, _I, _I),
               "ukdw": types.void(_P, _I, _P, _P, _P, _I, _I, _I, _I, _I),
               "silu32": types.void(_P, _P, _P, _I),
               "bsilu32": types.void(_P, _I, types.float32)}


class _Kernel(types.ExternalFunction):
    """A kernel called by its symbol name. Pickled as that name: numba keys the cache of a
    closure by its pickled cells, and a plain ExternalFunction pickles differently in each
    process (the cache would never hit)."""

    def __reduce__(self):
        return _function, (self.symbol,)


register_default(_Kernel)(OpaqueModel)     # as numba registers ExternalFunction itself


def _function(symbol):
    return _Kernel(symbol, _SIGNATURES[symbol.split("_")[1]])     # refdiff_<kind>_...


def kernel_function(MR, NV, dtype):
    """kernel(MR, NV, dtype), callable from numba code."""
    kernel(MR, NV, dtype)
    return _function(_kernel_name(MR, NV, dtype))


def dw_function(MR, KR, dtype):
    """dw_kernel(MR, KR, dtype), callable from numba code."""
    dw_kernel(MR, KR, dtype)
    return _function(_dw_name(MR, KR, dtype))


def silu_function():
    """silu_kernel(), callable from numba code."""
    silu_kernel()
    return _function("refdiff_silu32")


def bias_silu_function():
    """bias_silu_kernel(), callable from numba code: bsilu32(x, n, b), x <- silu(x + b)."""
    bias_silu_kernel()
    return _function("refdiff_bsilu32")


def _kernel_name(MR, NV, dtype):
    return f"refdiff_uk_{MR}_{NV}_{np.dtype(dtype).char}"


def _dw_name(MR, KR, dtype):
    return f"refdiff_ukdw_{MR}_{KR}_{np.dtype(dtype).char}"


@functools.lru_cache(maxsize=None)
def kernel(MR, NV, dtype):
    """Address of the compiled kernel (K >= 1 and npix >= 1 required: the loops run at least once)."""
    name = _kernel_name(MR, NV, dtype)
    return _compile(_ir(MR, NV, dtype).replace("@uk(", f"@{name}("), name)


@functools.lru_cache(maxsize=None)
def dw_kernel(MR, KR, dtype):
    """Address of   ukdw(dy, lddy, x, off, dw, lddw, npix, ns, sdy, sx):

        dw[r, j] += sum_{s < ns} sum_{n < npix rounded up to L} dy[r lddy + s sdy + n] x[off[j] + s sx + n]

    for r < MR, j < KR: the weight gradient of the conv over ns samples (dy rows are output
    channels, widened with zeros; x is read as in the forward). Each of the L SIMD lanes sums
    its own terms n = lane, lane + L, ... over all samples; the L lane sums are then added as a
    tree (llvm.vector.reduce.fadd with reassoc: a fixed order, so the result is deterministic;
    the ordered, lane-by-lane reduction cost as much as the sum itself on one sample of a 28 x 28
    image). npix >= 1 and ns >= 1."""
    name = _dw_name(MR, KR, dtype)
    return _compile(_ir_dw(MR, KR, dtype).replace("@ukdw(", f"@{name}("), name)


@functools.lru_cache(maxsize=None)
def silu_kernel():
    """Address of silu32(x, y, s, n) (float32; n a multiple of 16; see _ir_silu)."""
    return _compile(_ir_silu().replace("@silu32(", "@refdiff_silu32("), "refdiff_silu32")


@functools.lru_cache(maxsize=None)
def bias_silu_kernel():
    """Address of bsilu32(x, n, b): x[i] <- silu(x[i] + b) for i < n (float32; n a multiple of 16)."""
    return _compile(_ir_silu(in_place=True).replace("@bsilu32(", "@refdiff_bsilu32("), "refdiff_bsilu32")


DW_SIG = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                          ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                          ctypes.c_int64)


def call(MR, NV, x, off, K, w, ldw, y, ldy, npix):
    """Python-level call (for tests and timing; numba code calls the address directly)."""
    f = _SIG(kernel(MR, NV, x.dtype))
    f(x.ctypes.data, off.ctypes.data, K, w.ctypes.data, ldw, y.ctypes.data, ldy, npix)
