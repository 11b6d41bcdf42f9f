"""`cnnc bench`: images/s and ms per step of a network on a backend, optionally against a peer.

Inference runs the -O2 plan; `--train` times a whole training step (forward, loss, backward,
optimizer update) on the training plan `cnnc train` runs (-O2's training rewrites). Medians of timed repeats after warm-up. `--layers`
times each layer's forward (and backward with `--train`) like `caffe time`, sorted, with
GFLOP/s and share of the total. `--vs torch` builds the same network in PyTorch from our graph
with our weights and times it in the same process on the same batch and thread count;
`--vs onnxruntime` (inference) exports it to ONNX in memory and times onnxruntime's CPU session
with as many intra-op threads as our backend has, after checking both give the same output.
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np

from cnnc.backends.base import Ctx
from cnnc.compiler.train_config import TrainConfig
from cnnc.dsl.errors import CnncError, InternalError

from .artifact import compile_model
from .budget import run_estimate
from .executor import Executor
from .model import Model
from .train import training_plan


@dataclass
class BenchResult:
    network: str
    backend: str
    batch: int
    train: bool
    ms_per_step: float
    images_per_s: float
    peak_rss_mb: float
    peer: str | None = None
    peer_ms_per_step: float | None = None
    ratio: float | None = None
    peer_note: str | None = None  # how the peer ran (onnxruntime: opset, threads, agreement)
    layers: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return self.__dict__.copy()


def _median_ms(fn, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def _training(model: Model, batch: int) -> SimpleNamespace:
    """The training plan `cnnc train` runs, with an executor on the model's parameters (what
    layer_times reads: plan, backend, executor, graph)."""
    plan = training_plan(model, batch)
    return SimpleNamespace(plan=plan, backend=model.backend, executor=Executor(plan, model.backend, model.params),
                           graph=plan.graph)


def _train_step(model: Model, x, y, config: TrainConfig):
    executor = _training(model, len(x)).executor
    trainable = {k for k, t in model.trainable().items() if t}
    opt = model.backend.make_optimizer(config, {k: model.params[k] for k in sorted(trainable)})
    loss_fn = model.backend.loss("cross_entropy")
    ctx = Ctx(training=True, rng=np.random.default_rng(0))

    def step():
        out = executor.forward(x, ctx)
        _, dout = loss_fn(out, y)
        opt.step(executor.backward(dout), config.lr)
    return step


PEERS = ("torch", "onnxruntime")


def bench(path, backend: str = "numpy", batch: int = 1, train: bool = False, layers: bool = False,
          vs: str | None = None, repeats: int = 10, warmup: int = 3) -> BenchResult:
    if vs is not None and vs not in PEERS:
        raise CnncError(f"--vs {vs}: the peers are {', '.join(PEERS)}")
    if vs == "onnxruntime" and train:
        raise CnncError("--vs onnxruntime times inference only", hint="drop --train, or use --vs torch")
    model = Model.load(path, backend)
    run_estimate(model.graph, f"{'a training step' if train else 'inference'} of `{model.name}` at batch {batch}",
                 batch, training=train, optimizer_arrays=1 if train else 0, optimizer="momentum").check(
        "a smaller --batch")
    rng = np.random.default_rng(0)
    xh = rng.normal(size=(batch, *model.input_shape)).astype(np.float32)
    yh = rng.integers(0, int(model.classes), batch)
    config = TrainConfig(optimizer="momentum", momentum=0.9, lr=0.001, batch=batch)
    be = model.backend
    x, y = be.to_device(xh), be.to_device(yh)
    if train:
        step = _train_step(model, x, y, config)
    else:
        compiled = compile_model(model, 2)
        step = lambda: compiled.executor.forward(x, Ctx(), keep=False)  # noqa: E731
    ms = _median_ms(step, repeats, warmup)
    result = BenchResult(model.name, backend, batch, train, ms, 1000 * batch / ms,
                         resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if layers:
        result.layers = layer_times(_training(model, batch) if train else compiled, x, train, repeats=max(3, repeats // 3))
    if vs == "torch":
        result.peer_ms_per_step = torch_ms(model, xh, yh, train, config, repeats, warmup)
    elif vs == "onnxruntime":
        result.peer_ms_per_step, result.peer_note = onnxruntime_ms(model, compiled, xh, repeats, warmup)
    if vs is not None:
        result.peer = vs
        result.ratio = ms / result.peer_ms_per_step
    return result


def our_threads(model: Model) -> int:
    """The worker threads our backend computes with: the NumPy backend's, else the rule it follows."""
    from cnnc.backends.numpy import parallel
    if model.backend.name == "numpy":
        return parallel.get_threads()
    value = os.environ.get("CNNC_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else parallel.available_cpus()


def onnxruntime_ms(model: Model, compiled, xh, repeats: int, warmup: int) -> tuple[float, str]:
    """onnxruntime's ms per inference step on our exported network with our thread count, and a
    note saying how it ran; its output must be ours (else the comparison would be of two functions)."""
    from .peers import onnxruntime_session
    threads = our_threads(model)
    sess, exported = onnxruntime_session(model, threads)
    feed = {sess.get_inputs()[0].name: xh}
    ours = compiled.backend.to_host(compiled.executor.forward(compiled.backend.to_device(xh), Ctx(), keep=False))
    (theirs,) = sess.run(None, feed)
    err = float(np.abs(theirs - ours).max() / max(float(np.abs(ours).max()), 1e-30))
    if not err <= 1e-4:
        raise InternalError(f"onnxruntime's output of the exported `{model.name}` differs from ours: "
                            f"max|Δ|/max|ours| = {err:.2e}")
    ms = _median_ms(lambda: sess.run(None, feed), repeats, warmup)
    return ms, f"CPU, opset {exported.opset}, {threads} intra-op thread{'s' if threads != 1 else ''}, " \
               f"output max|Δ|/max|ours| {err:.1e}"


def torch_step(model: Model, xh, yh, train: bool, config: TrainConfig):
    """The same network in PyTorch (our graph, our weights, this process's thread count): a
    callable running one inference or one training step on the batch."""
    from .peers import TorchNetwork
    net = TorchNetwork(model.graph, model.host_params())
    torch = net.torch
    torch.set_num_threads(int(os.environ.get("CNNC_NUM_THREADS", os.cpu_count() or 1)))
    x, y = torch.tensor(xh), torch.tensor(yh)
    if not train:
        def step():
            with torch.no_grad():
                net(x, training=False)
        return step
    opt = torch.optim.SGD(net.parameters(), lr=config.lr, momentum=config.momentum)

    def train_step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(x, training=True), y).backward()
        opt.step()
    return train_step


def torch_ms(model: Model, xh, yh, train: bool, config: TrainConfig, repeats: int, warmup: int) -> float:
    return _median_ms(torch_step(model, xh, yh, train, config), repeats, warmup)


def layer_times(m, x, train: bool, repeats: int = 3) -> list[dict]:
    """Per-layer forward (and backward) milliseconds, sorted by total time, with GFLOP/s: the
    executor's own runs, each kernel timed through its `on_step` callback."""
    plan, be, ex = m.plan, m.backend, m.executor
    ctx = Ctx(training=train, rng=np.random.default_rng(0))
    times = {phase: {s.node.name: [] for s in plan.steps} for phase in ("forward", "backward")}

    def on_step(step, phase: str, seconds: float) -> None:
        times[phase][step.node.name].append(seconds)

    for _ in range(repeats):
        out = ex.forward(x, ctx, keep=train, on_step=on_step)
        if train:
            ex.backward(be.to_device(np.ones(out.shape, np.float32)), on_step=on_step)
    fwd, bwd = times["forward"], times["backward"]
    rows = []
    batch = x.shape[0]
    macs = {n: d.get("macs", 0) for _, d in m.graph.nodes(data=True) for n in [d["name"]]}
    for step in plan.steps:
        name = step.node.name
        f = 1000 * statistics.median(fwd[name])
        b = 1000 * statistics.median(bwd[name]) if bwd[name] else 0.0
        flops = 2 * macs.get(name, 0) * batch * (3 if train else 1)
        rows.append({"layer": name, "op": step.node.op, "forward_ms": f, "backward_ms": b,
                     "gflops": flops / ((f + b) / 1000) / 1e9 if flops and f + b > 0 else 0.0})
    total = sum(r["forward_ms"] + r["backward_ms"] for r in rows) or 1.0
    for r in rows:
        r["share"] = (r["forward_ms"] + r["backward_ms"]) / total
    return sorted(rows, key=lambda r: -(r["forward_ms"] + r["backward_ms"]))


def ranks_bench(path, backend: str = "numpy", batch: int = 64, repeats: int = 10, warmup: int = 2) -> dict:
    """`cnnc bench --ranks` (under `mpiexec -n N`): a data-parallel training step, `batch` images
    shared by the ranks, timed on every rank as compute (forward, loss, backward), waiting (a
    barrier: the skew between the ranks), allreduce (the gradients, as training sums them) and the
    optimizer update; medians over the steps, the slowest rank's for each part."""
    from .distributed import world

    comm = world()
    if batch % comm.size:
        raise CnncError(f"--batch {batch} does not split evenly over {comm.size} ranks",
                        hint=f"the batch is the step's whole batch: give a multiple of {comm.size}")
    model = Model.load(path, backend)
    local = batch // comm.size
    run_estimate(model.graph, f"a training step of `{model.name}` at batch {local}", local, training=True,
                 optimizer_arrays=1, optimizer="momentum").check("a smaller --batch")
    rng = np.random.default_rng(comm.rank)
    be = model.backend
    x = be.to_device(rng.normal(size=(local, *model.input_shape)).astype(np.float32))
    y = be.to_device(rng.integers(0, int(model.classes), local))
    config = TrainConfig(optimizer="momentum", momentum=0.9, lr=0.001, batch=batch)
    trainable = {k for k, t in model.trainable().items() if t}
    opt = be.make_optimizer(config, {k: model.params[k] for k in sorted(trainable)})
    loss_fn = be.loss("cross_entropy")
    ctx = Ctx(training=True, rng=np.random.default_rng(0))
    parts: dict[str, list[float]] = {"compute": [], "waiting": [], "allreduce": [], "update": []}
    grad_bytes = 0
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        out = model.executor.forward(x, ctx)
        _, dout = loss_fn(out, y)
        grads = model.executor.backward(dout)
        t1 = time.perf_counter()
        comm.barrier("the benchmark's barrier")
        t2 = time.perf_counter()
        keys = [k for k in reversed(list(model.params)) if k in grads and k in trainable]
        host = [np.array(be.to_host(grads[k]), dtype=np.float32) for k in keys]
        comm.allreduce(host)
        t3 = time.perf_counter()
        opt.step({k: be.to_device(h / np.float32(comm.size)) for k, h in zip(keys, host)}, config.lr)
        t4 = time.perf_counter()
        grad_bytes = sum(h.nbytes for h in host)
        if i >= warmup:
            for name, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                parts[name].append(v)
    mine = np.array([statistics.median(v) for v in parts.values()])
    table = np.zeros((comm.size, len(mine)))
    table[comm.rank] = mine
    slowest = comm.allreduce_array(table).max(axis=0)  # each part's median on the slowest rank
    ms = {name: 1000 * float(v) for name, v in zip(parts, slowest)}
    step = sum(ms.values())
    return {"network": model.name, "backend": backend, "ranks": comm.size, "batch": batch, "batch_per_rank": local,
            "gradient_mb": grad_bytes / 2**20, "ms": ms, "ms_per_step": step, "images_per_s": 1000 * batch / step,
            "overhead": (ms["waiting"] + ms["allreduce"]) / ms["compute"]}
