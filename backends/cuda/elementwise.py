"""The CUDA backend's element-wise ops, generated from the op table's formulas.

Every op of `compiler/ops.py` with a `Formula` gets, in one generated header (`header()`, the
shared include "cnnc/elementwise.cuh" that `source.py` puts once into every translation unit
whose templates include it):

    an op code, CNNC_OP_<NAME>: 1, 2, ... in table order (0 is "no activation")
    cnnc_fwd_<code>(x, p0, p1)         y = f(x), p0 and p1 the formula's parameters in order
    cnnc_grad_<code>(x, y, p0, p1)     the local derivative dy/dx
    cnnc_act_fwd(code, x, p0, p1)      dispatch by code; a constant code folds to one call
    cnnc_act_grad(code, x, y, p0, p1)

and the math helpers the formulas call. Kernels name no activation: they get codes and
arguments as #defines (ACT, ARG0, ARG1; chains a list of each) and call the dispatchers, so the
plain kernels, the chains and the conv/dense epilogues compute the same expression. The header
text is part of every including spec's key: a changed table recompiles.

Accuracy. The kernels build without --use_fast_math, but the helpers keep float32 results
within a few ulp with it too. What the flag does (nvcc 13, sm_90, checked on the PTX): expf
becomes ex2.approx of x·log2(e) (error growing with |x|), logf lg2.approx, tanhf tanh.approx
(~2^-11 relative), `/` div.approx and sqrtf sqrt.approx; expm1f, log1pf and erff keep their
full-precision code (only denormals flush to zero). So: exp is written here (Cody–Waite
reduction, degree-7 Taylor polynomial, scaling by exponent bits); log from log1pf of the
mantissa; tanh from expm1f; sigmoid and softplus from that exp and log1pf; division and square
root through the round-to-nearest intrinsics __fdiv_rn and __fsqrt_rn, which no flag changes.
"""

from __future__ import annotations

import math
from functools import lru_cache

from cnnc.compiler.formula import Expr, render
from cnnc.compiler.ops import OPS
from cnnc.dsl.errors import CnncError

HEADER = "cnnc/elementwise.cuh"  # the include name templates write
MAX_PARAMS = 2  # formula parameters the device functions take (p0, p1)


def table_ops() -> tuple[str, ...]:
    """Every op of the table with an element-wise formula, in table order."""
    return tuple(name for name, d in OPS.items() if d.formula is not None)


@lru_cache(maxsize=1)
def codes() -> dict[str, int]:
    """Op code by op: 1, 2, ... in table order."""
    return {op: i + 1 for i, op in enumerate(table_ops())}


def refusal(op: str) -> str | None:
    """Why the CUDA kernels cannot apply `op`, or None."""
    d = OPS.get(op)
    if d is None or d.formula is None:
        return f"`{op}` has no element-wise formula"
    if len(d.formula.params) > MAX_PARAMS:
        return (f"`{op}` takes {len(d.formula.params)} formula parameters; the CUDA element-wise kernels take "
                f"at most {MAX_PARAMS}")
    return None


def code(op: str) -> int:
    """The op code of an element-wise op (a CnncError where the kernels cannot run it)."""
    why = refusal(op)
    if why is not None:
        raise CnncError(f"the CUDA backend: {why}")
    return codes()[op]


def reads(op: str) -> frozenset[str]:
    """"input" and/or "output": what the op's derivative reads."""
    return OPS[op].formula.grad_reads


def padded_args(op: str, args) -> tuple[float, float]:
    """The formula's arguments as (p0, p1), unused ones 0."""
    args = tuple(float(a) for a in args)
    want = len(OPS[op].formula.params)
    if len(args) != want:
        raise CnncError(f"`{op}` takes {want} formula argument{'s' if want != 1 else ''}, got {len(args)}")
    return (args + (0.0,) * MAX_PARAMS)[:MAX_PARAMS]


def c_float(v: float) -> str:
    """A float32 literal (infinities and NaN through their bit patterns)."""
    v = float(v)
    if math.isnan(v):
        return "__int_as_float(0x7fc00000)"
    if math.isinf(v):
        return "__int_as_float(0x7f800000)" if v > 0 else "__int_as_float(0xff800000)"
    return f"{v!r}f"


# ---- rendering formulas ----------------------------------------------------------------------

# the formula language's functions (compiler/formula.py FUNCTIONS) as CUDA C
_CALLS = dict(
    exp="cnnc_exp({0})", expm1="expm1f({0})", log="cnnc_log({0})", log1p="log1pf({0})", sqrt="__fsqrt_rn({0})",
    tanh="tanh_acc({0})", erf="erff({0})", abs="fabsf({0})", sigmoid="sigmoid_acc({0})",
    softplus="cnnc_softplus({0})", min="fminf({0}, {1})", max="fmaxf({0}, {1})",
    clip="fminf(fmaxf({0}, {1}), {2})", where="(({0}) != 0.0f ? ({1}) : ({2}))",
)
_BINARY = {"+": "({0} + {1})", "-": "({0} - {1})", "*": "({0} * {1})", "/": "__fdiv_rn({0}, {1})"}


def c_expr(e: Expr, params: tuple[str, ...]) -> str:
    """CUDA C text of a formula tree over x, y and the parameters (as p0, p1, ...)."""
    def var(name: str) -> str:
        return name if name in ("x", "y") else f"p{params.index(name)}"

    def op(kind: str, name: str, args: list[str]) -> str:
        if kind == "neg":
            return f"(-{args[0]})"
        if kind == "cmp":
            return f"(({args[0]} {name} {args[1]}) ? 1.0f : 0.0f)"
        return _BINARY[name].format(*args)

    return render(e, var=var, num=c_float, call=lambda fn, args: _CALLS[fn].format(*args), op=op)


_HELPERS = r"""
#if !defined(__CUDACC__) && !defined(__CUDACC_RTC__)  // a host C++ compiler (the tests' CPU emulator): the device intrinsics used here
#include <math.h>
#include <string.h>
#ifndef __device__
#define __device__
#endif
#ifndef __forceinline__
#define __forceinline__ inline
#endif
static inline float __int_as_float(int i) { float f; memcpy(&f, &i, sizeof f); return f; }
static inline int __float_as_int(float f) { int i; memcpy(&i, &f, sizeof i); return i; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline float __fsqrt_rn(float a) { return sqrtf(a); }
#endif

// e^x within ~1 ulp whatever the flags: x = j·ln2 + f (Cody–Waite, |f| <= ln2/2), e^f by a
// degree-7 Taylor polynomial (truncation < 0.1 ulp), times 2^j in two exact steps
__device__ __forceinline__ float cnnc_exp(float x) {
    if (!(x < 88.72283935546875f)) return x != x ? x : __int_as_float(0x7f800000);  // NaN, overflow
    if (x < -103.97208404541015625f) return 0.0f;
    const float j = rintf(x * 1.44269502162933349609375f);
    float f = fmaf(j, -0.693145751953125f, x);  // ln2 = 0.693145751953125 + 1.4286068e-6
    f = fmaf(j, -1.428606765330187e-06f, f);
    float p = 1.9841269841269841e-04f;
    p = fmaf(p, f, 1.3888888888888889e-03f);
    p = fmaf(p, f, 8.3333333333333332e-03f);
    p = fmaf(p, f, 4.1666666666666664e-02f);
    p = fmaf(p, f, 0.16666666666666666f);
    p = fmaf(p, f, 0.5f);
    p = fmaf(p, f, 1.0f);
    p = fmaf(p, f, 1.0f);
    const int i = (int)j;
    const int i1 = i / 2, i2 = i - i / 2;  // each in [-75, 64]: a normal power of two
    return p * __int_as_float((i1 + 127) << 23) * __int_as_float((i2 + 127) << 23);
}

// log(x) within ~2 ulp: x = m·2^e with m in [√½, √2), log(m) = log1p(m - 1) (m - 1 exact)
__device__ __forceinline__ float cnnc_log(float x) {
    if (!(x > 0.0f)) return x == 0.0f ? __int_as_float(0xff800000) : __int_as_float(0x7fc00000);
    if (x == __int_as_float(0x7f800000)) return x;
    int e = 0;
    if (x < 1.17549435e-38f) { x *= 8388608.0f; e = -23; }  // a denormal (when not flushed to zero)
    int bits = __float_as_int(x);
    e += ((bits >> 23) & 255) - 127;
    bits = (bits & 0x007fffff) | 0x3f800000;  // m in [1, 2)
    float m = __int_as_float(bits);
    if (m > 1.41421356f) { m *= 0.5f; e += 1; }
    const float fe = (float)e;
    return fmaf(fe, 0.693145751953125f, fmaf(fe, 1.428606765330187e-06f, log1pf(m - 1.0f)));
}

// tanh within ~2 ulp: t = e^(2|x|) - 1 (expm1f keeps full precision under --use_fast_math),
// tanh|x| = t / (t + 2); 1 in float32 from |x| > 9
__device__ __forceinline__ float tanh_acc(float x) {
    const float a = fabsf(x);
    const float t = expm1f(2.0f * fminf(a, 9.5f));
    const float r = a > 9.0f ? 1.0f : __fdiv_rn(t, t + 2.0f);
    return copysignf(r, x);
}

// 1/(1 + e^-x) from e^-|x| in (0, 1]: no overflow, no cancellation
__device__ __forceinline__ float sigmoid_acc(float x) {
    const float e = cnnc_exp(-fabsf(x));
    const float r = __fdiv_rn(1.0f, 1.0f + e);
    return x >= 0.0f ? r : e * r;
}

// log(1 + e^x) = max(x, 0) + log1p(e^-|x|)
__device__ __forceinline__ float cnnc_softplus(float x) {
    return fmaxf(x, 0.0f) + log1pf(cnnc_exp(-fabsf(x)));
}
"""


@lru_cache(maxsize=1)
def header() -> str:
    """The generated header: helpers, op codes, per-op device functions and the dispatchers."""
    lines = ["// Generated by cnnc from the op table (compiler/ops.py): element-wise ops as device functions.",
             "#ifndef CNNC_ELEMENTWISE_CUH", "#define CNNC_ELEMENTWISE_CUH", _HELPERS]
    fwd_cases, grad_cases = [], []
    for op, c in codes().items():
        if op.isidentifier():
            lines.append(f"#define CNNC_OP_{op.upper()} {c}")
    lines.append("")
    for op, c in codes().items():
        f = OPS[op].formula
        if refusal(op) is not None:
            lines.append(f"// {op} ({c}): not generated, {refusal(op)}")
            continue
        lines += [f"// {op} ({c}): y = {f.forward}; dy/dx = {f.derivative}".replace("\n", " ")
                  + (f"; p0.. = {', '.join(f.params)}" if f.params else ""),
                  f"__device__ __forceinline__ float cnnc_fwd_{c}(float x, float p0, float p1) {{",
                  f"    return {c_expr(f.fwd, f.params)};", "}",
                  f"__device__ __forceinline__ float cnnc_grad_{c}(float x, float y, float p0, float p1) {{",
                  f"    return {c_expr(f.grad, f.params)};", "}"]
        fwd_cases.append(f"        case {c}: return cnnc_fwd_{c}(x, p0, p1);")
        grad_cases.append(f"        case {c}: return cnnc_grad_{c}(x, y, p0, p1);")
    lines += ["",
              "// y = f(x) of op `code` (0: x itself)",
              "__device__ __forceinline__ float cnnc_act_fwd(int code, float x, float p0, float p1) {",
              "    switch (code) {", *fwd_cases, "        default: return x;", "    }", "}",
              "// dy/dx of op `code` at input x and output y (0: 1)",
              "__device__ __forceinline__ float cnnc_act_grad(int code, float x, float y, float p0, float p1) {",
              "    switch (code) {", *grad_cases, "        default: return 1.0f;", "    }", "}",
              "#endif  // CNNC_ELEMENTWISE_CUH", ""]
    return "\n".join(lines)
