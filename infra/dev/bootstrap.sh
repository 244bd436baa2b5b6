#!/usr/bin/env bash
# Create or reuse the project-local virtual environment (.venv) and install the project into it.
# torch/torchvision are pinned (infra/constraints.txt) and installed first: an unpinned torch
# would pull a multi-GB build. Re-running is cheap: a stamp records what was installed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"
STAMP="$VENV/.sarjepa-installed"
want="$(cat "$ROOT/pyproject.toml" "$ROOT/infra/constraints.txt" | sha256sum | cut -c1-16)"

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "[bootstrap] creating $VENV" >&2
  "$PY" -m venv "$VENV"
fi
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
  exit 0
fi
echo "[bootstrap] installing dependencies (first run takes a few minutes)" >&2
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
"$VENV/bin/python" -m pip install -q -c "$ROOT/infra/constraints.txt" torch torchvision >&2
"$VENV/bin/python" -m pip install -q -c "$ROOT/infra/constraints.txt" -e "$ROOT[test]" >&2
echo "$want" > "$STAMP"
