"""The `train:` section: its schema and validation.

Each line is `setting [value] [field=value ...]`: `optimizer sgd momentum=0.9`, `lr 0.01
policy=step step_size=5`, `batch 64`. The line's first word names a field and its value; the
keyword arguments set further fields. Every field, choice and range is checked here, at compile
time, with the location of the offending word; the runtime reads the validated `TrainConfig`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from cnnc.dsl import ast
from cnnc.dsl.errors import CnncError, Diagnostics, Span, did_you_mean

from .build import bounded
from .ops import Flag

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adadelta", "adam", "adamw", "ftrl")
POLICIES = ("fixed", "step", "multistep", "exp", "inv", "poly", "sigmoid", "cosine", "plateau")
INITS = ("xavier", "glorot", "he", "msra", "gaussian", "uniform", "constant")
LOSSES = ("cross_entropy", "mse")

CROP_MODES = ("center", "random", "pad")
EIGENS = ("measured", "imagenet")
EVAL_CROPS = ("center", "ten")

NonNeg = Annotated[float, Field(ge=0)]
Pos = Annotated[float, Field(gt=0)]
Side = Annotated[int, Field(gt=0, le=1 << 16)]


def _square(v: Any) -> Any:
    return (v, v) if isinstance(v, int) and not isinstance(v, bool) else v


Size = Annotated[tuple[Side, Side], BeforeValidator(_square)]  # (h, w); one number is a square
Range = tuple[Pos, Pos]


class TrainConfig(BaseModel):
    """Training hyper-parameters. Defaults follow common practice (the seed's AlexNet/ResNet recipes)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    optimizer: Literal[OPTIMIZERS] = "sgd"  # type: ignore[valid-type]
    lr: Pos = 0.01
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.0
    nesterov: Flag = False
    weight_decay: NonNeg = 0.0
    beta1: Annotated[float, Field(ge=0, lt=1)] = 0.9
    beta2: Annotated[float, Field(ge=0, lt=1)] = 0.999
    eps: Pos = 1e-8
    rho: Annotated[float, Field(ge=0, lt=1)] = 0.9  # AdaDelta and RMSProp decay
    lr_power: Annotated[float, Field(le=0)] = -0.5  # FTRL
    l1: NonNeg = 0.0  # FTRL
    l2: NonNeg = 0.0  # FTRL

    policy: Literal[POLICIES] = "fixed"  # type: ignore[valid-type]
    gamma: Pos = 0.1
    step_size: Annotated[int, Field(gt=0)] | None = None  # epochs, for policy step
    milestones: tuple[Annotated[int, Field(gt=0)], ...] | None = None  # epochs, for policy multistep
    power: Pos = 1.0  # inv, poly
    warmup: Annotated[int, Field(ge=0)] = 0  # epochs of linear warm-up
    patience: Annotated[int, Field(ge=1)] = 2  # plateau
    min_lr: NonNeg = 0.0

    batch: Annotated[int, Field(gt=0, le=1 << 24)] = 64
    epochs: Annotated[int, Field(gt=0, le=1_000_000)] = 10
    init: Literal[INITS] = "he"  # type: ignore[valid-type]
    init_std: Pos = 0.01
    init_range: Pos = 0.05
    init_value: float = 0.0
    loss: Literal[LOSSES] = "cross_entropy"  # type: ignore[valid-type]
    label_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.0
    clip_norm: Pos | None = None
    accumulate: Annotated[int, Field(gt=0, le=1_000_000)] = 1
    seed: Annotated[int, Field(ge=0, lt=2**63)] = 0  # numpy's generators take non-negative seeds
    data: str = "mnist5k"
    normalize: Flag = True  # standardise pixels with the training split's per-channel mean and std
    crop: Annotated[int, Field(ge=0)] = 0  # augmentation: random crop after zero-padding by this much
    flip: Flag = False  # augmentation: random horizontal flips

    # Image transforms (runtime/transforms.py), applied in the fixed order
    # resize → crop → flip → jitter → to float → lighting → normalise.
    resize: Side | Size | None = None  # the short side, or (h, w)
    crop_size: Size | None = None  # `crop S random|center`
    crop_mode: Literal[CROP_MODES] = "center"  # type: ignore[valid-type]
    random_resized_crop: Size | None = None
    scale: Range = (0.08, 1.0)  # random_resized_crop's area fraction
    ratio: Range = (3 / 4, 4 / 3)  # random_resized_crop's aspect ratio (w / h)
    mean: tuple[float, ...] | None = None  # given, or measured on `stats_images` training images
    std: tuple[Pos, ...] | None = None
    lighting: NonNeg = 0.0  # std of the PCA colour noise
    eigen: Literal[EIGENS] = "measured"  # type: ignore[valid-type]
    eigval: tuple[NonNeg, NonNeg, NonNeg] | None = None  # measured, stored in the run
    eigvec: tuple[tuple[float, float, float], tuple[float, float, float], tuple[float, float, float]] | None = None
    brightness: NonNeg = 0.0
    contrast: NonNeg = 0.0
    saturation: NonNeg = 0.0
    hue: Annotated[float, Field(ge=0, le=0.5)] = 0.0
    eval_crop: Literal[EVAL_CROPS] = "center"  # type: ignore[valid-type]
    stats_images: Annotated[int, Field(gt=0, le=1_000_000)] = 1000

    @model_validator(mode="after")
    def _policy_needs(self):
        if self.policy == "step" and self.step_size is None:
            raise ValueError("policy step needs `step_size` (epochs between ×gamma decays)")
        if self.policy == "multistep" and not self.milestones:
            raise ValueError("policy multistep needs `milestones`, e.g. milestones=(30, 60, 90)")
        return self


_CHOICES = {"optimizer": OPTIMIZERS, "policy": POLICIES, "init": INITS, "loss": LOSSES}
_MEANINGS = {"lr": "the learning rate", "batch": "the batch size", "epochs": "the number of epochs"}


def _value(e: ast.Expr) -> Any:
    """Train settings are literals: numbers, words, strings, tuples of numbers."""
    if isinstance(e, ast.Num):
        return e.value
    if isinstance(e, ast.Str):
        return e.value
    if isinstance(e, ast.Var):
        return e.name
    if isinstance(e, ast.Neg):
        v = _value(e.operand)
        if isinstance(v, (int, float)):
            return -v
    if isinstance(e, ast.TupleExpr):
        return tuple(_value(i) for i in e.items)
    if isinstance(e, ast.Dims):
        return tuple(e.values)
    if isinstance(e, ast.BinOp):
        a, b = _value(e.left), _value(e.right)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            if e.op in ("/", "//", "%") and b == 0:
                raise CnncError("division by zero", e.span)
            return bounded({"+": lambda: a + b, "-": lambda: a - b, "*": lambda: a * b, "/": lambda: a / b,
                            "//": lambda: a // b, "%": lambda: a % b}[e.op](), e.span)
    raise CnncError("train settings take numbers, words or strings", e.span)


def validate_train(settings: list[ast.Setting] | None, outer: Diagnostics) -> TrainConfig | None:
    if settings is None:
        return None
    diags = Diagnostics()  # this section's own errors, whatever else the file has
    config = _validate(settings, diags)
    for err in diags.errors:
        outer.add(err)
    return config


def _validate(settings: list[ast.Setting], diags: Diagnostics) -> TrainConfig | None:
    fields = TrainConfig.model_fields
    given: dict[str, tuple[Any, Span]] = {}

    def put(name: str, value: Any, span: Span) -> None:
        if name not in fields:
            diags.add(CnncError(f"unknown train setting `{name}`", span,
                                did_you_mean(name, fields) or "settings: " + ", ".join(fields)))
        elif name in given:
            diags.add(CnncError(f"train setting `{name}` given twice", span).with_note(given[name][1],
                                                                                        "first given here"))
        else:
            given[name] = (value, span)

    for s in settings:
        try:
            positional = [a for a in s.args if a.name is None]
            if len(positional) > 1:
                raise CnncError(f"`{s.name}` takes one value, got {len(positional)}", positional[1].span)
            if s.name not in fields:
                put(s.name, None, s.name_span)
            elif positional:
                put(s.name, _value(positional[0].value), positional[0].span)
            else:
                raise CnncError(f"`{s.name}` needs a value", s.span)
            for a in s.args:
                if a.name is not None:
                    put(a.name, _value(a.value), a.span)
        except CnncError as err:
            diags.add(err)
    try:
        return TrainConfig(**{k: v for k, (v, _) in given.items()})
    except ValidationError as exc:
        for err in exc.errors():
            name = str(err["loc"][0]) if err["loc"] else ""
            value, span = given.get(name, (None, settings[0].span if settings else None))
            diags.add(_train_error(name, value, span, err))
        return None


def _train_error(name: str, value: Any, span: Span, err: dict) -> CnncError:
    if name in _CHOICES:
        kind = name if name != "init" else "initialiser"
        return CnncError(f"unknown {kind} `{value}`", span,
                         (did_you_mean(str(value), _CHOICES[name]) or "") + " choices: " + ", ".join(_CHOICES[name]))
    if not name:  # a model-level rule (policy needs ...)
        return CnncError(err["msg"].removeprefix("Value error, "), span)
    what = _MEANINGS.get(name, f"`{name}`")
    msg = err["msg"].split(", got ")[0]
    msg = msg[0].lower() + msg[1:]
    if msg.startswith("input should be "):
        msg = "must be " + msg[len("input should be "):]
    text = f"{what} {msg}, got {value}"
    hint = None
    if name == "lr":
        hint = "learning rates are small positive numbers: 0.1 for ResNet with BatchNorm, 0.01 for AlexNet"
    return CnncError(text[0].upper() + text[1:] if text[0] == "`" else text, span, hint)
