"""Fuzzing the command line: whatever the input, a located error or success; never a traceback, a
hang or a blow-up.

Four sources of input, each a hypothesis strategy:
- programs generated from the grammar and the op table (layers, attributes, blocks, loops,
  repeats, merges, expressions, train settings; valid and invalid values mixed);
- the zoo files mutated token-, line- and byte-wise (deleted, duplicated, swapped tokens, changed
  numbers, dropped or repeated lines, deep nesting and huge numbers injected, bytes flipped);
- byte-level garbage and random text;
- the files of a real run and a real artifact, damaged: checkpoint metadata and plan.json with
  values replaced or removed, checkpoints, weights and run.json with bytes flipped or cut.

Every .cnn input goes through `cnnc check`; those that check and are small also through
`cnnc compile -O2` (with a memory limit, so the estimate is exercised) and `cnnc run` on one
image, and those with a train section through one epoch of `cnnc train`, `cnnc eval` and a
resume. Damaged run files go through `cnnc train --resume`, `cnnc eval` and `cnnc run`. Each
run must exit 0 or 1 with no traceback, a `cnnc check` that fails must give a located error
(`file:line:col: error:`), and each command must finish within HANG_SECONDS and raise the
process's peak resident memory by less than MEMORY_LIMIT (`PeakMemory`).

CI runs EXAMPLES inputs per source (about a minute in all). A long run:

    CNNC_FUZZ_EXAMPLES=7000 CNNC_FUZZ_REPORT=fuzz.txt python -m pytest tests/cli/test_fuzz.py
"""

from __future__ import annotations

import os
import re
import signal
import time
import tracemalloc
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cnnc.compiler.ops import OPS, user_op_names
from cnnc.compiler.train_config import TrainConfig

from conftest import EXAMPLES, run_cli, tiny_net

EXAMPLES_PER_SOURCE = int(os.environ.get("CNNC_FUZZ_EXAMPLES", "60"))
HANG_SECONDS = 10
MEMORY_LIMIT = 2 << 30
RUN_LIMITS = {"params": 2_000_000, "macs": 50_000_000}  # which checked inputs are also compiled and run
LOCATED = re.compile(r"^.+:\d+:\d+: (error|warning): .+$", re.M)
ZOO = sorted(EXAMPLES.glob("*.cnn"))
STATS: Counter = Counter()
WORST: dict[str, float] = {"seconds": 0.0, "bytes": 0}
FUZZ = settings(max_examples=EXAMPLES_PER_SOURCE, deadline=None, derandomize=EXAMPLES_PER_SOURCE <= 200,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture])


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang(f"no answer within {HANG_SECONDS} s")


def _proc_status(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no {key} in /proc/self/status")


class PeakMemory:
    """What one command adds to the process's peak resident memory: the kernel's high-water mark
    (VmHWM), reset before the command through /proc/self/clear_refs, less the resident size
    then. It sees every allocation, NumPy's and BLAS's included, at no cost to the command's
    speed. Where the kernel does not offer the reset, tracemalloc's peak stands in."""

    def __enter__(self):
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                f.write("5")
            self.base = _proc_status("VmRSS")
            self.traced = False
        except OSError:
            tracemalloc.start()
            self.traced = True
        return self

    def __exit__(self, *exc):
        if self.traced:
            self.peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        else:
            self.peak = max(_proc_status("VmHWM") - self.base, 0)


def run_bounded(*args: str):
    """Run the command line in this process with a time and a memory bound; returns its Result."""
    previous = signal.signal(signal.SIGALRM, _alarm)
    start = time.perf_counter()
    try:
        with PeakMemory() as memory:
            signal.setitimer(signal.ITIMER_REAL, HANG_SECONDS)
            try:
                r = run_cli(*args)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
    finally:
        signal.signal(signal.SIGALRM, previous)
    seconds = time.perf_counter() - start
    peak = memory.peak
    WORST["seconds"] = max(WORST["seconds"], seconds)
    WORST["bytes"] = max(WORST["bytes"], peak)
    STATS["hangs"] += seconds >= HANG_SECONDS
    STATS["over memory"] += peak >= MEMORY_LIMIT
    assert seconds < HANG_SECONDS, f"`cnnc {args[0]}` took {seconds:.1f} s"
    assert peak < MEMORY_LIMIT, f"`cnnc {args[0]}` allocated {peak / 2**30:.2f} GiB"
    return r


def judge(r, what: str) -> None:
    """The one property: success, or a located error; never a traceback or another exit code."""
    STATS["tracebacks"] += "Traceback" in r.err or "internal error" in r.err
    STATS["other exits"] += r.code not in (0, 1)
    STATS["unlocated"] += r.code == 1 and what == "check" and not LOCATED.search(r.err)
    assert r.code in (0, 1), f"{what}: exit {r.code}\n{r.err[-3000:]}"
    assert "Traceback" not in r.err and "internal error" not in r.err, r.err[-3000:]
    if r.code == 1:
        assert LOCATED.search(r.err) or what != "check", f"{what}: unlocated error\n{r.err[-3000:]}"
        assert "error:" in r.err, r.err[-3000:]


def exercise(path, tmp_path) -> None:
    """check; and for small networks that check, compile -O2 and run one input through them."""
    import json
    r = run_bounded("check", str(path), "--json")
    judge(r, "check")
    STATS["inputs"] += 1
    STATS["checked" if r.code == 0 else "refused"] += 1
    if r.code != 0:
        return
    summary = json.loads(r.out)
    if summary["params"]["total"] > RUN_LIMITS["params"] or summary["macs"] > RUN_LIMITS["macs"]:
        return
    out = tmp_path / "artifact"
    r = run_bounded("compile", str(path), "-O2", "--max-memory", "512M", "-o", str(out))
    judge(r, "compile")
    if r.code != 0:
        STATS["compile refused"] += 1
        return
    STATS["compiled"] += 1
    shape = json.loads((out / "plan.json").read_text())["nodes"][0]["shape"]
    x = np.random.default_rng(0).normal(size=(1, *shape)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    r = run_bounded("run", str(out), "--input", str(tmp_path / "x.npy"), "--max-memory", "512M")
    judge(r, "run")
    STATS["ran" if r.code == 0 else "run refused"] += 1
    if summary["train"] is not None and len(shape) == 3:
        outputs = json.loads((out / "plan.json").read_text())["nodes"][-1]["shape"]
        train_briefly(path, tmp_path, shape, summary["classes"] or outputs[0])


def train_briefly(path, tmp_path, shape, classes) -> None:
    """A network with a train section: one epoch on 24 images, evaluation, and a resume."""
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (24, *shape), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(24) % max(int(classes), 1))
    run = tmp_path / "run"
    common = ("--data", str(tmp_path / "d.npz"), "--max-memory", "512M", "-q")
    r = run_bounded("train", str(path), "--epochs", "1", "-o", str(run), *common)
    judge(r, "train")
    STATS["trained" if r.code == 0 else "train refused"] += 1
    if r.code != 0:
        return
    judge(run_bounded("eval", str(path), "--checkpoint", str(run / "checkpoint.npz"), "--max-memory", "512M"),
          "eval")
    judge(run_bounded("train", "--resume", str(run), "--max-memory", "512M", "-q"), "resume")


def write(tmp_path_factory, data: bytes | str, name: str = "net.cnn"):
    d = tmp_path_factory.mktemp("fuzz")
    path = d / name
    path.write_bytes(data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data)
    return path, d


# ---- programs from the grammar and the op table ---------------------------------------------------

WORDS = ["same", "valid", "true", "false", "floor", "ceil", "exact", "none", "x", "in", "classes"]
OP_NAMES = sorted(user_op_names())
FIELDS = {name: [f for f in op.attrs.model_fields if f not in ("dims",)] for name, op in OPS.items() if op.user}
TRAIN_FIELDS = sorted(TrainConfig.model_fields)


@st.composite
def numbers(draw, names=()):
    kind = draw(st.sampled_from(["small", "small", "small", "int", "float", "dims", "word", "tuple", "expr",
                                 "name", "string", "huge"]))
    if kind == "small":
        return str(draw(st.integers(0, 8)))
    if kind == "int":
        return str(draw(st.sampled_from([0, 1, 2, 3, 5, 7, 16, 64, 100, 255, 1000, 4096, 10**6, 2**31])))
    if kind == "float":
        return draw(st.sampled_from(["0.5", "0.1", "1e-3", ".5", "1e9", "2.0", "1e308", "0.0"]))
    if kind == "dims":
        return "x".join(str(draw(st.integers(0, 9))) for _ in range(draw(st.integers(2, 3))))
    if kind == "word":
        return draw(st.sampled_from(WORDS))
    if kind == "tuple":
        items = [str(draw(st.integers(-1, 5))) for _ in range(draw(st.integers(1, 4)))]
        return "(" + ", ".join(items) + ")"
    if kind == "expr":
        a = draw(numbers(names)) if draw(st.booleans()) else str(draw(st.integers(0, 9)))
        op = draw(st.sampled_from(["+", "-", "*", "//", "/", "%"]))
        return f"({a} {op} {draw(st.integers(0, 9))})"
    if kind == "name":
        return draw(st.sampled_from(list(names) or ["c"]))
    if kind == "string":
        return '"' + draw(st.text(alphabet="ab./_ ", max_size=6)) + '"'
    return draw(st.sampled_from(["9" * 40, "1e999", "99999999999999999", "-" * 70 + "1"]))


@st.composite
def layer(draw, names, tensors, blocks):
    choice = draw(st.integers(0, 9))
    if choice == 0 and tensors:
        return f"add({draw(st.sampled_from(tensors))})"
    if choice == 1 and tensors:
        return f"concat({', '.join(draw(st.lists(st.sampled_from(tensors), min_size=1, max_size=3)))})"
    if choice == 2 and blocks:
        block, arity = draw(st.sampled_from(blocks))
        args = ", ".join(draw(numbers(names)) for _ in range(draw(st.integers(0, arity + 1))))
        rep = f" * {draw(st.integers(0, 4))}" if draw(st.integers(0, 4)) == 0 else ""
        return f"{block}({args}){rep}"
    if choice == 3:
        inner = " -> ".join(draw(layer(names, tensors, blocks)) for _ in range(draw(st.integers(1, 2))))
        return f"({inner}) * {draw(numbers(names))}"
    name = draw(st.sampled_from(OP_NAMES + ["rleu", "conv3d", "pool"]))
    op_fields = FIELDS.get(name) or FIELDS.get({a: o.name for o in OPS.values() for a in o.aliases}.get(name, ""), [])
    parts = [name]
    for _ in range(draw(st.integers(0, 2))):
        parts.append(draw(numbers(names)))
    for _ in range(draw(st.integers(0, 2))):
        key = draw(st.sampled_from(op_fields + ["strides", "foo"])) if op_fields else "foo"
        parts.append(f"{key}={draw(numbers(names))}")
    return " ".join(parts)


@st.composite
def body(draw, depth, names, blocks, indent):
    lines, tensors = [], []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.integers(0, 5))
        pad = " " * indent
        if kind == 0 and depth < 3:
            var = draw(st.sampled_from(["i", "j", "k"]))
            rng = draw(st.sampled_from(["2", "1, 3", "0", "(5)", "n", "100001", "3, 1"]))
            lines.append(f"{pad}for {var} in range({rng}):")
            lines += draw(body(depth + 1, names + [var], blocks, indent + 4))
            continue
        chain = " -> ".join(draw(layer(names, tensors, blocks)) for _ in range(draw(st.integers(1, 4))))
        if kind == 1:
            t = draw(st.sampled_from(["a", "b", "short", "x"]))
            if draw(st.booleans()):
                chain = f"{draw(st.sampled_from(tensors + ['in']))} -> {chain}" if tensors else chain
            lines.append(f"{pad}{t} = {chain}")
            tensors.append(t)
        else:
            lines.append(f"{pad}{chain}")
    if draw(st.integers(0, 9)) == 0:  # a wrongly indented line
        lines.append(" " * draw(st.integers(0, indent + 6)) + "relu")
    return lines


PLAUSIBLE = ["conv {c} 3x3 pad=1", "conv {c} 1x1", "conv {c} 3x3 stride=2 pad=1", "conv {c} 3x3 pad=same groups=1",
             "conv {c} 3x3 pad=1 dilation=2 round=floor", "bn", "relu", "relu6", "leaky_relu 0.1", "sigmoid",
             "tanh", "maxpool 2x2 round=floor", "avgpool 3x3 stride=1 pad=1", "dropout 0.3", "identity",
             "lrn 3", "batchnorm eps=1e-3", "softmax", "adaptive_avgpool 2x2", "conv {c} 1x7 pad=(0, 3)",
             "conv {c} 3x3 pad=(0, 1, 2, 1) round=ceil", "conv {c} 3x3 groups={c} pad=1 bias=false",
             "conv {c} 2x2 stride=3 round=floor", "maxpool 3x3 stride=2 pad=1 round=ceil",
             "avgpool 2x2 pad=1 count_pad=false round=ceil", "bn momentum=1 affine=false", "globalavgpool",
             "conv {c} 3x3 pad=1 trainable=false", "conv {c} 3x3 pad=1 lr_mult=0 decay_mult=2",
             "dropout 0", "lrn 5 alpha=1e-3 beta=0.75 k=2", "adaptive_avgpool 3x1", "conv {c} 5x5 pad=same stride=2",
             "relu -> relu -> sigmoid"]
TRAIN_LINES = ["optimizer {opt}", "optimizer momentum momentum=0.9 nesterov=true", "lr {lr} policy={policy}",
               "lr 0.1 policy=step step_size=1 gamma=0.5", "lr 0.05 policy=multistep milestones=(1, 2)",
               "lr 0.01 policy=cosine warmup=1 min_lr=0.001", "lr 0.1 policy=plateau patience=1",
               "batch {batch}", "accumulate {acc}", "clip_norm 1.0", "label_smoothing 0.1", "loss mse",
               "init {init}", "weight_decay 5e-4", "crop 2", "flip true", "normalize false", "seed {seed}"]


@st.composite
def plausible_programs(draw):
    """Programs that mostly check: small images, layers with sensible attributes, merges of
    tensors of one shape. They carry the fuzzing into compile and run."""
    c = draw(st.sampled_from([1, 3]))
    size = draw(st.sampled_from([4, 8, 9, 16]))
    lines = ["network p", f"input {c}x{size}x{size}", f"classes {draw(st.integers(1, 12))}", "layers:"]
    width = draw(st.sampled_from([2, 4, 8]))
    lines.append(f"    conv {width} 3x3 pad=1 -> relu")
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.integers(0, 5))
        if kind == 0:  # a residual
            lines.append("    x = identity")
            lines.append(f"    conv {width} 3x3 pad=1 -> bn -> relu -> conv {width} 3x3 pad=1 -> add(x)")
        elif kind == 1:  # a branch and a concat
            lines.append("    y = identity")
            lines.append(f"    z = conv {draw(st.integers(1, 6))} 1x1")
            lines.append("    concat(y, z)")
        elif kind == 2:
            lines.append(f"    ({draw(st.sampled_from(PLAUSIBLE)).format(c=width)}) * {draw(st.integers(1, 3))}")
        else:
            chain = " -> ".join(draw(st.sampled_from(PLAUSIBLE)).format(c=width) for _ in range(draw(st.integers(1, 3))))
            lines.append(f"    {chain}")
    lines.append(draw(st.sampled_from(["    gap -> dense classes", "    flatten -> dense classes",
                                       "    dense classes flatten=true", "    gap -> dense classes -> softmax"])))
    if draw(st.booleans()):
        lines.append("train:")
        used = set()
        for line in draw(st.lists(st.sampled_from(TRAIN_LINES), min_size=1, max_size=5, unique=True)):
            key = line.split()[0]
            if key in used:
                continue
            used.add(key)
            lines.append("    " + line.format(
                opt=draw(st.sampled_from(["sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adadelta", "adam",
                                          "adamw", "ftrl"])),
                lr=draw(st.sampled_from(["0.1", "0.01", "1", "10", "1e-9"])),
                policy=draw(st.sampled_from(["fixed", "exp gamma=0.9", "inv", "poly power=2", "sigmoid",
                                             "cosine"])),
                batch=draw(st.sampled_from([1, 3, 8, 16, 64, 1 << 24])), acc=draw(st.integers(1, 3)),
                init=draw(st.sampled_from(["xavier", "glorot", "he", "msra", "gaussian", "uniform", "constant"])),
                seed=draw(st.integers(0, 2**31))))
    return "\n".join(lines) + "\n"


@st.composite
def programs(draw):
    if draw(st.booleans()):
        return draw(plausible_programs())
    out = []
    if draw(st.integers(0, 5)):
        out.append(f"network {draw(st.sampled_from(['net', 'a1', 'x_y', 'conv']))}")
    dims = draw(st.sampled_from(["3x32x32", "1x28x28", "3x8x8", "784", "1x1x1", "3x224x224", "0x4x4", "2x5x7",
                                 "3x99999x99999"]))
    if draw(st.integers(0, 9)):
        out.append(f"input {dims}")
    if draw(st.integers(0, 3)):
        out.append(f"classes {draw(numbers())}")
    for _ in range(draw(st.integers(0, 1))):
        op = draw(st.sampled_from(["conv", "bn", "maxpool", "dense", "foo"]))
        out.append(f"default {op} {draw(st.sampled_from(['bias', 'round', 'eps', 'stride', 'x']))}={draw(numbers())}")
    blocks = []
    for b in range(draw(st.integers(0, 2))):
        params = draw(st.lists(st.sampled_from(["c", "s", "k", "n"]), max_size=3, unique=True))
        defaults = [f"{p}={draw(numbers(params))}" if draw(st.booleans()) else p for p in params]
        name = draw(st.sampled_from([f"blk{b}", "relu", "unit"]))
        out.append(f"block {name}({', '.join(defaults)}):")
        out += draw(body(1, params, blocks, 4))
        blocks.append((name, len(params)))
    out.append("layers:")
    out += draw(body(0, ["classes"], blocks, 4))
    if draw(st.booleans()):
        out.append("    gap -> dense classes")
    if draw(st.integers(0, 2)) == 0:
        out.append("train:")
        for _ in range(draw(st.integers(1, 4))):
            key = draw(st.sampled_from(TRAIN_FIELDS + ["learning_rate"]))
            out.append(f"    {key} {draw(numbers())}")
    return "\n".join(out) + "\n"


@FUZZ
@given(programs())
def test_generated_programs(tmp_path_factory, text):
    path, d = write(tmp_path_factory, text)
    exercise(path, d)


# ---- mutated zoo files ------------------------------------------------------------------------

TOKEN = re.compile(r"\d+x\d+(?:x\d+)?|\d+\.?\d*(?:e-?\d+)?|[A-Za-z_]\w*|->|//|\S")


@st.composite
def mutated(draw):
    path = draw(st.sampled_from(ZOO))
    text = path.read_text(encoding="utf-8")
    for _ in range(draw(st.integers(1, 4))):
        toks = list(TOKEN.finditer(text))
        kind = draw(st.sampled_from(["delete", "duplicate", "swap", "number", "drop_line", "repeat_line", "char",
                                     "nest", "huge", "splice", "crlf"]))
        if kind in ("drop_line", "repeat_line", "splice"):
            lines = text.splitlines(keepends=True)
            i = draw(st.integers(0, len(lines) - 1))
            if kind == "splice":
                other = draw(st.sampled_from(ZOO)).read_text(encoding="utf-8").splitlines(keepends=True)
                lines[i:i] = other[draw(st.integers(0, len(other) - 1)):][:draw(st.integers(1, 5))]
            else:
                lines[i:i + 1] = [] if kind == "drop_line" else [lines[i]] * draw(st.integers(2, 50))
            text = "".join(lines)
            continue
        if kind == "crlf":
            text = text.replace("\n", "\r\n")
            continue
        if kind == "char":
            at = draw(st.integers(0, len(text)))
            text = text[:at] + draw(st.sampled_from(list("()=,:*-+/#x\"\t\n\\ 0a.×→") + ["\x00", "é", "\u202e"])) \
                + text[at:]
            continue
        i = draw(st.integers(0, len(toks) - 1))
        t = toks[i]
        if kind == "delete":
            text = text[:t.start()] + text[t.end():]
        elif kind == "duplicate":
            text = text[:t.end()] + " " + t.group() * draw(st.integers(1, 3)) + text[t.end():]
        elif kind == "swap":
            j = draw(st.integers(0, len(toks) - 1))
            a, b = sorted((t, toks[j]), key=lambda m: m.start())
            if a.start() != b.start():
                text = text[:a.start()] + b.group() + text[a.end():b.start()] + a.group() + text[b.end():]
        elif kind == "nest":
            n = draw(st.sampled_from([3, 30, 70, 300]))
            text = text[:t.start()] + "(" * n + t.group() + ")" * n + text[t.end():]
        elif kind == "huge":
            text = text[:t.start()] + draw(st.sampled_from(["9" * 5000, "1e999", "4096", "99999999"])) + text[t.end():]
        else:
            numbers_ = [m for m in toks if m.group()[0].isdigit()]
            if numbers_:
                m = draw(st.sampled_from(numbers_))
                new = draw(st.sampled_from(["0", "1", "2", "3", "7", "13", "64", "255", "0.5", "1x1", "3x3", "-1",
                                            "100000", "2x2x2"]))
                text = text[:m.start()] + new + text[m.end():]
    return path.name, text


@FUZZ
@given(mutated())
def test_mutated_zoo_files(tmp_path_factory, case):
    name, text = case
    path, d = write(tmp_path_factory, text, name)
    exercise(path, d)


# ---- garbage --------------------------------------------------------------------------------------

@st.composite
def garbage(draw):
    kind = draw(st.sampled_from(["bytes", "text", "flipped"]))
    if kind == "bytes":
        return draw(st.binary(max_size=4000))
    if kind == "text":
        return draw(st.text(max_size=2000)).encode("utf-8", "surrogatepass")
    data = bytearray(draw(st.sampled_from(ZOO)).read_bytes())
    for _ in range(draw(st.integers(1, 20))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data)


@FUZZ
@given(garbage())
def test_garbage(tmp_path_factory, data):
    path, d = write(tmp_path_factory, data)
    exercise(path, d)


# ---- damaged run files ------------------------------------------------------------------------------

RUN_NET = tiny_net(optimizer="adam", lr="0.01 policy=plateau", epochs=1, seed=0)


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    """A trained run (1 epoch) and a compiled artifact, the material the damage starts from."""
    from conftest import make_data
    d = tmp_path_factory.mktemp("originals")
    (d / "tiny.cnn").write_text(RUN_NET)
    make_data(d / "d.npz", n=48)
    assert run_cli("train", str(d / "tiny.cnn"), "--data", str(d / "d.npz"), "-o", str(d / "run"), "-q").code == 0
    assert run_cli("compile", str(d / "tiny.cnn"), "-o", str(d / "art")).code == 0
    np.save(d / "x.npy", np.zeros((2, 1, 8, 8), np.float32))
    return d


ODD_VALUES = [None, -1, 0, 10**12, 2**70, "x", "", [], {}, [[[]]], 1e308, -1e308, True, 0.5, [1, 2, 3],
              {"a": 1}, "NaN"]


@st.composite
def json_damage(draw, doc):
    """`doc` with one value somewhere in it replaced by an odd one, or removed."""
    import copy
    doc = copy.deepcopy(doc)
    node, path = doc, []
    while isinstance(node, (dict, list)) and node and draw(st.integers(0, 3)):
        key = draw(st.sampled_from(sorted(node) if isinstance(node, dict) else list(range(len(node)))))
        path.append(key)
        node = node[key]
    if not path:
        return draw(st.sampled_from(ODD_VALUES))
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if draw(st.integers(0, 3)) == 0 and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = draw(st.sampled_from(ODD_VALUES))
    return doc


@st.composite
def damaged_runs(draw):
    target = draw(st.sampled_from(["checkpoint meta", "checkpoint arrays", "checkpoint bytes", "run.json",
                                   "plan.json", "weights bytes"]))
    cut = draw(st.booleans())
    flips = [(draw(st.integers(0, 10**9)), draw(st.integers(0, 255))) for _ in range(draw(st.integers(1, 8)))]
    return target, cut, flips, draw(st.booleans())


def _flip(data: bytes, cut: bool, flips) -> bytes:
    """Bytes overwritten at the (wrapped) positions of `flips`; with `cut`, also truncated at the first."""
    b = bytearray(data)
    for at, value in flips:
        b[at % len(b)] = value
    return bytes(b[: flips[0][0] % len(b)]) if cut else bytes(b)


@FUZZ
@given(damaged_runs(), st.data())
def test_damaged_run_files(originals, tmp_path_factory, case, data):
    import json
    import shutil
    from cnnc.runtime.checkpoint import read_npz, write_npz
    target, cut, flips, as_json = case
    d = tmp_path_factory.mktemp("damaged")
    shutil.copytree(originals / "run", d / "run")
    shutil.copytree(originals / "art", d / "art")
    ckpt, plan = d / "run" / "checkpoint.npz", d / "art" / "plan.json"
    if target == "checkpoint meta":
        arrays, meta = read_npz(ckpt)
        damaged = data.draw(json_damage(meta))
        payload = dict(arrays)
        payload["meta"] = np.frombuffer(json.dumps(damaged).encode(), np.uint8)
        np.savez(ckpt, **payload)
    elif target == "checkpoint arrays":
        arrays, meta = read_npz(ckpt)
        key = data.draw(st.sampled_from(sorted(arrays)))
        change = data.draw(st.sampled_from(["drop", "shape", "dtype", "nan", "scalar"]))
        if change == "drop":
            del arrays[key]
        elif change == "shape":
            arrays[key] = arrays[key].reshape(-1)[: max(arrays[key].size - 1, 0)]
        elif change == "dtype":
            arrays[key] = arrays[key].astype(data.draw(st.sampled_from(["U3", "complex64", "int8", "bool", "f2"])))
        elif change == "nan":
            arrays[key] = np.full_like(arrays[key], np.nan, dtype=np.float64)
        else:
            arrays[key] = np.float32(3.0)
        write_npz(ckpt, arrays, meta)
    elif target == "checkpoint bytes":
        ckpt.write_bytes(_flip(ckpt.read_bytes(), cut, flips))
    elif target == "weights bytes":
        w = d / "art" / "weights.npz"
        w.write_bytes(_flip(w.read_bytes(), cut, flips))
    elif target == "run.json":
        path = d / "run" / "run.json"
        info = json.loads(path.read_text())
        if as_json:
            path.write_text(json.dumps(data.draw(json_damage(info))))
        else:
            path.write_bytes(_flip(path.read_bytes(), cut, flips))
    else:
        doc = json.loads(plan.read_text())
        plan.write_text(json.dumps(data.draw(json_damage(doc))))
    STATS["damaged files"] += 1
    judge(run_bounded("train", "--resume", str(d / "run"), "--epochs", "2", "-q", "--max-memory", "512M"), "resume")
    judge(run_bounded("eval", str(originals / "tiny.cnn"), "--checkpoint", str(ckpt), "--data",
                      str(originals / "d.npz")), "eval")
    judge(run_bounded("run", str(d / "art"), "--input", str(originals / "x.npy")), "run")


def test_report():
    """The counts of this session's fuzzing (printed with -s; written to CNNC_FUZZ_REPORT)."""
    import resource
    if not STATS["inputs"] + STATS["damaged files"]:
        pytest.skip("no fuzz test ran in this session")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    lines = [f"inputs: {STATS['inputs'] + STATS['damaged files']}: {STATS['inputs']} .cnn sources "
             f"({STATS['checked']} checked, {STATS['refused']} refused with a located error) and "
             f"{STATS['damaged files']} damaged run directories and artifacts (each resumed, evaluated and run)",
             f"compiled and run: {STATS['compiled']} compiled ({STATS['compile refused']} refused), "
             f"{STATS['ran']} ran ({STATS['run refused']} refused), {STATS['trained']} trained for an epoch, "
             f"evaluated and resumed ({STATS['train refused']} refused)",
             f"tracebacks: {STATS['tracebacks']}, exits other than 0/1: {STATS['other exits']}, unlocated errors: "
             f"{STATS['unlocated']}, hangs over {HANG_SECONDS} s: {STATS['hangs']}, over "
             f"{MEMORY_LIMIT >> 30} GiB: {STATS['over memory']}",
             f"slowest command: {WORST['seconds']:.2f} s (limit {HANG_SECONDS} s); largest rise of peak memory "
             f"{WORST['bytes'] / 2**20:.0f} MiB (limit {MEMORY_LIMIT >> 30} GiB); process peak RSS {rss:.0f} MiB"]
    print("\n" + "\n".join(lines))
    if os.environ.get("CNNC_FUZZ_REPORT"):
        with open(os.environ["CNNC_FUZZ_REPORT"], "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
