"""compiler/to_cnn.py: a checked graph written back as `.cnn` source checks to the same graph.

The oracle is the front end itself: the written text is parsed and checked again, and the two
graphs are compared node by node (op, every attribute but the name, which inputs in which port,
shape), with the totals (params, buffers, MACs) and the train section; for a sample, the NumPy
backend's outputs agree with the weights moved through the writer's name map. Imported graphs carry
no block information, so the graphs are written with it stripped.
"""

from __future__ import annotations

import numpy as np
import pytest

from cnnc.compiler.graph import inputs_of
from cnnc.compiler.pipeline import PassContext, check, optimize, run_pipeline
from cnnc.compiler.to_cnn import write, write_cnn, write_cnn_with_names
from cnnc.dsl.errors import CnncError
from cnnc.dsl.loader import load_text
from conftest import EXAMPLES, run_cli

ZOO = sorted(p.stem for p in EXAMPLES.glob("*.cnn"))


def imported_like(g):
    """The graph as an importer hands it over: no block instances, call stacks or source spans, names
    that are not ours, shapes not yet inferred."""
    h = g.copy()
    h.graph = {k: g.graph[k] for k in ("network", "input", "output", "classes", "train")}
    for n, d in h.nodes(data=True):
        keep = {"op": d["op"], "attrs": d["attrs"], "name": f"onnx_node_{n}/{d['op']}"}
        d.clear()
        d.update(keep)
    return h


def recheck(text: str):
    return run_pipeline(load_text(text, "written.cnn"))


def assert_same_graph(g1, g2):
    """Node by node in order: op, attributes but the name, inputs by position and port, shape; and the totals."""
    o1, o2 = sorted(g1.nodes), sorted(g2.nodes)
    assert len(o1) == len(o2)
    p1 = {n: i for i, n in enumerate(o1)}
    p2 = {n: i for i, n in enumerate(o2)}
    for a, b in zip(o1, o2):
        d1, d2 = g1.nodes[a], g2.nodes[b]
        where = f"{d1['name']} / {d2['name']}"
        assert d1["op"] == d2["op"], where
        assert d1["attrs"].model_dump(exclude={"name"}) == d2["attrs"].model_dump(exclude={"name"}), where
        assert [p1[u] for u in inputs_of(g1, a)] == [p2[u] for u in inputs_of(g2, b)], where
        assert d1["shape"] == d2["shape"], where
    assert p1[g1.graph["output"]] == p2[g2.graph["output"]]
    for k in ("params", "trainable", "buffers", "macs"):
        assert g1.graph["totals"][k] == g2.graph["totals"][k], k
    assert g1.graph["train"] == g2.graph["train"]


def assert_names_predicted(written, g1, g2):
    """The writer's layer-name map is the names the front end gives the written file, in node order."""
    for a, b in zip(sorted(g1.nodes), sorted(g2.nodes)):
        assert written.layer_names[g1.nodes[a]["name"]] == g2.nodes[b]["name"]


@pytest.fixture(scope="module")
def zoo():
    return {name: check(EXAMPLES / f"{name}.cnn") for name in ZOO}


@pytest.mark.parametrize("name", ZOO)
def test_flat_round_trip_every_zoo_network(zoo, name):
    g = zoo[name]
    h = imported_like(g)
    written = write(h, blocks=False)
    g2 = recheck(written.text)
    assert_same_graph(g, g2)
    assert_names_predicted(written, h, g2)
    assert not g2.graph["blocks"]  # flat: no block definitions


@pytest.mark.parametrize("name", ["modern_blocks", "shufflenet_v2_x1_0", "cifar_resnet20", "squeezenet1_1"])
def test_flat_outputs_equal_with_weights_moved_by_the_name_map(zoo, name):
    from cnnc.runtime.model import Model

    g = zoo[name]
    h = imported_like(g)
    text, names = write_cnn_with_names(h, blocks=False)
    before, after = Model(g, seed=1), Model(recheck(text), seed=2)
    old = {h.nodes[n]["name"]: g.nodes[n]["name"] for n in g.nodes}  # importer name → our name
    ours = before.host_params()
    moved = {names[f"{layer}.{tensor}"]: ours[f"{old[layer]}.{tensor}"]
             for layer, tensor in (k.rsplit(".", 1) for k in names)}
    assert set(moved) == set(after.params)
    after.set_params(moved)
    x = np.random.default_rng(0).normal(size=(2,) + tuple(before.input_shape)).astype(np.float32)
    np.testing.assert_array_equal(before(x), after(x))


def test_attributes_written_only_where_they_differ(cnn):
    g = check(cnn("""
        input 3x32x32
        layers:
            conv 8 3x3 pad=1 bias=false -> bn eps=1e-3 -> leaky_relu 0.2
            conv 8 1x7 stride=(2, 1) pad=(0, 3) round=floor trainable=false lr_mult=2 -> relu
            maxpool 2x2 -> avgpool 3x3 stride=1 pad=(0, 1, 1, 0) count_pad=false
            conv 8 3x3 dilation=2 pad=same groups=2 -> dropout 0.3 -> flatten -> dense 10 bias=false
    """))
    text = write_cnn(g, blocks=False)
    body = text.split("layers:\n")[1]
    assert "conv 8 3x3 pad=1 bias=false -> bn eps=0.001 -> leaky_relu 0.2" in body
    assert "conv 8 1x7 stride=2x1 pad=(0, 3) round=floor trainable=false lr_mult=2.0 -> relu" in body
    assert "maxpool 2x2 -> avgpool 3x3 stride=1 pad=(0, 1, 1, 0) count_pad=false" in body
    assert "conv 8 3x3 pad=same dilation=2 groups=2 -> dropout 0.3 -> flatten" in body
    assert_same_graph(g, recheck(text))


def test_named_tensors_split_and_merge_order(cnn):
    g = check(cnn("""
        input 8x8x8
        layers:
            a, b = in -> split 2
            c = b -> conv 4 1x1
            concat(c, a) -> add(in)
            mul(in, in)
    """))
    text = write_cnn(g, blocks=False)
    g2 = recheck(text)
    assert_same_graph(g, g2)
    assert "x1, x2 = split" in text


def test_unused_layer_and_output_not_last(cnn):
    g = check(cnn("""
        input 4x8x8
        layers:
            y = conv 4 3x3 pad=1
            spare = y -> relu
            y -> bn
    """))
    assert g.graph["warnings"]  # `spare` is never used
    assert_same_graph(g, recheck(write_cnn(g, blocks=False)))


def test_odd_names_of_an_imported_graph(cnn):
    g = check(cnn("""
        network net
        input pixels: 1x4x4
        layers:
            conv 2 3x3 -> relu
    """))
    h = imported_like(g)
    h.graph["network"] = "9-layer net"
    h.nodes[h.graph["input"]]["name"] = "input.1"
    text = write_cnn(h, blocks=False)
    assert text.startswith("network net_9_layer_net\ninput 1x4x4\n")
    assert_same_graph(g, recheck(text))


def test_optimised_plans_are_refused(zoo):
    from cnnc.runtime.model import Model

    g = zoo["resnet18"]
    plan = optimize(g, PassContext(opt_level=2, fused_ops=frozenset({"fused_conv"})), Model(g).host_params())
    with pytest.raises(CnncError, match="fused_conv.*before optimisation"):
        write_cnn(plan)


def test_written_file_checks_on_the_command_line(zoo, tmp_path):
    path = tmp_path / "resnet18.cnn"
    path.write_text(write_cnn(imported_like(zoo["resnet18"]), blocks=False))
    r = run_cli("check", str(path))
    assert r.code == 0, r.err
    assert "params:      11,689,512 total" in r.out  # torchvision's resnet18, as tests/test_zoo.py


# ---- block recovery ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ZOO)
def test_blocks_round_trip_every_zoo_network(zoo, name):
    g = zoo[name]
    h = imported_like(g)
    written = write(h)
    g2 = recheck(written.text)
    assert_same_graph(g, g2)
    assert_names_predicted(written, h, g2)


def block_calls(g) -> list[tuple[str, dict]]:
    """(block, args) of each top-level block instance of a checked graph, in order."""
    return [(info["block"], info["args"]) for path, info in g.graph["blocks"].items() if len(path) == 1]


def test_resnet50_recovered_in_at_most_40_lines(zoo):
    written = write(imported_like(zoo["resnet50"]))
    assert written.lines() <= 40
    g2 = recheck(written.text)
    assert g2.graph["totals"]["params"] == 25_557_032  # torchvision's resnet50, as tests/test_zoo.py
    calls = block_calls(g2)
    assert len(calls) == 16  # 3 + 4 + 6 + 3 bottlenecks
    down = [args for block, args in calls if block == calls[0][0]]  # the first block of each stage
    assert [args["c"] for args in down] == [64, 128, 256, 512]
    assert [args["stride"] for args in down] == [1, 2, 2, 2]
    assert "add_block_b(128) * 3" in written.text  # identical consecutive calls repeat


def test_densenet121_dense_layers_recovered(zoo):
    written = write(imported_like(zoo["densenet121"]))
    g2 = recheck(written.text)
    calls = block_calls(g2)
    assert len(calls) == 6 + 12 + 24 + 16 and len({block for block, _ in calls}) == 1
    for n in (6, 12, 24, 16):
        assert f"() * {n}\n" in written.text
    assert written.lines() <= 20


def test_googlenet_inceptions_recovered(zoo):
    written = write(imported_like(zoo["googlenet"]))
    g2 = recheck(written.text)
    calls = block_calls(g2)
    assert len(calls) == 9 and len({block for block, _ in calls}) == 1
    # the six widths of each inception, as torchvision's table has them (3a first)
    assert list(calls[0][1].values()) == [64, 96, 128, 16, 32, 32]
    assert list(calls[-1][1].values()) == [384, 192, 384, 48, 128, 128]


def test_vgg16_runs_of_layers_repeat(zoo):
    text = write_cnn(imported_like(zoo["vgg16"]))
    assert "(conv 256 3x3 pad=1 -> relu) * 3 -> maxpool 2x2" in text
    assert not recheck(text).graph["blocks"]


@pytest.mark.parametrize("name", ["modern_blocks", "shufflenet_v2_x1_0", "cifar_resnet20", "squeezenet1_1"])
def test_blocks_outputs_equal_with_weights_moved_by_the_name_map(zoo, name):
    from cnnc.runtime.model import Model

    g = zoo[name]
    text, names = write_cnn_with_names(g)  # our own names: old → new is then direct
    before, after = Model(g, seed=1), Model(recheck(text), seed=2)
    ours = before.host_params()
    assert set(names) == set(ours)
    after.set_params({names[k]: v for k, v in ours.items()})
    x = np.random.default_rng(0).normal(size=(2,) + tuple(before.input_shape)).astype(np.float32)
    np.testing.assert_array_equal(before(x), after(x))


def test_recovered_blocks_are_clusters_in_viz(zoo, tmp_path):
    path = tmp_path / "resnet50.cnn"
    path.write_text(write_cnn(imported_like(zoo["resnet50"])))
    r = run_cli("viz", str(path), "-o", str(tmp_path / "resnet50.dot"))
    assert r.code == 0, r.err
    assert "16 block instances" in r.err
    dot = (tmp_path / "resnet50.dot").read_text()
    assert dot.count('id="cluster-add_block_b') == 12


def test_blocks_from_a_small_network_and_their_parameters(cnn):
    """Occurrences differing in filters (one a multiple of another) and stride (the table's default 1 in
    some) become parameters; identical consecutive calls repeat."""
    g = check(cnn("""
        input x1: 4x32x32
        block res(c, s):
            short = in -> conv 2*c 1x1 stride=s round=floor
            in -> conv c 3x3 stride=s pad=1 round=floor -> relu -> conv 2*c 3x3 pad=1 -> add(short) -> relu
        layers:
            res(4, 1) -> res(8, 2) -> res(16, 2) -> res(16, 2)
            y = conv 8 1x1
            z = y -> relu
            add(y, z)
    """))
    h = imported_like(g)
    written = write(h)
    text = written.text
    assert "block add_block(c, stride=1):" in text
    assert "conv 2*c 1x1 stride=stride" in text
    assert "add_block(4)\n    add_block(8, stride=2)\n    add_block(16, stride=2) * 2\n" in text
    g2 = recheck(text)
    assert_same_graph(g, g2)
    assert_names_predicted(written, h, g2)
    assert len(block_calls(g2)) == 4
    own = write_cnn(g)  # with the input's own name, which the tensor names keep clear of
    assert "input x1: 4x32x32" in own and "x2 = " in own and "    x1 = " not in own.split("layers:")[1]
    assert_same_graph(g, recheck(own))


def test_a_varying_attribute_without_a_value_keeps_layers_flat(cnn):
    g = check(cnn("""
        input 4x8x8
        layers:
            a = relu
            maxpool 3x3 stride=1 pad=1 -> add(a)
            b = relu
            maxpool 1x1 -> add(b)
    """))
    assert g.nodes[5]["attrs"].stride is None  # the second pool's stride is the kernel's, unset
    text = write_cnn(imported_like(g))
    assert "block" not in text
    assert_same_graph(g, recheck(text))


def test_mobilenet_v2_runs_of_layers_between_blocks_become_a_block(zoo):
    """The inverted residuals without a shortcut are runs of plain layers between the recovered residual
    blocks; they come back as one block too, and the stem, which matches their ops but not their kernel,
    stride and padding, stays as layers."""
    written = write(imported_like(zoo["mobilenet_v2"]))
    g2 = recheck(written.text)
    calls = block_calls(g2)
    assert len(calls) == 16  # Table 2's 17 blocks (1 + 2 + 3 + 4 + 3 + 3 + 1) but the first (t = 1), as layers
    assert written.text.count("conv 32 3x3 stride=2 pad=1 -> bn -> relu6") == 1  # the stem, as written
    assert written.lines() <= 30


def test_runs_of_calls_repeat_as_a_group(cnn):
    g = check(cnn("""
        input 8x8x8
        block r(c):
            conv c 3x3 pad=1 -> bn -> relu -> conv 8 3x3 pad=1 -> add(in)
        layers:
            for i in range(12):
                r(4 + i % 3)
            gap -> dense 10
    """))
    h = imported_like(g)
    written = write(h)
    assert "(add_block(4) -> add_block(5) -> add_block(6)) * 4\n" in written.text
    g2 = recheck(written.text)
    assert_same_graph(g, g2)
    assert_names_predicted(written, h, g2)


def test_merges_that_start_a_statement_name_all_their_operands(cnn):
    """A merge right after the input, or after a tensor that had to be named, starts a statement, where
    it takes only the tensors it names: its first operand is named too (`add(input, input)`)."""
    g = check(cnn("""
        input 8x8x8
        layers:
            t0 = in -> add(in)
            t1 = t0 -> identity
            t2 = concat(in, t0) -> conv 8 1x1
            t3 = t2 -> mul(t2)
            concat(t1, t3) -> gap
    """))
    for blocks in (False, True):
        text = write_cnn(imported_like(g), blocks)
        assert "x1 = add(input, input)\n" in text and "x4 = mul(x3, x3)\n" in text
        assert_same_graph(g, recheck(text))


# ---- random networks -------------------------------------------------------------------------------

BLOCK_BODIES = [
    ["conv 8 3x3 pad=1 -> relu", "conv 8 1x1 -> add(in)"],  # a residual
    ["a = conv 4 1x1", "b = in -> conv 4 3x3 pad=1", "concat(a, b)"],  # two branches joined
    ["a, b = in -> split", "b = b -> conv 4 1x1 -> relu", "concat(b, a)"],  # a split
    ["x = in", "gap -> conv 2 1x1 -> relu -> conv 8 1x1 -> sigmoid -> mul(x)"],  # a gate
    ["short = in -> conv 8 1x1 -> bn", "in -> conv 4 3x3 pad=1 -> relu -> conv 8 1x1 -> add(short) -> relu"],
]
LAYERS = ["relu", "bn", "conv 8 3x3 pad=1", "conv 8 1x1 bias=false", "identity", "dropout 0.1", "tanh",
          "maxpool 3x3 stride=1 pad=1"]


def random_network(rng, local: bool) -> str:
    """8 channels throughout: layers, block calls (repeated), merges with recent tensors (local) or any."""
    blocks = rng.sample(range(len(BLOCK_BODIES)), rng.randint(0, 3))
    lines = [f"block b{i}():\n" + "".join(f"    {s}\n" for s in BLOCK_BODIES[i]) for i in blocks]
    lines += ["input 8x8x8", "layers:"]
    tensors, cur = ["in"], "in"
    for i in range(rng.randint(3, 24)):
        pick = (lambda: rng.choice(tensors[-2:])) if local else (lambda: rng.choice(tensors))
        r = rng.random()
        if r < (0.6 if local else 0.3) and blocks:
            repeat = f" * {rng.randint(1, 3)}" if rng.random() < 0.3 else ""
            lines.append(f"    t{i} = {cur} -> b{rng.choice(blocks)}(){repeat}")
        elif r < 0.7:
            lines.append(f"    t{i} = {cur} -> " + rng.choice(LAYERS + [f"add({pick()})", f"mul({pick()})"]))
        else:
            lines.append(f"    t{i} = concat({pick()}, {pick()}) -> conv 8 1x1")
        tensors.append(f"t{i}")
        cur = tensors[-1] if local or rng.random() < 0.5 else rng.choice(tensors[-3:])
    lines.append(f"    {tensors[-1]} -> gap -> dense 3")
    return "\n".join(lines) + "\n"


def check_random_networks(seed: int, count: int) -> None:
    import random

    rng = random.Random(seed)
    for k in range(count):
        source = random_network(rng, local=k % 2 == 1)
        g = recheck(source)
        for h in (g, imported_like(g)):
            for blocks in (True, False):
                written = write(h, blocks)
                try:
                    g2 = recheck(written.text)
                    assert_same_graph(g, g2)
                    assert_names_predicted(written, h, g2)
                except Exception as exc:
                    raise AssertionError(f"network {k} of seed {seed}:\n{source}\nwritten as:\n{written.text}") from exc


def test_random_networks_round_trip():
    check_random_networks(seed=0, count=16)


@pytest.mark.slow
def test_random_networks_round_trip_many():
    check_random_networks(seed=1, count=400)
