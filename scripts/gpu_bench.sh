#!/usr/bin/env bash
# The one-shot GPU benchmark (docs/gpu.md): jaxtune's train step on a ~1B Llama and BERT-base, every case in one JSON.
#   scripts/gpu_bench.sh [OUTPUT.json] [--time-budget-s 450] [--tiny] [--only TEXT]
# PYTHON picks the interpreter (default: python3 on PATH, e.g. an activated venv with jax[cuda12]).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" -m jaxtune.tools.gpu_bench "$@"
