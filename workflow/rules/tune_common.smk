# Helpers of workflow/rules/tune.smk (no rules here): the search spaces of config tune, from
# ptycore.pipeline.model.Pipeline.tunes (the workflow's logic lives in the package).

import shlex

try:
    TUNES = PIPE.tunes()
except PtycoreError as _err:
    raise WorkflowError(f"invalid config: {_err}") from None
