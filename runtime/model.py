"""A checked network bound to a backend and its parameters: what the Python API hands out.

    model = Model.load("examples/lenet5.cnn")          # parse, check, compile for NumPy
    y = model(x)                                       # inference on a NumPy batch
    model.save("weights.npz"); model.load_weights("weights.npz")
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from cnnc.backends.base import Ctx, get_backend
from cnnc.compiler.pipeline import check
from cnnc.dsl.errors import CnncError

from .budget import weights_estimate
from .executor import Executor
from .init import init_params


class Model:
    def __init__(self, graph, backend_name: str = "numpy", seed: int | None = None, path: str | None = None):
        self.graph = graph
        self.path = path
        self.backend = get_backend(backend_name)
        self.plan = self.backend.compile(graph)
        self.config = graph.graph.get("train")
        if self.config is None:
            from cnnc.compiler.train_config import TrainConfig
            self.config = TrainConfig()
        seed = self.config.seed if seed is None else seed
        weights_estimate(graph, f"initialising the weights of `{self.name}`").check(
            "fewer filters or units, or a smaller input")
        host = init_params(self.plan.param_specs, self.config, np.random.default_rng(seed))
        imported = graph.graph.get("weights") or {}  # a model read from ONNX starts from its own weights
        host.update({k: np.array(v, np.float32) for k, v in imported.items() if k in host})  # own, writable copies
        self.params = {k: self.backend.to_device(v) for k, v in host.items()}
        self.executor = Executor(self.plan, self.backend, self.params)
        self.base_plan = self.plan  # float32: what use_precision starts from
        self.precision = "fp32"

    def use_precision(self, precision: str) -> None:
        """Compute conv and dense layers in `precision` (fp32, tf32, bf16, fp16) from now on, in
        training and inference; parameters stay float32. A CnncError if the backend cannot."""
        self.backend.check_precision(precision, self.path or self.name)
        self.plan = self.backend.precision_plan(self.base_plan, precision)
        self.executor = Executor(self.plan, self.backend, self.params)
        self.precision = precision

    @classmethod
    def load(cls, path: str | os.PathLike, backend: str = "numpy", seed: int | None = None,
             import_roots=()) -> "Model":
        return cls(check(path, import_roots=import_roots), backend, seed, str(path))

    # ---- facts
    @property
    def name(self) -> str:
        return self.graph.graph["network"]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.graph.nodes[self.graph.graph["input"]]["shape"]

    @property
    def classes(self) -> int | None:
        return self.graph.graph.get("classes") or self.graph.nodes[self.graph.graph["output"]]["shape"][0]

    def trainable(self) -> dict[str, bool]:
        """Per qualified parameter name: whether the optimizer updates it."""
        out = {}
        for n, d in self.graph.nodes(data=True):
            for spec in d.get("param_specs", []):
                out[f"{d['name']}.{spec.name}"] = (not spec.buffer) and d["attrs"].trainable
        return out

    def multipliers(self) -> tuple[dict[str, float], dict[str, float]]:
        lr, decay = {}, {}
        for n, d in self.graph.nodes(data=True):
            for spec in d.get("param_specs", []):
                q = f"{d['name']}.{spec.name}"
                lr[q], decay[q] = d["attrs"].lr_mult, d["attrs"].decay_mult
        return lr, decay

    def signature(self) -> str:
        """A digest of the parameter names and shapes: checkpoints must match it."""
        items = sorted((k, tuple(s.shape)) for k, s in self.plan.param_specs.items())
        return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]

    # ---- running
    def __call__(self, x: np.ndarray, training: bool = False, rng: np.random.Generator | None = None) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if x.shape[1:] != tuple(self.input_shape):
            raise CnncError(f"input batch has shape {x.shape[1:]}, the network takes {tuple(self.input_shape)}")
        ctx = Ctx(training=training, rng=rng or np.random.default_rng(0))
        return self.backend.to_host(self.executor.forward(self.backend.to_device(x), ctx, keep=False))

    def predict(self, x: np.ndarray, batch: int = 256) -> np.ndarray:
        return np.concatenate([self(x[i:i + batch]) for i in range(0, len(x), batch)])

    # ---- weights
    def host_params(self) -> dict[str, np.ndarray]:
        return {k: self.backend.to_host(v) for k, v in self.params.items()}

    def set_params(self, host: dict[str, np.ndarray], source: str = "checkpoint") -> None:
        missing = sorted(set(self.params) - set(host))
        extra = sorted(set(host) - set(self.params))
        if missing or extra:
            raise CnncError(f"{source} does not fit network `{self.name}`: "
                            + (f"missing {', '.join(missing[:3])}" if missing else "")
                            + ("; " if missing and extra else "")
                            + (f"unexpected {', '.join(extra[:3])}" if extra else ""),
                            hint="was it written for another .cnn file?")
        for k, v in host.items():
            if tuple(v.shape) != tuple(self.params[k].shape):
                raise CnncError(f"{source} does not fit network `{self.name}`: `{k}` has shape {tuple(v.shape)}, "
                                f"the network needs {tuple(self.params[k].shape)}")
        for k, v in host.items():
            self.params[k][...] = self.backend.to_device(np.asarray(v, dtype=np.float32))

    def save(self, path: str | os.PathLike) -> None:
        from .checkpoint import write_npz
        write_npz(Path(path), {f"param/{k}": v for k, v in self.host_params().items()},
                  {"network": self.name, "signature": self.signature(), "kind": "weights"})

    def load_weights(self, path: str | os.PathLike) -> None:
        from .checkpoint import parameters, read_npz
        arrays, meta = read_npz(Path(path))
        if meta.get("network") != self.name:
            raise CnncError(f"{path} holds weights of network `{meta.get('network')}`, not `{self.name}`")
        self.set_params(parameters(arrays, Path(path)), str(path))
