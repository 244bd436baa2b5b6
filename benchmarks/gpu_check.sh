#!/usr/bin/env bash
# The GPU path in one command, <= 8 minutes on one GPU: CUDA tests, ∇x on the device vs the CPU,
# gpu_bench.py (ViT-S/16 and ViT-B/16, 128 px, bf16, eager and compiled) and a 1-GPU `sarjepa
# pretrain` through Ray Train; one JSON in benchmarks/results/gpu_check.json (benchmarks/gpu_check.py
# says what each part checks). Run `bash infra/dev/bootstrap.sh` once first. Extra arguments go to
# gpu_check.py (--dry-run: the same parts on the CPU, tiny; --out PATH).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${SARJEPA_PYTHON:-$ROOT/.venv/bin/python}"
if [[ ! -x "$PY" ]]; then
  echo "sarjepa: error: $PY not found; run 'bash infra/dev/bootstrap.sh' first (or set SARJEPA_PYTHON)" >&2
  exit 2
fi
cd "$ROOT"
exec "$PY" benchmarks/gpu_check.py "$@"
