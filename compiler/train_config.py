"""The `train:` section: its schema and validation.

Each line is `setting [value] [field=value ...]`: `optimizer sgd momentum=0.9`, `lr 0.01
policy=step step_size=5`, `batch 64`. The line's first word names a field and its value; the
keyword arguments set further fields. Every field, choice and range is checked here, at compile
time, with the location of the offending word; the runtime reads the validated `TrainConfig`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from cnnc.dsl import ast
from cnnc.dsl.errors import CnncError, Diagnostics, Span, did_you_mean

from .build import bounded
from .ops import Flag

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adadelta", "adam", "adamw", "ftrl", "rprop")
POLICIES = ("fixed", "step", "multistep", "exp", "inv", "poly", "sigmoid", "cosine", "plateau")
INITS = ("xavier", "glorot", "he", "msra", "gaussian", "uniform", "constant")
LOSSES = ("cross_entropy", "mse")
# the arithmetic of convolutions and dense layers: float32, or tensor-core formats (float32 accumulation)
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")

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


def _one(v: Any) -> Any:
    return (v,) if isinstance(v, (int, float)) and not isinstance(v, bool) else v


PerChannel = Annotated[tuple[float, ...], BeforeValidator(_one)]
PosPerChannel = Annotated[tuple[Pos, ...], BeforeValidator(_one)]


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
    etas: tuple[Pos, Pos] = (0.5, 1.2)  # Rprop: step size factors (η⁻, η⁺) after a sign change / no change
    step_sizes: tuple[Pos, Pos] = (1e-6, 50.0)  # Rprop: the (smallest, largest) step size

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
    # imagefolder: data (runtime/images.py): unreadable files skipped (reported) or an error; decoding processes
    on_bad_image: Literal["skip", "error"] = "skip"
    workers: Annotated[int, Field(ge=0, le=256)] | None = None  # None: one per core but one; 0: in-process
    sync_bn: Flag = False  # data-parallel runs: BatchNorm statistics over every rank's batch
    # conv and dense inputs rounded to this format, float32 master weights; fp16 adds dynamic loss scaling
    precision: Literal[PRECISIONS] = "fp32"  # type: ignore[valid-type]
    tensorboard: Flag = False  # also write TensorBoard event files in the run directory (runtime/tensorboard.py)

    # Image transforms (runtime/transforms.py), applied in the fixed order
    # resize → crop → flip → jitter → to float → lighting → normalise.
    resize: Side | Size | None = None  # the short side, or (h, w)
    crop_size: Size | None = None  # `crop S random|center`
    crop_mode: Literal[CROP_MODES] = "center"  # type: ignore[valid-type]
    random_resized_crop: Size | None = None
    scale: Range = (0.08, 1.0)  # random_resized_crop's area fraction
    ratio: Range = (3 / 4, 4 / 3)  # random_resized_crop's aspect ratio (w / h)
    mean: PerChannel | None = None  # given, or measured on `stats_images` training images
    std: PosPerChannel | None = None
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

    @field_validator("etas")
    @classmethod
    def _etas(cls, v):
        if not v[0] < 1 < v[1]:
            raise ValueError("`etas` are the factors (shrink, grow) with shrink < 1 < grow")
        return v

    @field_validator("step_sizes")
    @classmethod
    def _step_sizes(cls, v):
        if v[0] > v[1]:
            raise ValueError("`step_sizes` is a range (smallest, largest)")
        return v

    @model_validator(mode="after")
    def _policy_needs(self):
        if self.policy == "step" and self.step_size is None:
            raise ValueError("policy step needs `step_size` (epochs between ×gamma decays)")
        if self.policy == "multistep" and not self.milestones:
            raise ValueError("policy multistep needs `milestones`, e.g. milestones=(30, 60, 90)")
        return self


_CHOICES = {"optimizer": OPTIMIZERS, "policy": POLICIES, "init": INITS, "loss": LOSSES, "crop_mode": CROP_MODES,
            "eigen": EIGENS, "eval_crop": EVAL_CROPS, "precision": PRECISIONS,
            "on_bad_image": ("skip", "error")}
_LINES = ("jitter",)  # settings that are only a line's word: `jitter` sets brightness, contrast, saturation
_BARE = {"flip": True, "sync_bn": True, "tensorboard": True}  # settings that may stand alone
_TUPLES = ("mean", "std", "scale", "ratio", "resize", "crop_size", "random_resized_crop")
# The settings of the image transforms (runtime/transforms.py).
TRANSFORM_FIELDS = ("resize", "crop_size", "crop_mode", "random_resized_crop", "scale", "ratio", "mean", "std",
                    "lighting", "eigen", "eigval", "eigvec", "brightness", "contrast", "saturation", "hue",
                    "eval_crop", "stats_images")
# torchvision's ImageNet preprocessing: the mean and std of ImageNet's [0, 1] RGB pixels.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
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


def validate_train(settings: list[ast.Setting] | None, outer: Diagnostics,
                   input_dims: tuple[tuple[int, ...], Span] | None = None,
                   spans: dict[str, Span] | None = None) -> TrainConfig | None:
    """The section's settings as a TrainConfig, or None after reporting its errors to `outer`.
    With the network's `input_dims` the image transforms are checked against its shape too; `spans`,
    when given, receives where each setting was written (for the training lint, compiler/lint.py)."""
    if settings is None:
        return None
    diags = Diagnostics()  # this section's own errors, whatever else the file has
    config = _validate(settings, diags, input_dims, spans)
    for err in diags.errors:
        outer.add(err)
    return config


def _line_values(s: ast.Setting) -> tuple[list[ast.Arg], list[tuple[str, Any, Span]]]:
    """A line's own positional values, and the `name value` pairs written after them that set
    further settings: `mean (0.5, 0.5, 0.5) std (0.2, 0.2, 0.2)` (where `std (…)` reads as a call)."""
    fields = TrainConfig.model_fields
    positional = [a for a in s.args if a.name is None]
    own: list[ast.Arg] = []
    more: list[tuple[str, Any, Span]] = []
    i = 0
    while i < len(positional):
        a = positional[i]
        e = a.value
        if own and isinstance(e, ast.Func) and e.name in fields:
            values = tuple(_value(x) for x in e.args)
            more.append((e.name, values[0] if len(values) == 1 and e.name not in _TUPLES else values, a.span))
        elif own and isinstance(e, ast.Var) and e.name in fields and i + 1 < len(positional):
            i += 1
            more.append((e.name, _value(positional[i].value), positional[i].span))
        else:
            own.append(a)
        i += 1
    return own, more


def _validate(settings: list[ast.Setting], diags: Diagnostics,
              input_dims: tuple[tuple[int, ...], Span] | None = None,
              spans_out: dict[str, Span] | None = None) -> TrainConfig | None:
    fields = TrainConfig.model_fields
    given: dict[str, tuple[Any, Span]] = {}
    legacy_crop: Span | None = None  # `crop N` alone: the zero-padding crop

    def put(name: str, value: Any, span: Span) -> None:
        if name not in fields:
            diags.add(CnncError(f"unknown train setting `{name}`", span,
                                did_you_mean(name, [*fields, *_LINES]) or "settings: " + ", ".join(fields)))
        elif name in given:
            diags.add(CnncError(f"train setting `{name}` given twice", span).with_note(given[name][1],
                                                                                        "first given here"))
        else:
            given[name] = (value, span)

    for s in settings:
        try:
            own, more = _line_values(s)
            keywords = [a for a in s.args if a.name is not None]
            if s.name == "crop" and len(own) == 2:
                mode = _value(own[1].value)
                if mode not in CROP_MODES:
                    raise CnncError(f"unknown crop mode `{mode}`", own[1].span,
                                    (did_you_mean(str(mode), CROP_MODES) or "") + " choices: " + ", ".join(CROP_MODES))
                if mode == "pad":
                    put("crop", _value(own[0].value), own[0].span)
                else:
                    put("crop_size", _value(own[0].value), own[0].span)
                    put("crop_mode", mode, own[1].span)
            elif s.name == "jitter":
                if len(own) > 1:
                    raise CnncError(f"`jitter` takes one value, got {len(own)}", own[1].span)
                if own:
                    for k in ("brightness", "contrast", "saturation"):
                        put(k, _value(own[0].value), own[0].span)
                elif not keywords:
                    raise CnncError("`jitter` needs its strengths", s.span,
                                    "e.g. `jitter brightness=0.4 contrast=0.4 saturation=0.4 hue=0.1`, or "
                                    "`jitter 0.4` for the first three")
            elif len(own) > 1:
                raise CnncError(f"`{s.name}` takes one value, got {len(own)}", own[1].span,
                                "a crop takes a size and a mode: `crop 224 random`" if s.name == "crop" else None)
            elif s.name not in fields:
                put(s.name, None, s.name_span)
            elif s.name == "normalize" and own and _value(own[0].value) in ("measured", "imagenet"):
                put("normalize", True, own[0].span)
                if _value(own[0].value) == "imagenet":
                    put("mean", IMAGENET_MEAN, own[0].span)
                    put("std", IMAGENET_STD, own[0].span)
            elif own:
                put(s.name, _value(own[0].value), own[0].span)
                if s.name == "crop":
                    legacy_crop = own[0].span
            elif s.name in _BARE:
                put(s.name, _BARE[s.name], s.name_span)
            else:
                raise CnncError(f"`{s.name}` needs a value", s.span)
            for name, value, span in more:
                put(name, value, span)
            for a in keywords:
                put(a.name, _value(a.value), a.span)
        except CnncError as err:
            diags.add(err)
    try:
        config = TrainConfig(**{k: v for k, (v, _) in given.items()})
    except ValidationError as exc:
        for err in exc.errors():
            name = str(err["loc"][0]) if err["loc"] else ""
            value, span = given.get(name, (None, settings[0].span if settings else None))
            diags.add(_train_error(name, value, span, err))
        return None
    spans = {k: span for k, (_, span) in given.items()}
    if spans_out is not None:
        spans_out.update(spans)
    for err in transform_errors(config, spans, input_dims, legacy_crop):
        diags.add(err)
    return config


def _size_text(hw: tuple[int, int]) -> str:
    return f"{hw[0]}×{hw[1]}"


def transform_errors(config: TrainConfig, spans: dict[str, Span], input_dims=None,
                     legacy_crop: Span | None = None) -> list[CnncError]:
    """The image transforms' mistakes: settings that contradict each other or the network's input."""
    errs: list[CnncError] = []

    def err(name: str, message: str, hint: str | None = None) -> None:
        errs.append(CnncError(message, spans.get(name), hint))

    used = [k for k in TRANSFORM_FIELDS if k in spans]
    rrc = config.random_resized_crop
    crop = rrc if rrc is not None else config.crop_size
    crop_name = "random_resized_crop" if rrc is not None else "crop_size"
    if rrc is not None and config.crop_size is not None:
        err("crop_size", "a random_resized_crop and a crop cannot both be taken: choose one")
    if rrc is None:
        for k in ("scale", "ratio"):
            if k in spans:
                err(k, f"`{k}` belongs to random_resized_crop, which is not set",
                    "e.g. `random_resized_crop 224 scale=(0.08, 1.0) ratio=(0.75, 1.333)`")
    for k in ("scale", "ratio"):
        lo, hi = getattr(config, k)
        if lo > hi:
            err(k, f"`{k}` is a range (low, high), got ({lo:g}, {hi:g})")
    if config.scale[1] > 1:
        err("scale", f"`scale` is a fraction of the image's area, at most 1, got {config.scale[1]:g}")
    if "crop_mode" in spans and config.crop_size is None:
        err("crop_mode", "`crop_mode` without a crop size", "write the crop on one line: `crop 224 random`")
    if "eigen" in spans and not config.lighting:
        err("eigen", "`eigen` chooses the eigenvectors of `lighting`, which is not set", "e.g. `lighting 0.1 eigen=imagenet`")
    if config.eval_crop == "ten" and crop is None:
        err("eval_crop", "ten-crop evaluation needs a crop size", "add e.g. `crop 224 random` and `resize 256`")
    if (config.mean is None) != (config.std is None) and ("mean" in spans or "std" in spans):
        err("mean" if "mean" in spans else "std", "`mean` and `std` go together: give both, or neither to measure them")
    if not config.normalize and (config.mean is not None or config.std is not None):
        err("normalize", "`normalize false` but a `mean` and `std` are given")
    if input_dims is None:
        return errs
    dims, dims_span = input_dims
    if len(dims) != 3:
        if used:
            err(used[0], f"image transforms need an image input (C×H×W); this network's input is "
                         f"{'x'.join(map(str, dims))}")
        return errs
    c, h, w = dims
    where = f"the network's input is {c}×{h}×{w}"
    if used and c not in (1, 3):
        err(used[0], f"image transforms make 1- or 3-channel images, but {where}")
    if crop is not None and tuple(crop) != (h, w):
        word = "random_resized_crop" if rrc is not None else "crop"
        err(crop_name, f"{word} {_size_text(crop)} does not give the input's size: {where}",
            f"crop to the input's H×W: `{word} {h if h == w else f'{h}x{w}'}" +
            (" random`" if rrc is None else "`"))
    if legacy_crop is not None and 2 * config.crop >= min(h, w):
        errs.append(CnncError(f"`crop {config.crop}` alone is the zero-padding crop (pad {config.crop} pixels on "
                              f"each side, then a random {h}×{w} crop), which cannot be meant here: {where}",
                              legacy_crop, f"write `crop {h} random` or `crop {h} center` for a {h}×{w} crop, or "
                                           f"`crop {config.crop} pad` for the padding crop"))
    if config.crop and crop is not None:
        err("crop", "a padding crop and a crop of a size cannot both be taken: choose one")
    resize = config.resize
    if resize is not None:
        side = resize if isinstance(resize, int) else None
        if crop is None and not config.crop and side is not None:
            err("resize", f"`resize {side}` sets only the short side, so images come out in varying shapes",
                f"add a crop (`crop {h} center`), or resize to the exact size: `resize {h}x{w}`")
        elif crop is None and side is None and tuple(resize) != (h, w):
            err("resize", f"resize {_size_text(resize)} does not give the input's size: {where}",
                f"resize to `{h}x{w}`, or add a crop")
        elif crop is not None and (side is not None and side < min(crop) or
                                   side is None and (resize[0] < crop[0] or resize[1] < crop[1])):
            err("resize", f"resize {resize if side else _size_text(resize)} makes images smaller than the "
                          f"{_size_text(crop)} crop", "resize to at least the crop size (256 for 224 is common)")
    for k, n in (("mean", config.mean), ("std", config.std)):
        if n is not None and len(n) != c:
            err(k, f"`{k}` has {len(n)} value(s), one per channel is needed: {where}")
    if c != 3:
        if config.lighting:
            err("lighting", f"PCA lighting noise is for RGB images: {where}")
        for k in ("saturation", "hue"):
            if getattr(config, k):
                err(k, f"`{k}` jitter is for RGB images: {where}")
    return errs


def _train_error(name: str, value: Any, span: Span, err: dict) -> CnncError:
    if name in _CHOICES:
        kind = name if name != "init" else "initialiser"
        return CnncError(f"unknown {kind} `{value}`", span,
                         (did_you_mean(str(value), _CHOICES[name]) or "") + " choices: " + ", ".join(_CHOICES[name]))
    if not name or err["type"] == "value_error":  # our own rules (policy needs ..., Rprop's ranges) say it all
        return CnncError(err["msg"].removeprefix("Value error, ") + (f", got {value}" if name else ""), span)
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
