"""Reverse-mode autodiff over a compiled plan.

`forward` runs the plan's steps in order, keeping what each kernel saved for its backward
(in training) and dropping an activation once its last consumer has run. `backward` walks the
steps in reverse, hands each kernel the gradient of its output, and sums the gradients that
flow back into a tensor from several consumers (residual shortcuts, dense connections).

Both take `on_step`, a callable `on_step(step, phase, seconds)` called after each step's kernel
with the plan step, "forward" or "backward" and the kernel's wall-clock time (what `cnnc bench
--layers` reports; on an asynchronous device, the time to launch it).
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable

from cnnc.backends.base import Backend, Ctx, Plan


OnStep = Callable[[object, str, float], None]  # (plan step, "forward" | "backward", seconds)


class Executor:
    def __init__(self, plan: Plan, backend: Backend, params: dict):
        self.plan = plan
        self.backend = backend
        self.params = params  # qualified name → device array (buffers included)
        self._saved: dict[int, object] | None = None
        self._ctx: Ctx | None = None
        last_use = {plan.input: -1}
        for i, step in enumerate(plan.steps):
            last_use[step.node.id] = i
            for u in step.inputs:
                last_use[u] = i
        self._free_after: list[list[int]] = [[] for _ in plan.steps]
        for node, i in last_use.items():
            if node != plan.output and i >= 0:
                self._free_after[i].append(node)
        self._local = [{q.rsplit(".", 1)[1]: q for q in step.params} for step in plan.steps]
        # steps that read only the network's input: nothing needs their input gradient
        self._on_input = [all(u == plan.input for u in step.inputs) for step in plan.steps]

    def _step_params(self, i: int) -> dict:
        return {local: self.params[q] for local, q in self._local[i].items()}

    def forward(self, x, ctx: Ctx, keep: bool | None = None, trace: dict | None = None,
                on_step: OnStep | None = None):
        """Run the network on a batch. With `keep` (default: ctx.training) save for backward;
        with a `trace` dict, also copy every node's output there (host arrays, by node name);
        `on_step(step, "forward", seconds)` after each step's kernel."""
        with self.backend.pass_scope(len(x)):
            return self._forward(x, ctx, ctx.training if keep is None else keep, trace, on_step)

    def _forward(self, x, ctx: Ctx, keep: bool, trace: dict | None, on_step: OnStep | None):
        values = {self.plan.input: x}
        saved: dict[int, object] = {}
        for i, step in enumerate(self.plan.steps):
            xs = [values[u] for u in step.inputs]
            start = time.perf_counter() if on_step is not None else 0.0
            y, s = step.kernel.forward(step.node, xs, self._step_params(i), ctx)
            if on_step is not None:
                on_step(step, "forward", time.perf_counter() - start)
            values[step.node.id] = y
            if trace is not None:
                trace[step.node.name] = self.backend.to_host(y)
            if keep:
                saved[step.node.id] = s
            for dead in self._free_after[i]:
                values.pop(dead, None)
        self._saved = saved if keep else None
        self._ctx = ctx
        return values[self.plan.output]

    def backward_ctx(self, i: int, ctx: Ctx) -> Ctx:
        """The context step i's backward kernel runs in: told when its input is the network's."""
        return replace(ctx, need_input_grad=False) if self._on_input[i] else ctx

    def backward(self, dy, on_step: OnStep | None = None) -> dict:
        """Gradients of every parameter (qualified name → array) given d(loss)/d(output);
        `on_step(step, "backward", seconds)` after each step's kernel."""
        if self._saved is None:
            raise RuntimeError("backward() needs a forward() that kept its saved tensors")
        with self.backend.pass_scope(len(dy)):
            return self._backward(dy, on_step)

    def _backward(self, dy, on_step: OnStep | None) -> dict:
        grads = {self.plan.output: dy}
        pgrads: dict = {}
        for i in range(len(self.plan.steps) - 1, -1, -1):
            step = self.plan.steps[i]
            g = grads.pop(step.node.id, None)
            if g is None:  # this node does not reach the output
                continue
            start = time.perf_counter() if on_step is not None else 0.0
            dxs, dps = step.kernel.backward(step.node, self._saved.pop(step.node.id), g, self._step_params(i),
                                           self.backward_ctx(i, self._ctx))
            if on_step is not None:
                on_step(step, "backward", time.perf_counter() - start)
            for local, dp in dps.items():
                pgrads[self._local[i][local]] = dp
            for u, dx in zip(step.inputs, dxs):
                if dx is None or u == self.plan.input:
                    continue
                # fan-out: a tensor read by several nodes receives the sum of their gradients. A new
                # array, since a kernel may hand the same gradient array to several inputs (add).
                grads[u] = grads[u] + dx if u in grads else dx
        self._saved = None
        return pgrads
