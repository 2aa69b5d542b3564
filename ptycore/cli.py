"""``ptycore`` command line: one verb per pipeline step (each is also a Snakemake rule).

Verb modules live in ``ptycore.commands``; each defines ``HELP``, ``add_arguments(parser)``
and ``run(args) -> int``, and imports heavy libraries only inside ``run``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ptycore import __version__
from ptycore.errors import PtycoreError

#: verb -> module in ptycore.commands, in pipeline order
VERBS = ["simulate", "ingest", "preprocess", "init", "reconstruct", "evaluate", "aggregate", "inspect", "tune"]


def _available_verbs():
    for verb in VERBS:
        try:
            yield verb, importlib.import_module(f"ptycore.commands.{verb}")
        except ModuleNotFoundError as err:
            if err.name != f"ptycore.commands.{verb}":
                raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ptycore",
        description="Electron ptychography pipeline: simulate → ingest → preprocess → init → reconstruct → "
        "evaluate → aggregate. Run 'ptycore VERB --help' for each step.",
    )
    parser.add_argument("--version", action="version", version=f"ptycore {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, module in _available_verbs():
        p = sub.add_parser(verb, help=module.HELP, description=module.HELP)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "verb", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except PtycoreError as err:
        if args.debug:
            raise
        print(f"ptycore {args.verb}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"ptycore {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
