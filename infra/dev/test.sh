#!/usr/bin/env bash
# The test command (README, .ci/run): bootstrap .venv, then run the whole suite.
# Tests start their own services: a moto S3 server on 127.0.0.1 and local Ray clusters.
# Extra arguments go to pytest, e.g. `bash infra/dev/test.sh -m "not slow"`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
bash "$ROOT/infra/dev/bootstrap.sh"
cd "$ROOT"
export RAY_DATA_DISABLE_PROGRESS_BARS=1 RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
set +e
"$ROOT/.venv/bin/python" -m pytest -q -ra --durations=15 "$@"
rc=$?
set -e
if [[ $rc -eq 5 ]]; then
  echo "no tests were collected: failing" >&2
  exit 1
fi
exit $rc
