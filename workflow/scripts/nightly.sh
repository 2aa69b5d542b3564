#!/usr/bin/env bash
# Nightly facility run: every dataset in config/config.yaml and in its `inbox:` glob, evaluated and
# aggregated. Datasets already processed are up to date and skipped; a bad dataset fails only its
# own branch (--keep-going) and results/aggregate lists it with the first line of its error
# (results/logs/aggregate-failures.json).
#
#   workflow/scripts/nightly.sh                 # profiles/slurm; PTYCORE_PROFILE=profiles/local for one machine
#   workflow/scripts/nightly.sh -n              # what tonight would run (extra arguments go to snakemake)
#
# cron (01:30 every night, from the project checkout, with its virtualenv):
#   30 1 * * * cd /opt/ptycore && PATH=/opt/ptycore/.venv/bin:$PATH workflow/scripts/nightly.sh >> nightly.log 2>&1
set -euo pipefail
cd "$(dirname "$0")/../.."
profile=${PTYCORE_PROFILE:-profiles/slurm}
lock=${PTYCORE_NIGHTLY_LOCK:-.nightly.lock}
echo "== ptycore nightly $(date -Is) profile=$profile"
# One run at a time: if last night's run is still going, skip tonight's.
exec 9>"$lock"
if ! flock -n 9; then
    echo "previous nightly run still going (lock $lock); skipping"
    exit 0
fi
# No other run can be going now, so a lock left by a killed run is stale: clear it.
snakemake --profile "$profile" --unlock "$@" >/dev/null 2>&1 || true
# --rerun-triggers mtime: a dataset is redone only when its files change, not when the workflow's
# code or parameters do (re-run those on purpose with --forcerun or by deleting their stores).
exec snakemake --profile "$profile" --keep-going --rerun-incomplete --rerun-triggers mtime "$@" all
