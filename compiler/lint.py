"""The training lint: the seed's rules of thumb, checked against a network and its train settings.

`lint_training(g, config, spans, backend=None, train_size=None)` returns one CnncWarning per rule
that a checked graph and its TrainConfig break, each with the span of the offending `train:`
setting or layer (`spans`: setting name → Span, as compiler/train_config.py records them; a setting
given on the command line has none) and the reason. `cnnc check` prints them (the front-end pass
`lint_training` in compiler/pipeline.py), and `cnnc train` again before its first batch with what
only it knows: the backend and the size of the training set. `initial_loss_warning` is the one
rule that needs a run: the first batch's loss against ln C.

The rules read the op table, not op names: a BatchNorm is a normalisation (`kind` "norm") with
running statistics (buffer parameters); a dropout is training-only noise on single units (`drops`
"units"), with a rate above 0.

- lr ≥ 1 with the SGD family (sgd, momentum, nesterov): the step is lr·g, so the weights move by
  more than the gradient itself; the seed's "a learning rate of 1 is too large".
- a batch that is not a power of two on the CUDA backend.
- an iteration budget far below the seed's "about 2,000 for small data, tens of thousands for
  more": optimizer steps = epochs · ⌈⌈N / batch⌉ / accumulate⌉ (epochs · ⌈N / batch⌉ without
  accumulation). Small data is up to SMALL_DATA training images, with ITERATIONS_SMALL steps
  expected, more data ITERATIONS_LARGE (the bottom of "tens of thousands"); far below is under
  FAR_BELOW of that. The seed's figures are orders of magnitude, not targets: a quick recipe
  (lenet5.cnn: 945 steps of cosine-decayed momentum SGD, 98% on MNIST-5k) finishes in half of
  them, so only a budget under a quarter, which stops while the loss still falls steeply in the
  first epochs, is flagged. Full-batch Rprop is left out: it needs far fewer steps.
- weight decay on BatchNorm's scale and shift (decay_mult not 0 on a trainable BatchNorm).
- a dropout whose output reaches a BatchNorm.
- rprop with mini-batches: it follows only the gradient's sign, so it needs the full batch.
"""

from __future__ import annotations

import math

import networkx as nx

from cnnc.dsl.errors import CnncWarning, Span

from .ops import OPS
from .train_config import TrainConfig

SGD_FAMILY = ("sgd", "momentum", "nesterov")
SMALL_DATA = 10_000  # training images: MNIST-5k's 4,000 is small, CIFAR-10's 50,000 is more
ITERATIONS_SMALL = 2_000
ITERATIONS_LARGE = 10_000
FAR_BELOW = 0.25
# Training-set sizes the compiler knows without reading any data: the embedded digits' training
# split (runtime/data.py; tests/compiler/test_lint.py checks that they agree).
KNOWN_TRAIN_SIZES = {"mnist5k": 4000}


def is_batchnorm(d: dict) -> bool:
    """A normalisation over the batch: the op table's `norm` kind with running statistics (buffers)."""
    return OPS[d["op"]].kind == "norm" and any(s.buffer for s in d.get("param_specs", ()))


def is_dropout(d: dict) -> bool:
    """Training-only noise on single units (the op table's `drops` "units"), at a rate above 0. Stochastic
    depth, which drops a sample's whole residual branch, is not meant: EfficientNet's recipe puts it
    before BatchNorms on purpose."""
    return OPS[d["op"]].drops == "units" and d["attrs"].get("rate", 0) > 0


def lint_training(g: nx.MultiDiGraph, config: TrainConfig, spans: dict[str, Span] | None = None, *,
                  backend: str | None = None, train_size: int | None = None) -> list[CnncWarning]:
    """The warnings of every rule that `g` trained with `config` breaks (see the module docstring).
    `backend` None: the backend is not known yet (cnnc check), the CUDA rule is left out;
    `train_size` None: the number of training images is not known, the budget rules are left out."""
    spans = spans or {}
    where = g.graph["source"].name if g.graph.get("source") is not None else None
    out: list[CnncWarning] = []

    def warn(message: str, span: Span | None, hint: str) -> CnncWarning:
        w = CnncWarning(message if span is not None or where is None else f"{where}: {message}", span, hint)
        out.append(w)
        return w

    if config.optimizer in SGD_FAMILY and config.lr >= 1:
        warn(f"learning rate {config.lr:g} is 1 or more with {config.optimizer}: SGD's step is lr·gradient, so "
             "every step moves the weights by more than the gradient itself and the loss usually diverges",
             spans.get("lr"), "try 0.1, 0.01 and 0.001 and keep the largest whose loss falls steadily "
                              "(0.1 is common with BatchNorm, 0.01 without)")
    if backend == "cuda" and config.batch & (config.batch - 1):
        lo = 1 << (config.batch.bit_length() - 1)
        warn(f"batch {config.batch} is not a power of two: the CUDA kernels cut batch·pixels (convolutions) and "
             "the batch (dense layers) into tiles of 32 to 128 and run warps of 32 threads, so a batch of "
             "2ᵏ fills them and any other leaves the last tiles partly idle", spans.get("batch"),
             f"batch {lo} or {2 * lo}")
    if train_size:
        _budget(config, spans, train_size, warn)
    _batchnorm_rules(g, config, spans, warn)
    return out


def _budget(config: TrainConfig, spans: dict, n: int, warn) -> None:
    batches = math.ceil(n / config.batch)
    steps = config.epochs * math.ceil(batches / config.accumulate)
    small = n <= SMALL_DATA
    expected = ITERATIONS_SMALL if small else ITERATIONS_LARGE
    # The seed's figures are for mini-batch SGD. Full-batch Rprop grows its steps by η⁺ each step on its
    # own: 40 steps take LeNet-5 to 97.3% on MNIST-5k (lenet5.cnn --optimizer rprop --lr 0.001 --batch 4000)
    full_batch_rprop = config.optimizer == "rprop" and config.batch * config.accumulate >= n
    if steps < FAR_BELOW * expected and not full_batch_rprop:
        per = f"⌈{n} / {config.batch}⌉" + (f" / {config.accumulate}" if config.accumulate > 1 else "")
        need = math.ceil(FAR_BELOW * expected / math.ceil(batches / config.accumulate))
        epochs = f"{config.epochs} epoch{'s' if config.epochs != 1 else ''}"
        warn(f"{steps} iterations ({epochs} × {per} steps per epoch) are far below the "
             f"{'about 2,000 of small data' if small else 'tens of thousands of more data'} "
             f"({n} training images): under a quarter of {expected:,}, the run stops while the loss is "
             "still falling steeply", spans.get("epochs"),
             f"{need} epochs or more (at least {math.ceil(FAR_BELOW * expected):,} iterations); aim for "
             f"about {expected:,}")
    if config.optimizer == "rprop" and config.batch * config.accumulate < n:
        warn(f"rprop with batch {config.batch}" + (f" × accumulate {config.accumulate}" if config.accumulate > 1
                                                   else "") +
             f" < {n} training images: Rprop follows only the sign of each step's gradient, and a "
             "mini-batch's signs change with the batch, not with the slope", spans.get("optimizer"),
             f"full batch (batch {n}, or a smaller batch with accumulate), or rmsprop, the mini-batch form of Rprop")


def _batchnorm_rules(g: nx.MultiDiGraph, config: TrainConfig, spans: dict, warn) -> None:
    nodes = sorted(g.nodes)
    bns = [n for n in nodes if is_batchnorm(g.nodes[n])]
    if not bns:
        return
    decayed = [n for n in bns if _decayed(g.nodes[n]["attrs"])]
    if config.weight_decay > 0 and decayed:
        first = g.nodes[decayed[0]]
        others = f" and {len(decayed) - 1} more" if len(decayed) > 1 else ""
        w = warn(f"weight decay {config.weight_decay:g} also shrinks the scale and shift of BatchNorm "
                 f"`{first['name']}`{others}: BatchNorm undoes the scale of the weights before it, so decaying "
                 "its own γ and β only pulls each layer's output towards 0, a penalty that does not regularise",
                 first["span"], "`default bn decay_mult=0` (or `bn decay_mult=0` per layer) leaves them undecayed, "
                                "as the ResNet recipes' no-bias-decay does")
        if spans.get("weight_decay") is not None:
            w.with_note(spans["weight_decay"], "weight decay set here")
    bn_set = set(bns)
    for n in nodes:
        d = g.nodes[n]
        if not is_dropout(d):
            continue
        after = sorted(bn_set & nx.descendants(g, n))
        if after:
            bn = g.nodes[after[0]]
            w = warn(f"`{d['name']}` ({d['op']} {d['attrs'].get('rate'):g}) feeds BatchNorm `{bn['name']}`: the "
                     "statistics BatchNorm gathers in training include the dropped units, so at inference, "
                     "without dropout, the variance it sees differs from the one it learned (and BatchNorm "
                     "already regularises: the ResNet recipe has no dropout)", d["span"],
                     "remove the dropout, or keep it only after the last BatchNorm, before the classifier")
            w.with_note(bn["span"], f"`{bn['name']}` is here")
            return  # one such warning says it; the fix is the same for every one


def _decayed(attrs) -> bool:
    return attrs.trainable and attrs.lr_mult > 0 and attrs.decay_mult > 0


def initial_loss_warning(loss: float, classes: int, config: TrainConfig, span: Span | None,
                         where: str | None = None) -> CnncWarning | None:
    """The warning when the first batch's cross-entropy is far (more than half of ln C away) from
    ln C, the loss of a network that knows nothing yet (uniform predictions), or None."""
    if config.loss != "cross_entropy" or classes < 2:
        return None
    expected = math.log(classes)
    if abs(loss - expected) <= 0.5 * expected:
        return None
    if loss > expected:
        reason = ("the logits start large: check the initialisation scale"
                  + (f" (init {config.init}" + (f" init_std={config.init_std:g}" if config.init == "gaussian" else "")
                     + ")" if config.init in ("gaussian", "uniform", "constant") else "")
                  + ", whether the inputs are normalised" + (" (normalize is false)" if not config.normalize else "")
                  + ", and that the labels are the data's (a wrong class count or order)")
    else:
        reason = ("a network that knows nothing cannot do better than ln C: check that the labels are the "
                  "data's (one class for all, or labels leaking into the inputs), then the initialisation and "
                  "the normalisation of the inputs")
    message = (f"the first loss {loss:.3f} is far from ln {classes} = {expected:.2f} (uniform predictions): "
               f"{reason}")
    return CnncWarning(message if span is not None or where is None else f"{where}: {message}", span,
                       "wrong labels, a bad initialisation or unnormalised inputs are the usual causes")
