"""The `cnnc` command line.

Imports of the compiler are deferred into the command functions: `cnnc --help` must answer
fast. A user mistake prints `file:line:col: error: ...` with the source line and a caret, and
exits 1; never a traceback. Anything else is a bug in cnnc: it prints "internal error", the
traceback to report, and exits 70 (EX_SOFTWARE).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cnnc import __version__

EXIT_USER_ERROR = 1
EXIT_INTERNAL_ERROR = 70  # sysexits.h EX_SOFTWARE
ISSUES = "https://github.com/cnnc/cnnc/issues"


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def _memory_parent() -> argparse.ArgumentParser:
    m = argparse.ArgumentParser(add_help=False)
    m.add_argument("--max-memory", metavar="SIZE",
                   help="memory limit for the estimate checked before allocating (e.g. 8G, 512M, none); "
                        "default: the memory available now")
    return m


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cnnc",
        description="A compiler for convolutional neural networks written in the .cnn language.",
        epilog="Run `cnnc COMMAND --help` for a command's options. Language reference: docs/language.md.")
    p.add_argument("--version", action="version", version=f"cnnc {__version__}")
    p.add_argument("--autotune", choices=("off", "fast", "full"),
                   help="kernel choice by timing on first use (CUDA tile configurations, NumPy convolution "
                        "algorithms): off (heuristic), fast (3 candidates, default), full (all); choices are "
                        "cached in ~/.cache/cnnc/tuning.json (CNNC_TUNING_CACHE)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    mem = _memory_parent()

    c = sub.add_parser("check", help="check a .cnn file: shapes, parameters, MACs, memory, receptive fields",
                       description="Parse a .cnn file, infer every shape and count parameters, MACs, "
                                   "activation memory and receptive fields, layer by layer.")
    c.add_argument("file", nargs="?", help="the .cnn file (or a .onnx model)")
    c.add_argument("--batch", type=_positive, default=1,
                   help="batch size for MACs and activation memory (default 1)")
    c.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    c.add_argument("--explain", nargs="?", const="", metavar="LAYER",
                   help="instead of the table, the arithmetic of every layer's output size (the rounding and the "
                        "padding that makes it exact), parameter count and receptive field; or of one LAYER "
                        "(a dotted name or block instance)")
    c.add_argument("--import-root", action="append", default=[], metavar="DIR",
                   help="also allow imports from DIR (imports otherwise stay in the importing file's directory)")
    c.add_argument("--verify", action="store_true", help="check the graph invariants after every pass")
    c.set_defaults(run=_cmd_check)

    im = sub.add_parser("import", help="read an ONNX model and write it as a .cnn file (and its weights)",
                        description="Convert an ONNX model (opset 6 and up) into a .cnn file that checks to the same "
                                    "network, and its weights into a checkpoint that --checkpoint accepts.")
    im.add_argument("file", help="the .onnx model")
    im.add_argument("-o", "--output", metavar="OUT.cnn", help="the .cnn file to write (default: print it)")
    im.add_argument("--weights", metavar="WEIGHTS.npz",
                    help="also write the model's weights, as `cnnc eval/compile/train --checkpoint` read them")
    im.add_argument("--flat", action="store_true", help="write every layer, without recovering repeated blocks")
    im.set_defaults(run=_cmd_import)

    t = sub.add_parser("train", parents=[mem], help="train a network (default data: the embedded MNIST-5k digits)",
                       description="Train the network with the settings of its `train:` section; flags override "
                                   "them. Writes checkpoint.npz, metrics.jsonl and curves.png to the run directory.")
    t.add_argument("file", nargs="?", help="the .cnn file (optional with --resume)")
    t.add_argument("--data", help="dataset: mnist5k, FILE.npz, mnist:DIR, cifar10:DIR, folder:DIR or imagefolder:DIR")
    t.add_argument("-o", "--output", metavar="RUN_DIR", help="run directory (default runs/NETWORK[-N])")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its checkpoint")
    t.add_argument("--backend", default="numpy", help="backend to train on (default numpy)")
    t.add_argument("--weights", metavar="WEIGHTS.npz",
                   help="start from these weights (a checkpoint, or a file cnnc weights import wrote): fine-tuning")
    for flag, kind, text in [("--lr", float, "base learning rate"), ("--epochs", int, "number of epochs"),
                             ("--batch", int, "batch size"), ("--optimizer", str, "sgd, momentum, nesterov, adagrad, "
                              "rmsprop, adadelta, adam, adamw, ftrl or rprop"), ("--seed", int, "random seed"),
                             ("--momentum", float, "momentum"), ("--weight-decay", float, "L2 weight decay"),
                             ("--policy", str, "learning-rate policy"), ("--accumulate", int,
                              "accumulate gradients over this many batches"),
                             ("--precision", str, "conv and dense arithmetic: fp32, tf32, bf16 or fp16 (float32 "
                              "master weights; fp16 with dynamic loss scaling)")]:
        t.add_argument(flag, type=kind, help=text)
    t.add_argument("--workers", type=int, metavar="N", help="image-decoding processes for imagefolder: data "
                   "(default: the `workers` setting, else one per core but one; 0: in this process)")
    t.add_argument("--json", action="store_true", help="print a JSON summary on stdout (progress stays on stderr)")
    t.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard event files to the run directory (pip install 'cnnc[tensorboard]')")
    t.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    t.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="one run per value (per combination, when repeated) of a train setting, each in its own "
                        "directory under the run directory, then one figure and table of them all")
    t.add_argument("--jobs", type=_positive, default=1, metavar="N", help="with --sweep: N runs at once, "
                   "in separate processes (default 1)")
    t.set_defaults(run=_cmd_train)

    lf = sub.add_parser("lr-find", parents=[mem], help="the learning-rate range test: loss against an exponential "
                        "sweep of the rate, and a suggested rate",
                        description="Train for --steps batches from the current weights with the file's optimizer "
                                    "while the learning rate grows exponentially from --start to --end; stop when "
                                    "the smoothed loss exceeds 4x its best. Prints the rate of steepest descent "
                                    "of the smoothed loss and writes lr_find.png, .json and .csv. The weights and "
                                    "the optimizer state are left as they were.")
    lf.add_argument("file", nargs="?", help="the .cnn file (optional with --resume)")
    lf.add_argument("--data", help="dataset, as for cnnc train (default: the train section's, else mnist5k)")
    lf.add_argument("--start", type=float, default=1e-7, help="first learning rate (default 1e-7)")
    lf.add_argument("--end", type=float, default=10.0, help="last learning rate (default 10)")
    lf.add_argument("--steps", type=_positive, default=100, help="batches in the sweep (default 100)")
    lf.add_argument("-o", "--output", metavar="DIR", help="where to write the curve (default runs/NETWORK-lr-find)")
    lf.add_argument("--weights", metavar="WEIGHTS.npz", help="start from these weights")
    lf.add_argument("--resume", metavar="RUN_DIR", help="start from this run's checkpoint, with its optimizer state")
    lf.add_argument("--backend", default="numpy")
    for flag, kind, text in [("--batch", int, "batch size"), ("--optimizer", str, "optimizer"),
                             ("--momentum", float, "momentum"), ("--weight-decay", float, "L2 weight decay"),
                             ("--seed", int, "random seed"), ("--precision", str, "conv and dense arithmetic: "
                              "fp32, tf32, bf16 or fp16, as for cnnc train")]:
        lf.add_argument(flag, type=kind, help=text)
    lf.add_argument("--workers", type=int, metavar="N", help="image-decoding processes for imagefolder: data")
    lf.add_argument("--json", action="store_true", help="print the curve and the suggestion as one JSON object")
    lf.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    lf.set_defaults(run=_cmd_lr_find)

    rs = sub.add_parser("runs", help="compare run directories: a table of final metrics and one figure of curves",
                        description="Read the metrics.jsonl of each run directory and print final loss, accuracy "
                                    "and time side by side; draw their loss and accuracy curves in one figure.")
    rs.add_argument("dirs", nargs="+", metavar="DIR", help="run directories written by cnnc train")
    rs.add_argument("--plot", default="runs.png", metavar="OUT.png",
                    help="the figure to write (default runs.png; needs matplotlib)")
    rs.add_argument("--no-plot", action="store_true", help="only the table")
    rs.add_argument("--json", action="store_true", help="print one JSON list, one object per run")
    rs.set_defaults(run=_cmd_runs)

    k = sub.add_parser("compile", parents=[mem], help="optimise a network and write an executable artifact",
                       description="Run the pass pipeline (fusion, BatchNorm folding, memory planning) for a "
                                   "backend and write the plan, the weights and any generated kernels to OUT.")
    k.add_argument("file", help="the .cnn file (or a .onnx model)")
    k.add_argument("--backend", default="numpy", help="backend to compile for (default numpy)")
    k.add_argument("-O", dest="opt_level", type=int, choices=(0, 1, 2), default=2,
                   help="optimisation level: 0 no rewrites, 1 clean-ups, 2 folding and fusion (default)")
    k.add_argument("--checkpoint", help="weights from a checkpoint.npz (default: freshly initialised)")
    k.add_argument("-o", "--output", metavar="OUT", help="artifact directory to write")
    k.add_argument("--report", action="store_true", help="list every rewrite with its .cnn lines, and refusals")
    k.add_argument("--disable-pass", action="append", default=[], metavar="NAME", help="skip a pass")
    k.add_argument("--dump-after", action="append", default=[], metavar="NAME",
                   help="print the graph after a pass, one line per node")
    k.add_argument("--time-passes", action="store_true", help="print the time each pass took")
    k.add_argument("--verify", action="store_true", help="check the graph invariants after every pass")
    k.add_argument("--batch", type=_positive, default=1, help="batch size for the memory figures (default 1)")
    k.set_defaults(run=_cmd_compile)

    x = sub.add_parser("export", parents=[mem], help="write a network as an ONNX model, checked by onnx",
                       description="Write the network (its checkpoint's weights, or its initial ones) as an ONNX "
                                   "model with a symbolic batch dimension N, validated by onnx's full checker and "
                                   "strict shape inference before it is written. Needs `pip install 'cnnc[onnx]'`.")
    x.add_argument("file", help="the .cnn file")
    x.add_argument("--checkpoint", help="weights from a checkpoint.npz (default: the network's initial weights)")
    x.add_argument("-O", dest="opt_level", type=int, choices=(0, 1, 2), default=0,
                   help="graph to export: 0 as written, BatchNorm in inference form (default); 2 the optimised "
                        "inference graph, BatchNorm folded")
    x.add_argument("--opset", type=int, default=17, help="ONNX opset, 13 to 22 (default 17)")
    x.add_argument("-o", "--output", required=True, metavar="MODEL.onnx", help="the ONNX file to write")
    x.set_defaults(run=_cmd_export)

    r = sub.add_parser("run", parents=[mem], help="execute a compiled artifact on an input array")
    r.add_argument("artifact", help="directory written by cnnc compile")
    r.add_argument("--input", required=True, help="a .npy array, N×C×H×W (or one C×H×W item)")
    r.add_argument("-o", "--output", help="write the output array to this .npy file")
    r.set_defaults(run=_cmd_run)

    b = sub.add_parser("bench", parents=[mem], help="images/s and ms per step, per layer, against PyTorch or onnxruntime",
                       description="Time inference (the -O2 plan) or a training step; medians after warm-up.")
    b.add_argument("file", help="the .cnn file (or a .onnx model)")
    b.add_argument("--backend", default="numpy")
    b.add_argument("--batch", type=_positive, default=1)
    b.add_argument("--train", action="store_true", help="time a whole training step")
    b.add_argument("--layers", action="store_true", help="per-layer times, sorted, with GFLOP/s")
    b.add_argument("--vs", choices=("torch", "onnxruntime"),
                   help="time the same network in PyTorch, or its ONNX export in onnxruntime (inference), too")
    b.add_argument("--repeats", type=_positive, default=10)
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.add_argument("--ranks", action="store_true",
                   help="under mpiexec -n N: a data-parallel training step of --batch images shared by the ranks, "
                        "split into compute, waiting and allreduce")
    b.set_defaults(run=_cmd_bench)

    q = sub.add_parser("parity", parents=[mem], help="compare two backends layer by layer on the same weights and inputs")
    q.add_argument("file", help="the .cnn file (or a .onnx model)")
    q.add_argument("--backends", default="numpy,cuda", help="reference,other (default numpy,cuda)")
    q.add_argument("--batch", type=_positive, default=2)
    q.add_argument("--size", help="run at a smaller input, HxW (e.g. 64x64)")
    q.add_argument("--tolerance", type=float, default=1e-4, help="relative difference that flags a layer")
    q.add_argument("--local", action="store_true",
                   help="each layer on the reference's own inputs and output gradient: its kernels alone, without "
                        "the sign flips a ReLU makes of rounding differences in the whole network")
    q.set_defaults(run=_cmd_parity)

    v = sub.add_parser("viz", parents=[mem], help="draw a network's graph: SVG, PNG, PDF, DOT or an interactive HTML page",
                       description="Draw the graph with Graphviz: each block call a labelled cluster, edges with "
                                   "tensor shapes, residual shortcuts and concatenations in their own colours. The "
                                   "output's extension picks the format; .html writes one self-contained page "
                                   "with collapsible blocks, node details and search.")
    v.add_argument("file", help="the .cnn file (or a .onnx model)")
    v.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="OUT.svg, OUT.png, OUT.pdf, OUT.dot or OUT.html")
    v.add_argument("--format", choices=("svg", "png", "pdf", "dot", "html"), help="format (default: from OUT)")
    v.add_argument("--collapse", action="store_true", help="draw every block instance as a single node")
    v.add_argument("--depth", type=int, metavar="N",
                   help="draw N levels of block calls as clusters and deeper instances as single nodes")
    v.add_argument("-O", dest="opt_level", type=int, choices=(0, 1, 2), default=0,
                   help="draw the graph after this level's rewrites (2: fused nodes; default 0, as written)")
    v.add_argument("--rankdir", type=str.upper, choices=("TB", "LR"), default="TB",
                   help="layout direction: TB top to bottom (default), LR left to right")
    v.add_argument("--no-shapes", action="store_true", help="leave tensor shapes off edges and nodes")
    v.add_argument("--no-params", action="store_true", help="leave parameter counts off")
    v.add_argument("--import-root", action="append", default=[], metavar="DIR",
                   help="also allow imports from DIR")
    v.set_defaults(run=_cmd_viz)

    e = sub.add_parser("eval", parents=[mem], help="loss, accuracy and confusion matrix of a checkpoint")
    e.add_argument("file", help="the .cnn file (or a .onnx model)")
    e.add_argument("--checkpoint", required=True, help="checkpoint.npz written by cnnc train")
    e.add_argument("--data", help="dataset (default: the one the checkpoint was trained on)")
    e.add_argument("--backend", default="numpy")
    e.add_argument("--workers", type=int, metavar="N", help="image-decoding processes for imagefolder: data")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(run=_cmd_eval)

    w = sub.add_parser("weights", parents=[mem], help="PyTorch state dicts in and out (safetensors, no pickle)",
                       description="Bring trained weights from PyTorch (a safetensors state dict, torchvision's or "
                                   "timm's names) into a network, or write a network's weights for PyTorch.")
    wsub = w.add_subparsers(dest="weights_command", metavar="ACTION", required=True)
    wi = wsub.add_parser("import", parents=[mem], help="match a state dict to the network's layers, write our weights",
                         description="Match the state dict's modules to the network's layers by order, kind and "
                                     "shape (the names may be anyone's), print the mapping and write a weights "
                                     "file that --checkpoint, cnnc eval and cnnc train --weights accept.")
    wi.add_argument("file", help="the .cnn file")
    wi.add_argument("state", help="state dict saved with safetensors.torch.save_file")
    wi.add_argument("-o", "--output", metavar="WEIGHTS.npz", help="weights file to write (default: STATE with .npz)")
    wi.add_argument("-q", "--quiet", action="store_true", help="no mapping report")
    wi.set_defaults(run=_cmd_weights_import)
    we = wsub.add_parser("export", parents=[mem], help="write the weights as a PyTorch state dict (safetensors)",
                         description="Write a checkpoint's weights under torchvision's names and layouts (ResNets, "
                                     "ResNeXt, DenseNets), under our own names, or under a reference state dict's.")
    we.add_argument("file", help="the .cnn file")
    we.add_argument("--checkpoint", required=True, help="checkpoint.npz of cnnc train, or a weights file")
    we.add_argument("--names", choices=("torchvision", "cnnc"),
                    help="tensor names: torchvision's (the default where known) or ours")
    we.add_argument("--like", metavar="REF.safetensors",
                    help="take names, shapes and integer buffers from this state dict, matched as import does")
    we.add_argument("-o", "--output", required=True, metavar="STATE.safetensors", help="state dict to write")
    we.add_argument("-q", "--quiet", action="store_true", help="no mapping report")
    we.set_defaults(run=_cmd_weights_export)

    cmp = sub.add_parser("compare", help="several networks side by side: parameters, MACs, memory, depth, RF",
                         description="Check every .cnn file and print one row per network: parameters, "
                                     "buffers, MACs per image, depth (conv and dense layers on the longest "
                                     "path), receptive field, input size, and activation memory for inference "
                                     "(batch 1) and for a training step (the file's train batch).")
    cmp.add_argument("files", nargs="+", metavar="FILE", help="the .cnn files")
    cmp.add_argument("--batch", type=_positive, metavar="N",
                     help="batch for both memory figures (default: 1 for inference, each file's train batch "
                          "for training)")
    cmp.add_argument("--json", action="store_true", help="print a JSON list, one object of exact figures per network")
    cmp.add_argument("--plot", metavar="OUT.png",
                     help="also draw MACs against parameters, bubble area the inference memory (.png, .svg, .pdf; "
                          "needs matplotlib)")
    cmp.add_argument("--import-root", action="append", default=[], metavar="DIR",
                     help="also allow imports from DIR")
    cmp.set_defaults(run=_cmd_compare)

    o = sub.add_parser("ops", help="list the layers the language has, from the op table",
                       description="Every layer a .cnn file may use (aliases, arguments, defaults, counts, PyTorch "
                                   "and ONNX equivalents) and every element-wise formula with its derivative.")
    o.add_argument("name", nargs="?", help="one layer (or alias) to describe")
    o.add_argument("--json", action="store_true", help="print one JSON object")
    o.set_defaults(run=_cmd_ops)
    return p


def _cmd_ops(args) -> int:
    from cnnc.compiler import opdocs
    from cnnc.compiler.ops import OPS, lookup, user_op_names
    from cnnc.dsl.errors import CnncError, did_you_mean

    if args.name is not None:
        op = lookup(args.name)
        if op is None:
            raise CnncError(f"no layer named `{args.name}`", hint=did_you_mean(args.name, user_op_names()))
        names = [op.name]
    else:
        names = [n for n, op in OPS.items() if op.user]
    if args.json:
        print(json.dumps([opdocs.describe(n) for n in names], indent=2))
    elif args.name is not None:
        for k, v in opdocs.describe(names[0]).items():
            print(f"{k}: {v}")
    else:
        print(opdocs.summary() + "\n\n" + opdocs.activations())
    return 0


def _cmd_train(args) -> int:
    from cnnc.runtime import api

    overrides = {"lr": args.lr, "epochs": args.epochs, "batch": args.batch, "optimizer": args.optimizer,
                 "seed": args.seed, "momentum": args.momentum, "weight_decay": args.weight_decay,
                 "policy": args.policy, "accumulate": args.accumulate, "precision": args.precision}
    if args.sweep or args.jobs > 1:
        return _cmd_sweep(args, overrides)
    trainer, notes = api.prepare(args.file, run_dir=args.output, resume=args.resume, data=args.data,
                                 backend=args.backend, progress=not args.quiet, weights=args.weights,
                                 workers=args.workers, tensorboard=args.tensorboard, **overrides)
    cfg = trainer.config
    trainer.progress.line(f"training {trainer.model.name} on {trainer.data.name}: {len(trainer.data.train_y)} train / "
                          f"{len(trainer.data.test_y)} test images, {cfg.optimizer} lr {cfg.lr:g} ({cfg.policy}), "
                          f"batch {cfg.batch}, {cfg.epochs} epochs, run directory {trainer.run_dir}")
    for note in notes:
        trainer.progress.line(note)
    result = api.run(trainer)
    if trainer.comm.rank:  # under mpiexec rank 0 reports for the job
        return 130 if result.interrupted else 0
    if args.json:
        from cnnc.runtime.files import dumps
        from cnnc.runtime.train import result_json
        print(dumps(result_json(result)))
    else:
        status = "interrupted" if result.interrupted else "done"
        print(f"{status}: {result.epochs} epochs in {result.seconds:.1f} s; initial loss {result.initial_loss:.4f}, "
              f"train loss {result.train_loss:.4f}, test loss {result.test_loss:.4f}, "
              f"test accuracy {100 * result.test_accuracy:.2f}%; run directory {result.run_dir}"
              + (f"; {result.bad_images} bad image(s) skipped" if getattr(trainer.data, "streamed", False) else ""))
    return 130 if result.interrupted else 0


def _cmd_sweep(args, overrides: dict) -> int:
    from cnnc.runtime import sweep

    result = sweep.sweep(args.file, args.sweep, jobs=args.jobs, run_dir=args.output, resume=args.resume,
                         data=args.data, backend=args.backend, weights=args.weights, workers=args.workers,
                         progress=not args.quiet, **overrides)
    if args.json:
        from cnnc.runtime.files import dumps
        print(dumps(result.to_json()))
    else:
        print(result.table)
    for line in result.notes:
        print(line, file=sys.stderr)
    if result.interrupted:
        return 130
    return 0 if result.completed else 1


def _cmd_lr_find(args) -> int:
    from cnnc.runtime.lr_find import lr_find

    overrides = {"batch": args.batch, "optimizer": args.optimizer, "momentum": args.momentum,
                 "weight_decay": args.weight_decay, "seed": args.seed, "precision": args.precision}
    result = lr_find(args.file, start=args.start, end=args.end, steps=args.steps, out_dir=args.output,
                     resume=args.resume, data=args.data, backend=args.backend, weights=args.weights,
                     workers=args.workers, progress=not args.quiet, **overrides)
    if args.json:
        from cnnc.runtime.files import dumps
        print(dumps(result.to_json()))
    else:
        print(result.summary())
    for line in result.notes:
        print(line, file=sys.stderr)
    return 0


def _cmd_runs(args) -> int:
    from cnnc.runtime import runs

    if not args.no_plot:
        runs.check_plot_path(args.plot)
    found = [runs.read_run(d) for d in args.dirs]
    if args.json:
        from cnnc.runtime.files import dumps
        print(dumps([r.to_json() for r in found]))
    else:
        print(runs.table(found))
    if not args.no_plot:
        print(runs.write_plot(found, args.plot), file=sys.stderr)
    return 0


def _cmd_compile(args) -> int:
    from cnnc.compiler.pipeline import PassContext, optimize
    from cnnc.compiler.summary import human_bytes
    from cnnc.backends.base import Backend, backend_class
    from cnnc.runtime.artifact import compile_graph, write_artifact
    from cnnc.runtime.model import Model

    cls = backend_class(args.backend)
    model = Model.load(args.file)
    if args.checkpoint:
        model.load_weights(args.checkpoint)
    ctx = PassContext(batch=args.batch, verify=args.verify, disabled=frozenset(args.disable_pass),
                      dump_after=frozenset(args.dump_after))
    g, params, meta = compile_graph(model, args.opt_level, args.backend, ctx)
    for name, text in ctx.dumps:
        print(f"# after {name}\n{text}\n")
    resources = write_artifact(g, params, meta, args.output) if args.output else None
    if args.output:
        print(f"wrote {args.output}: plan.json ({g.number_of_nodes()} nodes), weights.npz"
              + (f", {len(resources)} compiled kernels" if resources else ""), file=sys.stderr)
    if args.report and resources is None and cls.build_artifact is not Backend.build_artifact:
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            resources = cls.build_artifact(g, tmp, False)
    if args.report:
        for record in g.graph["report"]:
            print(("refused: " if record.refused else "") + record.render())
        train_ctx = cls.configure(PassContext(batch=args.batch, opt_level=args.opt_level, mode="training",
                                              disabled=frozenset(args.disable_pass)))
        trained = optimize(model.graph, train_ctx, model.host_params())
        done = sum(not r.refused for r in g.graph["report"])
        print(f"\n{done} rewrites, {len(g.graph['report']) - done} refused; nodes {g.graph['nodes_before']} → "
              f"{g.number_of_nodes()}")
        for label, mem in (("inference", g.graph["memory"]), ("training step", trained.graph["memory"])):
            ratio = mem["planned_bytes"] / max(mem["unplanned_bytes"], 1)
            print(f"activation memory, {label} at batch {mem['batch']}: {human_bytes(mem['unplanned_bytes'])} "
                  f"without planning → {human_bytes(mem['planned_bytes'])} planned ({100 * ratio:.0f}%)")
        if resources:
            print(f"\n{'kernel':<44}{'registers':>10}{'smem':>10}{'stack':>8}{'spills':>8}")
            for row in resources:
                print(f"{row['kernel']:<44}{row['registers']:>10}{row['shared_bytes']:>10}{row['stack_bytes']:>8}"
                      f"{row['spill_stores'] + row['spill_loads']:>8}")
    if args.time_passes:
        for name, seconds in ctx.timings.items():
            print(f"{name:<28} {1000 * seconds:8.2f} ms")
    return 0


def _cmd_export(args) -> int:
    from cnnc.runtime import onnx_export
    from cnnc.runtime.model import Model

    onnx_export.check_opset(args.opset)
    onnx_export.need_onnx()
    onnx_export.check_output(args.output)
    model = Model.load(args.file)
    if args.checkpoint:
        model.load_weights(args.checkpoint)
    weights = onnx_export.weights_note(model, args.checkpoint)
    exported = onnx_export.export_model(model, args.opt_level, args.opset, weights)
    onnx_export.write_onnx(exported, args.output)
    print(f"wrote {args.output}: {model.name}, opset {exported.opset} (IR {exported.model.ir_version}), "
          f"-O{args.opt_level}, {exported.nodes} nodes, {exported.parameters:,} weights; {weights}", file=sys.stderr)
    return 0


def _cmd_run(args) -> int:
    import numpy as np

    from cnnc.runtime.artifact import read_artifact, read_input, save_output

    cm = read_artifact(args.artifact)
    y = cm(read_input(args.input, cm.input_shape))
    if args.output:
        save_output(args.output, y)
        print(f"wrote {args.output}: {y.shape[0]} × {' × '.join(map(str, y.shape[1:]))}")
    else:
        flat = y.reshape(len(y), -1)
        for i, row in enumerate(flat):
            print(f"{i}: class {int(np.argmax(row))} ({', '.join(f'{v:.4g}' for v in row[:10])}"
                  f"{', ...' if row.size > 10 else ''})")
    return 0


def _cmd_bench(args) -> int:
    from cnnc.runtime.bench import bench

    if args.ranks:
        return _bench_ranks(args)
    r = bench(args.file, args.backend, args.batch, args.train, args.layers, args.vs, args.repeats)
    if args.json:
        print(json.dumps(r.to_json()))
        return 0
    what = "training step" if r.train else "inference (-O2)"
    print(f"{r.network} on {r.backend}, batch {r.batch}, {what}: {r.ms_per_step:.2f} ms per step, "
          f"{r.images_per_s:.1f} images/s, peak memory {r.peak_rss_mb:.0f} MB")
    if r.peer:
        how = f" ({r.peer_note})" if r.peer_note else ""
        print(f"{r.peer}{how}: {r.peer_ms_per_step:.2f} ms per step; ratio (ours / {r.peer}) {r.ratio:.2f}")
    if r.layers:
        print(f"\n{'layer':<36}{'op':<16}{'forward ms':>11}{'backward ms':>12}{'GFLOP/s':>9}{'share':>7}")
        for row in r.layers:
            print(f"{row['layer']:<36}{row['op']:<16}{row['forward_ms']:>11.3f}{row['backward_ms']:>12.3f}"
                  f"{row['gflops']:>9.1f}{100 * row['share']:>6.1f}%")
    return 0


def _bench_ranks(args) -> int:
    from cnnc.runtime.bench import ranks_bench
    from cnnc.runtime.distributed import world

    r = ranks_bench(args.file, args.backend, args.batch, args.repeats)
    if world().rank:
        return 0
    if args.json:
        print(json.dumps(r))
        return 0
    ms = r["ms"]
    print(f"{r['network']} on {r['backend']}, {r['ranks']} rank(s), batch {r['batch']} ({r['batch_per_rank']} a rank), "
          f"{r['gradient_mb']:.2f} MB of gradients: {r['ms_per_step']:.1f} ms per step, {r['images_per_s']:.1f} images/s")
    print(f"  compute {ms['compute']:.1f} ms, waiting {ms['waiting']:.1f} ms, allreduce {ms['allreduce']:.2f} ms, "
          f"update {ms['update']:.1f} ms (slowest rank's medians); overhead {100 * r['overhead']:.1f}% of compute")
    return 0


def _cmd_parity(args) -> int:
    from cnnc.dsl.errors import CnncError
    from cnnc.runtime.parity import format_local_rows, format_rows, local_parity, network, parity

    names = tuple(b.strip() for b in args.backends.split(","))
    if len(names) != 2:
        raise CnncError(f"--backends takes two names separated by a comma, got `{args.backends}`")
    size = None
    if args.size:
        try:
            size = tuple(int(v) for v in args.size.lower().split("x"))
            assert len(size) == 2
        except (ValueError, AssertionError):
            raise CnncError(f"--size takes HxW, like 64x64, got `{args.size}`") from None
    if args.local:
        rows, first_bad = local_parity(network(args.file, size), names[1], args.batch, tolerance=args.tolerance,
                                       reference=names[0])
        print(format_local_rows(rows, first_bad, names, args.tolerance))
    else:
        rows, first_bad = parity(args.file, names, args.batch, input_size=size, tolerance=args.tolerance)
        print(format_rows(rows, first_bad, names, args.tolerance))
    return 0 if first_bad is None else 1


def _cmd_viz(args) -> int:
    from cnnc.compiler import viz
    from cnnc.dsl.errors import CnncError
    from cnnc.runtime.viz import load_graph

    if args.depth is not None and args.depth < 0:
        raise CnncError(f"--depth takes a number of block levels, 0 or more, got {args.depth}")
    fmt = viz.format_of(args.output, args.format)
    opts = viz.VizOptions(rankdir=args.rankdir, shapes=not args.no_shapes, params=not args.no_params,
                          depth=0 if args.collapse else args.depth)
    g = load_graph(args.file, args.opt_level, args.import_root)
    notes: list[str] = []
    viz.write(g, args.output, opts, fmt, notes)
    print(f"wrote {args.output}: {g.number_of_nodes()} layers, {len(g.graph['blocks'])} block instances",
          file=sys.stderr)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return 0


def _cmd_eval(args) -> int:
    from cnnc.runtime import api

    ev = api.evaluate(args.file, args.checkpoint, args.data, args.backend, args.workers)
    loss, acc, confusion = ev
    if args.json:
        print(json.dumps({"loss": loss, "accuracy": acc, "top5": ev.top5, "confusion": confusion.tolist()}))
        return 0
    top5 = f", top-5 {100 * ev.top5:.2f}%" if ev.top5 is not None else ""
    print(f"loss {loss:.4f}, accuracy {100 * acc:.2f}%{top5} ({int(confusion.sum())} images)")
    width = max(5, len(str(int(confusion.max()))) + 1)
    print("confusion matrix (rows: true class, columns: predicted)")
    print(" " * 6 + "".join(f"{j:>{width}}" for j in range(confusion.shape[1])))
    for i, row in enumerate(confusion):
        print(f"{i:>5} " + "".join(f"{v:>{width}}" for v in row))
    return 0


def _cmd_weights_import(args) -> int:
    from cnnc.runtime.weights import import_state

    out = Path(args.output) if args.output else Path(args.state).with_suffix(".npz")
    report, model = import_state(args.file, args.state, out)
    _print_weights_report(report, args.quiet)
    print(f"wrote {out}: {len(report.rows)} layers of `{model.name}` from {args.state}", file=sys.stderr)
    return 0


def _print_weights_report(report, quiet: bool) -> None:
    """The mapping table on stdout (unless -q), its notes on stderr."""
    if not quiet:
        print(report.render())
    for note in report.notes:
        print(f"note: {note}", file=sys.stderr)


def _cmd_weights_export(args) -> int:
    from cnnc.dsl.errors import CnncError
    from cnnc.runtime.weights import export_state

    if args.like and args.names:
        raise CnncError("--names and --like both choose the tensor names: give one")
    report, used = export_state(args.file, args.checkpoint, args.output, args.names, args.like)
    _print_weights_report(report, args.quiet)
    print(f"wrote {args.output}: {len(report.rows)} layers, {used}", file=sys.stderr)
    return 0


def _cmd_compare(args) -> int:
    from cnnc.runtime import compare

    if args.plot:
        compare.plot_format(args.plot)
        compare.require_plotting()
    entries, warnings = compare.compare(args.files, args.batch, args.import_root)
    for w in warnings:
        print(w.render() + "\n", file=sys.stderr)
    if args.plot:
        compare.write_plot(entries, args.plot)
        print(f"wrote {args.plot}: {len(entries)} networks", file=sys.stderr)
    if args.json:
        print(json.dumps([e.to_json() for e in entries], indent=2))
    else:
        print(compare.table(entries))
    return 0


def _cmd_import(args) -> int:
    import tempfile
    from pathlib import Path

    from cnnc.compiler.pipeline import check, check_onnx
    from cnnc.compiler.to_cnn import write
    from cnnc.dsl.errors import CnncError
    from cnnc.runtime.model import Model

    if not args.file.lower().endswith(".onnx"):
        raise CnncError(f"`cnnc import` reads .onnx models, got {args.file}")
    g = check_onnx(args.file, blocks=False)
    written = write(g, blocks=not args.flat)
    out = Path(args.output) if args.output else None
    if out is not None and out.suffix != ".cnn":
        raise CnncError(f"-o {out}: the output is a .cnn file")
    with tempfile.TemporaryDirectory() as tmp:  # the written text must check to the same network
        path = out if out is not None else Path(tmp) / "model.cnn"
        if out is not None:
            from cnnc.runtime.files import write_atomic
            write_atomic(out, lambda f: f.write(written.text.encode("utf-8")))
        else:
            path.write_text(written.text, encoding="utf-8")
        again = check(path)
        if args.weights:
            model = Model(again)
            weights = g.graph["weights"]
            model.set_params({written.param_names.get(k, k): v for k, v in weights.items()}, args.file)
            model.save(args.weights)
    for k in ("params", "buffers", "macs"):
        if again.graph["totals"][k] != g.graph["totals"][k]:
            raise CnncError(f"the written .cnn counts {again.graph['totals'][k]} {k}, the model "
                            f"{g.graph['totals'][k]}: not the same network", hint="please report this")
    if out is None:
        sys.stdout.write(written.text)
    t = g.graph["totals"]
    print(f"{args.file}: {g.number_of_nodes() - 1} layers, {t['params']:,} parameters, {t['macs']:,} MACs"
          + (f" → {out} ({written.lines()} lines)" if out else "")
          + (f", weights → {args.weights}" if args.weights else
             "; its weights are not written (give --weights FILE.npz)"), file=sys.stderr)
    return 0


def _cmd_check(args) -> int:
    from cnnc.compiler import summary
    from cnnc.compiler.pipeline import check

    if args.file is None and args.explain and Path(args.explain).suffix in (".cnn", ".onnx"):
        # `cnnc check --explain FILE`: --explain took the file as its layer name
        args.file, args.explain = args.explain, ""
    if args.file is None:
        print("error: cnnc check needs a FILE (a .cnn file or a .onnx model)", file=sys.stderr)
        return 2
    g = check(args.file, batch=args.batch, import_roots=args.import_root, verify=args.verify)
    for w in g.graph.get("warnings", []):
        print(w.render() + "\n", file=sys.stderr)
    if args.explain is not None:
        from cnnc.compiler import explain

        entries = explain.explain(g, args.explain or None)
        if args.json:
            print(json.dumps(summary.to_json(g) | {"explain": entries}))
        else:
            print(explain.render(g, entries))
    elif args.json:
        print(json.dumps(summary.to_json(g)))
    else:
        print(summary.table(g))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.autotune:
        import os
        os.environ["CNNC_AUTOTUNE"] = args.autotune  # read by backends/tuning.py (CUDA: when it loads)
    if not getattr(args, "run", None):
        parser.print_help()
        return 0
    try:
        if getattr(args, "max_memory", None) is None:
            return args.run(args)
        from cnnc.runtime import budget

        with budget.override(args.max_memory):
            return args.run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:  # only our located errors are user mistakes; anything else is a bug
        from cnnc.dsl.errors import CnncError, CnncErrors

        if isinstance(exc, (CnncError, CnncErrors)):
            print(exc.render(), file=sys.stderr)
            return EXIT_USER_ERROR
        return _internal_error(exc, args)


def _internal_error(exc: BaseException, args) -> int:
    import traceback

    if isinstance(exc, MemoryError):  # the estimates passed, yet an allocation failed: say so plainly
        print("error: out of memory: an allocation failed although the estimate checked before it fit "
              "(other programs may be using memory too)\nhint: a smaller batch, or free memory and try again",
              file=sys.stderr)
        return EXIT_USER_ERROR
    print(f"internal error in cnnc {__version__} while running `cnnc {args.command}`: this is a bug in cnnc, "
          f"not a mistake in your input; please report it with the text below at {ISSUES}\n", file=sys.stderr)
    traceback.print_exception(exc, file=sys.stderr)
    return EXIT_INTERNAL_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
