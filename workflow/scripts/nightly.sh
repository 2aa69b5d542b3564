#!/usr/bin/env bash
# Nightly facility run: every dataset in config/config.yaml and in its `inbox:` glob, evaluated and
# aggregated. Datasets already processed are up to date and skipped; a bad dataset fails only its
# own branch (--keep-going) and results/aggregate lists it with the first line of its error
# (results/logs/aggregate-failures.json). One nightly run at a time; while a manual run is going
# in the same directory the night is skipped (its lock is never cleared). See ptycore/pipeline/nightly.py.
#
#   workflow/scripts/nightly.sh                 # profiles/slurm; PTYCORE_PROFILE=profiles/local for one machine
#   workflow/scripts/nightly.sh -n              # what tonight would run (extra arguments go to snakemake)
#
# cron (01:30 every night, from the project checkout, with its virtualenv):
#   30 1 * * * cd /opt/ptycore && PATH=/opt/ptycore/.venv/bin:$PATH workflow/scripts/nightly.sh >> nightly.log 2>&1
set -euo pipefail
cd "$(dirname "$0")/../.."
exec python3 -m ptycore.pipeline.nightly "$@"
