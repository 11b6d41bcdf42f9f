"""The CUDA backend's kernels for the channel and normalisation ops of modern blocks (mul and
fused_mul, x · act(gate), prelu, layer_scale, channel_shuffle, pad_channels, channel_slice,
layernorm, groupnorm, stochastic_depth), over one template, `kernels/channel_ops.cu`, specialised per node.

The conventions are `ops.py`'s: `_roles(node)` gives the node's `KernelSpec`s by role ("fwd",
"train", "bwd"), read by `specs(node, training)` (ahead-of-time compilation, no GPU needed) and
by the kernels at run time; float32 CuPy arrays, NCHW, the batch a runtime argument; inputs and
`dy` are never written; outputs come from `device.empty`. stochastic_depth draws its per-sample
mask on the host from `ctx.rng`, as the NumPy backend does, so both backends drop the same samples.
"""

from __future__ import annotations

import math

import numpy as np

from cnnc.backends.base import Kernel
from cnnc.compiler.ops import pad_channels_split
from cnnc.dsl.errors import CnncError

from . import device
from . import elementwise as ew
from .ops import THREADS, _blocks, _cp, _f32, _inner, _launch  # the 1-D launch conventions
from .source import KernelSpec

TEMPLATE = "channel_ops.cu"
OP_CODES = {"mul": 1, "fused_mul": 1, "prelu": 2, "layer_scale": 3, "channel_shuffle": 4, "pad_channels": 5,
            "channel_slice": 6, "layernorm": 7, "groupnorm": 8, "stochastic_depth": 9}

_fallback_rng = np.random.default_rng()


# ---- specs -----------------------------------------------------------------------------------

def _spec(node, entries, **defines) -> KernelSpec:
    return KernelSpec.make(TEMPLATE, entries, OP=OP_CODES[node.op], **defines)


def _roles_mul(node):
    """mul, and fused_mul (its attributes an Epilogue: input 1 the gate, x · act(g))."""
    a, b = node.in_shapes
    fused = "activation" in type(node.attrs).model_fields
    act = node.attrs.act() if fused else None
    gate = 2 if fused else 0 if a == b else (1 if tuple(a[1:]) == (1, 1) else 2)
    p0, p1 = ew.padded_args(*act) if act is not None else (0.0, 0.0)
    d = dict(C=node.out_shape[0], HW=_inner(node.out_shape), GATE=gate,
             ACT=ew.code(act[0]) if act is not None else 0, ARG0=float(p0), ARG1=float(p1))
    entries = ("mul_bwd_full",) + (("mul_bwd_gate",) if gate else ())
    return {"fwd": _spec(node, ("mul_fwd",), **d), "bwd": _spec(node, entries, BWD=1, **d)}


def _roles_prelu(node):
    shape = node.in_shapes[0]
    d = dict(C=shape[0], HW=_inner(shape), SHARED=int(bool(node.attrs.shared)))
    return {"fwd": _spec(node, ("prelu_fwd",), **d), "bwd": _spec(node, ("prelu_bwd", "chan_reduce"), BWD=1, **d)}


def _roles_layer_scale(node):
    shape = node.in_shapes[0]
    d = dict(C=shape[0], HW=_inner(shape))
    return {"fwd": _spec(node, ("ls_fwd",), **d), "bwd": _spec(node, ("ls_fwd", "chan_reduce"), BWD=1, **d)}


def _roles_shuffle(node):
    shape = node.in_shapes[0]
    return {"fwd": _spec(node, ("shuffle",), C=shape[0], HW=_inner(shape))}  # backward: the inverse shuffle


def _roles_pad(node):
    a = node.attrs
    c, h, w = node.in_shapes[0]
    co, oh, ow = node.out_shape
    before, _ = pad_channels_split(a, c)
    d = dict(C=c, HW=h * w, CO=co, H=h, W=w, OH=oh, OW=ow, S=int(a.stride), BEFORE=before)
    return {"fwd": _spec(node, ("pad_fwd",), **d), "bwd": _spec(node, ("pad_bwd",), BWD=1, **d)}


def _roles_slice(node):
    shape = node.in_shapes[0]
    lo, hi = node.attrs.bounds(shape[0])
    d = dict(C=shape[0], HW=_inner(shape), CO=int(hi) - int(lo), LO=int(lo))
    return {"fwd": _spec(node, ("slice_fwd",), **d), "bwd": _spec(node, ("slice_bwd",), BWD=1, **d)}


def _roles_norm(fwd: str, bwd: str):
    def roles(node):
        shape = node.in_shapes[0]
        a = node.attrs
        d = dict(C=shape[0], HW=_inner(shape), EPS=float(a.eps), AFFINE=int(bool(a.affine)))
        if a.get("groups") is not None:  # group norm: statistics per group of channels
            d["G"] = int(a.groups)
        return {"fwd": _spec(node, (fwd,), **d), "bwd": _spec(node, (bwd, "chan_reduce"), BWD=1, **d)}
    return roles


def _roles_sd(node):
    if float(node.attrs.rate) == 0.0:
        return {}
    per = math.prod(node.in_shapes[0])
    return {"train": _spec(node, ("sd_apply",), C=1, HW=per, PER=per)}  # backward reuses it


_ROLES = {"mul": _roles_mul, "fused_mul": _roles_mul, "prelu": _roles_prelu, "layer_scale": _roles_layer_scale,
          "channel_shuffle": _roles_shuffle, "pad_channels": _roles_pad, "channel_slice": _roles_slice,
          "layernorm": _roles_norm("ln_fwd", "ln_bwd"), "groupnorm": _roles_norm("gn_fwd", "gn_bwd"),
          "stochastic_depth": _roles_sd}

_role_cache: dict = {}


def _roles(node) -> dict[str, KernelSpec]:
    rule = _ROLES.get(node.op)
    if rule is None:
        raise CnncError(f"the CUDA channel ops have no kernels for `{node.op}`")
    try:
        found = _role_cache.get(node)
    except TypeError:
        return rule(node)
    if found is None:
        found = _role_cache[node] = rule(node)
    return found


def specs(node, training: bool) -> list[KernelSpec]:
    """Every kernel specialisation `node` runs: forward, and in training its training-only
    forward work and its backward."""
    roles = _roles(node)
    out = []
    for role in (("fwd", "train", "bwd") if training else ("fwd",)):
        spec = roles.get(role)
        if spec is not None and spec not in out:
            out.append(spec)
    return out


# ---- kernels ---------------------------------------------------------------------------------

def _chan_reduce(spec, a, b, mode: int):
    out = device.empty((spec.define("C"),))
    _launch(spec, "chan_reduce", (spec.define("C"),), (THREADS,), a, b, out, np.int32(a.shape[0]), np.int32(mode))
    return out


def mul_forward(node, xs, params, ctx):
    a, b = (_f32(v) for v in xs)
    spec = _roles(node)["fwd"]
    y = device.empty((a.shape[0], *node.out_shape))
    _launch(spec, "mul_fwd", (_blocks(y.size),), (THREADS,), a, b, y, np.int64(y.size))
    return y, (a, b)


def mul_backward(node, saved, dy, params, ctx):
    a, b = saved
    dy = _f32(dy)
    spec = _roles(node)["bwd"]
    gate = spec.define("GATE")
    n = np.int64(dy.size)
    grid = (_blocks(dy.size),)

    def full_grad(other):  # d(full operand) = dy · the other operand
        dx = device.empty(dy.shape)
        _launch(spec, "mul_bwd_full", grid, (THREADS,), dy, other, dx, n)
        return dx

    if gate == 0:
        return [full_grad(b), full_grad(a)], {}
    gate_in, full_in = (a, b) if gate == 1 else (b, a)
    rows = dy.shape[0] * spec.define("C")
    dg = device.empty(gate_in.shape)
    _launch(spec, "mul_bwd_gate", (_blocks(rows * 32),), (THREADS,), dy, full_in, gate_in, dg, np.int64(rows))
    dfull = full_grad(gate_in)
    return ([dg, dfull] if gate == 1 else [dfull, dg]), {}


def prelu_forward(node, xs, params, ctx):
    x = _f32(xs[0])
    w = _f32(params["weight"])
    y = device.empty(x.shape)
    _launch(_roles(node)["fwd"], "prelu_fwd", (_blocks(x.size),), (THREADS,), x, w, y, np.int64(x.size))
    return y, x


def prelu_backward(node, saved, dy, params, ctx):
    x, dy = saved, _f32(dy)
    spec = _roles(node)["bwd"]
    w = _f32(params["weight"])
    dx = device.empty(dy.shape)
    _launch(spec, "prelu_bwd", (_blocks(dy.size),), (THREADS,), x, dy, w, dx, np.int64(dy.size))
    dw = _chan_reduce(spec, dy, x, 2)
    if spec.define("SHARED"):
        dw = dw.sum(keepdims=True)
    return [dx], {"weight": dw}


def layer_scale_forward(node, xs, params, ctx):
    x = _f32(xs[0])
    y = device.empty(x.shape)
    _launch(_roles(node)["fwd"], "ls_fwd", (_blocks(x.size),), (THREADS,), x, _f32(params["weight"]), y,
            np.int64(x.size))
    return y, x


def layer_scale_backward(node, saved, dy, params, ctx):
    x, dy = saved, _f32(dy)
    spec = _roles(node)["bwd"]
    dx = device.empty(dy.shape)
    _launch(spec, "ls_fwd", (_blocks(dy.size),), (THREADS,), dy, _f32(params["weight"]), dx, np.int64(dy.size))
    return [dx], {"weight": _chan_reduce(spec, dy, x, 1)}


def _shuffle(node, src, groups: int):
    out = device.empty(src.shape)
    _launch(_roles(node)["fwd"], "shuffle", (_blocks(src.size),), (THREADS,), src, out, np.int64(src.size),
            np.int32(groups))
    return out


def channel_shuffle_forward(node, xs, params, ctx):
    return _shuffle(node, _f32(xs[0]), int(node.attrs.groups)), None


def channel_shuffle_backward(node, saved, dy, params, ctx):
    dy = _f32(dy)
    return [_shuffle(node, dy, dy.shape[1] // int(node.attrs.groups))], {}


def _copy_kernel(entry_fwd: str, entry_bwd: str):
    def forward(node, xs, params, ctx):
        x = _f32(xs[0])
        y = device.empty((x.shape[0], *node.out_shape))
        _launch(_roles(node)["fwd"], entry_fwd, (_blocks(y.size),), (THREADS,), x, y, np.int64(y.size))
        return y, x.shape

    def backward(node, saved, dy, params, ctx):
        dy = _f32(dy)
        dx = device.empty(saved)
        _launch(_roles(node)["bwd"], entry_bwd, (_blocks(dx.size),), (THREADS,), dy, dx, np.int64(dx.size))
        return [dx], {}
    return forward, backward


pad_channels_forward, pad_channels_backward = _copy_kernel("pad_fwd", "pad_bwd")
channel_slice_forward, channel_slice_backward = _copy_kernel("slice_fwd", "slice_bwd")


def _norm_kernels(fwd: str, bwd: str, grouped: bool):
    def forward(node, xs, params, ctx):
        x = _f32(xs[0])
        spec = _roles(node)["fwd"]
        affine = bool(node.attrs.affine)
        w = _f32(params["weight"]) if affine else x
        b = _f32(params["bias"]) if affine else x
        y, xhat = device.empty(x.shape), device.empty(x.shape)
        if grouped:
            blocks = x.shape[0] * int(node.attrs.groups)
            inv = device.empty((blocks,))
            _launch(spec, fwd, (blocks,), (THREADS,), x, w, b, y, xhat, inv)
        else:
            positions = x.shape[0] * spec.define("HW")
            inv = device.empty((positions,))
            _launch(spec, fwd, (_blocks(positions),), (THREADS,), x, w, b, y, xhat, inv, np.int64(positions))
        return y, (xhat, inv)

    def backward(node, saved, dy, params, ctx):
        xhat, inv = saved
        dy = _f32(dy)
        spec = _roles(node)["bwd"]
        affine = bool(node.attrs.affine)
        w = _f32(params["weight"]) if affine else dy
        dx = device.empty(dy.shape)
        if grouped:
            _launch(spec, bwd, (inv.size,), (THREADS,), xhat, inv, dy, w, dx)
        else:
            _launch(spec, bwd, (_blocks(inv.size),), (THREADS,), xhat, inv, dy, w, dx, np.int64(inv.size))
        if not affine:
            return [dx], {}
        return [dx], {"weight": _chan_reduce(spec, dy, xhat, 1), "bias": _chan_reduce(spec, dy, dy, 0)}
    return forward, backward


layernorm_forward, layernorm_backward = _norm_kernels("ln_fwd", "ln_bwd", grouped=False)
groupnorm_forward, groupnorm_backward = _norm_kernels("gn_fwd", "gn_bwd", grouped=True)


def stochastic_depth_forward(node, xs, params, ctx):
    x = xs[0]
    roles = _roles(node)
    if not ctx.training or "train" not in roles:  # evaluation, or rate 0: the identity
        return x, None
    rate = float(node.attrs.rate)
    rng = getattr(ctx, "rng", None) or _fallback_rng
    keep = (rng.random(x.shape[0], dtype=np.float32) >= rate).astype(np.float32) * np.float32(1.0 / (1.0 - rate))
    mask = _cp().asarray(keep)
    return _sd_apply(roles["train"], _f32(x), mask), mask


def _sd_apply(spec, v, mask):
    out = device.empty(v.shape)
    _launch(spec, "sd_apply", (_blocks(v.size),), (THREADS,), v, mask, out, np.int64(v.size))
    return out


def stochastic_depth_backward(node, saved, dy, params, ctx):
    if saved is None:
        return [dy], {}
    return [_sd_apply(_roles(node)["train"], _f32(dy), saved)], {}


fused_mul_forward, fused_mul_backward = mul_forward, mul_backward  # ACT in the specs applies the gate's activation

KERNELS: dict[str, Kernel] = {op: Kernel(globals()[f"{op}_forward"], globals()[f"{op}_backward"]) for op in OP_CODES}
