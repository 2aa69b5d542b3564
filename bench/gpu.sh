#!/usr/bin/env bash
# bench/gpu.sh - one reconstruction on 1..N GPUs of this machine: s/iter, each GPU's peak memory,
# the plan's per-device estimate and the achieved memory bandwidth (bytes one GPU's iteration
# moves, from XLA's cost analysis, over its time), for the standard and the large case of
# bench/devices.py; then the same on N processes of one GPU each (jax.distributed, as srun or
# `ptycore launch` start them). Needs a CUDA jaxlib (pip install -e ".[gpu]").
#
#   bash bench/gpu.sh                 # every GPU nvidia-smi lists
#   GPUS=2 ITERATIONS=20 bash bench/gpu.sh
#   CASES=standard bash bench/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
ITERATIONS=${ITERATIONS:-12}
CASES=${CASES:-"standard large"}
if [[ -z ${GPUS:-} ]]; then
    GPUS=$(nvidia-smi --list-gpus 2>/dev/null | wc -l) || GPUS=0
fi
if [[ $GPUS -lt 1 ]]; then
    echo "bench/gpu.sh: no GPU found (nvidia-smi --list-gpus lists none); set GPUS=N to force" >&2
    exit 2
fi
unset JAX_PLATFORMS
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # the peak memory is then what the run itself needs
"$PYTHON" - <<'PY'
import jax
devices = jax.devices()
if devices[0].platform != "gpu":
    raise SystemExit(f"bench/gpu.sh: JAX sees no GPU ({devices[0].platform}); install a CUDA jaxlib: pip install -e '.[gpu]'")
print(f"# {len(devices)} × {devices[0].device_kind}, jax {jax.__version__}")
PY
nvidia-smi --query-gpu=index,name,memory.total,clocks.max.memory --format=csv,noheader || true
counts=$(seq 1 "$GPUS")
for case in $CASES; do
    # one process on 1, 2, ... N GPUs, then N processes of one GPU each
    "$PYTHON" bench/devices.py --case "$case" --iterations "$ITERATIONS" --bandwidth \
        --devices $counts --processes $([[ $GPUS -gt 1 ]] && echo "$GPUS")
done
