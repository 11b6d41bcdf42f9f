"""Each rewrite pass on a small graph: the graph before, the graph expected after."""

from __future__ import annotations

import numpy as np
import pytest

from cnnc.compiler import optimize as opt
from cnnc.compiler.graph import inputs_of, verify
from cnnc.compiler.pipeline import PassContext, optimize, run_pipeline
from cnnc.dsl import load_text

FUSED = frozenset({"fused_conv", "fused_dense", "fused_bn", "fused_mul", "elemwise_chain", "layout_transform"})


def graph(body: str, header: str = "network t\ninput 3x8x8\n"):
    return run_pipeline(load_text(header + "layers:\n" + body, "t.cnn"), PassContext(verify=True))


def params_for(g, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for _, d in g.nodes(data=True):
        for spec in d.get("param_specs", []):
            v = rng.normal(0, 1, spec.shape).astype(np.float32)
            if spec.name == "running_var":
                v = np.abs(v) + 0.5
            out[f"{d['name']}.{spec.name}"] = v
    return out


def ops(g) -> list[str]:
    """The ops in execution order, input excluded: the shape of the graph in one list."""
    return [g.nodes[n]["op"] for n in sorted(g.nodes) if g.nodes[n]["op"] != "input"]


def run_pass(g, fn, **ctx):
    g = g.copy()
    g.graph = dict(g.graph)
    g.graph.setdefault("params", params_for(g))
    g.graph["report"] = []
    out = fn(g, PassContext(fused_ops=ctx.pop("fused_ops", FUSED), **ctx))
    verify(out)
    return out


def test_eliminate_dead():
    before = graph("    a = conv 4 3x3 pad=1\n    in -> conv 2 1x1 -> relu\n")
    assert ops(before) == ["conv", "conv", "relu"]
    after = run_pass(before, opt.eliminate_dead)
    assert ops(after) == ["conv", "relu"]
    assert "conv1.weight" not in after.graph["params"]
    assert "removed `conv1`" in after.graph["report"][0].text


def test_remove_identity_and_dropout():
    before = graph("    conv 4 3x3 pad=1 -> identity -> dropout 0.5 -> relu\n")
    after = run_pass(run_pass(before, opt.remove_identity), opt.remove_dropout)
    assert ops(after) == ["conv", "relu"]
    relu = next(n for n in after.nodes if after.nodes[n]["op"] == "relu")
    assert after.nodes[inputs_of(after, relu)[0]]["op"] == "conv"


def test_dropout_stays_in_training_plans():
    g = graph("    conv 4 3x3 pad=1 -> dropout 0.5 -> relu\n")
    trained = optimize(g, PassContext(mode="training", fused_ops=FUSED), params_for(g))
    assert "dropout" in ops(trained)
    inferred = optimize(g, PassContext(mode="inference", fused_ops=FUSED), params_for(g))
    assert "dropout" not in ops(inferred)


def test_remove_flatten_before_dense():
    before = graph("    conv 4 3x3 pad=1 -> flatten -> dense 5\n")
    after = run_pass(before, opt.remove_flatten_before_dense)
    assert ops(after) == ["conv", "dense"]
    dense = next(n for n in after.nodes if after.nodes[n]["op"] == "dense")
    assert after.nodes[dense]["attrs"].flatten and after.nodes[dense]["shape"] == (5,)


def test_fold_batchnorm_weights():
    before = graph("    conv 4 3x3 pad=1 bias=false -> bn -> relu\n")
    p = params_for(before)
    after = run_pass(before, opt.fold_batchnorm)
    assert ops(after) == ["conv", "relu"]
    conv = next(n for n in after.nodes if after.nodes[n]["op"] == "conv")
    assert after.nodes[conv]["attrs"].bias
    s = p["bn1.weight"] / np.sqrt(p["bn1.running_var"] + 1e-5)
    q = after.graph["params"]
    np.testing.assert_allclose(q["conv1.weight"], p["conv1.weight"] * s[:, None, None, None], rtol=1e-6)
    np.testing.assert_allclose(q["conv1.bias"], p["bn1.bias"] - p["bn1.running_mean"] * s, rtol=1e-5, atol=1e-6)
    assert not any(k.startswith("bn1.") for k in q)


def test_fold_batchnorm_refusals():
    two_users = graph("    x = conv 4 3x3 pad=1\n    a = bn\n    concat(a, x)\n")
    after = run_pass(two_users, opt.fold_batchnorm)
    assert "batchnorm" in ops(after)
    assert "2 consumers" in after.graph["report"][0].text and after.graph["report"][0].refused
    after_concat = graph("    a = conv 4 1x1\n    b = in -> conv 4 1x1\n    concat(a, b) -> bn\n")
    after = run_pass(after_concat, opt.fold_batchnorm)
    assert "its input comes from concat" in after.graph["report"][0].text


def test_fuse_epilogue_conv_relu():
    before = graph("    conv 4 3x3 pad=1 -> relu -> maxpool 2x2\n")
    after = run_pass(before, opt.fuse_epilogue)
    assert ops(after) == ["fused_conv", "maxpool"]
    n = next(n for n in after.nodes if after.nodes[n]["op"] == "fused_conv")
    a = after.nodes[n]["attrs"]
    assert a.activation == "relu" and not a.residual and after.nodes[n]["name"] == "conv1"
    assert "conv + relu → fused conv_relu" in after.graph["report"][0].render()


def test_fuse_residual_after_folding():
    before = graph("    conv 3 3x3 pad=1 bias=false -> bn -> add(in) -> relu -> gap\n")
    after = run_pass(run_pass(before, opt.fold_batchnorm), opt.fuse_epilogue)
    assert ops(after) == ["fused_conv", "globalavgpool"]
    n = next(n for n in after.nodes if after.nodes[n]["op"] == "fused_conv")
    assert after.nodes[n]["attrs"].residual and after.nodes[n]["attrs"].activation == "relu"
    assert [after.nodes[u]["op"] for u in inputs_of(after, n)] == ["input", "input"]
    assert "conv + bn + add + relu → fused conv_bn_add_relu" in after.graph["report"][-1].render()


def test_fuse_epilogue_refusals():
    two = graph("    conv 4 3x3 pad=1\n    x = relu\n    y = sigmoid\n")
    g = graph("    c = conv 4 3x3 pad=1\n    a = relu\n    b = c -> sigmoid\n    concat(a, b)\n")
    after = run_pass(g, opt.fuse_epilogue)
    assert ops(after) == ["conv", "relu", "sigmoid", "concat"]
    assert "conv `conv1` output has 2 consumers" in after.graph["report"][0].text
    no_kernel = run_pass(graph("    conv 4 3x3 pad=1 -> relu\n"), opt.fuse_epilogue, fused_ops=frozenset())
    assert ops(no_kernel) == ["conv", "relu"]
    assert "has no fused_conv kernel" in no_kernel.graph["report"][0].text
    assert two is not None


def test_fuse_batchnorm_activation_where_batchnorm_stays():
    """Training keeps BatchNorm (no folding): it takes the activation that reads it, its attributes
    and name kept; at inference it folds into the conv first and the conv takes the activation."""
    g = graph("    conv 4 3x3 pad=1 bias=false -> bn momentum=0.2 -> relu6 -> conv 4 1x1 -> bn -> add(in) -> relu\n",
              header="network t\ninput 4x8x8\n")
    trained = optimize(g, PassContext(mode="training", fused_ops=FUSED, verify=True), params_for(g))
    assert ops(trained) == ["conv", "fused_bn", "conv", "fused_bn"]
    first, last = sorted(n for n in trained.nodes if trained.nodes[n]["op"] == "fused_bn")
    d = trained.nodes[first]
    assert d["name"] == "bn1" and d["attrs"].activation == "relu6" and d["attrs"].momentum == 0.2
    assert not d["attrs"].residual
    assert [s.name for s in d["param_specs"]] == ["weight", "bias", "running_mean", "running_var"]
    assert any("bn + relu6 → fused bn_relu6" in r.render() for r in trained.graph["report"])
    # a residual block's bn → add → relu: one fused_bn, the shortcut its second input
    d = trained.nodes[last]
    assert d["name"] == "bn2" and d["attrs"].residual and d["attrs"].activation == "relu"
    assert [trained.nodes[u]["op"] for u in inputs_of(trained, last)] == ["conv", "input"]
    assert any("bn + add + relu → fused bn_add_relu" in r.render() for r in trained.graph["report"])
    from cnnc.backends.cuda import CudaBackend  # its fused_bn kernels take no residual: the add stays
    refused = optimize(g, PassContext(mode="training", fused_ops=FUSED, fusion_check=CudaBackend.fusion_refusal),
                       params_for(g))
    assert ops(refused) == ["conv", "fused_bn", "conv", "batchnorm", "add", "relu"]
    assert any("take no residual input" in r.text and r.refused for r in refused.graph["report"])
    inferred = optimize(g, PassContext(mode="inference", fused_ops=FUSED, verify=True), params_for(g))
    assert ops(inferred) == ["fused_conv", "fused_conv"]
    no_kernel = optimize(g, PassContext(mode="training", fused_ops=FUSED - {"fused_bn"}), params_for(g))
    assert "batchnorm" in ops(no_kernel) and "relu6" in ops(no_kernel)
    assert any("has no fused_bn kernel" in r.text and r.refused for r in no_kernel.graph["report"])
    after_concat = graph("    a = conv 4 1x1\n    b = in -> conv 4 1x1\n    concat(a, b) -> bn -> relu\n")
    inferred = optimize(after_concat, PassContext(mode="inference", fused_ops=FUSED), params_for(after_concat))
    assert ops(inferred)[-1] == "fused_bn"  # not foldable: fused with its activation at inference too


SE = "    x = conv 4 3x3 pad=1\n    gap -> conv 4 1x1 -> {act} -> mul(x)\n"


@pytest.mark.parametrize("act, args", [("hardsigmoid", ()), ("elu 0.5", (0.5,))])
def test_fuse_gate(act, args):
    before = graph(SE.format(act=act))
    after = run_pass(before, opt.fuse_gate)
    assert ops(after) == ["conv", "globalavgpool", "conv", "fused_mul"]
    n = next(n for n in after.nodes if after.nodes[n]["op"] == "fused_mul")
    d = after.nodes[n]
    name = act.split()[0]
    assert (d["attrs"].activation, tuple(d["attrs"].act_args)) == (name, args)
    full, gate = inputs_of(after, n)  # normalised: the full tensor first, whatever order mul had them in
    assert after.nodes[full]["shape"] == (4, 8, 8) and after.nodes[gate]["shape"] == (4, 1, 1)
    assert after.nodes[gate]["op"] == "conv" and d["shape"] == (4, 8, 8)
    (rec,) = after.graph["report"]
    assert rec.text == f"{name} + mul → fused {name}_mul" and not rec.refused
    assert [op for op, _, _ in d["fused_from"]] == [name, "mul"]


def test_fuse_gate_gives_the_unfused_values():
    from cnnc.runtime.model import Model

    g = graph(SE.format(act="hardsigmoid") + "    gap -> dense 3\n")
    params = params_for(g, seed=2)
    x = np.random.default_rng(1).normal(size=(2, 3, 8, 8)).astype(np.float32)
    outs = []
    for disabled in (frozenset({"fuse_gate"}), frozenset()):
        opt_g = optimize(g, PassContext(fused_ops=FUSED, disabled=disabled), {k: v.copy() for k, v in params.items()})
        assert ("fused_mul" in ops(opt_g)) == (not disabled)
        m = Model(opt_g, seed=0)
        m.set_params(opt_g.graph["params"])
        outs.append(m(x))
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-6, atol=1e-7)


def test_fuse_gate_refusals():
    two = graph("    x = conv 4 3x3 pad=1\n    s = gap -> conv 4 1x1 -> hardsigmoid\n    a = x -> mul(s)\n"
                "    b = x -> conv 4 1x1 -> mul(s)\n    add(a, b)\n")
    after = run_pass(two, opt.fuse_gate)
    assert "fused_mul" not in ops(after) and "hardsigmoid" in ops(after)
    why = "not fused: hardsigmoid `hardsigmoid1` output has 2 consumers"
    assert [r.text for r in after.graph["report"]] == [why, why]  # one per product
    assert all(r.refused for r in after.graph["report"])
    no_kernel = run_pass(graph(SE.format(act="sigmoid")), opt.fuse_gate, fused_ops=frozenset())
    assert ops(no_kernel)[-2:] == ["sigmoid", "mul"]
    assert no_kernel.graph["report"][0].text == "not fused: backend `numpy` has no fused_mul kernel"
    equal = run_pass(graph("    x = conv 4 3x3 pad=1\n    relu -> mul(x)\n"), opt.fuse_gate)
    assert "fused_mul" not in ops(equal) and not equal.graph["report"]  # equal shapes: no gate to fuse


def test_fuse_elementwise_chain():
    before = graph("    conv 4 3x3 pad=1 -> relu -> leaky_relu 0.2 -> tanh -> maxpool 2x2\n")
    after = run_pass(before, opt.fuse_elementwise)
    assert ops(after) == ["conv", "elemwise_chain", "maxpool"]
    n = next(n for n in after.nodes if after.nodes[n]["op"] == "elemwise_chain")
    assert after.nodes[n]["attrs"].ops == ("relu", "leaky_relu", "tanh")
    assert after.nodes[n]["attrs"].args[1] == pytest.approx((0.2,))


def test_choose_layout_inserts_and_shares_transforms():
    before = graph("    conv 4 3x3 pad=1 -> relu -> conv 4 3x3 pad=1 -> flatten\n")
    after = run_pass(before, opt.choose_layout, layouts={"conv": "NHWC"})
    # NCHW input → NHWC for the first conv; relu follows its input's layout; flatten wants NCHW
    assert ops(after) == ["layout_transform", "conv", "relu", "conv", "layout_transform", "flatten"]
    transforms = [after.nodes[n]["attrs"].to for n in sorted(after.nodes) if after.nodes[n]["op"] == "layout_transform"]
    assert transforms == ["NHWC", "NCHW"]
    same = run_pass(before, opt.choose_layout)
    assert ops(same) == ops(before)


def test_inverse_layout_transforms_cancel():
    g = run_pass(graph("    conv 4 3x3 pad=1 -> relu\n"), opt.choose_layout, layouts={"conv": "NHWC", "relu": "NCHW"})
    assert ops(g) == ["layout_transform", "conv", "layout_transform", "relu"]
    # feed the NCHW transform straight from the NHWC one: a pair that cancels
    t1, conv, t2, relu = [n for n in sorted(g.nodes) if g.nodes[n]["op"] != "input"]
    g.remove_edge(conv, t2)
    g.add_edge(t1, t2, port=0)
    g.remove_node(conv)
    opt._cancel_transforms(g)
    assert [g.nodes[n]["op"] for n in sorted(g.nodes)] == ["input", "relu"]


def test_plan_memory_reuses_buffers_and_works_in_place():
    g = graph("    conv 8 3x3 pad=1 -> relu -> conv 8 3x3 pad=1 -> relu -> conv 8 3x3 pad=1\n")
    after = run_pass(g, opt.plan_memory, opt_level=1)
    mem = after.graph["memory"]
    one = 8 * 8 * 8 * 4
    assert mem["unplanned_bytes"] == 3 * 8 * 8 * 4 + 5 * one
    assert mem["in_place"] == 2  # each relu writes over the conv output it consumes
    assert mem["planned_bytes"] <= 2 * one + 3 * 8 * 8 * 4
    offsets = {after.nodes[n]["name"]: after.nodes[n].get("buffer_offset") for n in after.nodes}
    assert offsets["relu1"] == offsets["conv1"]


def test_plan_memory_for_training_keeps_what_backward_needs():
    g = graph("    conv 8 3x3 pad=1 -> relu -> conv 8 3x3 pad=1 -> gap\n")
    inference = run_pass(g, opt.plan_memory)
    training = run_pass(g, opt.plan_memory, mode="training")
    assert training.graph["memory"]["planned_bytes"] > inference.graph["memory"]["planned_bytes"]
    assert training.graph["memory"]["planned_bytes"] < training.graph["memory"]["unplanned_bytes"]
