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
