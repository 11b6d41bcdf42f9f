"""Graph building, shape inference and counting on small networks, checked by hand."""

from __future__ import annotations

import pytest

from cnnc.compiler.graph import inputs_of, verify
from cnnc.compiler import pipeline
from cnnc.compiler.pipeline import PassContext, run_pipeline
from cnnc.compiler.summary import rows, table, to_json
from cnnc.dsl import load_text
from cnnc.dsl.errors import InternalError

HEADER = "network t\ninput 3x32x32\nclasses 10\n"


def compile_text(body: str, batch: int = 1, header: str = HEADER):
    return run_pipeline(load_text(header + body, "t.cnn"), PassContext(batch=batch, verify=True))


def by_name(g):
    return {d["name"]: d for _, d in g.nodes(data=True)}


def test_lenet_shapes_params_and_receptive_field():
    g = compile_text("layers:\n    conv 6 5x5 -> tanh -> avgpool 2x2 -> conv 16 5x5 -> tanh -> avgpool 2x2\n"
                     "    conv 120 5x5 -> tanh -> dense 84 -> tanh -> dense classes\n",
                     header="network lenet\ninput 1x32x32\nclasses 10\n")
    n = by_name(g)
    assert n["conv1"]["shape"] == (6, 28, 28) and n["avgpool2"]["shape"] == (16, 5, 5)
    assert n["conv3"]["shape"] == (120, 1, 1)
    assert g.graph["totals"]["params"] == 61_706  # LeNet-5 with full C3 connectivity
    # receptive field: 5 → pool 6 (/2) → 5x5 conv: 6 + 4·2 = 14 → pool 16 (/4) → 5x5: 16 + 4·4 = 32
    assert n["conv1"]["rf"] == (5, 5, 1, 1)
    assert n["avgpool1"]["rf"] == (6, 6, 2, 2)
    assert n["conv2"]["rf"] == (14, 14, 2, 2)
    assert n["conv3"]["rf"] == (32, 32, 4, 4)
    assert n["dense1"]["rf"] == "global"


def test_block_instances_are_named_and_nested():
    g = compile_text("block unit(c):\n    conv c 3x3 pad=1 -> relu\n"
                     "block stage(c, n):\n    unit(c) * n\n"
                     "layers:\n    stage(8, 2) -> stage(16, 1)\n")
    names = [d["name"] for _, d in sorted(g.nodes(data=True))]
    assert names == ["input", "stage1.unit1.conv1", "stage1.unit1.relu1", "stage1.unit2.conv1",
                     "stage1.unit2.relu1", "stage2.unit1.conv1", "stage2.unit1.relu1"]
    assert set(g.graph["blocks"]) == {("stage1",), ("stage1", "unit1"), ("stage1", "unit2"), ("stage2",),
                                      ("stage2", "unit1")}
    r = rows(g)
    assert [(x.depth, x.name) for x in r[:4]] == [(0, "input"), (0, "stage1"), (1, "unit1"), (2, "conv1")]
    assert r[1].params == (8 * 3 * 9 + 8) + (8 * 8 * 9 + 8)  # stage1 = unit1 (3→8) + unit2 (8→8)
    assert r[1].op == "stage(c=8, n=2)" and r[1].shape == (8, 32, 32)


def test_loop_and_arithmetic_grow_a_dense_block():
    g = compile_text("block layer(g):\n    new = bn -> relu -> conv g 3x3 pad=1\n    concat(in, new)\n"
                     "block dense_block(n, g):\n    for i in range(n):\n        layer(g)\n"
                     "layers:\n    conv 16 3x3 pad=1 -> dense_block(4, 12) -> conv 16*2 1x1\n")
    n = by_name(g)
    # each layer adds g channels: 16 → 28 → 40 → 52 → 64
    assert [n[f"dense_block1.layer{i}.concat1"]["shape"][0] for i in range(1, 5)] == [28, 40, 52, 64]
    assert n["dense_block1.layer3.conv1"]["params"] == 12 * 40 * 9 + 12
    assert n["conv2"]["shape"] == (32, 32, 32)


def test_concat_keeps_order_and_inputs_are_ported():
    g = compile_text("layers:\n    a = conv 4 1x1\n    b = in -> conv 8 1x1\n    concat(b, a, b)\n")
    n = by_name(g)
    cat = next(k for k, d in g.nodes(data=True) if d["name"] == "concat1")
    assert [g.nodes[u]["name"] for u in inputs_of(g, cat)] == ["conv2", "conv1", "conv2"]
    assert n["concat1"]["shape"] == (20, 32, 32)


def test_chain_merge_puts_the_flowing_tensor_first():
    g = compile_text("layers:\n    a = conv 4 1x1\n    in -> conv 8 1x1 -> concat(a)\n")
    cat = next(k for k, d in g.nodes(data=True) if d["name"] == "concat1")
    assert [g.nodes[u]["name"] for u in inputs_of(g, cat)] == ["conv2", "conv1"]


def test_defaults_and_explicit_override():
    g = compile_text("default conv bias=false\nlayers:\n    conv 4 3x3 pad=1 -> conv 4 3x3 pad=1 bias=true\n")
    n = by_name(g)
    assert n["conv1"]["params"] == 4 * 3 * 9 and n["conv2"]["params"] == 4 * 4 * 9 + 4


def test_trainable_false_counts_as_non_trainable():
    g = compile_text("layers:\n    conv 4 3x3 pad=1 trainable=false -> gap -> dense classes\n")
    t = g.graph["totals"]
    assert t["non_trainable"] == 4 * 3 * 9 + 4 and t["trainable"] == 4 * 10 + 10


def test_explicit_layer_name():
    g = compile_text('layers:\n    conv 4 3x3 pad=1 name="stem" -> relu\n')
    assert "stem" in by_name(g)


def test_memory_inference_peak_and_training_sum():
    # input 3·32·32 = 3072 floats; conv → 8·32·32 = 8192; relu 8192; gap 8; dense 10
    g = compile_text("layers:\n    conv 8 3x3 pad=1 -> relu -> gap -> dense classes\n", batch=2)
    t = g.graph["totals"]
    assert t["training_bytes"] == 2 * 4 * (3072 + 8192 + 8192 + 8 + 10)
    # peak: conv output and relu output alive together (relu reads conv)
    assert t["inference_bytes"] == 2 * 4 * (8192 + 8192)
    assert t["macs"] == 2 * (8 * 32 * 32 * 27 + 80)


def test_residual_keeps_the_shortcut_alive():
    g = compile_text("layers:\n    conv 8 3x3 pad=1\n    x = relu\n    conv 8 3x3 pad=1 -> conv 8 3x3 pad=1 -> add(x)\n")
    # at the second conv, x (8192), first conv of the branch (8192) and its output (8192) are alive
    assert g.graph["totals"]["inference_bytes"] == 4 * 3 * 8192


def test_verify_catches_broken_invariants():
    g = compile_text("layers:\n    conv 8 3x3 pad=1 -> relu\n")
    verify(g)
    g.remove_edge(1, 2)
    with pytest.raises(InternalError, match="inputs"):
        verify(g)


def test_json_schema():
    g = compile_text("layers:\n    conv 8 3x3 pad=1 -> bn -> relu -> gap -> dense classes\ntrain:\n    lr 0.1\n")
    j = to_json(g)
    assert j["network"] == "t" and j["input"] == [3, 32, 32] and j["output"] == [10]
    assert j["params"] == {"total": 224 + 16 + 90, "trainable": 330, "non_trainable": 0, "bytes": 330 * 4}
    assert j["buffers"] == 16
    assert j["layers"][1] == {"name": "conv1", "op": "conv", "shape": [8, 32, 32], "params": 224, "buffers": 0,
                              "macs": 8 * 32 * 32 * 27, "bytes": 8 * 32 * 32 * 4, "rf": [3, 3, 1, 1], "line": 5,
                              "file": "t.cnn", "block": None}
    assert j["train"]["lr"] == 0.1 and j["train"]["optimizer"] == "sgd"


def test_table_lists_totals():
    g = compile_text("layers:\n    conv 8 3x3 pad=1 -> gap -> dense classes\n")
    text = table(g)
    assert "params:      314 total" in text and "conv 3x3 8" in text


def test_pad_same_with_kernel_smaller_than_stride():
    # TF SAME: ceil(8/2) = 4 even for a 1x1 kernel with stride 2 (no padding needed)
    g = compile_text("layers:\n    conv 4 1x1 stride=2 pad=same -> maxpool 1x1 stride=2 pad=same\n",
                     header="network t\ninput 3x8x8\n")
    assert [d["shape"] for _, d in sorted(g.nodes(data=True))][1:] == [(4, 4, 4), (4, 2, 2)]


def test_automatic_names_do_not_collide():
    g = compile_text("layers:\n    relu6\n    for i in range(12):\n        relu\n")
    names = [d["name"] for _, d in g.nodes(data=True)]
    assert "relu6_1" in names and "relu12" in names and len(set(names)) == len(names)


def test_block_row_shows_the_block_output():
    g = compile_text("block blk(c):\n    x = relu\n    conv c 1x1\n    x\n"
                     "layers:\n    blk(2) -> relu\n", header="network t\ninput 3x4x4\n")
    block_row = next(r for r in rows(g) if r.is_block)
    assert block_row.shape == (3, 4, 4)


def test_json_layer_macs_are_at_the_batch_size():
    g = compile_text("layers:\n    conv 8 3x3 pad=1 -> gap -> dense classes\n", batch=4)
    j = to_json(g)
    assert sum(layer["macs"] for layer in j["layers"]) == j["macs"] == 4 * (8 * 32 * 32 * 27 + 80)


def test_adaptive_pool_upsampling_keeps_a_positive_jump():
    g = compile_text("layers:\n    adaptive_avgpool 64x64 -> conv 4 3x3 pad=1\n")
    assert all(d["rf"][2] >= 1 for _, d in g.nodes(data=True))


def test_unused_result_is_a_warning():
    g = compile_text("layers:\n    conv 8 3x3 pad=1\n    concat(in)\n")
    (w,) = g.graph["warnings"]
    assert w.kind == "warning" and "`conv1` is never used" in w.message and w.span.line == 5


# ---- the pass protocol and the one driver ------------------------------------------------------

RESNETISH = ("layers:\n    x = conv 8 3x3 pad=1 -> bn -> relu -> dropout 0.5\n"
             "    a = x -> conv 8 3x3 pad=1 -> bn\n    add(a, x) -> relu -> identity -> flatten -> dense classes\n")


def test_every_pass_is_a_named_function_of_graph_and_context():
    import inspect

    for p in pipeline.PIPELINE:
        assert p.fn.__name__ == p.name and p.fn.__name__ != "<lambda>", p
        assert list(inspect.signature(p.fn).parameters)[:2] == ["g", "ctx"] or p.name == "build_graph", p
        assert len(inspect.signature(p.fn).parameters) == 2, p


def test_verify_runs_after_every_pass_that_runs(monkeypatch):
    seen = []
    monkeypatch.setattr(pipeline, "verify_graph", lambda g: seen.append(g.number_of_nodes()))
    ctx = PassContext(verify=True)
    g = run_pipeline(load_text(HEADER + RESNETISH, "t.cnn"), ctx)
    assert len(seen) == 5 and list(ctx.timings) == ["build_graph", "infer_shapes", "find_unused", "count",
                                                    "lint_training"]
    seen.clear()
    ctx = PassContext(verify=True, opt_level=1, mode="training", fused_ops=frozenset({"fused_conv"}))
    pipeline.optimize(g, ctx)
    ran = [p.name for p in pipeline.PIPELINE if not p.front and p.runs(ctx)]
    assert ran == ["eliminate_dead", "remove_identity", "remove_flatten_before_dense", "plan_memory"]
    assert list(ctx.timings) == ran and len(seen) == len(ran)


def test_one_run_from_source_equals_check_then_optimize():
    fused = frozenset({"fused_conv", "fused_dense", "elemwise_chain", "layout_transform"})
    program = load_text(HEADER + RESNETISH, "t.cnn")
    checked = run_pipeline(program, PassContext())
    params = {f"{d['name']}.{s.name}": pipeline_params(s.shape, s.name)
              for _, d in checked.nodes(data=True) for s in d["param_specs"]}
    two = pipeline.optimize(checked, PassContext(fused_ops=fused), params)
    one = pipeline.run(program, PassContext(fused_ops=fused, verify=True), params=params)
    assert pipeline.dump(one) == pipeline.dump(two)
    assert " = batchnorm(" not in pipeline.dump(one) and " = fused_conv(" in pipeline.dump(one)
    assert "report" not in checked.graph and checked.number_of_nodes() == 12  # the checked graph is left alone
    assert [r.render() for r in one.graph["report"]] == [r.render() for r in two.graph["report"]]


def pipeline_params(shape, name):
    import numpy as np

    return np.ones(shape, np.float32) if name == "running_var" else np.full(shape, 0.5, np.float32)


def test_front_end_errors_are_collected_in_the_context_and_raised_together():
    from cnnc.dsl.errors import CnncErrors

    ctx = PassContext()
    with pytest.raises(CnncErrors) as info:
        run_pipeline(load_text(HEADER + "layers:\n    conv 8 3x3 stride=0 -> dense 10\n    conv 4 9x9 pad=-1\n",
                               "t.cnn"), ctx)
    assert len(info.value.errors) >= 2 and ctx.diags.errors == info.value.errors
    assert "count" not in ctx.timings  # the counting passes need a clean graph


def test_an_unknown_pass_name_is_refused_with_a_suggestion():
    from cnnc.dsl.errors import CnncError

    g = compile_text("layers:\n    conv 4 3x3 -> relu\n")
    with pytest.raises(CnncError, match="no pass named `fuse_epilog`") as info:
        pipeline.optimize(g, PassContext(disabled=frozenset({"fuse_epilog"})))
    assert "fuse_epilogue" in str(info.value.hint)
