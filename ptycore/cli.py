"""``ptycore`` command line: one verb per pipeline step (each is also a Snakemake rule).

Verb modules live in ``ptycore.commands``; each defines ``HELP``, ``add_arguments(parser)``
and ``run(args) -> int``, and imports heavy libraries only inside ``run``.

Errors become one line ``ptycore VERB: error: ...`` and an exit code: 2 for bad input (a
:class:`~ptycore.errors.PtycoreError`), 3 for a diverged reconstruction, 4 when the file system
refuses (read-only, full, no permission: an ``OSError``, named by its path) or a stored chunk
cannot be decoded (the damaged store and chunk named, see :mod:`ptycore.store`), 130 when
interrupted. ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys

from ptycore import __version__
from ptycore.errors import PtycoreError, StorageError

#: argparse destinations that name a verb's input files, in the order they are blamed for a read error
INPUT_ARGS = ("data", "init", "result", "truth", "half1", "half2", "patterns", "meta", "plan", "config", "store")
#: errno -> what to tell the user
_OS_HINTS = {
    errno.ENOSPC: "no space left on the device (free some space or write elsewhere)",
    errno.EDQUOT: "disk quota exceeded (free some space or write elsewhere)",
    errno.EROFS: "read-only file system (write the output elsewhere)",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a path component is a file, not a directory",
    errno.EEXIST: "is in the way (exists, and is not a directory)",
    errno.EISDIR: "is a directory",
    errno.ENOENT: "no such file or directory",
    errno.EIO: "input/output error (a failing disk or network file system)",
}

#: verb -> module in ptycore.commands, in pipeline order
VERBS = ["simulate", "ingest", "preprocess", "init", "reconstruct", "evaluate", "aggregate", "inspect", "tune",
         "plans", "launch", "prior"]


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


def _input_paths(args) -> list[str]:
    paths = []
    for key in INPUT_ARGS:
        value = getattr(args, key, None)
        if isinstance(value, str) and value:
            paths.append(value)
    return paths


def os_error_message(err: OSError, args) -> str:
    """One line for a file-system error: the path it concerns and what happened."""
    if err.filename:
        path = err.filename
    elif err.errno is None:  # e.g. a library's "unable to open file": about the inputs
        path = ", ".join(_input_paths(args)) or getattr(args, "out", None) or "?"
    else:
        path = getattr(args, "out", None) or ", ".join(_input_paths(args)) or "?"
    what = _OS_HINTS.get(err.errno) or err.strerror or (str(err).splitlines() or [""])[0] or err.__class__.__name__
    if err.filename2:
        path = f"{path} -> {err.filename2}"
    return f"{path}: {what}"


def is_decode_error(err: BaseException) -> bool:
    """A failure inside zarr's or numcodecs' chunk decoding (a damaged chunk file)."""
    tb = err.__traceback__
    while tb is not None:
        name = tb.tb_frame.f_globals.get("__name__", "")
        if name.startswith(("numcodecs", "zarr.")) and "decode" in tb.tb_frame.f_code.co_name:
            return True
        tb = tb.tb_next
    return False


def decode_error_message(err: BaseException, args) -> str:
    """Name the damaged store and chunk: the full check of every store the verb opened."""
    from ptycore.errors import InvalidData
    from ptycore.store import opened_stores, verify_store

    for path in reversed(opened_stores()):
        try:
            verify_store(path)
        except InvalidData as found:
            return str(found)
        except OSError:
            continue
    names = ", ".join(str(p) for p in opened_stores()) or ", ".join(_input_paths(args)) or "an input"
    reason = f"{err.__class__.__name__}: {str(err).splitlines()[0] if str(err) else ''}".rstrip(": ")
    return f"{names}: a stored chunk could not be decoded ({reason}); the store is damaged, write it again"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "verb", None):
        parser.print_help()
        return 2
    if "ptycore.store" in sys.modules:  # in-process callers (tests) run several verbs in one process
        sys.modules["ptycore.store"].forget_opened()
    from ptycore import compile_cache

    compile_cache.enable()  # every ptycore process shares the compiled programs (PTYCORE_COMPILATION_CACHE)
    try:
        return int(args._run(args) or 0)
    except PtycoreError as err:
        if args.debug:
            raise
        print(f"ptycore {args.verb}: error: {err}", file=sys.stderr)
        return err.exit_code
    except OSError as err:
        if args.debug:
            raise
        print(f"ptycore {args.verb}: error: {os_error_message(err, args)}", file=sys.stderr)
        return StorageError.exit_code
    except Exception as err:
        if args.debug or not is_decode_error(err):
            raise
        print(f"ptycore {args.verb}: error: {decode_error_message(err, args)}", file=sys.stderr)
        return StorageError.exit_code
    except KeyboardInterrupt:
        print(f"ptycore {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
