#!/usr/bin/env bash
# The fault-injection suite (nightly): every reliability test, the heavy ones marked `faults`
# included (skipped in the default suite to keep CI within its budget), then the reliability
# figures (benchmarks/results/reliability.json). Extra arguments go to the first pytest run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
bash "$ROOT/infra/dev/bootstrap.sh"
cd "$ROOT"
export RAY_DATA_DISABLE_PROGRESS_BARS=1 RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1 SARJEPA_FAULTS=1
"$ROOT/.venv/bin/python" -m pytest -q -ra --durations=15 \
  tests/data/test_badrows.py tests/model/test_io.py tests/data/test_shards.py \
  tests/train/test_reliability.py tests/test_canary.py tests/test_s3_outage.py "$@"
# runs the heavy fault tests itself (node removal, resume-equivalence through Ray, S3 outage,
# sweep driver killed) and saves their figures with the rest
"$ROOT/.venv/bin/python" benchmarks/reliability.py
