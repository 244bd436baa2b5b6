#!/usr/bin/env bash
# The main job on embedded defaults: synthetic SAR chips into a local S3 endpoint, then
# `sarjepa pipeline` on a local Ray cluster: a four-trial Ray Tune sweep stopped early (ASHA) on
# the online few-shot probe, the best point pretrained, a few-shot report against the baselines.
# Extra arguments go to `sarjepa demo` (e.g. --out DIR, --quick).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
bash "$ROOT/infra/dev/bootstrap.sh"
cd "$ROOT"
export RAY_DATA_DISABLE_PROGRESS_BARS=1 RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
exec "$ROOT/.venv/bin/sarjepa" demo "$@"
