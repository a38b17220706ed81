#!/usr/bin/env bash
# One prepared GPU check: bash benchmarks/gpu_check.sh OUTDIR [--dry-run] [--budget SECONDS]
# (options: python benchmarks/gpu_check.py --help). Uses $PYTHON, else the first of
# ./.venv/bin/python, python3, python that has torch.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    for cand in "$here/../.venv/bin/python" python3 python; do
        if command -v "$cand" >/dev/null 2>&1 && "$cand" -c "import torch" >/dev/null 2>&1; then
            PY="$cand"
            break
        fi
    done
fi
if [ -z "$PY" ]; then
    echo "gpu_check.sh: no Python with torch found; set PYTHON=/path/to/python" >&2
    exit 2
fi
exec "$PY" "$here/gpu_check.py" "$@"
