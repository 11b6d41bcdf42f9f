"""The CUDA backend's kernels for every op but the convolutions (`conv.py`), and its losses.

Each op's kernels are templates in `kernels/` specialised per node: `_roles(node)` gives the
node's `KernelSpec`s by role, and both `specs(node, training)` (ahead-of-time compilation, no
GPU needed) and the kernels below (at run time) read them, so the two always agree:

    "fwd"    the forward pass, in inference and training
    "train"  forward work done only in training (dropout's mask)
    "bwd"    the backward pass (compiled only for training)

The kernels follow `backends/base.py`'s contract with PyTorch's semantics, as the NumPy backend
(`backends/numpy/`) does: float32 CuPy arrays, NCHW, the batch a runtime argument; inputs and
`dy` are never written; every output comes from `device.empty` (NaN-filled when
`device.POISON` is on, so an element a kernel forgot to write fails the tests). Launches pass
scalars as NumPy scalars of the kernel parameter's exact type, and never null pointers: an
argument a kernel does not read is given some valid array.

Every op of the op table with an element-wise formula runs `ELEMENTWISE` (act_forward /
act_backward over eltwise.cu, whose ops come from the header `elementwise.py` generates from the
table); nothing here names an activation. Backward keeps from forward what the formula's
derivative reads: the output alone, or the input (then it recomputes the output where needed).
Dense layers multiply through `cupy.matmul` (cuBLAS) and add the bias and activation in one
epilogue kernel. `identity` and `flatten` are no kernels: they return their input or a view.
CuPy is imported only through `device.cupy()`, when a kernel first runs.
"""

from __future__ import annotations

import math

import numpy as np

from cnnc.backends.base import Kernel
from cnnc.compiler.ops import OPS, ChainAttrs, formula_args
from cnnc.dsl.errors import CnncError

from . import device
from . import elementwise as ew
from .source import KernelSpec

THREADS = 256  # threads per block of the 1-D launches
MAX_BLOCKS = 4096  # grid-stride loops: more blocks than the H100's 132 SMs can hold add nothing
MAX_CHAIN = 16  # ops an elemwise_chain kernel applies

_fallback_rng = np.random.default_rng()  # dropout when the context brings no generator


# ---- helpers ---------------------------------------------------------------------------------

def _cp():
    return device.cupy()


def _f32(a):
    """A C-contiguous float32 device array: `a` itself when it is one already."""
    cp = _cp()
    return cp.ascontiguousarray(a, dtype=cp.float32)


_functions: dict = {}


def _launch(spec: KernelSpec, entry: str, grid, block, *args) -> None:
    key = (spec, entry)
    fn = _functions.get(key)
    if fn is None:
        fn = _functions[key] = device.function(spec, entry)
    fn(tuple(int(g) for g in grid), tuple(int(b) for b in block), args)


def _blocks(work: int, threads: int = THREADS) -> int:
    """Blocks for `work` threads' worth of a grid-stride loop (at least 1, at most MAX_BLOCKS)."""
    return max(1, min(MAX_BLOCKS, -(-int(work) // threads)))


def _i32(v) -> np.int32:
    return np.int32(v)


def _i64(v) -> np.int64:
    return np.int64(v)


def _f(v) -> np.float32:
    """A Python float as float32, as NumPy casts a Python scalar that multiplies a float32 array."""
    return np.float32(v)


def _pads(node) -> tuple[int, int, int, int]:
    return tuple(node.pads) if node.pads is not None else (0, 0, 0, 0)


def _vec(shape) -> int:
    """1 when every batch's element count is a multiple of 4 (float4 loads allowed)."""
    return int(math.prod(shape) % 4 == 0)


def _inner(shape) -> int:
    """Elements per channel of a (C, ...) shape: H·W, or 1 for flat features."""
    return math.prod(shape[1:]) if len(shape) > 1 else 1


# ---- specs -----------------------------------------------------------------------------------

def _is_elementwise(op: str) -> bool:
    """An op the table gives an element-wise formula (ELEMENTWISE runs it)."""
    return op in OPS and OPS[op].formula is not None


def _chain(node) -> list[tuple[str, tuple[float, ...]]]:
    """The element-wise ops a node applies, in order, with their formula arguments: a single
    element-wise op, an elemwise_chain's ops, or a dense layer's activation (none for plain dense)."""
    a = node.attrs
    if _is_elementwise(node.op):
        out = [(node.op, formula_args(node.op, a))]
    elif isinstance(a, ChainAttrs):
        out = a.steps(node.name)
        if len(out) > MAX_CHAIN:
            raise CnncError(f"elemwise_chain `{node.name}` has {len(out)} ops; the CUDA kernel takes at most "
                            f"{MAX_CHAIN}")
    else:
        act = a.act() if hasattr(a, "act") else None  # fused_dense; plain dense has none
        out = [] if act is None else [act]
    for op, args in out:
        ew.code(op)  # a clear error for an op the kernels cannot run
        ew.padded_args(op, args)
    return out


def _reads(node, chain) -> str:
    """What backward keeps: "output" for a single op whose derivative reads only its output,
    "none" for one that reads neither, else "input" (chains always recompute from their input)."""
    if isinstance(node.attrs, ChainAttrs) or len(chain) != 1:
        return "input"
    reads = ew.reads(chain[0][0])
    if "input" in reads:
        return "input"
    return "output" if "output" in reads else "none"


def _eltwise(chain, bwd: bool, vec: int = 0, cols: int = 0, bias: bool = False) -> KernelSpec:
    args = [ew.padded_args(op, a) for op, a in chain]
    defines = dict(CHAIN_LEN=len(chain), CHAIN_CODES=", ".join(str(ew.code(op)) for op, _ in chain) or "0",
                   CHAIN_ARG0=", ".join(ew.c_float(a[0]) for a in args) or "0.0f",
                   CHAIN_ARG1=", ".join(ew.c_float(a[1]) for a in args) or "0.0f",
                   COLS=cols, BIAS=int(bias), VEC=vec if not cols else 0, BWD=int(bwd))
    if not bwd:
        entries = ("dense_fwd",) if cols else ("act_fwd",)
    else:
        entries = ("act_bwd_out", "act_bwd_in") + (("bias_grad",) if cols else ())
    return KernelSpec.make("eltwise.cu", entries, **defines)


def _roles_act(node):
    chain = _chain(node)
    if not chain:  # an empty chain passes its input through
        return {}
    vec = _vec(node.in_shapes[0])
    return {"fwd": _eltwise(chain, False, vec), "bwd": _eltwise(chain, True, vec)}


def _roles_dense(node):
    chain = _chain(node)
    if not (chain or node.attrs.bias):  # a bare matrix product
        return {}
    units = node.out_shape[0]
    return {"fwd": _eltwise(chain, False, cols=units, bias=node.attrs.bias),
            "bwd": _eltwise(chain, True, cols=units, bias=node.attrs.bias)}


_POOL_KIND = {"maxpool": 1, "avgpool": 2, "globalavgpool": 3, "adaptive_avgpool": 4}
_POOL_ENTRY = {1: "maxpool", 2: "avgpool", 3: "gap", 4: "adaptive"}


def _roles_pool(node):
    kind = _POOL_KIND[node.op]
    c, h, w = node.in_shapes[0]
    _, oh, ow = node.out_shape
    d = dict(POOL=kind, C=c, H=h, W=w, OH=oh, OW=ow)
    if kind in (1, 2):
        a = node.attrs
        sh, sw = a.stride or a.kernel
        pt, pb, pl, pr = _pads(node)
        d.update(KH=a.kernel[0], KW=a.kernel[1], SH=sh, SW=sw, PT=pt, PB=pb, PL=pl, PR=pr)
        if kind == 2:
            d["COUNT_PAD"] = int(bool(a.count_pad))
    name = _POOL_ENTRY[kind]
    return {"fwd": KernelSpec.make("pool.cu", (f"{name}_fwd",), BWD=0, **d),
            "bwd": KernelSpec.make("pool.cu", (f"{name}_bwd",), BWD=1, **d)}


def _roles_bn(node):
    a = node.attrs
    shape = node.in_shapes[0]
    m = float(a.momentum)
    d = dict(C=shape[0], HW=_inner(shape), AFFINE=int(bool(a.affine)), EPS=float(a.eps), MOMENTUM=m,
             ONE_MINUS_M=1.0 - m)
    return {"fwd": KernelSpec.make("bn.cu", ("bn_train_fwd", "bn_eval_stats", "bn_apply"), BWD=0, **d),
            "bwd": KernelSpec.make("bn.cu", ("bn_bwd",), BWD=1, **d)}


def _roles_fused_bn(node):
    """BatchNorm's kernels, then the activation's element-wise kernels on its output (a
    composition: one pass more each way than the NumPy backend's single loop, the same values)."""
    roles = dict(_roles_bn(node))
    chain = _chain(node)
    if chain:
        vec = _vec(node.in_shapes[0])
        roles.update(act_fwd=_eltwise(chain, False, vec), act_bwd=_eltwise(chain, True, vec))
    return roles


def _roles_softmax(node):
    shape = node.in_shapes[0]
    d = dict(C=shape[0], HW=_inner(shape))
    return {"fwd": KernelSpec.make("softmax.cu", ("softmax_fwd",), BWD=0, **d),
            "bwd": KernelSpec.make("softmax.cu", ("softmax_bwd",), BWD=1, **d)}


def _roles_lrn(node):
    a = node.attrs
    shape = node.in_shapes[0]
    size, alpha, beta = int(a.size), float(a.alpha), float(a.beta)
    d = dict(C=shape[0], HW=_inner(shape), SIZE=size, ALPHA=alpha, BETA=beta, K=float(a.k), ALPHA_N=alpha / size,
             COEF=2.0 * beta * alpha / size)
    return {"fwd": KernelSpec.make("lrn.cu", ("lrn_fwd",), BWD=0, **d),
            "bwd": KernelSpec.make("lrn.cu", ("lrn_bwd",), BWD=1, **d)}


def _roles_dropout(node):
    rate = float(node.attrs.rate)
    if rate == 0.0:
        return {}
    spec = KernelSpec.make("dropout.cu", ("dropout_apply",), THRESH=math.ceil(rate * (1 << 24)),
                           SCALE=1.0 / (1.0 - rate), VEC=_vec(node.in_shapes[0]))
    return {"train": spec}  # evaluation is the identity; backward reuses the forward's entry


def _roles_add(node):
    return {"fwd": KernelSpec.make("add.cu", ("add",), VEC=_vec(node.out_shape))}


def _roles_concat(node):
    out = node.out_shape
    return {"fwd": KernelSpec.make("concat.cu", ("concat_copy",), INNER=_inner(out), CTOT=out[0])}


def _layout_dims(node) -> tuple[int, int]:
    """(rows, cols) of the forward's per-item transpose: C × HW to NHWC, HW × C back to NCHW."""
    c, h, w = node.in_shapes[0]
    return (c, h * w) if node.attrs.to == "NHWC" else (h * w, c)


def _roles_layout(node):
    rows, cols = _layout_dims(node)
    return {"fwd": KernelSpec.make("layout.cu", ("transpose",), ROWS=rows, COLS=cols),
            "bwd": KernelSpec.make("layout.cu", ("transpose",), ROWS=cols, COLS=rows)}


_ROLES = {  # by op; every op with an element-wise formula takes _roles_act (see _role_rule)
    "maxpool": _roles_pool, "avgpool": _roles_pool, "globalavgpool": _roles_pool, "adaptive_avgpool": _roles_pool,
    "dense": _roles_dense, "fused_dense": _roles_dense,
    "elemwise_chain": _roles_act,
    "softmax": _roles_softmax, "dropout": _roles_dropout, "batchnorm": _roles_bn, "fused_bn": _roles_fused_bn,
    "lrn": _roles_lrn,
    "add": _roles_add, "concat": _roles_concat, "layout_transform": _roles_layout,
    "identity": lambda node: {}, "flatten": lambda node: {}, "split": lambda node: {},
}

_role_cache: dict = {}


def _role_rule(op: str):
    rule = _ROLES.get(op)
    if rule is None and _is_elementwise(op):
        rule = _roles_act
    if rule is None:
        raise CnncError(f"the CUDA ops have no kernels for `{op}`")
    return rule


def _roles(node) -> dict[str, KernelSpec]:
    try:
        found = _role_cache.get(node)
    except TypeError:  # attributes that do not hash: build every time
        return _role_rule(node.op)(node)
    if found is None:
        found = _role_cache[node] = _role_rule(node.op)(node)
    return found


def specs(node, training: bool) -> list[KernelSpec]:
    """Every kernel specialisation `node` runs: forward, and in training its training-only
    forward work and its backward."""
    roles = _roles(node)
    wanted = ("fwd", "act_fwd", "train", "bwd", "act_bwd") if training else ("fwd", "act_fwd")
    out = []
    for role in wanted:
        spec = roles.get(role)
        if spec is not None and spec not in out:
            out.append(spec)
    return out


def loss_specs() -> list[KernelSpec]:
    return [_LOSS_SPEC]


_LOSS_SPEC = KernelSpec.make("loss.cu", ("ce_fwd_bwd", "mse_fwd_bwd"))


# ---- dense, flatten, identity ------------------------------------------------------------------

def dense_forward(node, xs, params, ctx):
    cp = _cp()
    x = _f32(xs[0])
    n = x.shape[0]
    x2 = x.reshape(n, -1)  # (N, C, 1, 1) or (N, C, H, W) with flatten → (N, F)
    w = _f32(params["weight"])
    units = w.shape[0]
    z = device.empty((n, units))
    cp.matmul(x2, w.T, out=z)
    chain = _chain(node)
    roles = _roles(node)
    keep_pre = bool(chain) and _reads(node, chain) == "input"
    y = z
    if "fwd" in roles:
        if keep_pre:  # the derivative reads the activation's input: keep z apart from y
            y = device.empty((n, units))
        bias = _f32(params["bias"]) if "bias" in params else z
        _launch(roles["fwd"], "dense_fwd", (_blocks(z.size),), (THREADS,), z, y, bias, _i64(z.size))
    return y, (x2, x.shape, z if keep_pre else y)


def dense_backward(node, saved, dy, params, ctx):
    cp = _cp()
    x2, shape, v = saved
    dy = _f32(dy)
    chain = _chain(node)
    roles = _roles(node)
    dz = dy
    if chain:
        dz = device.empty(dy.shape)
        entry = "act_bwd_in" if _reads(node, chain) == "input" else "act_bwd_out"
        _launch(roles["bwd"], entry, (_blocks(dy.size),), (THREADS,), v, dy, dz, _i64(dy.size))
    w = _f32(params["weight"])
    dw = device.empty(w.shape)
    cp.matmul(dz.T, x2, out=dw)
    dparams = {"weight": dw}
    if "bias" in params:
        units = w.shape[0]
        db = device.empty((units,))
        _launch(roles["bwd"], "bias_grad", (_blocks(units),), (THREADS,), dz, db, _i32(dz.shape[0]))
        dparams["bias"] = db
    dx = device.empty((dz.shape[0], w.shape[1]))
    cp.matmul(dz, w, out=dx)
    return [dx.reshape(shape)], dparams


def flatten_forward(node, xs, params, ctx):
    (x,) = xs
    return x.reshape(x.shape[0], -1), x.shape


def flatten_backward(node, saved, dy, params, ctx):
    return [dy.reshape(saved)], {}


def identity_forward(node, xs, params, ctx):
    return xs[0], None


def identity_backward(node, saved, dy, params, ctx):
    return [dy], {}


# ---- element-wise ops and chains --------------------------------------------------------------------

def _act_apply(node, spec, x):
    """The activation's forward kernel on x: (y, what its backward reads)."""
    y = device.empty(x.shape)
    n = x.size
    _launch(spec, "act_fwd", (_blocks(-(-n // 4) if spec.define("VEC") else n),), (THREADS,), x, y, _i64(n))
    keep = _reads(node, _chain(node))
    return y, (x if keep == "input" else y if keep == "output" else None)


def _act_grad(node, spec, saved, dy):
    dy = _f32(dy)
    dx = device.empty(dy.shape)
    entry = "act_bwd_in" if _reads(node, _chain(node)) == "input" else "act_bwd_out"
    n = dy.size
    src = saved if saved is not None else dy  # a derivative that reads neither: any array
    _launch(spec, entry, (_blocks(-(-n // 4) if spec.define("VEC") else n),), (THREADS,), src, dy, dx, _i64(n))
    return dx


def act_forward(node, xs, params, ctx):
    roles = _roles(node)
    if not roles:  # an empty elemwise_chain
        return xs[0], None
    return _act_apply(node, roles["fwd"], _f32(xs[0]))


def act_backward(node, saved, dy, params, ctx):
    roles = _roles(node)
    if not roles:
        return [dy], {}
    return [_act_grad(node, roles["bwd"], saved, dy)], {}


ELEMENTWISE = Kernel(act_forward, act_backward)  # every op with an element-wise formula


# ---- softmax ---------------------------------------------------------------------------------------

def _softmax_grid(spec, n: int) -> tuple[int]:
    if spec.define("HW") == 1:
        return (_blocks(n * 32),)  # a warp per row
    return (_blocks(n * spec.define("HW")),)  # a thread per (n, position)


def softmax_forward(node, xs, params, ctx):
    x = _f32(xs[0])
    spec = _roles(node)["fwd"]
    y = device.empty(x.shape)
    _launch(spec, "softmax_fwd", _softmax_grid(spec, x.shape[0]), (THREADS,), x, y, _i32(x.shape[0]))
    return y, y


def softmax_backward(node, saved, dy, params, ctx):
    dy = _f32(dy)
    spec = _roles(node)["bwd"]
    dx = device.empty(dy.shape)
    _launch(spec, "softmax_bwd", _softmax_grid(spec, dy.shape[0]), (THREADS,), saved, dy, dx, _i32(dy.shape[0]))
    return [dx], {}


# ---- dropout ---------------------------------------------------------------------------------------

def _dropout_apply(spec, src, seed: int):
    out = device.empty(src.shape)
    n = src.size
    _launch(spec, "dropout_apply", (_blocks(-(-n // 4) if spec.define("VEC") else n),), (THREADS,), src, out,
            _i64(n), np.uint32(seed))
    return out


def dropout_forward(node, xs, params, ctx):
    (x,) = xs
    roles = _roles(node)
    if not ctx.training or "train" not in roles:  # evaluation, or rate 0: the identity
        return x, None
    rng = getattr(ctx, "rng", None) or _fallback_rng
    seed = int(rng.integers(0, 1 << 32))  # the mask is a hash of (seed, element index)
    return _dropout_apply(roles["train"], _f32(x), seed), seed


def dropout_backward(node, saved, dy, params, ctx):
    if saved is None:
        return [dy], {}
    return [_dropout_apply(_roles(node)["train"], _f32(dy), saved)], {}


# ---- batchnorm ---------------------------------------------------------------------------------------

def batchnorm_forward(node, xs, params, ctx):
    x = _f32(xs[0])
    spec = _roles(node)["fwd"]
    c, n = spec.define("C"), x.shape[0]
    affine = bool(node.attrs.affine)
    w = _f32(params["weight"]) if affine else x
    b = _f32(params["bias"]) if affine else x
    y = device.empty(x.shape)
    mean, invstd = device.empty((c,)), device.empty((c,))
    training = bool(ctx.training)
    if training:
        rm, rv = params["running_mean"], params["running_var"]  # updated in place: the executor's arrays
        count = n * spec.define("HW")
        unbias_m = float(node.attrs.momentum) * count / max(count - 1, 1)
        _launch(spec, "bn_train_fwd", (c,), (256,), x, w, b, y, rm, rv, mean, invstd, _i32(n), _f(unbias_m))
    else:
        rm, rv = _f32(params["running_mean"]), _f32(params["running_var"])
        _launch(spec, "bn_eval_stats", (_blocks(c),), (THREADS,), rm, rv, mean, invstd)
        _launch(spec, "bn_apply", (_blocks(x.size),), (THREADS,), x, mean, invstd, w, b, y, _i64(x.size))
    return y, (x, mean, invstd, training)


def batchnorm_backward(node, saved, dy, params, ctx):
    x, mean, invstd, training = saved
    dy = _f32(dy)
    spec = _roles(node)["bwd"]
    c = spec.define("C")
    affine = bool(node.attrs.affine)
    w = _f32(params["weight"]) if affine else x
    dx = device.empty(dy.shape)
    dw, db = (device.empty((c,)), device.empty((c,))) if affine else (dx, dx)
    _launch(spec, "bn_bwd", (c,), (256,), x, dy, mean, invstd, w, dx, dw, db, _i32(dy.shape[0]), _i32(int(training)))
    return [dx], ({"weight": dw, "bias": db} if affine else {})


def fused_bn_forward(node, xs, params, ctx):
    y, saved = batchnorm_forward(node, xs, params, ctx)
    roles = _roles(node)
    if "act_fwd" not in roles:  # no activation
        return y, (saved, None)
    y, act_saved = _act_apply(node, roles["act_fwd"], y)
    return y, (saved, act_saved)


def fused_bn_backward(node, saved, dy, params, ctx):
    bn_saved, act_saved = saved
    roles = _roles(node)
    if "act_bwd" in roles:
        dy = _act_grad(node, roles["act_bwd"], act_saved, dy)
    return batchnorm_backward(node, bn_saved, dy, params, ctx)


# ---- lrn -------------------------------------------------------------------------------------------

def _lrn_forward(spec, x, save: bool):
    y = device.empty(x.shape)
    d = device.empty(x.shape) if save else y  # not written unless saved
    _launch(spec, "lrn_fwd", (_blocks(x.size),), (THREADS,), x, y, d, _i64(x.size), _i32(int(save)))
    return y, (d if save else None)


def lrn_forward(node, xs, params, ctx):
    x = _f32(xs[0])
    y, d = _lrn_forward(_roles(node)["fwd"], x, bool(ctx.training))
    return y, (x, d)


def lrn_backward(node, saved, dy, params, ctx):
    x, d = saved
    roles = _roles(node)
    if d is None:  # a forward run outside training: recompute the denominators
        _, d = _lrn_forward(roles["fwd"], x, True)
    dy = _f32(dy)
    dx = device.empty(dy.shape)
    _launch(roles["bwd"], "lrn_bwd", (_blocks(dx.size),), (THREADS,), x, d, dy, dx, _i64(dx.size))
    return [dx], {}


# ---- pools -----------------------------------------------------------------------------------------

def _maxpool_run(spec, x, save: bool):
    n = x.shape[0]
    y = device.empty((n, spec.define("C"), spec.define("OH"), spec.define("OW")))
    arg = device.empty(y.shape, dtype="int32") if save else y  # the argmax is not written unless saved
    _launch(spec, "maxpool_fwd", (_blocks(y.size),), (THREADS,), x, y, arg, _i64(y.size), _i32(int(save)))
    return y, (arg if save else None)


def maxpool_forward(node, xs, params, ctx):
    x = _f32(xs[0])
    y, arg = _maxpool_run(_roles(node)["fwd"], x, bool(ctx.training))
    return y, (x, arg)


def maxpool_backward(node, saved, dy, params, ctx):
    x, arg = saved
    roles = _roles(node)
    if arg is None:  # a forward run outside training: find the winners again
        _, arg = _maxpool_run(roles["fwd"], x, True)
    dy = _f32(dy)
    dx = device.empty(x.shape)
    _launch(roles["bwd"], "maxpool_bwd", (_blocks(dx.size),), (THREADS,), arg, dy, dx, _i64(dx.size))
    return [dx], {}


def _pool_forward(entry: str):
    def forward(node, xs, params, ctx):
        x = _f32(xs[0])
        spec = _roles(node)["fwd"]
        n = x.shape[0]
        y = device.empty((n, *node.out_shape))
        if entry == "gap_fwd":  # a warp per (n, c) plane
            _launch(spec, entry, (_blocks(y.size * 32),), (THREADS,), x, y, _i64(y.size))
        else:
            _launch(spec, entry, (_blocks(y.size),), (THREADS,), x, y, _i64(y.size))
        return y, x.shape
    return forward


def _pool_backward(entry: str):
    def backward(node, saved, dy, params, ctx):
        dy = _f32(dy)
        dx = device.empty(saved)
        _launch(_roles(node)["bwd"], entry, (_blocks(dx.size),), (THREADS,), dy, dx, _i64(dx.size))
        return [dx], {}
    return backward


# ---- merges ----------------------------------------------------------------------------------------

def add_forward(node, xs, params, ctx):
    xs = [_f32(v) for v in xs]
    spec = _roles(node)["fwd"]
    y = device.empty(xs[0].shape)
    n = y.size
    grid = (_blocks(-(-n // 4) if spec.define("VEC") else n),)
    first = xs[:4]
    k = len(first)
    first += [xs[0]] * (4 - k)  # unread placeholders
    _launch(spec, "add", grid, (THREADS,), *first, y, _i64(n), _i32(k))
    rest = xs[4:]
    while rest:  # y += the next three, in order
        chunk, rest = rest[:3], rest[3:]
        k = 1 + len(chunk)
        args = [y] + chunk + [y] * (3 - len(chunk))
        _launch(spec, "add", grid, (THREADS,), *args, y, _i64(n), _i32(k))
    return y, len(xs)


def add_backward(node, saved, dy, params, ctx):
    return [dy] * saved, {}  # the executor sums into new arrays, so sharing dy is safe


def concat_forward(node, xs, params, ctx):
    xs = [_f32(v) for v in xs]
    spec = _roles(node)["fwd"]
    inner = spec.define("INNER")
    n = xs[0].shape[0]
    y = device.empty((n, *node.out_shape))
    off = 0
    for v in xs:
        seg = v.shape[1] * inner
        _launch(spec, "concat_copy", (_blocks(seg), max(1, min(n, 65535))), (THREADS,), v, y, _i32(n), _i64(seg),
                _i64(off * inner), _i32(1))
        off += v.shape[1]
    return y, [v.shape[1] for v in xs]


def concat_backward(node, saved, dy, params, ctx):
    dy = _f32(dy)
    spec = _roles(node)["fwd"]
    inner = spec.define("INNER")
    n = dy.shape[0]
    dxs, off = [], 0
    for ci in saved:
        dx = device.empty((n, ci, *dy.shape[2:]))
        seg = ci * inner
        _launch(spec, "concat_copy", (_blocks(seg), max(1, min(n, 65535))), (THREADS,), dy, dx, _i32(n), _i64(seg),
                _i64(off * inner), _i32(0))
        dxs.append(dx)
        off += ci
    return dxs, {}


# ---- layout_transform --------------------------------------------------------------------------------

def _transpose(spec, src, out_shape):
    rows, cols = spec.define("ROWS"), spec.define("COLS")
    out = device.empty(out_shape)
    grid = (-(-cols // 32), -(-rows // 32), src.shape[0])
    _launch(spec, "transpose", grid, (32, 8), src, out)
    return out


def layout_forward(node, xs, params, ctx):
    x = _f32(xs[0])
    if x.ndim != 4:
        raise CnncError(f"layout_transform needs a 4-D array, got shape {x.shape}")
    n, (c, h, w) = x.shape[0], node.in_shapes[0]
    shape = (n, h, w, c) if node.attrs.to == "NHWC" else (n, c, h, w)
    return _transpose(_roles(node)["fwd"], x, shape), x.shape


def layout_backward(node, saved, dy, params, ctx):
    return [_transpose(_roles(node)["bwd"], _f32(dy), saved)], {}


KERNELS: dict[str, Kernel] = {
    "maxpool": Kernel(maxpool_forward, maxpool_backward),
    "avgpool": Kernel(_pool_forward("avgpool_fwd"), _pool_backward("avgpool_bwd")),
    "globalavgpool": Kernel(_pool_forward("gap_fwd"), _pool_backward("gap_bwd")),
    "adaptive_avgpool": Kernel(_pool_forward("adaptive_fwd"), _pool_backward("adaptive_bwd")),
    "dense": Kernel(dense_forward, dense_backward),
    "fused_dense": Kernel(dense_forward, dense_backward),
    "flatten": Kernel(flatten_forward, flatten_backward),
    "elemwise_chain": ELEMENTWISE,
    "softmax": Kernel(softmax_forward, softmax_backward),
    "dropout": Kernel(dropout_forward, dropout_backward),
    "identity": Kernel(identity_forward, identity_backward),
    "split": Kernel(identity_forward, identity_backward),  # a pass-through; its parts are channel slices
    "batchnorm": Kernel(batchnorm_forward, batchnorm_backward),
    "fused_bn": Kernel(fused_bn_forward, fused_bn_backward),
    "lrn": Kernel(lrn_forward, lrn_backward),
    "add": Kernel(add_forward, add_backward),
    "concat": Kernel(concat_forward, concat_backward),
    "layout_transform": Kernel(layout_forward, layout_backward),
}


# ---- losses ----------------------------------------------------------------------------------------

def cross_entropy(logits, labels, label_smoothing: float = 0.0):
    """Softmax cross-entropy of (N, C) logits against integer labels (N,), as F.cross_entropy
    (mean over the batch; label smoothing ε: target (1−ε)·one-hot + ε/C). Returns the loss as a
    Python float and d loss / d logits, from one kernel."""
    cp = _cp()
    logits = _f32(logits)
    if logits.ndim != 2:
        raise CnncError(f"cross_entropy needs (batch, classes) logits, got shape {logits.shape}")
    n, c = logits.shape
    labels = cp.asarray(labels)
    if labels.shape != (n,) or labels.dtype.kind not in "iu":
        raise CnncError(f"cross_entropy needs {n} integer labels, got shape {labels.shape} of {labels.dtype}")
    eps = float(label_smoothing)
    if not 0.0 <= eps <= 1.0:
        raise CnncError(f"label_smoothing must lie in [0, 1], got {eps}")
    labels = cp.ascontiguousarray(labels, dtype=cp.int64)
    grad = device.empty((n, c))
    rows = device.empty((n,))
    bad = cp.zeros((1,), dtype=cp.int32)
    if n:
        _launch(_LOSS_SPEC, "ce_fwd_bwd", (_blocks(n * 32),), (THREADS,), logits, labels, grad, rows, bad, _i32(n),
                _i32(c), _f(1.0 - eps), _f(eps), _f(eps / c), _f(1.0 / n))
    # one transfer: the per-sample losses' float64 sum and the count of bad labels
    total, nbad = (float(v) for v in cp.asnumpy(cp.stack([cp.sum(rows, dtype=cp.float64),
                                                             bad[0].astype(cp.float64)])))
    if nbad:
        host = cp.asnumpy(labels)
        raise CnncError(f"cross_entropy labels must lie in 0…{c - 1}, got {host.min()}…{host.max()}")
    return (total / n if n else float("nan")), grad


def mse(pred, target):
    """Mean of squared differences over all elements, as F.mse_loss; (loss as a Python float, gradient)."""
    cp = _cp()
    pred = _f32(pred)
    target = cp.asarray(target)
    if pred.shape != target.shape:
        raise CnncError(f"mse needs a target of the prediction's shape {pred.shape}, got {target.shape}")
    target = _f32(target)
    n = pred.size
    grad = device.empty(pred.shape)
    blocks = _blocks(n)
    partial = device.empty((blocks,), dtype="float64")
    if n:
        _launch(_LOSS_SPEC, "mse_fwd_bwd", (blocks,), (THREADS,), pred, target, grad, partial, _i64(n),
                _f(2.0 / n))
        return float(cp.sum(partial)) / n, grad
    return float("nan"), grad


LOSSES = {"cross_entropy": cross_entropy, "mse": mse}
