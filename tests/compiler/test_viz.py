"""`cnnc viz`: the DOT text (no Graphviz needed), and the SVG and PNG Graphviz makes of the example
networks: one cluster per block instance, shortcut and dense edges with their own style, tensor
shapes on the edges. Tests that run Graphviz skip, saying so, where `dot` is not installed."""

from __future__ import annotations

import re
import shutil
import xml.etree.ElementTree as ET
from importlib import resources

import pytest

from cnnc.compiler import viz
from cnnc.compiler.pipeline import check
from cnnc.runtime.viz import load_graph
from conftest import EXAMPLES, run_cli

needs_dot = pytest.mark.skipif(shutil.which("dot") is None,
                               reason="Graphviz's `dot` is not installed (apt-get install graphviz)")
SVG = "{http://www.w3.org/2000/svg}"
NETS = ["googlenet_2014", "resnet50", "densenet121"]


@pytest.fixture(scope="module")
def graphs():
    return {name: check(EXAMPLES / f"{name}.cnn") for name in NETS}


def block_keys(g) -> set[str]:
    return {".".join(p) for p in g.graph["blocks"]}


# ---- facts -----------------------------------------------------------------------------------

def test_shortcuts_one_per_residual_block(graphs):
    kinds = viz.classify_edges(graphs["resnet50"])
    shortcuts = [e for e, k in kinds.items() if k == "shortcut"]
    assert len(shortcuts) == 16  # 3 + 4 + 6 + 3 bottlenecks, one add each
    g = graphs["resnet50"]
    for u, v, _ in shortcuts:
        assert g.nodes[v]["op"] == "add"
        # the shortcut is the projection (bn of a 1x1 conv) or the block input, never the chain's own bn
        assert g.nodes[u]["path"] != g.nodes[v]["path"] or g.nodes[u]["local_name"] == "bn1"


def test_dense_edges_are_concat_inputs(graphs):
    kinds = viz.classify_edges(graphs["densenet121"])
    assert sum(k == "dense" for k in kinds.values()) == 2 * (6 + 12 + 24 + 16)
    kinds = viz.classify_edges(graphs["googlenet_2014"])
    assert sum(k == "dense" for k in kinds.values()) == 4 * 9
    assert not any(k == "shortcut" for k in kinds.values())


def test_shortcut_found_whichever_order_the_branches_are_written(cnn):
    path = cnn("""
        network t
        input 3x8x8
        layers:
            x = conv 4 3x3 pad=1
            main = x -> conv 4 3x3 pad=1 -> relu -> conv 4 3x3 pad=1
            add(x, main)
        """)
    g = check(path)
    short = [(g.nodes[u]["name"], g.nodes[v]["op"]) for (u, v, _), k in viz.classify_edges(g).items()
             if k == "shortcut"]
    assert short == [("conv1", "add")]


def test_block_infos_inputs_output_params(graphs):
    g = graphs["googlenet_2014"]
    infos = viz.block_infos(g)
    info = infos[("inception1",)]
    assert info.layers == 14 and info.block == "inception"
    assert [g.nodes[u]["name"] for u in info.inputs] == ["maxpool2"]
    assert g.nodes[info.output]["shape"] == (256, 28, 28)
    assert info.params == sum(g.nodes[n]["params"] for n in g if g.nodes[n]["path"][:1] == ("inception1",))


# ---- the DOT text ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NETS)
def test_dot_one_cluster_per_block_instance(graphs, name):
    g = graphs[name]
    text = viz.to_dot(g)
    clusters = set(re.findall(r'subgraph "cluster_([^"]+)"', text))
    assert clusters == block_keys(g)
    assert text.count("subgraph ") == len(g.graph["blocks"])
    # every layer is a node, with its output shape
    assert len(re.findall(r"^\s*n\d+ \[", text, re.M)) == g.number_of_nodes()


def test_dot_nested_clusters_nest(graphs):
    text = viz.to_dot(graphs["resnet50"])
    outer = text.index('subgraph "cluster_stage1" {')
    inner = text.index('subgraph "cluster_stage1.bottleneck1" {')
    nxt = text.index('subgraph "cluster_stage2" {')
    assert outer < inner < nxt
    # stage1's brace closes after its bottlenecks
    depth = 0
    for ch in text[outer:nxt]:
        depth += ch == "{"
        depth -= ch == "}"
    assert depth == 0


def test_dot_labels_name_block_args_and_params(graphs):
    text = viz.to_dot(graphs["googlenet_2014"])
    assert "inception1 = inception(c1=64, c3r=96, c3=128, c5r=16, c5=32, pp=32)" in text
    assert "164K params, 14 layers" in text
    assert "conv 7x7/2 64 pad 3" in text  # kernel, stride, filters, pad
    assert "64×112×112" in text


def test_dot_groups_shown(cnn):
    g = check(cnn("network t\ninput 8x8x8\nlayers:\n    conv 8 3x3 groups=4 pad=1 -> relu\n"))
    assert "conv 3x3 8 g4 pad 1" in viz.to_dot(g)


def test_dot_collapse_and_depth(graphs):
    g = graphs["resnet50"]
    text = viz.to_dot(g, viz.VizOptions(depth=0))
    assert "subgraph" not in text
    blocks = re.findall(r'^\s*"block-([^"]+)" \[', text, re.M)
    assert blocks == ["stage1", "stage2", "stage3", "stage4"]
    assert "64×56×56 → 256×56×56" in text and "216K params" in text
    text = viz.to_dot(g, viz.VizOptions(depth=1))
    assert set(re.findall(r'subgraph "cluster_([^"]+)"', text)) == {"stage1", "stage2", "stage3", "stage4"}
    assert len(re.findall(r'^\s*"block-([^"]+)" \[', text, re.M)) == 16
    # edges between collapsed instances are not repeated
    edges = re.findall(r'^\s*("[^"]+"|n\d+) -> ("[^"]+"|n\d+)', text, re.M)
    assert len(edges) == len(set(edges))


def test_dot_options(graphs):
    g = graphs["resnet50"]
    text = viz.to_dot(g, viz.VizOptions(rankdir="LR", shapes=False, params=False, tooltips=False))
    assert "rankdir=LR" in text
    assert "×" not in text.replace("3×224×224 → 1000", "")  # the title keeps the network's input → output
    assert " params" not in text


def test_dot_concat_inputs_in_order(graphs):
    text = viz.to_dot(graphs["googlenet_2014"])
    labels = re.findall(r'class="dense" [^\]]*label="#(\d) ', text)
    assert labels[:4] == ["1", "2", "3", "4"]
    assert "ordering=in" in text


def test_dot_fused_nodes_at_O2():
    g = load_graph(EXAMPLES / "resnet50.cnn", opt_level=2)
    text = viz.to_dot(g)
    assert "[conv + bn + relu]" in text and "[conv + bn + add + relu]" in text
    assert "fused" in text
    # the fused residual input is still drawn as a shortcut
    assert len(re.findall(r'class="shortcut"', text)) == 16


def test_dot_output_needs_no_graphviz(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    out = tmp_path / "g.dot"
    r = run_cli("viz", str(EXAMPLES / "googlenet_2014.cnn"), "-o", str(out))
    assert r.code == 0, r.err
    assert out.read_text().startswith('digraph "googlenet_2014"')
    r = run_cli("viz", str(EXAMPLES / "googlenet_2014.cnn"), "-o", str(tmp_path / "g.svg"))
    assert r.code == 1 and "Traceback" not in r.err
    assert "Graphviz" in r.err and "apt-get install graphviz" in r.err


def test_unknown_format_is_a_user_error(tmp_path):
    r = run_cli("viz", str(EXAMPLES / "lenet5.cnn"), "-o", str(tmp_path / "x.gif"))
    assert r.code == 1 and "cannot tell the output format" in r.err


def test_assets_ship_with_the_package():
    folder = resources.files("cnnc.compiler").joinpath("viz_assets")
    assert folder.joinpath("viz.js").read_text(encoding="utf-8").strip()
    assert folder.joinpath("viz.css").read_text(encoding="utf-8").strip()


# ---- Graphviz output -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    if shutil.which("dot") is None:
        pytest.skip("Graphviz's `dot` is not installed (apt-get install graphviz)")
    out = tmp_path_factory.mktemp("viz")
    files = {}
    for name in NETS:
        for fmt in ("svg", "png"):
            path = out / f"{name}.{fmt}"
            r = run_cli("viz", str(EXAMPLES / f"{name}.cnn"), "-o", str(path))
            assert r.code == 0, r.err
            files[name, fmt] = path
    return files


def _classes(el) -> set[str]:
    return set((el.get("class") or "").split())


def _svg(path):
    return ET.parse(path).getroot()


@needs_dot
@pytest.mark.parametrize("name", NETS)
def test_svg_one_cluster_per_block_instance(rendered, graphs, name):
    root = _svg(rendered[name, "svg"])
    clusters = [g for g in root.iter(f"{SVG}g") if "cluster" in _classes(g)]
    g = graphs[name]
    assert len(clusters) == len(g.graph["blocks"])
    titles = {c.find(f"{SVG}title").text for c in clusters}
    assert titles == {f"cluster_{k}" for k in block_keys(g)}
    assert {c.get("id") for c in clusters} == {f"cluster-{k}" for k in block_keys(g)}
    assert all("block" in _classes(c) for c in clusters)
    nodes = [n for n in root.iter(f"{SVG}g") if "node" in _classes(n)]
    assert len(nodes) == g.number_of_nodes()
    assert {n.get("id") for n in nodes} == {f"node-{d['name']}" for _, d in g.nodes(data=True)}


@needs_dot
def test_svg_shortcut_edges_styled(rendered):
    root = _svg(rendered["resnet50", "svg"])
    edges = [e for e in root.iter(f"{SVG}g") if "edge" in _classes(e)]
    short = [e for e in edges if "shortcut" in _classes(e)]
    assert len(short) == 16
    for e in short:
        path = e.find(f".//{SVG}path")
        assert path.get("stroke") == "#d62728"
        assert path.get("stroke-dasharray")  # dashed
        assert re.fullmatch(r"edge-\d+-\d+-\d+", e.get("id"))
        labels = [t.text for t in e.iter(f"{SVG}text")]
        assert labels and re.fullmatch(r"\d+×\d+×\d+", labels[0])
    flow = [e for e in edges if "flow" in _classes(e)]
    assert flow and all(e.find(f".//{SVG}path").get("stroke") == "#666666" for e in flow)
    assert not any(e.find(f".//{SVG}path").get("stroke-dasharray") for e in flow)


@needs_dot
@pytest.mark.parametrize("name,count", [("densenet121", 116), ("googlenet_2014", 36)])
def test_svg_dense_edges_styled(rendered, name, count):
    root = _svg(rendered[name, "svg"])
    dense = [e for e in root.iter(f"{SVG}g") if "dense" in _classes(e)]
    assert len(dense) == count
    for e in dense:
        assert e.find(f".//{SVG}path").get("stroke") == "#2b8a3e"
        assert re.fullmatch(r"#\d+ \d+×\d+×\d+", e.find(f".//{SVG}text").text)


@needs_dot
@pytest.mark.parametrize("name", NETS)
def test_svg_edges_carry_shapes(rendered, graphs, name):
    root = _svg(rendered[name, "svg"])
    g = graphs[name]
    edges = [e for e in root.iter(f"{SVG}g") if "edge" in _classes(e)]
    assert len(edges) == g.number_of_edges()
    for e in edges:
        u = int(e.get("id").split("-")[1])
        text = " ".join(t.text for t in e.iter(f"{SVG}text"))
        assert viz.shape_text(g.nodes[u]["shape"]) in text


@needs_dot
@pytest.mark.parametrize("name", NETS)
def test_png_written(rendered, name):
    data = rendered[name, "png"].read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 300 and height > 1000


@needs_dot
def test_collapsed_svg_has_block_nodes(tmp_path):
    out = tmp_path / "g.svg"
    r = run_cli("viz", str(EXAMPLES / "googlenet_2014.cnn"), "--collapse", "-o", str(out))
    assert r.code == 0, r.err
    root = _svg(out)
    assert not [g for g in root.iter(f"{SVG}g") if "cluster" in _classes(g)]
    blocks = [g for g in root.iter(f"{SVG}g") if "collapsed" in _classes(g)]
    assert [b.get("id") for b in blocks] == [f"block-inception{i}" for i in range(1, 10)]
    text = " ".join(t.text or "" for t in blocks[0].iter(f"{SVG}text"))
    assert "192×28×28 → 256×28×28" in text and "164K params" in text


@needs_dot
def test_pdf_written(tmp_path):
    out = tmp_path / "g.pdf"
    r = run_cli("viz", str(EXAMPLES / "lenet5.cnn"), "-o", str(out), "--rankdir", "lr")
    assert r.code == 0, r.err
    assert out.read_bytes()[:5] == b"%PDF-"
