"""The op table: every layer cnnc knows, declared once.

Each `OpDef` gives an op's attribute schema (a pydantic model), which attributes may be
given positionally, how many inputs it takes, its shape rule, its parameter tensors
(trainable parameters and non-trainable buffers), its MAC count, its receptive-field window
and its fusion pattern (TVM's classification, read by the fusion passes). Passes look ops up
here; they do not test op names.

Shapes exclude the batch dimension: (C, H, W) for images, (F,) for flat features.

ONNX: `onnx` is the readable name of the ONNX operator an op corresponds to (what importers and
the docs read, e.g. "Conv"); `onnx_export` is how `cnnc export` writes it: a rule (section
"ONNX equivalents" below) that describes the op's ONNX nodes through an emitter
(compiler/onnx_desc.py), or for an element-wise op an `OnnxAct` (its operator, attributes and the
first opset that has it; below that opset, or without one, its formula is written node by node).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Annotated, Any, Callable, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PositiveInt

from cnnc.dsl.errors import CnncError, InternalError

from .formula import Formula

Shape = tuple[int, ...]


class Pattern(str, Enum):
    """Fusion patterns, as TVM classifies ops (lower values fuse more freely)."""

    ELEMWISE = "elemwise"
    BROADCAST = "broadcast"
    INJECTIVE = "injective"
    REDUCE = "reduce"
    OUT_ELEMWISE_FUSABLE = "out_elemwise_fusable"
    OPAQUE = "opaque"


@dataclass(frozen=True)
class ParamSpec:
    """One parameter tensor of a layer. `buffer` tensors (BatchNorm running statistics) are state, not parameters.

    `init` says how training starts it: "weight" follows the train section's `init` (Xavier, He, ...,
    with PyTorch's fan convention), a number fills the tensor with that value."""

    name: str
    shape: Shape
    buffer: bool = False
    init: str | float = 0.0


@dataclass(frozen=True)
class Window:
    """A sliding window's effective extent and stride per axis, for receptive-field arithmetic."""

    kh: int
    kw: int
    sh: int
    sw: int


GLOBAL = "global"  # the window covers the whole input (global pooling, dense)


# ---- attribute types -----------------------------------------------------------------------

def _int_like(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _pair(v: Any) -> Any:
    """`3`, `3x3`, `1x7` or `(1, 7)` → (h, w)."""
    if isinstance(v, list):  # from a JSON plan
        v = tuple(v)
    if _int_like(v):
        return (v, v)
    if isinstance(v, tuple) and len(v) in (1, 2) and all(_int_like(x) for x in v):
        return (v[0], v[-1])
    raise ValueError("takes a number or HxW, like 3 or 1x7")


def _pad(v: Any) -> Any:
    """`same`, `valid`, `p`, `(h, w)` or `(top, bottom, left, right)` → a 4-tuple or the word."""
    if v in ("same", "valid"):
        return v
    if isinstance(v, list):  # from a JSON plan
        v = tuple(v)
    if _int_like(v):
        v = (v,)
    if isinstance(v, tuple) and len(v) in (1, 2, 4) and all(_int_like(x) for x in v):
        if min(v) < 0:
            raise ValueError("cannot be negative")
        if len(v) == 1:
            return v * 4
        return (v[0], v[0], v[1], v[1]) if len(v) == 2 else v
    raise ValueError("takes same, valid, a number, (h, w) or (top, bottom, left, right)")


Pair = Annotated[tuple[PositiveInt, PositiveInt], BeforeValidator(_pair)]
Pads = Annotated[Union[Literal["same", "valid"], tuple[int, int, int, int]], BeforeValidator(_pad)]
def _flag(v: Any) -> Any:
    """Only true/false: `bias=1` or `bias=yes` are more likely slips than choices."""
    if isinstance(v, bool):
        return v
    if v in ("true", "false"):
        return v == "true"
    raise ValueError("takes true or false")


Flag = Annotated[bool, BeforeValidator(_flag)]
Rounding = Literal["exact", "floor", "ceil"]
Prob = Annotated[float, Field(ge=0.0, lt=1.0)]


class Attrs(BaseModel):
    """Attributes every layer accepts: an explicit `name`; `trainable=false` freezes its parameters;
    `lr_mult` and `decay_mult` scale its learning rate and weight decay (Caffe's multipliers)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    name: str | None = None
    trainable: Flag = True
    lr_mult: Annotated[float, Field(ge=0)] = 1.0
    decay_mult: Annotated[float, Field(ge=0)] = 1.0

    def get(self, field: str, default: Any = None) -> Any:
        """The attribute if this op has it, else `default` (getattr's fallback is slow on pydantic models)."""
        return self.__dict__.get(field, default)


class NoAttrs(Attrs):
    pass


class InputAttrs(Attrs):
    dims: tuple[PositiveInt, ...]


class ConvAttrs(Attrs):
    filters: PositiveInt
    kernel: Pair
    stride: Pair = (1, 1)
    pad: Pads = (0, 0, 0, 0)
    dilation: Pair = (1, 1)
    groups: PositiveInt = 1
    bias: Flag = True
    round: Rounding = "exact"


class PoolAttrs(Attrs):
    kernel: Pair
    stride: Annotated[Pair | None, Field(description="kernel")] = None  # None: the kernel, as PyTorch and Keras
    pad: Pads = (0, 0, 0, 0)
    round: Rounding = "exact"
    count_pad: Flag = True  # avgpool: padded zeros count in the divisor (PyTorch's count_include_pad)


class AdaptivePoolAttrs(Attrs):
    size: Pair


class DenseAttrs(Attrs):
    units: PositiveInt
    bias: Flag = True
    flatten: Flag = False  # accept a C×H×W input and flatten it (the compiler sets it when it drops a flatten)


class BatchNormAttrs(Attrs):
    eps: Annotated[float, Field(gt=0)] = 1e-5
    momentum: Annotated[float, Field(ge=0, le=1)] = 0.1
    affine: Flag = True


class LrnAttrs(Attrs):
    size: PositiveInt = 5
    alpha: float = 1e-4
    beta: float = 0.75
    k: float = 1.0


class EluAttrs(Attrs):
    alpha: float = 1.0


class DropoutAttrs(Attrs):
    rate: Prob = 0.5


class LeakyReluAttrs(Attrs):
    slope: float = 0.01


# ---- attributes of the channel and normalisation ops of modern blocks (SE, ConvNeXt, ShuffleNet) --

class PreluAttrs(Attrs):
    shared: Flag = False  # one slope for every channel (PyTorch's nn.PReLU() default) instead of one per channel


class LayerScaleAttrs(Attrs):
    init: Annotated[float, Field(allow_inf_nan=False)] = 1e-6  # γ's starting value


class ChannelShuffleAttrs(Attrs):
    groups: PositiveInt


class PadChannelsAttrs(Attrs):
    to: PositiveInt
    stride: PositiveInt = 1


class LayerNormAttrs(Attrs):
    eps: Annotated[float, Field(gt=0)] = 1e-6
    affine: Flag = True


class GroupNormAttrs(Attrs):
    groups: PositiveInt
    eps: Annotated[float, Field(gt=0)] = 1e-5
    affine: Flag = True


class StochasticDepthAttrs(Attrs):
    rate: Prob


class ChannelSliceAttrs(Attrs):
    lo: Annotated[int, Field(ge=0)] | None = None
    hi: PositiveInt | None = None
    part: Annotated[tuple[Annotated[int, Field(ge=0)], PositiveInt] | None,
                    Field(description="set by split")] = None  # (i, n): the i-th of n equal parts

    def bounds(self, c: int) -> tuple[int, int]:
        """(lo, hi) within c channels: the given ones, or those of part i of n."""
        if self.part is not None:
            i, n = self.part
            return (i * c // n, (i + 1) * c // n)
        return (self.lo, self.hi)


class SplitAttrs(Attrs):
    parts: Annotated[int, Field(ge=2)] = 2


# ---- attributes of the ops that passes create (not written in .cnn files) -------------------

def _elementwise_name(v: Any) -> Any:
    """An op of the table that has an element-wise formula (checked when the table is complete)."""
    if v == "none" or (isinstance(v, str) and v in OPS and OPS[v].formula is not None):
        return v
    raise ValueError(f"`{v}` is not an element-wise op of the op table")


ElementwiseName = Annotated[str, BeforeValidator(_elementwise_name)]


def _args(v: Any) -> Any:
    return tuple(float(x) for x in v) if isinstance(v, (list, tuple)) else v


Args = Annotated[tuple[float, ...], BeforeValidator(_args)]


class Epilogue(Attrs):
    """The element-wise activation a fused op applies last, with its formula's arguments."""

    activation: ElementwiseName = "none"
    act_args: Args = ()  # the activation's formula parameters, in OpDef.formula.params order

    def act(self) -> tuple[str, tuple[float, ...]] | None:
        return None if self.activation == "none" else (self.activation, tuple(self.act_args))


class FusedConvAttrs(ConvAttrs, Epilogue):
    """conv (+ folded BatchNorm in its weights and bias) (+ residual input) (+ activation)."""

    residual: Flag = False  # a second input added before the activation


class FusedDenseAttrs(DenseAttrs, Epilogue):
    pass


class FusedBatchNormAttrs(BatchNormAttrs, Epilogue):
    """BatchNorm (batch or running statistics) (+ residual input) then an element-wise activation,
    in one pass each way."""

    residual: Flag = False  # a second input added before the activation (a residual block's bn → add → relu)


class FusedMulAttrs(Epilogue):
    """x · act(g): input 0 the C×H×W tensor, input 1 the C×1×1 gate whose activation is applied first
    (fuse_gate puts the operands in this order whichever order the product had them in)."""


class ChainAttrs(Attrs):
    """Unary element-wise ops applied in order, in one pass over the data."""

    ops: tuple[ElementwiseName, ...]
    args: tuple[Args, ...] = ()  # one tuple per op: its formula parameters

    def steps(self, node_name: str) -> list[tuple[str, tuple[float, ...]]]:
        """(op, formula arguments) in order; an op whose formula takes parameters needs them."""
        out = []
        for i, op in enumerate(self.ops):
            args = tuple(self.args[i]) if i < len(self.args) else ()
            want = len(OPS[op].formula.params)
            if len(args) != want:
                raise CnncError(f"elemwise_chain `{node_name}`: its {op} (op {i + 1}) takes {want} "
                                f"argument{'s' if want != 1 else ''}, got {len(args)}")
            out.append((op, args))
        return out


def formula_args(op: str, attrs: Attrs) -> tuple[float, ...]:
    """The values of an element-wise op's formula parameters, read from its attributes."""
    return tuple(float(attrs.get(p)) for p in OPS[op].formula.params)


class LayoutAttrs(Attrs):
    """Reorder a C×H×W tensor's memory between NCHW and NHWC; the logical shape stays C×H×W."""

    to: Literal["NCHW", "NHWC"]


# ---- the op definition ---------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class OnnxAct:
    """An element-wise op's ONNX operator: attributes fixed (`attrs`) or from the formula's
    parameters (`from_params`: ONNX attribute → parameter), constant extra inputs (Clip's bounds),
    and the first opset that has it (`since`); below it the formula is exported instead."""

    op_type: str
    attrs: dict = field(default_factory=dict)
    from_params: dict = field(default_factory=dict)
    consts: tuple[float, ...] = ()
    since: int = 1


def _no_params(attrs, ins) -> list[ParamSpec]:
    return []


def _no_macs(attrs, ins, out) -> int:
    return 0


@dataclass(frozen=True)
class OpDef:
    name: str
    doc: str
    attrs: type[Attrs]
    shape: Callable[[Any, list[Shape]], Shape]
    pattern: Pattern
    positional: tuple[str, ...] = ()
    inputs: tuple[int, int | None] = (1, 1)  # (min, max); max None: any number
    params: Callable[[Any, list[Shape]], list[ParamSpec]] = _no_params
    macs: Callable[[Any, list[Shape], Shape], int] = _no_macs
    window: Callable[[Any, list[Shape]], Window | str | None] = lambda a, ins: None
    # a sliding window's arithmetic per axis (height, width), which its shape rule computes with
    slides: Callable[[Any, list[Shape]], tuple[Slide, Slide]] | None = None
    params_text: Callable[[Any, list[Shape]], str] | None = None  # params_doc with the numbers, where it needs more
    aliases: tuple[str, ...] = ()
    tensor_args: bool = False  # positional arguments name tensors (merges)
    user: bool = True  # may be written in a .cnn file
    # gradient: what backward needs kept from forward ("input", "output"), for memory planning
    grad_needs: frozenset[str] = frozenset()
    fused_as: str | None = None  # the fused op an epilogue fusion turns this op into
    # a broadcast product: the fused op it becomes with the element-wise activation of its C×1×1 gate (fuse_gate)
    gate_fused_as: str | None = None
    # a per-channel op kept in the plan (BatchNorm in training): the fused op it becomes with the
    # element-wise op that reads it (fuse_epilogue)
    act_fused_as: str | None = None
    formula: Formula | None = None  # element-wise ops: y = f(x) and f', which every backend renders
    kind: str = "misc"  # what pictures draw it as: io conv dense pool norm act merge misc
    torch: str | None = None  # the PyTorch equivalent, an expression in F, torch, x and the attributes
    onnx: str | None = None  # the ONNX operator it maps to (readable name)
    # how `cnnc export` writes it: a rule (E, a, node, xs) -> output name, or an OnnxAct (element-wise ops)
    onnx_export: Callable | OnnxAct | None = None
    residual_fusable: bool = False  # a merge an epilogue fusion may absorb as the residual input
    identity_in: frozenset[str] = frozenset()  # modes ("inference", "training") in which the op is the identity
    # training-only noise: "units" zeroes single activations (dropout), "samples" a sample's whole tensor
    drops: str | None = None
    absorbed_as: str | None = None  # a flag attribute of its consumers that does this op's work (flatten)
    # a per-channel affine op that folds into the producer's weights at inference:
    # (attrs, params) → (scale, center, shift), y = (x − center)·scale + shift
    fold: Callable[[Any, dict], tuple[Any, Any, Any]] | None = None
    label: str | None = None  # its short name in fused labels ("bn" in conv_bn_relu)
    loss_absorbs: frozenset[str] = frozenset()  # losses that include it (cross-entropy's softmax): training drops it
    # a layer with several outputs (split): how many, and the op and attributes of output i; the
    # builder makes one node per output, each reading this layer's (pass-through) result
    outputs: Callable[[Any], int] | None = None
    part: Callable[[Any, int], tuple[str, dict]] | None = None
    # the language reference's summary columns (compiler/opdocs.py)
    out_doc: str = "same"
    params_doc: str = "0"
    macs_doc: str = "0"
    torch_doc: str | None = None  # the PyTorch module, where `torch` is a function


def _need_rank(ins: list[Shape], op: str, ranks=(3,)) -> Shape:
    (x,) = ins
    if len(x) not in ranks:
        want = " or ".join({3: "C×H×W", 1: "flat features"}[r] for r in ranks)
        raise CnncError(f"{op} needs {want} input, got {fmt_shape(x)}")
    return x


def fmt_shape(s: Shape) -> str:
    return "×".join(str(d) for d in s)


# ---- spatial arithmetic --------------------------------------------------------------------

def resolve_pads(pad, n_h: int, n_w: int, k: tuple[int, int], s: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, bottom, left, right). `same` pads so that out = ceil(n / stride), the extra pixel at the end (TF)."""
    if pad == "valid":
        return (0, 0, 0, 0)
    if pad == "same":
        out = []
        for n, kk, ss in ((n_h, k[0], s[0]), (n_w, k[1], s[1])):
            total = max((math.ceil(n / ss) - 1) * ss + kk - n, 0)
            out += [total // 2, total - total // 2]
        return tuple(out)
    return tuple(pad)


@dataclass(frozen=True)
class Slide:
    """One axis of a sliding window: N input pixels padded with P0 before and P1 after, a kernel k
    dilated by d (its extent F = d·(k − 1) + 1) moved by stride S, and the rounding rule applied
    when (N − F + P0 + P1)/S is not whole. `pad_word` is the padding as the layer spells it
    (`same`, `valid`) or None for numbers; `pool`: a ceil-rounded window may not start in the
    end padding (Caffe, PyTorch). Shape rules compute sizes with it, `cnnc check --explain`
    shows its arithmetic."""

    n: int
    kernel: int
    stride: int
    p0: int
    p1: int
    rounding: str
    dilation: int = 1
    pool: bool = False
    pad_word: str | None = None
    rule: str = ""  # how the layer spells its rounding: `round=floor`, `pad=same`


    @property
    def extent(self) -> int:
        return self.dilation * (self.kernel - 1) + 1

    @property
    def span(self) -> int:
        """N − F + P0 + P1: how far the window moves."""
        return self.n + self.p0 + self.p1 - self.extent

    def arith(self) -> str:
        """The output-size rule with the numbers filled in: `(32 − 5 + 2·0)/2 + 1`."""
        pad_txt = f"2·{self.p0}" if self.p0 == self.p1 else f"{self.p0} + {self.p1}"
        return f"({self.n} − {self.extent} + {pad_txt})/{self.stride} + 1"

    def extent_text(self) -> str:
        """` (F = d·(k−1)+1 = 5)` for a dilated kernel, else empty."""
        return f" (F = {self.dilation}·({self.kernel}−1)+1 = {self.extent})" if self.dilation > 1 else ""

    def size(self, axis: str, op: str) -> int:
        """The number of window positions, checked to be a whole, positive number."""
        span, s, eff = self.span, self.stride, self.extent_text()
        arith = self.arith()
        if span < 0:
            raise CnncError(f"{op} output {axis} would be zero or less: {arith} = {span / s + 1:g}{eff}",
                            hint=f"the {axis} {self.n} is smaller than the kernel {self.extent}; remove a "
                                 "downsampling layer, use a smaller kernel or pad more")
        if span % s == 0 or self.rounding == "floor":
            out = span // s + 1
        elif self.rounding == "ceil":
            out = self.ceil_size()
            if self.ceil_dropped():
                out -= 1
        else:
            value = span / s + 1
            other = [d for d in range(1, 6) if d != s and span % d == 0][:2]
            strides = " or ".join(str(d) for d in other)
            hint = (f"{'stride ' + strides + ', ' if strides else ''}`pad=same`, "
                    "or explicit rounding `round=floor` / `round=ceil`")
            raise CnncError(f"{op} output {axis} is not an integer: {arith} = {value:g}{eff}", hint=hint)
        if out <= 0:
            raise CnncError(f"{op} output {axis} would be zero or less: {arith} = {out}{eff}")
        return out

    def ceil_size(self) -> int:
        return -(-self.span // self.stride) + 1

    def ceil_dropped(self) -> bool:
        """Whether ceil rounding's last window would start inside the end padding, and is dropped."""
        return self.pool and (self.ceil_size() - 1) * self.stride >= self.n + self.p0


def _conv_shape(a: ConvAttrs, ins: list[Shape]) -> Shape:
    c, h, w = _need_rank(ins, "conv")
    if c % a.groups:
        raise CnncError(f"conv groups={a.groups} does not divide the {c} input channels",
                        hint=f"input channels must be a multiple of groups; divisors of {c}: "
                             + ", ".join(str(d) for d in range(1, c + 1) if c % d == 0 and d <= 64))
    if a.filters % a.groups:
        raise CnncError(f"conv groups={a.groups} does not divide the {a.filters} filters")
    sh, sw = _conv_slides(a, ins)
    return (a.filters, sh.size("height", "conv"), sw.size("width", "conv"))


def _conv_slides(a: ConvAttrs, ins: list[Shape]) -> tuple[Slide, Slide]:
    _, h, w = ins[0]
    t, b, l, r = resolve_pads(a.pad, h, w, _eff_kernel(a), a.stride)
    rounding = "floor" if a.pad == "same" else a.round  # `same` pads for ceil(N/S) outputs; floor gets there
    word = a.pad if isinstance(a.pad, str) else None
    rule = f"pad={word}" if word == "same" else f"round={a.round}"
    return (Slide(h, a.kernel[0], a.stride[0], t, b, rounding, a.dilation[0], pad_word=word, rule=rule),
            Slide(w, a.kernel[1], a.stride[1], l, r, rounding, a.dilation[1], pad_word=word, rule=rule))


def _conv_params_text(a: ConvAttrs, ins) -> str:
    """K·(C/g)·kh·kw (+K) with the numbers."""
    return (f"{a.filters}·({ins[0][0]}/{a.groups})·{a.kernel[0]}·{a.kernel[1]}"
            + (f" + {a.filters}" if a.bias else ""))


def _eff_kernel(a: ConvAttrs) -> tuple[int, int]:
    return (a.dilation[0] * (a.kernel[0] - 1) + 1, a.dilation[1] * (a.kernel[1] - 1) + 1)


def _conv_params(a: ConvAttrs, ins) -> list[ParamSpec]:
    c = ins[0][0]
    ps = [ParamSpec("weight", (a.filters, c // a.groups, a.kernel[0], a.kernel[1]), init="weight")]
    if a.bias:
        ps.append(ParamSpec("bias", (a.filters,)))
    return ps


def _conv_macs(a: ConvAttrs, ins, out) -> int:
    return math.prod(out) * a.kernel[0] * a.kernel[1] * (ins[0][0] // a.groups)


def _pool_shape(op: str):
    def rule(a: PoolAttrs, ins: list[Shape]) -> Shape:
        c, h, w = _need_rank(ins, op)
        sh, sw = _pool_slides(a, ins)
        for sl, axis in ((sh, "height"), (sw, "width")):
            p = max(sl.p0, sl.p1)
            if p > sl.kernel // 2:
                raise CnncError(f"{op} pad {p} is more than half the kernel {sl.kernel} ({axis})",
                                hint="a window lying wholly in the padding has no input; use a smaller pad")
        return (c, sh.size("height", op), sw.size("width", op))
    return rule


def _pool_slides(a: PoolAttrs, ins: list[Shape]) -> tuple[Slide, Slide]:
    _, h, w = ins[0]
    stride = a.stride or a.kernel
    t, b, l, r = resolve_pads(a.pad, h, w, a.kernel, stride)
    rounding = "floor" if a.pad == "same" else a.round
    word = a.pad if isinstance(a.pad, str) else None
    rule = f"pad={word}" if word == "same" else f"round={a.round}"
    return (Slide(h, a.kernel[0], stride[0], t, b, rounding, pool=True, pad_word=word, rule=rule),
            Slide(w, a.kernel[1], stride[1], l, r, rounding, pool=True, pad_word=word, rule=rule))


def _dense_shape(a: DenseAttrs, ins: list[Shape]) -> Shape:
    (x,) = ins
    if len(x) == 3 and (x[1], x[2]) != (1, 1) and not a.flatten:
        raise CnncError(f"dense after a spatial tensor {fmt_shape(x)}: flattening is not implied",
                        hint=f"insert `flatten` before `dense` (giving {math.prod(x)} features), write "
                             "`dense ... flatten=true`, or pool to 1×1 first (`globalavgpool`); dense flattens "
                             "C×1×1 by itself")
    return (a.units,)


def _dense_in(ins) -> int:
    return math.prod(ins[0])


def _same(ins: list[Shape]) -> Shape:
    return ins[0]


def _elementwise(a, ins: list[Shape]) -> Shape:
    return ins[0]


def _add_shape(a, ins: list[Shape]) -> Shape:
    first = ins[0]
    for i, s in enumerate(ins[1:], 2):
        if s != first:
            raise CnncError(f"add of tensors with different shapes: {fmt_shape(first)} and {fmt_shape(s)}",
                            hint="a residual shortcut needs a projection (`conv` 1×1 with the same stride) "
                                 "when channels or size change")
    return first


def _concat_shape(a, ins: list[Shape]) -> Shape:
    ranks = {len(s) for s in ins}
    if ranks == {1}:
        return (sum(s[0] for s in ins),)
    if ranks != {3}:
        raise CnncError("concat of flat and spatial tensors: " + ", ".join(fmt_shape(s) for s in ins))
    h, w = ins[0][1:]
    for s in ins[1:]:
        if s[1:] != (h, w):
            raise CnncError(f"concat of tensors with different heights/widths: {fmt_shape(ins[0])} and "
                            f"{fmt_shape(s)}", hint="concat joins channels; every input needs the same H×W")
    return (sum(s[0] for s in ins), h, w)


def _bn_shape(a, ins):
    return _need_rank(ins, "batchnorm", (3, 1))


def _fused_bn_shape(a: FusedBatchNormAttrs, ins: list[Shape]) -> Shape:
    out = _bn_shape(a, ins[:1])
    if a.residual and tuple(ins[1]) != tuple(out):
        raise CnncError(f"fused residual of shape {fmt_shape(ins[1])} does not match {fmt_shape(out)}")
    return out


def _bn_params(a: BatchNormAttrs, ins) -> list[ParamSpec]:
    c = ins[0][0]
    ps = [ParamSpec("weight", (c,), init=1.0), ParamSpec("bias", (c,))] if a.affine else []
    return ps + [ParamSpec("running_mean", (c,), buffer=True), ParamSpec("running_var", (c,), buffer=True, init=1.0)]


def _bn_fold(a: BatchNormAttrs, p: dict):
    """Inference BatchNorm as y = (x − μ)·scale + β per channel, in float64: scale = γ / sqrt(σ² + ε)."""
    import numpy as np  # the op table itself stays free of array code but for this rule
    mean, var = p["running_mean"].astype(np.float64), p["running_var"].astype(np.float64)
    gamma = p["weight"].astype(np.float64) if a.affine else np.ones_like(mean)
    beta = p["bias"].astype(np.float64) if a.affine else np.zeros_like(mean)
    return gamma / np.sqrt(var + a.eps), mean, beta


def _dense_params(a: DenseAttrs, ins) -> list[ParamSpec]:
    ps = [ParamSpec("weight", (a.units, _dense_in(ins)), init="weight")]
    if a.bias:
        ps.append(ParamSpec("bias", (a.units,)))
    return ps


def _adaptive_shape(a: AdaptivePoolAttrs, ins):
    c, h, w = _need_rank(ins, "adaptive_avgpool")
    return (c, a.size[0], a.size[1])


def _adaptive_window(a: AdaptivePoolAttrs, ins):
    _, h, w = ins[0]
    return Window(math.ceil(h / a.size[0]), math.ceil(w / a.size[1]), max(1, h // a.size[0]), max(1, w // a.size[1]))


def _pool_window(a: PoolAttrs, ins):
    s = a.stride or a.kernel
    return Window(a.kernel[0], a.kernel[1], s[0], s[1])


def _input_shape(a: InputAttrs, ins):
    return tuple(a.dims)


def _act(name: str, doc: str, forward: str, derivative: str, attrs=NoAttrs, positional=(), aliases=(),
         torch: str | None = None, onnx: str | None = None, onnx_export: OnnxAct | None = None) -> OpDef:
    """An element-wise activation: its formula is all a backend needs to run and fuse it."""
    params = tuple(f for f in attrs.model_fields if f not in Attrs.model_fields)
    formula = Formula(forward, derivative, params).bind(name)
    return OpDef(name, doc, attrs, _elementwise, Pattern.ELEMWISE, positional=positional, aliases=aliases,
                 grad_needs=formula.grad_reads, formula=formula, kind="act", torch=torch, onnx=onnx,
                 onnx_export=onnx_export)


def _fused_conv_shape(a: FusedConvAttrs, ins: list[Shape]) -> Shape:
    out = _conv_shape(a, ins[:1])
    if a.residual and tuple(ins[1]) != out:
        raise CnncError(f"fused residual of shape {fmt_shape(ins[1])} does not match {fmt_shape(out)}")
    return out


IN = frozenset({"input"})
OUT = frozenset({"output"})


# ---- PyTorch equivalents of the ops that need more than one expression -----------------------
# Each takes (T, a, node, xs, p, training): T has `torch` and `F` (torch.nn.functional), `a` the
# attributes, `node` the graph node's meta (resolved `pads`), xs the inputs, p the parameters.

def _torch_pad(T, x, pads, value=0.0):
    t, b, l, r = pads
    return T.F.pad(x, (l, r, t, b), value=value) if any(pads) else x


def _torch_conv(T, a, node, xs, p, training):
    y = T.F.conv2d(_torch_pad(T, xs[0], node["pads"]), p["weight"], p.get("bias"), a.stride, 0, a.dilation,
                   a.groups)
    if a.get("residual"):
        y = y + xs[1]
    return _torch_epilogue(T, a, y)


def _torch_fused_bn(T, a, node, xs, p, training):
    y = T.F.batch_norm(xs[0], p["running_mean"], p["running_var"], p.get("weight"), p.get("bias"), training,
                       a.momentum, a.eps)
    if a.residual:
        y = y + xs[1]
    return _torch_epilogue(T, a, y)


def _torch_epilogue(T, a, y):
    act = a.act() if isinstance(a, Epilogue) else None
    return y if act is None else torch_elementwise(T, act[0], act[1], y)


def torch_elementwise(T, op: str, args: tuple[float, ...], x):
    """An element-wise op of the table applied in PyTorch, with its formula's arguments."""
    d = OPS[op]
    names = {"torch": T.torch, "F": T.F, "x": x, **dict(zip(d.formula.params, args))}
    return eval(d.torch, {"__builtins__": {}}, names)  # noqa: S307 — the table's own expressions


def _torch_pool(kind: str):
    def run(T, a, node, xs, p, training):
        t, b, l, r = node["pads"]
        stride = a.stride or a.kernel
        ceil = a.round == "ceil"
        fn = T.F.max_pool2d if kind == "max" else T.F.avg_pool2d
        extra = {} if kind == "max" else {"count_include_pad": a.count_pad}
        if t == b and l == r:
            return fn(xs[0], a.kernel, stride, (t, l), ceil_mode=ceil, **extra)
        x = _torch_pad(T, xs[0], node["pads"], float("-inf") if kind == "max" else 0.0)
        return fn(x, a.kernel, stride, 0, ceil_mode=ceil)
    return run


def _torch_dense(T, a, node, xs, p, training):
    y = T.F.linear(xs[0].reshape(xs[0].shape[0], -1), p["weight"], p.get("bias"))
    return _torch_epilogue(T, a, y)


def _torch_chain(T, a, node, xs, p, training):
    x = xs[0]
    for op, args in a.steps(node["name"]):
        x = torch_elementwise(T, op, args, x)
    return x


def _torch_sum(T, a, node, xs, p, training):
    out = xs[0]
    for v in xs[1:]:
        out = out + v
    return out


# ---- channel and normalisation ops of modern blocks --------------------------------------------

def _mul_shape(a, ins: list[Shape]) -> Shape:
    """Equal shapes, or a C×H×W tensor and a C×1×1 gate (either order) that broadcasts over H×W."""
    x, y = ins
    if x == y:
        return x
    if len(x) == 3 and len(y) == 3 and x[0] == y[0] and (x[1:] == (1, 1) or y[1:] == (1, 1)):
        return y if x[1:] == (1, 1) else x
    raise CnncError(f"mul of tensors with shapes {fmt_shape(x)} and {fmt_shape(y)}",
                    hint="mul takes two tensors of one shape, or a C×H×W tensor and a C×1×1 gate with the "
                         "same C (squeeze-excitation: `... -> gap -> ... -> hardsigmoid -> mul(x)`)")


def _fused_mul_shape(a, ins: list[Shape]) -> Shape:
    """A C×H×W tensor (input 0) and its C×1×1 gate (input 1)."""
    x, g = ins
    if len(x) != 3 or tuple(g) != (x[0], 1, 1):
        raise CnncError(f"fused_mul of tensors with shapes {fmt_shape(x)} and {fmt_shape(g)}: needs a C×H×W "
                        "tensor and then its C×1×1 gate")
    return x


def _prelu_params(a: PreluAttrs, ins) -> list[ParamSpec]:
    return [ParamSpec("weight", (1,) if a.shared else (ins[0][0],), init=0.25)]


def _layer_scale_params(a: LayerScaleAttrs, ins) -> list[ParamSpec]:
    return [ParamSpec("weight", (ins[0][0],), init=float(a.init))]


def _layer_scale_fold(a: LayerScaleAttrs, p: dict):
    """y = x·γ per channel: scale γ, no centre, no shift."""
    import numpy as np
    gamma = p["weight"].astype(np.float64)
    return gamma, np.zeros_like(gamma), np.zeros_like(gamma)


def _norm_params(a, ins) -> list[ParamSpec]:
    c = ins[0][0]
    return [ParamSpec("weight", (c,), init=1.0), ParamSpec("bias", (c,))] if a.affine else []


def _divides(op: str, groups: int, c: int) -> None:
    if c % groups:
        raise CnncError(f"{op} groups={groups} does not divide the {c} channels",
                        hint=f"channels must be a multiple of groups; divisors of {c}: "
                             + ", ".join(str(d) for d in range(1, c + 1) if c % d == 0 and d <= 64))


def _channel_shuffle_shape(a: ChannelShuffleAttrs, ins) -> Shape:
    x = _need_rank(ins, "channel_shuffle")
    _divides("channel_shuffle", a.groups, x[0])
    return x


def _groupnorm_shape(a: GroupNormAttrs, ins) -> Shape:
    x = _need_rank(ins, "groupnorm", (3, 1))
    _divides("groupnorm", a.groups, x[0])
    return x


def _pad_channels_shape(a: PadChannelsAttrs, ins) -> Shape:
    c, h, w = _need_rank(ins, "pad_channels")
    if a.to < c:
        raise CnncError(f"pad_channels to={a.to} is fewer than the {c} input channels",
                        hint="pad_channels only adds zero channels; `to` is the output channel count (≥ C)")
    sh, sw = _pad_channels_slides(a, ins)
    return (a.to, sh.size("height", "pad_channels"), sw.size("width", "pad_channels"))


def _pad_channels_slides(a: PadChannelsAttrs, ins) -> tuple[Slide, Slide]:
    """Every stride-th row and column from the first: a 1×1 window, floor rounding, ⌈N/S⌉ positions."""
    _, h, w = ins[0]
    rule = f"stride {a.stride}: the first row and column of every {a.stride}"
    return (Slide(h, 1, a.stride, 0, 0, "floor", rule=rule), Slide(w, 1, a.stride, 0, 0, "floor", rule=rule))


def pad_channels_split(a: PadChannelsAttrs, c: int) -> tuple[int, int]:
    """Zero channels (before, after): half each side, the odd one after (the classic CIFAR ResNet's pad)."""
    total = a.to - c
    return total // 2, total - total // 2


def _channel_slice_shape(a: ChannelSliceAttrs, ins) -> Shape:
    x = _need_rank(ins, "channel_slice", (3, 1))
    if a.part is None and (a.lo is None or a.hi is None):
        raise CnncError("channel_slice needs lo and hi", hint="`channel_slice 0 c//2` takes the first c//2 channels")
    lo, hi = a.bounds(x[0])
    if not lo < hi <= x[0]:
        raise CnncError(f"channel_slice {lo} {hi} of {x[0]} channels: needs 0 ≤ lo < hi ≤ {x[0]}",
                        hint="channel_slice lo hi takes channels lo … hi−1 (`channel_slice 0 c//2` is the first half)")
    return (hi - lo,) + tuple(x[1:])


def _split_shape(a: SplitAttrs, ins) -> Shape:
    x = _need_rank(ins, "split", (3, 1))
    if x[0] % a.parts:
        raise CnncError(f"split {a.parts} of {x[0]} channels: {a.parts} does not divide {x[0]}",
                        hint="split cuts the channels into equal parts; use channel_slice for others")
    return x


def _torch_per_channel(T, v, x):
    return v.reshape((1, -1) + (1,) * (x.dim() - 2))


def _torch_layer_scale(T, a, node, xs, p, training):
    return xs[0] * _torch_per_channel(T, p["weight"], xs[0])


def _torch_fused_mul(T, a, node, xs, p, training):
    act = a.act()
    gate = xs[1] if act is None else torch_elementwise(T, act[0], act[1], xs[1])
    return xs[0] * gate


def _torch_channel_shuffle(T, a, node, xs, p, training):
    x = xs[0]
    n, c, h, w = x.shape
    return x.reshape(n, a.groups, c // a.groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def _torch_pad_channels(T, a, node, xs, p, training):
    x = xs[0][:, :, ::a.stride, ::a.stride]
    before, after = pad_channels_split(a, x.shape[1])
    return T.F.pad(x, (0, 0, 0, 0, before, after))


def _torch_layernorm(T, a, node, xs, p, training):
    x = xs[0]
    c = x.shape[1]
    if x.dim() == 2:
        return T.F.layer_norm(x, (c,), p.get("weight"), p.get("bias"), a.eps)
    y = T.F.layer_norm(x.permute(0, 2, 3, 1), (c,), p.get("weight"), p.get("bias"), a.eps)
    return y.permute(0, 3, 1, 2)  # ConvNeXt's LayerNorm2d


def _torch_stochastic_depth(T, a, node, xs, p, training):
    """torchvision.ops.stochastic_depth(x, rate, "row", training)."""
    x = xs[0]
    if not training or a.rate == 0.0:
        return x
    keep = T.torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device)
    keep.bernoulli_(1.0 - a.rate)
    return x * keep / (1.0 - a.rate)


# ---- ONNX equivalents (`cnnc export`) ---------------------------------------------------------
# Each rule takes (E, a, node, xs): E an OnnxEmitter (compiler/onnx_desc.py) recording ONNX nodes
# and initializers as plain descriptions, `a` the attributes, `node` the graph node's meta
# (resolved `pads`, `shape`, the inputs' `in_shapes`), xs the inputs' value names; it returns the
# name of the value holding the result. Shapes there exclude the batch, which ONNX sees as axis 0.

def _onnx_identity(E, a, node, xs):
    return xs[0]


def _onnx_epilogue(E, a, y):
    act = a.act() if isinstance(a, Epilogue) else None
    return y if act is None else E.act(act[0], act[1], y)


def _onnx_conv(E, a, node, xs):
    _, h, w = node["in_shapes"][0]
    _, oh, ow = node["shape"]
    t, b, l, r = node["pads"]
    kh, kw = _eff_kernel(a)
    # ceil rounding's overhang is zero padding at the end; ONNX drops floor rounding's tail itself
    b += max(0, (oh - 1) * a.stride[0] + kh - (h + t + b))
    r += max(0, (ow - 1) * a.stride[1] + kw - (w + l + r))
    ins = [xs[0], E.param("weight")] + ([E.param("bias")] if a.bias else [])
    y = E.node("Conv", ins, kernel_shape=list(a.kernel), strides=list(a.stride), dilations=list(a.dilation),
               group=a.groups, pads=[t, l, b, r])
    if a.get("residual"):
        y = E.node("Add", [y, xs[1]])
    return _onnx_epilogue(E, a, y)


def _onnx_pool(op_type: str):
    def rule(E, a, node, xs):
        _, h, w = node["in_shapes"][0]
        _, oh, ow = node["shape"]
        stride = a.stride or a.kernel
        t, b, l, r = node["pads"]
        axes = [(h, a.kernel[0], stride[0], t, b, oh), (w, a.kernel[1], stride[1], l, r, ow)]
        ceil = int(any((n + p0 + p1 - k) // s + 1 < out for n, k, s, p0, p1, out in axes))
        ends = []
        for n, k, s, p0, p1, out in axes:
            span = n + p0 + p1 - k
            if (-(-span // s) if ceil else span // s) + 1 != out:
                # a last window starting in the end padding, which PyTorch and cnnc drop: pad only to
                # the end of the windows used (never more than the given pad, so divisors stay)
                p1 = (out - 1) * s + k - n - p0
            ends.append(p1)
        extra = {"count_include_pad": int(a.count_pad)} if op_type == "AveragePool" else {}
        return E.node(op_type, xs, kernel_shape=list(a.kernel), strides=list(stride),
                      pads=[t, l, ends[0], ends[1]], ceil_mode=ceil, **extra)
    return rule


def adaptive_windows(n: int, out: int) -> list[tuple[int, int]]:
    """PyTorch's adaptive pooling windows [floor(i·n/out), ceil((i+1)·n/out)) along one axis."""
    return [((i * n) // out, -(-((i + 1) * n) // out)) for i in range(out)]


def _onnx_adaptive_avgpool(E, a, node, xs):
    import numpy as np
    _, h, w = node["in_shapes"][0]
    _, oh, ow = node["shape"]
    if h % oh == 0 and w % ow == 0:  # equal windows: a plain average pool
        k = [h // oh, w // ow]
        return E.node("AveragePool", xs, kernel_shape=k, strides=k, pads=[0, 0, 0, 0], ceil_mode=0,
                      count_include_pad=0)
    # unequal windows: the average is separable, rows then columns, Ah · x · Awᵀ

    def matrix(n, out):
        m = np.zeros((out, n), dtype=np.float32)
        for i, (lo, hi) in enumerate(adaptive_windows(n, out)):
            m[i, lo:hi] = 1.0 / (hi - lo)
        return m
    rows = E.node("MatMul", [E.const(matrix(h, oh)), xs[0]])
    return E.node("MatMul", [rows, E.const(matrix(w, ow).T)])


def _onnx_dense(E, a, node, xs):
    x = xs[0]
    if len(node["in_shapes"][0]) > 1:  # the implicit flatten of a C×H×W input
        x = E.node("Flatten", [x], axis=1)
    ins = [x, E.param("weight")] + ([E.param("bias")] if a.bias else [])
    return _onnx_epilogue(E, a, E.node("Gemm", ins, transB=1, alpha=1.0, beta=1.0))


def _onnx_chain(E, a, node, xs):
    x = xs[0]
    for op, args in a.steps(node["name"]):
        x = E.act(op, args, x)
    return x


def _onnx_batchnorm(E, a, node, xs):
    c = node["in_shapes"][0][0]
    scale = E.param("weight") if a.affine else E.const([1.0] * c)
    shift = E.param("bias") if a.affine else E.const([0.0] * c)
    return E.node("BatchNormalization", [xs[0], scale, shift, E.param("running_mean"), E.param("running_var")],
                  epsilon=float(a.eps))


def _onnx_fused_bn(E, a, node, xs):
    y = _onnx_batchnorm(E, a, node, xs[:1])
    if a.residual:
        y = E.node("Add", [y, xs[1]])
    return _onnx_epilogue(E, a, y)


def _onnx_lrn(E, a, node, xs):
    """ONNX's LRN also divides alpha by size. For even sizes its window (⌊(n−1)/2⌋ channels before,
    ⌈(n−1)/2⌉ after) is the mirror of ours (PyTorch's: n//2 before, (n−1)//2 after), and onnxruntime
    refuses them: there the window mean of x² is a 3-D average pool over (channels, 1, 1)."""
    n = int(a.size)
    if n % 2:
        return E.node("LRN", xs, size=n, alpha=float(a.alpha), beta=float(a.beta), bias=float(a.k))
    x = xs[0]
    sq = E.node("Unsqueeze", [E.node("Mul", [x, x]), E.ints([1])])
    mean = E.node("AveragePool", [sq], kernel_shape=[n, 1, 1], strides=[1, 1, 1],
                  pads=[n // 2, 0, 0, (n - 1) // 2, 0, 0], ceil_mode=0, count_include_pad=1)
    d = E.node("Add", [E.node("Mul", [E.node("Squeeze", [mean, E.ints([1])]), E.const(float(a.alpha))]),
                       E.const(float(a.k))])
    return E.node("Mul", [x, E.node("Pow", [d, E.const(-float(a.beta))])])


def _onnx_add(E, a, node, xs):
    return E.node("Add" if len(xs) == 2 else "Sum", xs)


def _per_channel_shape(node) -> tuple[int, ...]:
    """A per-channel vector's shape broadcasting against N×C×H×W (C×1×1) or N×F (F)."""
    s = node["in_shapes"][0]
    return (s[0],) + (1,) * (len(s) - 1)


def _onnx_prelu(E, a, node, xs):
    return E.node("PRelu", [xs[0], E.param("weight", (1,) if a.shared else _per_channel_shape(node))])


def _onnx_layer_scale(E, a, node, xs):
    return E.node("Mul", [xs[0], E.param("weight", _per_channel_shape(node))])


def _onnx_fused_mul(E, a, node, xs):
    return E.node("Mul", [xs[0], _onnx_epilogue(E, a, xs[1])])


def _onnx_channel_shuffle(E, a, node, xs):
    c, h, w = node["in_shapes"][0]
    g = a.groups
    v = E.node("Reshape", [xs[0], E.ints([0, g, c // g, h, w])])  # 0: the batch, kept symbolic
    v = E.node("Transpose", [v], perm=[0, 2, 1, 3, 4])
    return E.node("Reshape", [v, E.ints([0, c, h, w])])


def _onnx_pad_channels(E, a, node, xs):
    x = xs[0]
    if a.stride > 1:  # every stride-th row and column: a slice to the end (int64's largest)
        x = E.node("Slice", [x, E.ints([0, 0]), E.ints([2 ** 63 - 1] * 2), E.ints([2, 3]),
                             E.ints([a.stride, a.stride])])
    before, after = pad_channels_split(a, node["in_shapes"][0][0])
    if before == after == 0:
        return x
    return E.node("Pad", [x, E.ints([0, before, 0, 0, 0, after, 0, 0])], mode="constant")


def _onnx_affine(E, a, node, y):
    if not a.affine:
        return y
    shape = _per_channel_shape(node)
    return E.node("Add", [E.node("Mul", [y, E.param("weight", shape)]), E.param("bias", shape)])


def _onnx_layernorm(E, a, node, xs):
    """Over the channels at each position: LayerNormalization over the last axis of NHWC (opset 17
    and up), else mean and biased variance over axis 1 as the NumPy backend computes them."""
    spatial = len(node["in_shapes"][0]) == 3
    if E.opset >= 17:
        c = node["in_shapes"][0][0]
        x = E.node("Transpose", xs, perm=[0, 2, 3, 1]) if spatial else xs[0]
        scale = E.param("weight") if a.affine else E.const([1.0] * c)
        shift = E.param("bias") if a.affine else E.const([0.0] * c)
        y = E.node("LayerNormalization", [x, scale, shift], axis=-1, epsilon=float(a.eps))
        return E.node("Transpose", [y], perm=[0, 3, 1, 2]) if spatial else y
    centred = E.node("Sub", [xs[0], E.reduce_mean(xs[0], [1])])
    var = E.reduce_mean(E.node("Mul", [centred, centred]), [1])
    y = E.node("Div", [centred, E.node("Sqrt", [E.node("Add", [var, E.const(float(a.eps))])])])
    return _onnx_affine(E, a, node, y)


def _onnx_groupnorm(E, a, node, xs):
    """GroupNormalization has per-group scales in opset 18 and per-channel ones from 21: our
    statistics through InstanceNormalization over N×G×(C/G·H·W), then the per-channel affine."""
    shape = node["in_shapes"][0]
    g = a.groups
    v = E.node("Reshape", [xs[0], E.ints([0, g, -1])])
    v = E.node("InstanceNormalization", [v, E.const([1.0] * g), E.const([0.0] * g)], epsilon=float(a.eps))
    return _onnx_affine(E, a, node, E.node("Reshape", [v, E.ints([0, *shape])]))


def _onnx_channel_slice(E, a, node, xs):
    lo, hi = a.bounds(node["in_shapes"][0][0])
    return E.node("Slice", [xs[0], E.ints([lo]), E.ints([hi]), E.ints([1])])



OPS: dict[str, OpDef] = {op.name: op for op in [
    OpDef("input", "The network input.", InputAttrs, _input_shape, Pattern.OPAQUE, inputs=(0, 0), user=False,
          kind="io"),
    OpDef("conv", "2-D convolution (cross-correlation), NCHW, weights K×(C/groups)×kh×kw.", ConvAttrs, _conv_shape,
          Pattern.OUT_ELEMWISE_FUSABLE, positional=("filters", "kernel"), params=_conv_params, macs=_conv_macs,
          window=lambda a, ins: Window(*_eff_kernel(a), *a.stride), slides=_conv_slides,
          params_text=_conv_params_text, aliases=("conv2d", "convolution"),
          grad_needs=IN, fused_as="fused_conv", kind="conv", torch=_torch_conv, onnx="Conv",
          onnx_export=_onnx_conv, out_doc="K×H'×W'", params_doc="K·(C/g)·kh·kw (+K)", macs_doc="H'·W'·K·kh·kw·C/g",
          torch_doc="nn.Conv2d"),
    OpDef("maxpool", "Max pooling.", PoolAttrs, _pool_shape("maxpool"), Pattern.OUT_ELEMWISE_FUSABLE,
          positional=("kernel",), window=_pool_window, slides=_pool_slides, aliases=("max_pool", "maxpool2d"),
          grad_needs=IN | OUT,
          kind="pool", torch=_torch_pool("max"), onnx="MaxPool",
          onnx_export=_onnx_pool("MaxPool"), out_doc="C×H'×W'", torch_doc="nn.MaxPool2d"),
    OpDef("avgpool", "Average pooling.", PoolAttrs, _pool_shape("avgpool"), Pattern.OUT_ELEMWISE_FUSABLE,
          positional=("kernel",), window=_pool_window, slides=_pool_slides, aliases=("avg_pool", "avgpool2d"),
          kind="pool",
          torch=_torch_pool("avg"), onnx="AveragePool",
          onnx_export=_onnx_pool("AveragePool"), out_doc="C×H'×W'", torch_doc="nn.AvgPool2d"),
    OpDef("globalavgpool", "Average over all positions: C×H×W → C×1×1.", NoAttrs,
          lambda a, ins: (_need_rank(ins, "globalavgpool")[0], 1, 1), Pattern.REDUCE,
          window=lambda a, ins: GLOBAL, aliases=("gap", "global_avgpool", "globalpool"), kind="pool",
          torch="x.mean(dim=(2, 3), keepdim=True)", onnx="GlobalAveragePool",
          onnx_export=lambda E, a, node, xs: E.node("GlobalAveragePool", xs), out_doc="C×1×1",
          torch_doc="nn.AdaptiveAvgPool2d(1)"),
    OpDef("adaptive_avgpool", "Average pooling to a fixed output size (PyTorch's AdaptiveAvgPool2d).",
          AdaptivePoolAttrs, _adaptive_shape, Pattern.OUT_ELEMWISE_FUSABLE, positional=("size",),
          window=_adaptive_window, kind="pool", torch="F.adaptive_avg_pool2d(x, a.size)", onnx="AveragePool",
          onnx_export=_onnx_adaptive_avgpool,
          out_doc="C×h×w", torch_doc="nn.AdaptiveAvgPool2d"),
    OpDef("fused_conv", "conv with folded BatchNorm, residual add and activation in its epilogue.", FusedConvAttrs,
          _fused_conv_shape, Pattern.OPAQUE, inputs=(1, 2), params=_conv_params, macs=_conv_macs,
          window=lambda a, ins: Window(*_eff_kernel(a), *a.stride), slides=lambda a, ins: _conv_slides(a, ins[:1]),
          params_text=_conv_params_text, user=False, grad_needs=IN | OUT, kind="conv",
          torch=_torch_conv, onnx="Conv", onnx_export=_onnx_conv, label="conv"),
    OpDef("fused_dense", "dense with folded BatchNorm and activation in its epilogue.", FusedDenseAttrs,
          _dense_shape, Pattern.OPAQUE, params=_dense_params, macs=lambda a, ins, out: a.units * _dense_in(ins),
          window=lambda a, ins: GLOBAL, user=False, grad_needs=IN | OUT, kind="dense", torch=_torch_dense,
          onnx="Gemm", onnx_export=_onnx_dense, label="dense"),
    OpDef("elemwise_chain", "Several unary element-wise ops in one pass.", ChainAttrs, _elementwise,
          Pattern.ELEMWISE, user=False, grad_needs=IN, kind="act", torch=_torch_chain, onnx_export=_onnx_chain),
    OpDef("layout_transform", "Reorders memory between NCHW and NHWC.", LayoutAttrs, _elementwise,
          Pattern.INJECTIVE, user=False, torch="x", onnx="Transpose",
          onnx_export=_onnx_identity),  # the logical C×H×W shape is unchanged
    OpDef("dense", "Fully connected layer; flattens a C×1×1 input by itself.", DenseAttrs, _dense_shape,
          Pattern.OUT_ELEMWISE_FUSABLE, positional=("units",), params=_dense_params,
          macs=lambda a, ins, out: a.units * _dense_in(ins), window=lambda a, ins: GLOBAL,
          aliases=("fc", "linear", "innerproduct"), grad_needs=IN, fused_as="fused_dense", kind="dense",
          torch=_torch_dense, onnx="Gemm", onnx_export=_onnx_dense, out_doc="U", params_doc="U·F (+U)", macs_doc="U·F",
          torch_doc="nn.Linear"),
    OpDef("flatten", "C×H×W → C·H·W features.", NoAttrs, lambda a, ins: (math.prod(ins[0]),), Pattern.INJECTIVE,
          torch="x.reshape(x.shape[0], -1)", onnx="Flatten",
          onnx_export=lambda E, a, node, xs: E.node("Flatten", xs, axis=1), absorbed_as="flatten", out_doc="C·H·W",
          torch_doc="nn.Flatten"),
    _act("relu", "max(x, 0).", "max(x, 0)", "y > 0", torch="F.relu(x)", onnx="Relu", onnx_export=OnnxAct("Relu")),
    _act("leaky_relu", "x if x > 0 else slope·x.", "where(x > 0, x, x * slope)", "where(x > 0, 1, slope)",
         LeakyReluAttrs, ("slope",), ("leakyrelu",), torch="F.leaky_relu(x, slope)", onnx="LeakyRelu",
         onnx_export=OnnxAct("LeakyRelu", from_params={"alpha": "slope"})),
    _act("relu6", "min(max(x, 0), 6).", "clip(x, 0, 6)", "(y > 0) * (y < 6)", torch="F.relu6(x)", onnx="Clip",
         onnx_export=OnnxAct("Clip", consts=(0.0, 6.0))),
    _act("sigmoid", "1 / (1 + e^−x).", "sigmoid(x)", "y * (1 - y)", torch="torch.sigmoid(x)", onnx="Sigmoid",
         onnx_export=OnnxAct("Sigmoid")),
    _act("tanh", "Hyperbolic tangent.", "tanh(x)", "1 - y * y", torch="torch.tanh(x)", onnx="Tanh",
         onnx_export=OnnxAct("Tanh")),
    _act("hardsigmoid", "relu6(x + 3) / 6 (MobileNetV3's gate).", "clip(x + 3, 0, 6) / 6",
         "(y > 0) * (y < 1) / 6", aliases=("hard_sigmoid",), torch="F.hardsigmoid(x)", onnx="HardSigmoid",
         onnx_export=OnnxAct("HardSigmoid", {"alpha": 1 / 6, "beta": 0.5})),
    _act("hardswish", "x · relu6(x + 3) / 6 (MobileNetV3).", "x * clip(x + 3, 0, 6) / 6",
         "where(x < -3, 0, where(x <= 3, x / 3 + 0.5, 1))", aliases=("hard_swish",), torch="F.hardswish(x)",
         onnx="HardSwish", onnx_export=OnnxAct("HardSwish", since=14)),
    _act("silu", "x · sigmoid(x) (swish; EfficientNet).", "x * sigmoid(x)",
         "sigmoid(x) * (1 + x * (1 - sigmoid(x)))", aliases=("swish",), torch="F.silu(x)", onnx="Mul(x, Sigmoid(x))"),
    _act("gelu", "x · Φ(x), Φ the standard normal CDF (ConvNeXt).", "0.5 * x * (1 + erf(x * 0.7071067811865476))",
         "0.5 * (1 + erf(x * 0.7071067811865476)) + x * 0.3989422804014327 * exp(-0.5 * x * x)",
         torch="F.gelu(x)", onnx="Gelu", onnx_export=OnnxAct("Gelu", since=20)),
    _act("gelu_tanh", "GELU's tanh approximation: ½x(1 + tanh(√(2/π)(x + 0.044715x³))).",
         "0.5 * x * (1 + tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))",
         "0.5 * (1 + tanh(0.7978845608028654 * (x + 0.044715 * x * x * x))) + 0.5 * x * "
         "(1 - tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)) * "
         "tanh(0.7978845608028654 * (x + 0.044715 * x * x * x))) * 0.7978845608028654 * (1 + 0.134145 * x * x)",
         torch="F.gelu(x, approximate='tanh')", onnx="Gelu",
         onnx_export=OnnxAct("Gelu", {"approximate": "tanh"}, since=20)),
    _act("elu", "x if x > 0 else alpha·(e^x − 1).", "where(x > 0, x, alpha * expm1(x))",
         "where(x > 0, 1, alpha * exp(x))", EluAttrs, ("alpha",), torch="F.elu(x, alpha)", onnx="Elu",
         onnx_export=OnnxAct("Elu", from_params={"alpha": "alpha"})),
    _act("mish", "x · tanh(softplus(x)) (YOLOv4).", "x * tanh(softplus(x))",
         "tanh(softplus(x)) + x * sigmoid(x) * (1 - tanh(softplus(x)) * tanh(softplus(x)))",
         torch="F.mish(x)", onnx="Mish", onnx_export=OnnxAct("Mish", since=18)),
    OpDef("softmax", "Softmax over channels.", NoAttrs, _elementwise, Pattern.OPAQUE, grad_needs=OUT, kind="act",
          torch="F.softmax(x, dim=1)", onnx="Softmax",
          onnx_export=lambda E, a, node, xs: E.node("Softmax", xs, axis=1), loss_absorbs=frozenset({"cross_entropy"})),
    OpDef("dropout", "Zeroes a fraction `rate` of activations in training, scales the rest by 1/(1−rate).",
          DropoutAttrs, _elementwise, Pattern.ELEMWISE, positional=("rate",),  # keeps its own mask
          torch="F.dropout(x, a.rate, training)", onnx="Dropout",
          onnx_export=_onnx_identity, identity_in=frozenset({"inference"}), drops="units"),
    OpDef("identity", "Passes its input through.", NoAttrs, _elementwise, Pattern.ELEMWISE, torch="x",
          onnx="Identity", onnx_export=_onnx_identity, identity_in=frozenset({"inference", "training"})),
    OpDef("batchnorm", "Batch normalisation per channel; running mean and variance are buffers.", BatchNormAttrs,
          _bn_shape, Pattern.BROADCAST, params=_bn_params, aliases=("bn", "batch_norm"), grad_needs=IN, kind="norm",
          fold=_bn_fold, label="bn", params_doc="2C (0 if `affine=false`); buffers 2C", torch_doc="nn.BatchNorm2d",
          torch="F.batch_norm(x, p['running_mean'], p['running_var'], p.get('weight'), p.get('bias'), training, "
                "a.momentum, a.eps)", onnx="BatchNormalization", onnx_export=_onnx_batchnorm, act_fused_as="fused_bn"),
    OpDef("fused_bn", "batchnorm (+ a residual input) with an activation in the same pass (training plans, and "
          "inference where the BatchNorm could not fold into a conv).", FusedBatchNormAttrs, _fused_bn_shape,
          Pattern.OPAQUE, inputs=(1, 2), params=_bn_params,
          user=False, grad_needs=IN | OUT, kind="norm", torch=_torch_fused_bn, onnx="BatchNormalization",
          onnx_export=_onnx_fused_bn, label="bn"),
    OpDef("lrn", "Local response normalisation across channels (AlexNet): x / (k + α/n·Σx²)^β.", LrnAttrs,
          _elementwise, Pattern.OPAQUE, positional=("size",), grad_needs=IN | OUT, kind="norm",
          torch="F.local_response_norm(x, a.size, a.alpha, a.beta, a.k)", onnx="LRN", onnx_export=_onnx_lrn,
          torch_doc="nn.LocalResponseNorm"),
    OpDef("add", "Element-wise sum of tensors of one shape (residual connections).", NoAttrs, _add_shape,
          Pattern.BROADCAST, inputs=(2, None), tensor_args=True, kind="merge", torch=_torch_sum, onnx="Sum",
          onnx_export=_onnx_add,
          torch_doc="a + b",
          residual_fusable=True),
    OpDef("concat", "Channel concatenation, inputs in the order written.", NoAttrs, _concat_shape,
          Pattern.INJECTIVE, inputs=(1, None), tensor_args=True, aliases=("cat",), kind="merge",
          torch="torch.cat(xs, dim=1)", onnx="Concat",
          onnx_export=lambda E, a, node, xs: E.node("Concat", xs, axis=1), out_doc="ΣC×H×W or ΣF"),
    OpDef("mul", "Element-wise product of two tensors of one shape, or of a C×H×W tensor and a C×1×1 gate "
          "broadcast over H×W (squeeze-excitation).", NoAttrs, _mul_shape, Pattern.BROADCAST, inputs=(2, 2),
          tensor_args=True, grad_needs=IN, kind="merge", torch="xs[0] * xs[1]", onnx="Mul",
          onnx_export=lambda E, a, node, xs: E.node("Mul", xs),
          out_doc="the larger", torch_doc="a * b", gate_fused_as="fused_mul"),
    OpDef("fused_mul", "A C×H×W tensor times the element-wise activation of its C×1×1 gate, x · act(g), in one "
          "pass (squeeze-excitation's gate and product).", FusedMulAttrs, _fused_mul_shape, Pattern.BROADCAST,
          inputs=(2, 2), user=False, grad_needs=IN, kind="merge", torch=_torch_fused_mul, onnx="Mul",
          onnx_export=_onnx_fused_mul,
          label="mul"),
    OpDef("prelu", "x if x > 0 else a·x with a learnable slope a per channel (one for all with `shared=true`).",
          PreluAttrs, lambda a, ins: _need_rank(ins, "prelu", (3, 1)), Pattern.BROADCAST, params=_prelu_params,
          grad_needs=IN, kind="act", torch="F.prelu(x, p['weight'])", onnx="PRelu", onnx_export=_onnx_prelu,
          params_doc="C (1 if `shared=true`)", torch_doc="nn.PReLU(C)"),
    OpDef("layer_scale", "x · γ with a learnable γ per channel, started at `init` (ConvNeXt, CaiT).",
          LayerScaleAttrs, lambda a, ins: _need_rank(ins, "layer_scale", (3, 1)), Pattern.BROADCAST,
          params=_layer_scale_params, grad_needs=IN, kind="norm", fold=_layer_scale_fold, label="ls",
          torch=_torch_layer_scale, onnx="Mul", onnx_export=_onnx_layer_scale, params_doc="C",
          torch_doc="x * gamma[:, None, None]"),
    OpDef("channel_shuffle", "ShuffleNet's channel shuffle: C = g·k channels viewed as g×k, transposed to k×g.",
          ChannelShuffleAttrs, _channel_shuffle_shape, Pattern.INJECTIVE, positional=("groups",),
          torch=_torch_channel_shuffle, onnx="Reshape, Transpose, Reshape",
          onnx_export=_onnx_channel_shuffle, torch_doc="nn.ChannelShuffle"),
    OpDef("pad_channels", "Zero channels added before and after, after taking every `stride`-th row and column "
          "(the ResNet option-A shortcut).", PadChannelsAttrs, _pad_channels_shape, Pattern.INJECTIVE,
          positional=("to",), window=lambda a, ins: Window(1, 1, a.stride, a.stride), slides=_pad_channels_slides,
          torch=_torch_pad_channels,
          onnx="Slice, Pad", onnx_export=_onnx_pad_channels, out_doc="to×⌈H/s⌉×⌈W/s⌉",
          torch_doc="F.pad(x[:, :, ::s, ::s], (0, 0, 0, 0, p, p))"),
    OpDef("layernorm", "Layer normalisation over the channels at each position (ConvNeXt's LayerNorm2d), or over "
          "the features of a flat input.", LayerNormAttrs, lambda a, ins: _need_rank(ins, "layernorm", (3, 1)),
          Pattern.OPAQUE, params=_norm_params, aliases=("layer_norm",), grad_needs=IN, kind="norm",
          torch=_torch_layernorm, onnx="LayerNormalization", onnx_export=_onnx_layernorm,
          params_doc="2C (0 if `affine=false`)",
          torch_doc="nn.LayerNorm(C) over channels"),
    OpDef("groupnorm", "Group normalisation: channels in `groups` groups, each normalised over its channels and "
          "positions per sample.", GroupNormAttrs, _groupnorm_shape, Pattern.OPAQUE, positional=("groups",),
          params=_norm_params, aliases=("group_norm",), grad_needs=IN, kind="norm",
          torch="F.group_norm(x, a.groups, p.get('weight'), p.get('bias'), a.eps)", onnx="GroupNormalization",
          onnx_export=_onnx_groupnorm, params_doc="2C (0 if `affine=false`)", torch_doc="nn.GroupNorm"),
    OpDef("stochastic_depth", "In training each sample's whole tensor is kept with probability 1 − rate and scaled "
          "by 1/(1 − rate), else zeroed (torchvision's mode \"row\"); the identity at inference.",
          StochasticDepthAttrs, _elementwise, Pattern.ELEMWISE, positional=("rate",), aliases=("drop_path",),
          torch=_torch_stochastic_depth, onnx="Identity", onnx_export=_onnx_identity,
          identity_in=frozenset({"inference"}), drops="samples",
          torch_doc="torchvision.ops.StochasticDepth(rate, \"row\")"),
    OpDef("channel_slice", "Channels lo … hi−1 (features of a flat input): one half of ShuffleNetV2's channel "
          "split.", ChannelSliceAttrs, _channel_slice_shape, Pattern.INJECTIVE, positional=("lo", "hi"),
          torch="x[:, a.bounds(x.shape[1])[0]:a.bounds(x.shape[1])[1]]", onnx="Slice", onnx_export=_onnx_channel_slice,
          out_doc="(hi−lo)×H×W",
          torch_doc="x[:, lo:hi]"),
    OpDef("split", "Equal channel parts, one tensor each: `a, b = ... -> split 2` (ShuffleNetV2's channel split).",
          SplitAttrs, _split_shape, Pattern.INJECTIVE, positional=("parts",), aliases=("chunk",), torch="x",
          onnx="Split", onnx_export=_onnx_identity, identity_in=frozenset({"inference", "training"}),
          out_doc="parts × (C/parts)×H×W",
          torch_doc="x.chunk(parts, dim=1)", outputs=lambda a: a.parts,
          part=lambda a, i: ("channel_slice", {"part": (i, a.parts)})),
]}

_ALIASES = {alias: op.name for op in OPS.values() for alias in op.aliases}


def lookup(name: str) -> OpDef | None:
    """The op a `.cnn` name refers to (canonical name or alias), or None."""
    op = OPS.get(_ALIASES.get(name, name))
    return op if op is not None and op.user else None


def user_op_names() -> list[str]:
    return [n for n, op in OPS.items() if op.user] + list(_ALIASES)
