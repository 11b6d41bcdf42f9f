"""PyTorch state dicts in and out without pickle: safetensors files matched to a network's layers.

`import_state` reads a state dict saved with `safetensors.torch.save_file` (torchvision's or
timm's names, or any other) and assigns its tensors to our layers; `export_state` writes our
weights under torchvision's names and layouts, so that `torchvision.models.X().load_state_dict`
takes them with `strict=True`.

Matching. Their tensors are grouped into modules (the key up to `.weight`, `.bias`,
`.running_mean`, ...); ours are grouped by layer, with the names and shapes of the op table's
ParamSpecs, which are PyTorch's (dense weights are (out, in) on both sides). A safetensors file
keeps no order (its keys come back sorted), so the order is rebuilt from their module tree and
ours is the graph's: our layers are taken in order, each assigned a module of theirs with the same
tensor names and shapes (trailing 1-sized axes aside: a Linear is a 1x1 conv) such that

- a module subtree once left is complete (state dicts are written module by module),
- a BatchNorm reading a conv's output sits beside that conv (`bn1` by `conv1`,
  `downsample.1` by `downsample.0`): they share a parent module, and
- siblings of one numbered family (`conv1` < `conv2`, `layer1` < `layer2`, `0` < `1`) are
  entered in number order, while differently named siblings may come in any order (our ResNets
  write the projection shortcut before the main path, torchvision registers `downsample` last).

A bare nn.Parameter (ConvNeXt's `features.1.0.layer_scale`) is a module of its own, its tensor
called `weight` as our op table calls it. A choice that leads nowhere is taken back (depth-first
search, bounded). Once an assignment is found, a second one that differs within a few layers is
looked for: equal shapes that the names cannot order (a ResNet-50 written with the shortcut last:
`layer1.0.conv3` and `layer1.0.downsample.0` are both 256×64×1×1) give a note saying which was
taken (the first by name among the nearest, torchvision's order there). Where no assignment
exists, the error names our layer (with its line in the .cnn file) and the modules of theirs that
could have come next, with their shapes. Integer buffers (`num_batches_tracked`) are ignored on
import and written on export.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cnnc.compiler.ops import OPS
from cnnc.dsl.errors import CnncError

IGNORED_SUFFIXES = ("num_batches_tracked",)  # integer bookkeeping of torch's BatchNorm, no weights
MODULE_TENSORS = ("weight", "bias", "running_mean", "running_var")  # what torch's layers call their tensors
MAX_STEPS = 200_000  # the search's bound: a mismatch is reported, never searched for minutes
AMBIGUITY_STEPS = 50_000  # the bound on looking for a second assignment once one is found
LOCAL_SPAN = 16  # a second assignment that differs within this many consecutive layers is reported


def _safetensors():
    try:
        import safetensors.numpy as st
    except ImportError:
        raise CnncError("reading and writing PyTorch state dicts needs the safetensors package",
                        hint="pip install 'cnnc[safetensors]'") from None
    return st


def fmt(shape) -> str:
    return "×".join(map(str, shape)) if len(shape) else "scalar"


def _squeezed(shape) -> tuple[int, ...]:
    """The shape without trailing 1-sized axes: (K, C, 1, 1) and (K, C) are one layout."""
    s = tuple(shape)
    while len(s) > 1 and s[-1] == 1:
        s = s[:-1]
    return s


def _signature(tensors: dict[str, tuple]) -> tuple:
    return tuple(sorted((k, _squeezed(v)) for k, v in tensors.items()))


# ---- the two sides ---------------------------------------------------------------------------

@dataclass
class Layer:
    """One of our layers with parameters."""
    name: str
    op: str
    node: int
    shapes: dict[str, tuple[int, ...]]  # ParamSpec name → shape, in the op table's order
    span: object = None
    pairs_with: str | None = None  # the weighted layer whose output this BatchNorm reads: their modules are siblings

    def describe(self) -> str:
        return f"`{self.name}` ({self.op}, {_tensors_text(self.shapes)})"


@dataclass
class Module:
    """One module of theirs: the tensors whose keys share a prefix."""
    name: str
    tensors: dict[str, np.ndarray]
    path: tuple[str, ...] = ()
    bare: bool = False  # one nn.Parameter of its parent, its key the module's name, its tensor called weight here

    def key(self, leaf: str) -> str:
        """The state-dict key of one of its tensors."""
        return self.name if self.bare else f"{self.name}.{leaf}" if self.name else leaf

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.tensors.items()}

    @property
    def kind(self) -> str:
        return "parameter" if self.bare else torch_kind(self.shapes)

    def describe(self) -> str:
        return f"`{self.name}` ({self.kind}, {_tensors_text(self.shapes)})"


def torch_kind(s: dict[str, tuple]) -> str:
    """What a module's tensor set says it is in PyTorch, for the report."""
    if "running_mean" in s and "running_var" in s:
        return "batchnorm"
    w = s.get("weight")
    if w is None:
        return "tensors"
    return {4: "conv", 2: "linear", 1: "norm" if "bias" in s else "scale"}.get(len(w), "tensors")


def _tensors_text(shapes: dict[str, tuple]) -> str:
    """`weight 64×3×7×7`; tensors of one shape together: `weight, bias, running_mean, running_var 64`."""
    by_shape: dict[tuple, list[str]] = {}
    for k, v in shapes.items():
        by_shape.setdefault(tuple(v), []).append(k)
    return "; ".join(f"{', '.join(ks)} {fmt(s)}" for s, ks in by_shape.items())


def our_layers(graph) -> list[Layer]:
    """Our layers with parameters, in graph order (the order our weights files use)."""
    out = []
    for n, d in graph.nodes(data=True):
        if not d.get("param_specs"):
            continue
        layer = Layer(d["name"], d["op"], n, {s.name: tuple(s.shape) for s in d["param_specs"]}, d.get("span"))
        preds = list(graph.predecessors(n))
        running = any(s.buffer for s in d["param_specs"])  # a BatchNorm: statistics as buffers
        if OPS[d["op"]].kind == "norm" and running and len(preds) == 1 and graph.nodes[preds[0]].get("param_specs"):
            layer.pairs_with = graph.nodes[preds[0]]["name"]
        out.append(layer)
    return out


def read_state(path: Path) -> tuple[list[Module], dict[str, np.ndarray]]:
    """Their modules (in key order) and the integer buffers left out, of a safetensors file."""
    st = _safetensors()
    path = Path(path)
    if not path.exists():
        raise CnncError(f"state dict not found: {path}")
    if not path.is_file():
        raise CnncError(f"{path} is not a file: not a safetensors state dict")
    try:
        arrays = st.load_file(str(path))
    except OSError as exc:
        raise CnncError(f"could not read {path}: {exc.strerror or exc}") from None
    except Exception as exc:  # safetensors raises its own error types for a damaged or foreign file
        raise CnncError(f"{path} is not a safetensors file ({exc.__class__.__name__}: {exc})",
                        hint="save the state dict with safetensors.torch.save_file(model.state_dict(), PATH)") from None
    if not arrays:
        raise CnncError(f"{path} holds no tensors")
    groups: dict[str, dict[str, np.ndarray]] = {}
    bare: set[str] = set()
    ignored = {}
    for key in sorted(arrays):
        prefix, _, leaf = key.rpartition(".")
        a = arrays[key]
        if leaf in IGNORED_SUFFIXES or a.dtype.kind in "iub":
            ignored[key] = a
            continue
        if a.dtype.kind != "f":
            raise CnncError(f"{path}: `{key}` holds {a.dtype} values, not floating-point numbers")
        with np.errstate(all="ignore"):
            a32 = a.astype(np.float32)
        if not np.isfinite(a32).all():
            raise CnncError(f"{path}: `{key}` holds a value that is not a finite float32")
        if leaf not in MODULE_TENSORS:  # a bare nn.Parameter (ConvNeXt's `layer_scale`): a module of its own
            prefix, leaf = key, "weight"
            bare.add(key)
        groups.setdefault(prefix, {})[leaf] = a32
    return [Module(k, v, tuple(k.split(".")) if k else (), k in bare) for k, v in groups.items()], ignored


# ---- matching --------------------------------------------------------------------------------

_NUMBERED = re.compile(r"^(.*?)(\d+)$")


def _family(part: str) -> tuple[str, int | None]:
    m = _NUMBERED.match(part)
    return (m.group(1), int(m.group(2))) if m else (part, None)


class _Tree:
    """Their module tree: per node (a path prefix) the number of modules below it and how many are
    assigned; per parent its children by numbered family."""

    def __init__(self, modules: list[Module]):
        self.total: dict[tuple, int] = {}
        self.done: dict[tuple, int] = {}
        self.families: dict[tuple, dict[str, list[tuple[int, tuple]]]] = {}
        for m in modules:
            for d in range(len(m.path) + 1):
                node = m.path[:d]
                if node not in self.total and d > 0:
                    fam, num = _family(node[-1])
                    if num is not None:
                        self.families.setdefault(node[:-1], {}).setdefault(fam, []).append((num, node))
                self.total[node] = self.total.get(node, 0) + 1
                self.done.setdefault(node, 0)

    def complete(self, node: tuple) -> bool:
        return self.done[node] == self.total[node]

    def mark(self, path: tuple, step: int) -> None:
        for d in range(len(path) + 1):
            self.done[path[:d]] += step

    def allowed(self, last: tuple | None, path: tuple) -> bool:
        """May the module at `path` come right after the one at `last`?"""
        common = 0
        if last is not None:
            while common < min(len(last), len(path)) and last[common] == path[common]:
                common += 1
            for d in range(len(last), common, -1):  # every subtree left behind must be complete
                if not self.complete(last[:d]):
                    return False
        for d in range(common + 1, len(path) + 1):  # every subtree entered must be new, its elder siblings done
            node = path[:d]
            if self.done[node]:
                return False
            fam, num = _family(node[-1])
            if num is not None:
                for other_num, other in self.families[node[:-1]][fam]:
                    if other_num < num and not self.complete(other):
                        return False
        return True

    def next_modules(self, last: tuple | None, modules: list[Module], used: set[int]) -> list[Module]:
        return [m for i, m in enumerate(modules) if i not in used and self.allowed(last, m.path)]


def _closeness(last: tuple | None, path: tuple) -> int:
    """How deep the two paths agree: the nearer module is tried first."""
    if last is None:
        return 0
    n = 0
    while n < min(len(last), len(path)) and last[n] == path[n]:
        n += 1
    return n


def match(layers: list[Layer], modules: list[Module], source: str, target: str,
          notes: list[str] | None = None) -> list[tuple[Layer, Module]]:
    """Each of our layers with its module of theirs, in our order; a CnncError where none fits. Where a
    second assignment fits as well, a note saying where the two part goes to `notes`."""
    notes = [] if notes is None else notes
    tree = _Tree(modules)
    by_sig: dict[tuple, list[int]] = {}
    for i, m in enumerate(modules):
        by_sig.setdefault(_signature(m.shapes), []).append(i)
    chosen: list[int] = []
    options: list[list[int]] = []
    used: set[int] = set()
    furthest = None  # (layer index, assignments so far, modules that could come next) at the deepest dead end
    steps = 0

    def last_path():
        return modules[chosen[-1]].path if chosen else None

    index = {x.name: k for k, x in enumerate(layers)}

    def candidates(k: int) -> list[int]:
        last = last_path()
        found = [i for i in by_sig.get(_signature(layers[k].shapes), ()) if i not in used
                 and tree.allowed(last, modules[i].path)]
        partner = index.get(layers[k].pairs_with)
        if partner is not None and partner < len(chosen):
            parent = modules[chosen[partner]].path[:-1]
            found = [i for i in found if modules[i].path[:-1] == parent]
        return sorted(found, key=lambda i: (_closeness(last, modules[i].path), -i))  # pop() takes the nearest

    def take(i: int) -> None:
        chosen.append(i)
        used.add(i)
        tree.mark(modules[i].path, 1)

    def undo() -> None:
        i = chosen.pop()
        used.discard(i)
        tree.mark(modules[i].path, -1)

    def search(limit: int) -> bool:
        """Run the search on from its state until a whole assignment (True) or the end or the limit."""
        nonlocal furthest, steps
        while options and steps < limit:
            steps += 1
            if options[-1]:
                take(options[-1].pop())
                if len(chosen) == len(layers):
                    return True
                options.append(candidates(len(chosen)))
                continue
            k = len(options) - 1
            if furthest is None or k > furthest[0]:
                furthest = (k, list(chosen), tree.next_modules(last_path(), modules, used))
            options.pop()
            if chosen:
                undo()
        return False

    if layers:
        options.append(candidates(0))
    found = search(MAX_STEPS)
    if found:  # is it the only one? an equal-shaped module nearby may fit as well
        first = list(chosen)
        limit = steps + AMBIGUITY_STEPS
        undo()
        while search(limit):
            differ = [j for j, (a, b) in enumerate(zip(first, chosen)) if a != b]
            # two runs of modules that may trade places (ResNet-50's layer1.0.conv3 and downsample.0);
            # far-reaching reassignments (every BatchNorm moved on by one) read no real network
            if differ[-1] - differ[0] < LOCAL_SPAN:
                k = differ[0]
                notes.append(f"ambiguous: our layer `{layers[k].name}` fits their `{modules[first[k]].name}` and "
                             f"`{modules[chosen[k]].name}` alike (same shapes, and the state dict keeps no order); "
                             f"took `{modules[first[k]].name}`, the first by name among the nearest")
                break
            undo()
        chosen[:] = first
    if not found:
        k, so_far, nxt = furthest or (0, [], [])
        layer = layers[k]
        after = f" after `{layers[k - 1].name}` ↔ `{modules[so_far[k - 1]].name}`" if k else ""
        if nxt:
            theirs = "; ".join(m.describe() for m in nxt[:4]) + (f"; and {len(nxt) - 4} more" if len(nxt) > 4 else "")
            msg = (f"{source} does not fit {target}: our layer {layer.describe()} has no counterpart there"
                   f"{after}; the modules of theirs that may come next are {theirs}")
        else:
            msg = (f"{source} does not fit {target}: our layer {layer.describe()} has no counterpart there"
                   f"{after}: every module of theirs is taken")
        raise CnncError(msg + (" (the search stopped at its step limit)" if not found and steps >= MAX_STEPS else ""),
                        span=layer.span,
                        hint=f"{len(modules)} weighted modules there, {len(layers)} layers with parameters here; "
                             "is it the state dict of another network or variant?")
    if len(modules) > len(layers):
        rest = [m for i, m in enumerate(modules) if i not in set(chosen)]
        raise CnncError(f"{source} does not fit {target}: {len(rest)} of its modules have no layer here: "
                        + "; ".join(m.describe() for m in rest[:4]) + (" ..." if len(rest) > 4 else ""),
                        hint=f"{len(modules)} weighted modules there, {len(layers)} layers with parameters here")
    return [(layers[k], modules[i]) for k, i in enumerate(chosen)]


# ---- torchvision's names, from our graph -----------------------------------------------------

def _kind(layer: Layer) -> str:
    return OPS[layer.op].kind


def _instances(graph, layers: list[Layer]):
    """(layers before the first block instance, [(instance path, its layers)], layers after the last)."""
    before, after, blocks = [], [], {}
    for layer in layers:
        path = tuple(graph.nodes[layer.node].get("path", ()))
        if path:
            if after:
                raise _layout(graph, f"layer `{layer.name}` comes after `{after[0].name}`, outside every block")
            blocks.setdefault(path, []).append(layer)
        else:
            (after if blocks else before).append(layer)
    return before, list(blocks.items()), after


def _layout(graph, why: str) -> CnncError:
    return CnncError(f"network `{graph.graph['network']}` does not have the layout torchvision's names are written "
                     f"for: {why}", hint="export with --names cnnc, or name the tensors after a reference state dict "
                                         "with --like REF.safetensors")


def _expect(graph, layers: list[Layer], kinds: tuple[str, ...], where: str) -> None:
    got = tuple(_kind(x) for x in layers)
    if got != kinds:
        raise _layout(graph, f"{where} has layers of kinds ({', '.join(got) or 'none'}), "
                             f"torchvision's has ({', '.join(kinds)})")


def _stem_and_head(graph, before, after, stem, head):
    _expect(graph, before, ("conv", "norm"), "the stem")
    _expect(graph, after[-1:], ("dense",), "the classifier")
    return {before[0].name: stem[0], before[1].name: stem[1], after[-1].name: head}


def _resnet_names(graph, layers: list[Layer]) -> dict[str, str]:
    """torchvision.models.resnet: conv1, bn1, layerS.J.{convK, bnK, downsample.0, downsample.1}, fc."""
    before, blocks, after = _instances(graph, layers)
    _expect(graph, after, ("dense",), "the classifier")
    names = _stem_and_head(graph, before, after, ("conv1", "bn1"), "fc")
    stage, index, previous = 0, 0, None
    for path, inner in blocks:
        where = f"block instance `{'.'.join(path)}`"
        channels = inner[-1].shapes[next(iter(inner[-1].shapes))][0]
        if channels != previous:
            stage, index, previous = stage + 1, 0, channels
        else:
            index += 1
        prefix = f"layer{stage}.{index}"
        convs = [x for x in inner if _kind(x) == "conv"]
        if not convs or any(_kind(x) not in ("conv", "norm") for x in inner):
            raise _layout(graph, f"{where} is not a residual block of convs and BatchNorms")
        short = [x for x in convs if _reads_outside(graph, x, path) and _feeds_merge(graph, x)]
        main = [x for x in convs if x not in short]
        if len(short) > 1:
            raise _layout(graph, f"{where} has {len(short)} shortcut convs")
        conv_names = {x.name: f"{prefix}.conv{k}" for k, x in enumerate(main, 1)}
        conv_names.update({x.name: f"{prefix}.downsample.0" for x in short})
        names.update(conv_names)
        for x in inner:
            if _kind(x) == "norm":
                src = _producer(graph, x)
                if src not in conv_names:
                    raise _layout(graph, f"BatchNorm `{x.name}` does not follow a conv of its block")
                names[x.name] = conv_names[src].replace(".conv", ".bn").replace("downsample.0", "downsample.1")
    return names


def _densenet_names(graph, layers: list[Layer]) -> dict[str, str]:
    """torchvision.models.densenet: features.{conv0, norm0, denseblockB.denselayerL.{norm1, conv1, norm2,
    conv2}, transitionB.{norm, conv}, norm5}, classifier."""
    before, blocks, after = _instances(graph, layers)
    _expect(graph, after, ("norm", "dense"), "the end of the network")
    names = _stem_and_head(graph, before, after, ("features.conv0", "features.norm0"), "classifier")
    names[after[0].name] = "features.norm5"
    block, index = 1, 0
    for path, inner in blocks:
        kinds = tuple(_kind(x) for x in inner)
        if kinds == ("norm", "conv", "norm", "conv"):
            index += 1
            prefix = f"features.denseblock{block}.denselayer{index}"
            leaves = ("norm1", "conv1", "norm2", "conv2")
        elif kinds == ("norm", "conv"):
            prefix, leaves = f"features.transition{block}", ("norm", "conv")
            block, index = block + 1, 0
        else:
            raise _layout(graph, f"block instance `{'.'.join(path)}` has layers of kinds ({', '.join(kinds)}), "
                                 "neither a dense layer (norm, conv, norm, conv) nor a transition (norm, conv)")
        names.update({x.name: f"{prefix}.{leaf}" for x, leaf in zip(inner, leaves)})
    return names


def _producer(graph, layer: Layer) -> str | None:
    preds = list(graph.predecessors(layer.node))
    return graph.nodes[preds[0]]["name"] if len(preds) == 1 else None


def _reads_outside(graph, layer: Layer, path: tuple) -> bool:
    return all(tuple(graph.nodes[p].get("path", ()))[:len(path)] != path for p in graph.predecessors(layer.node))


def _feeds_merge(graph, layer: Layer) -> bool:
    """Whether the conv's output, through per-channel normalisation, reaches a merge (the residual add)."""
    node = layer.node
    while True:
        succ = list(graph.successors(node))
        if len(succ) != 1:
            return False
        kind = OPS[graph.nodes[succ[0]]["op"]].kind
        if kind == "merge":
            return True
        if kind != "norm":
            return False
        node = succ[0]


# network names of the families torchvision's names are written for
SCHEMES = [(re.compile(r"^(resnet\d+|resnext\d+_\d+x\d+d|wide_resnet\d+_\d+)$"), "ResNet", _resnet_names),
           (re.compile(r"^densenet\d+$"), "DenseNet", _densenet_names)]


def torchvision_names(graph, layers: list[Layer]) -> dict[str, str]:
    """Our layer name → torchvision's module name, for the families in SCHEMES."""
    network = graph.graph["network"]
    for pattern, _, scheme in SCHEMES:
        if pattern.match(network):
            return scheme(graph, layers)
    raise CnncError(f"torchvision names are known for the ResNet family (resnet18 ... resnet152, resnext50_32x4d) "
                    f"and DenseNets (densenet121, 169, 201), not for network `{network}`",
                    hint="export with --names cnnc, or name the tensors after a reference state dict saved from "
                         "the PyTorch model with --like REF.safetensors")


def has_torchvision_names(network: str) -> bool:
    return any(p.match(network) for p, _, _ in SCHEMES)


# ---- the commands ----------------------------------------------------------------------------

@dataclass
class Report:
    rows: list[tuple[str, str, str, str, str]] = field(default_factory=list)  # theirs, kind, shapes, ours, op
    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # ambiguities the search found

    def render(self) -> str:
        w = max((len(r[0]) for r in self.rows), default=10)
        v = max((len(r[2]) for r in self.rows), default=10)
        lines = [f"{'theirs':<{w}}  {'kind':<10} {'tensors':<{v}}  ours"]
        lines += [f"{a:<{w}}  {b:<10} {c:<{v}}  {d} ({e})" for a, b, c, d, e in self.rows]
        if self.ignored:
            leaves = sorted({k.rpartition('.')[2] for k in self.ignored})
            lines.append(f"ignored {len(self.ignored)} integer buffers ({', '.join(leaves)}), e.g. `{self.ignored[0]}`")
        return "\n".join(lines)


def import_state(cnn_path, state_path, out_path, import_roots=()) -> tuple[Report, object]:
    """Read a safetensors state dict, match it to the network's layers, write our weights file."""
    from .model import Model

    state_path = Path(state_path)
    modules, ignored = read_state(state_path)
    model = Model.load(cnn_path, import_roots=import_roots)
    layers = our_layers(model.graph)
    report = Report(ignored=list(ignored))
    pairs = match(layers, modules, str(state_path), f"network `{model.name}` ({cnn_path})", report.notes)
    host = {}
    for layer, module in pairs:
        for leaf, shape in layer.shapes.items():
            host[f"{layer.name}.{leaf}"] = module.tensors[leaf].reshape(shape)
        report.rows.append((module.name, module.kind, _tensors_text(module.shapes), layer.name, layer.op))
    model.set_params(host, str(state_path))
    model.save(out_path)
    return report, model


def load_checkpoint_into(model, checkpoint) -> None:
    """Our weights (a checkpoint.npz of `cnnc train`, or a file Model.save wrote) into the model."""
    from .checkpoint import parameters, read_npz

    checkpoint = Path(checkpoint)
    arrays, meta = read_npz(checkpoint)
    if meta.get("network") != model.name or meta.get("signature") not in (None, model.signature()):
        raise CnncError(f"{checkpoint} holds weights of network `{meta.get('network')}`, not `{model.name}`")
    model.set_params(parameters(arrays, checkpoint), str(checkpoint))


def export_state(cnn_path, checkpoint, out_path, names: str | None = None, like=None,
                 import_roots=()) -> tuple[Report, str]:
    """Write the checkpoint's weights as a safetensors state dict; returns the report and the naming used.
    names: "torchvision" (default where known), "cnnc" (our own names); `like`: a reference state dict
    whose names, shapes and integer buffers are taken."""
    from .model import Model

    st = _safetensors()
    model = Model.load(cnn_path, import_roots=import_roots)
    load_checkpoint_into(model, checkpoint)
    host = model.host_params()
    layers = our_layers(model.graph)
    out, report = {}, Report()
    if like is not None:
        modules, ignored = read_state(Path(like))
        for layer, module in match(layers, modules, str(like), f"network `{model.name}` ({cnn_path})", report.notes):
            for leaf in layer.shapes:
                out[module.key(leaf)] = host[f"{layer.name}.{leaf}"].reshape(module.shapes[leaf])
            report.rows.append((module.name, module.kind, _tensors_text(module.shapes), layer.name, layer.op))
        out.update(ignored)
        report.ignored = list(ignored)
        used = f"the names of {like}"
    else:
        if names is None:
            names = "torchvision" if has_torchvision_names(model.name) else "cnnc"
        table = torchvision_names(model.graph, layers) if names == "torchvision" else {x.name: x.name for x in layers}
        for layer in layers:
            theirs = table[layer.name]
            for leaf in layer.shapes:
                out[f"{theirs}.{leaf}"] = host[f"{layer.name}.{leaf}"]
            if names == "torchvision" and "running_mean" in layer.shapes:  # torch's BatchNorm2d has it
                out[f"{theirs}.num_batches_tracked"] = np.zeros((), np.int64)
            report.rows.append((theirs, torch_kind(layer.shapes), _tensors_text(layer.shapes), layer.name, layer.op))
        used = f"{names} names"
    payload = {k: np.asarray(v, order="C") for k, v in out.items()}  # ascontiguousarray would make scalars 1-D
    from .files import write_atomic
    data = st.save(payload, metadata={"format": "pt"})
    write_atomic(Path(out_path), lambda f: f.write(data))
    return report, used
