"""ptycore's exceptions. The CLI turns each into one clear line and a non-zero exit."""


class PtycoreError(Exception):
    """Base class: a problem the user can fix, reported as one line without a traceback."""

    exit_code = 2


class InvalidArgument(PtycoreError):
    """A command-line option or parameter is out of range or inconsistent."""


class InvalidPlan(PtycoreError):
    """A reconstruction plan failed validation (the message names the field)."""


class InvalidData(PtycoreError):
    """An input file, dataset or metadata record is missing, malformed or inconsistent."""


class Diverged(PtycoreError):
    """A reconstruction's loss became non-finite."""

    exit_code = 3


class MissingDependency(PtycoreError):
    """An optional extra (e.g. 'sim' for abTEM) is needed but not installed."""


class Interrupted(PtycoreError):
    """A run was stopped by a signal (SIGTERM from Slurm, Ctrl-C) after writing a checkpoint;
    the exit code is 128 + the signal's number, as for a process the signal killed."""

    def __init__(self, message: str, signum: int = 15):
        super().__init__(message)
        self.exit_code = 128 + int(signum)


class InsufficientMemory(PtycoreError):
    """A run's estimated peak memory exceeds what the host or device has free."""


class StorageError(PtycoreError):
    """The file system refused a read or write (read-only, full, no permission, not a directory),
    or a stored chunk could not be decoded. Nothing was written; earlier outputs are untouched."""

    exit_code = 4


# ---------------------------------------------------------------- reading errors back from logs
#: the one line the CLI prints for a PtycoreError (ptycore/cli.py)
ERROR_LINE_PREFIX = r"ptycore [a-z]+: error: "


def first_error_line(log) -> str | None:
    """The error a failed step's log reports, in one line (None for a missing or empty log):
    the first ``ptycore VERB: error: ...`` line a verb prints; else, after a Python traceback,
    its last line (the exception); else the first line that mentions an error (any case);
    else the log's last non-empty line (a message from the shell, a signal)."""
    import re
    from pathlib import Path

    try:
        lines = [line.strip() for line in Path(log).read_text(errors="replace").splitlines()]
    except OSError:
        return None
    for line in lines:
        if re.match(ERROR_LINE_PREFIX, line):
            return line
    lines = [line for line in lines if line]
    if not lines:
        return None
    if any(line.startswith("Traceback (most recent call last)") for line in lines):
        return lines[-1]
    return next((line for line in lines if "error" in line.lower()), lines[-1])
