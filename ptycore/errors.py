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


class StorageError(PtycoreError):
    """The file system refused a read or write (read-only, full, no permission, not a directory),
    or a stored chunk could not be decoded. Nothing was written; earlier outputs are untouched."""

    exit_code = 4
