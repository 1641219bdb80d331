#!/usr/bin/env bash
# The lent GPU machine's command (docs/gpu.md): runs benchmarks/gpu_check.py with the
# machine's python3, installing the carried wheels of .whl/ (or $WHEELS) first when the
# folder is there. Any argument is passed on, e.g.
#   bash benchmarks/gpu_check.sh --commit 1a2b3c4 --steps cuda_parity,render,kaolrm_train
#   bash benchmarks/gpu_check.sh --cpu-dry-run --out /tmp/dry      # here, on a CPU
set -o pipefail
cd "$(dirname "$0")/.." || exit 1
export PYTHONUNBUFFERED=1
WHEELS=${WHEELS:-.whl}
args=()
if [[ -d "$WHEELS" && " $* " != *" --cpu-dry-run "* ]]; then
  args+=(--wheels "$WHEELS")
fi
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "${args[@]}" "$@"
