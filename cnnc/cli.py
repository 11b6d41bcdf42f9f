"""The `cnnc` command line.

Imports of the compiler are deferred into the command functions: `cnnc --help` must answer
fast. A user mistake prints `file:line:col: error: ...` with the source line and a caret, and
exits 1; never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys

from cnnc import __version__

EXIT_USER_ERROR = 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cnnc",
        description="A compiler for convolutional neural networks written in the .cnn language.",
        epilog="Run `cnnc COMMAND --help` for a command's options. Language reference: docs/language.md.")
    p.add_argument("--version", action="version", version=f"cnnc {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    c = sub.add_parser("check", help="check a .cnn file: shapes, parameters, MACs, memory, receptive fields",
                       description="Parse a .cnn file, infer every shape and count parameters, MACs, "
                                   "activation memory and receptive fields, layer by layer.")
    c.add_argument("file", help="the .cnn file")
    c.add_argument("--batch", type=int, default=1, help="batch size for MACs and activation memory (default 1)")
    c.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    c.add_argument("--import-root", action="append", default=[], metavar="DIR",
                   help="also allow imports from DIR (imports otherwise stay in the importing file's directory)")
    c.add_argument("--verify", action="store_true", help="check the graph invariants after every pass")
    c.set_defaults(run=_cmd_check)

    t = sub.add_parser("train", help="train a network (default data: the embedded MNIST-5k digits)",
                       description="Train the network with the settings of its `train:` section; flags override "
                                   "them. Writes checkpoint.npz, metrics.jsonl and curves.png to the run directory.")
    t.add_argument("file", nargs="?", help="the .cnn file (optional with --resume)")
    t.add_argument("--data", help="dataset: mnist5k, FILE.npz, mnist:DIR, cifar10:DIR or folder:DIR")
    t.add_argument("-o", "--output", metavar="RUN_DIR", help="run directory (default runs/NETWORK[-N])")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its checkpoint")
    t.add_argument("--backend", default="numpy", help="backend to train on (default numpy)")
    for flag, kind, text in [("--lr", float, "base learning rate"), ("--epochs", int, "number of epochs"),
                             ("--batch", int, "batch size"), ("--optimizer", str, "sgd, momentum, nesterov, adagrad, "
                              "rmsprop, adadelta, adam, adamw or ftrl"), ("--seed", int, "random seed"),
                             ("--momentum", float, "momentum"), ("--weight-decay", float, "L2 weight decay"),
                             ("--policy", str, "learning-rate policy"), ("--accumulate", int,
                              "accumulate gradients over this many batches")]:
        t.add_argument(flag, type=kind, help=text)
    t.add_argument("--json", action="store_true", help="print a JSON summary on stdout (progress stays on stderr)")
    t.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    t.set_defaults(run=_cmd_train)

    e = sub.add_parser("eval", help="loss, accuracy and confusion matrix of a checkpoint")
    e.add_argument("file", help="the .cnn file")
    e.add_argument("--checkpoint", required=True, help="checkpoint.npz written by cnnc train")
    e.add_argument("--data", help="dataset (default: the one the checkpoint was trained on)")
    e.add_argument("--backend", default="numpy")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(run=_cmd_eval)
    return p


def _cmd_train(args) -> int:
    from cnnc.runtime import api

    overrides = {"lr": args.lr, "epochs": args.epochs, "batch": args.batch, "optimizer": args.optimizer,
                 "seed": args.seed, "momentum": args.momentum, "weight_decay": args.weight_decay,
                 "policy": args.policy, "accumulate": args.accumulate}
    trainer, notes = api.prepare(args.file, run_dir=args.output, resume=args.resume, data=args.data,
                                 backend=args.backend, progress=not args.quiet, **overrides)
    cfg = trainer.config
    trainer.progress.line(f"training {trainer.model.name} on {trainer.data.name}: {len(trainer.data.train_y)} train / "
                          f"{len(trainer.data.test_y)} test images, {cfg.optimizer} lr {cfg.lr:g} ({cfg.policy}), "
                          f"batch {cfg.batch}, {cfg.epochs} epochs, run directory {trainer.run_dir}")
    for note in notes:
        trainer.progress.line(note)
    result = api.run(trainer)
    if args.json:
        from cnnc.runtime.train import result_json
        print(json.dumps(result_json(result)))
    else:
        status = "interrupted" if result.interrupted else "done"
        print(f"{status}: {result.epochs} epochs in {result.seconds:.1f} s; initial loss {result.initial_loss:.4f}, "
              f"train loss {result.train_loss:.4f}, test loss {result.test_loss:.4f}, "
              f"test accuracy {100 * result.test_accuracy:.2f}%; run directory {result.run_dir}")
    return 130 if result.interrupted else 0


def _cmd_eval(args) -> int:
    from cnnc.runtime import api

    loss, acc, confusion = api.evaluate(args.file, args.checkpoint, args.data, args.backend)
    if args.json:
        print(json.dumps({"loss": loss, "accuracy": acc, "confusion": confusion.tolist()}))
        return 0
    print(f"loss {loss:.4f}, accuracy {100 * acc:.2f}% ({int(confusion.sum())} images)")
    width = max(5, len(str(int(confusion.max()))) + 1)
    print("confusion matrix (rows: true class, columns: predicted)")
    print(" " * 6 + "".join(f"{j:>{width}}" for j in range(confusion.shape[1])))
    for i, row in enumerate(confusion):
        print(f"{i:>5} " + "".join(f"{v:>{width}}" for v in row))
    return 0


def _cmd_check(args) -> int:
    from cnnc.compiler import summary
    from cnnc.compiler.pipeline import check

    g = check(args.file, batch=args.batch, import_roots=args.import_root, verify=args.verify)
    for w in g.graph.get("warnings", []):
        print(w.render() + "\n", file=sys.stderr)
    if args.json:
        print(json.dumps(summary.to_json(g)))
    else:
        print(summary.table(g))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 0
    try:
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
        raise


if __name__ == "__main__":
    raise SystemExit(main())
