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

    return p


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
