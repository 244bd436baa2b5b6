#!/usr/bin/env bash
# A real local Ray cluster for `sarjepa submit` / `sarjepa jobs`: a `ray start --head` on
# 127.0.0.1 (dashboard and job server on loopback, token auth on) plus an S3 endpoint (moto
# server on 127.0.0.1) with a bucket. Every process is recorded by PID and stopped by PID.
#
#   bash infra/dev/cluster.sh up      # prints what to `source` for the endpoint and the job server
#   bash infra/dev/cluster.sh status
#   bash infra/dev/cluster.sh down
#
# Jobs run `python` from the head's PATH: the head starts with the project's interpreter first on
# it (SARJEPA_PYTHON, default .venv/bin/python), so jobs import the project's dependencies.
# The cluster holds the store's credentials itself (its processes inherit them); job specs forward
# only the endpoint and region.
# Ports (override with the variables): GCS 6379 (SARJEPA_RAY_PORT), job server 8265
# (SARJEPA_DASHBOARD_PORT), S3 9000 (SARJEPA_S3_PORT), dashboard agent 52365
# (SARJEPA_AGENT_PORT), Ray client 10001 (SARJEPA_CLIENT_PORT), bucket `sarjepa` (SARJEPA_BUCKET).
# Ray's GCS, raylet, object manager, agents and workers listen on all interfaces even with a
# loopback node address (docs/DEPLOY.md, "Which ports listen where"): firewall them.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
STATE="${SARJEPA_CLUSTER_DIR:-$ROOT/.cluster}"
PY="${SARJEPA_PYTHON:-$ROOT/.venv/bin/python}"
RAY_PORT="${SARJEPA_RAY_PORT:-6379}"
DASHBOARD_PORT="${SARJEPA_DASHBOARD_PORT:-8265}"
S3_PORT="${SARJEPA_S3_PORT:-9000}"
AGENT_PORT="${SARJEPA_AGENT_PORT:-52365}"
CLIENT_PORT="${SARJEPA_CLIENT_PORT:-10001}"
BUCKET="${SARJEPA_BUCKET:-sarjepa}"
NUM_CPUS="${SARJEPA_CLUSTER_CPUS:-4}"

die() { echo "cluster.sh: error: $*" >&2; exit 1; }

alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

wait_for_port() {  # port, pid file, what
  local deadline=$((SECONDS + 120))
  until "$PY" -c "import socket,sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), 1)" "$1" 2>/dev/null; do
    alive "$2" || die "$3 exited during start-up; see $STATE/${3}.log"
    (( SECONDS < deadline )) || die "$3 did not open 127.0.0.1:$1 within 120 s; see $STATE/${3}.log"
    sleep 1
  done
}

# Stop the process group led by the recorded PID (setsid made it the leader; only processes this
# script started are in it): SIGINT to the leader first (`ray start --block` then shuts its node
# down in order), SIGTERM to the group after 30 s, SIGKILL after 30 more.
stop_group() {  # pid file, what
  [[ -f "$1" ]] || return 0
  local pid signal deadline; pid="$(cat "$1")"
  for signal in INT TERM KILL; do
    kill -0 -- "-$pid" 2>/dev/null || break
    if [[ $signal == INT ]]; then kill -INT "$pid" 2>/dev/null || true
    else echo "cluster.sh: $2 (group $pid) still running: SIG$signal to the group" >&2; kill "-$signal" -- "-$pid" 2>/dev/null || true
    fi
    deadline=$((SECONDS + 30))
    while kill -0 -- "-$pid" 2>/dev/null && (( SECONDS < deadline )); do sleep 0.5; done
  done
  echo "stopped $2 (process group $pid)"
  rm -f "$1"
}

up() {  # pid file, what
  [[ -f "$1" ]] || return 0
  local pid; pid="$(cat "$1")"
  if kill -0 "$pid" 2>/dev/null || kill -0 -- "-$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || true
    local deadline=$((SECONDS + 30))
    while kill -0 -- "-$pid" 2>/dev/null && (( SECONDS < deadline )); do sleep 0.5; done
    if kill -0 -- "-$pid" 2>/dev/null; then
      echo "cluster.sh: $2 (group $pid) ignored SIGTERM for 30 s: SIGKILL" >&2
      kill -KILL -- "-$pid" 2>/dev/null || true
    fi
    echo "stopped $2 (process group $pid)"
  fi
  rm -f "$1"
}

up() {
  [[ -x "$PY" ]] || die "no interpreter at $PY: run 'bash infra/dev/bootstrap.sh' or set SARJEPA_PYTHON"
  alive "$STATE/ray.pid" && die "a head from this checkout is already up (PID $(cat "$STATE/ray.pid")); run '$0 down' first"
  local bin port; bin="$(dirname "$PY")"
  [[ -x "$bin/ray" ]] || die "no 'ray' beside $PY: install the project into that environment"
  for port in "$RAY_PORT" "$DASHBOARD_PORT" "$S3_PORT" "$AGENT_PORT" "$CLIENT_PORT"; do
    "$PY" -c "import socket,sys; s=socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1])))" "$port" 2>/dev/null \
      || die "127.0.0.1:$port is in use; choose other ports (SARJEPA_*_PORT, see the top of $0)"
  done
  mkdir -p "$STATE"
  # a failed start-up stops whatever it had started
  trap 'echo "cluster.sh: start-up failed; stopping what it started" >&2; down' EXIT

  # S3 endpoint with the bucket; its credentials are the local store's, kept in $STATE/env
  setsid "$PY" -m moto.server -H 127.0.0.1 -p "$S3_PORT" >"$STATE/s3.log" 2>&1 &
  echo $! >"$STATE/s3.pid"
  wait_for_port "$S3_PORT" "$STATE/s3.pid" s3
  "$PY" - "$STATE/env" "$S3_PORT" "$DASHBOARD_PORT" "$BUCKET" <<'PYEOF'
import os, shlex, sys
from sarjepa_dist.local_s3 import TEST_CREDENTIALS, create_bucket
env_file, s3_port, dash_port, bucket = sys.argv[1:]
env = {**TEST_CREDENTIALS, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}",
       "RAY_ADDRESS": f"http://127.0.0.1:{dash_port}"}
os.environ.update(env)  # boto3 takes the local store's credentials from the environment
create_bucket(env["AWS_ENDPOINT_URL"], bucket)
with open(env_file, "w") as fh:
    fh.writelines(f"export {k}={shlex.quote(v)}\n" for k, v in sorted(env.items()))
PYEOF
  chmod 600 "$STATE/env"

  # token auth on: `ray start` turns it on only when told (RAY_AUTH_MODE) and a token exists
  export RAY_AUTH_MODE=token
  "$bin/ray" get-auth-token --generate >/dev/null
  local temp; temp="$(mktemp -d /tmp/sarjepa-ray.XXXXXX)"   # short: Ray's socket paths must fit 107 bytes
  echo "$temp" >"$STATE/ray.tempdir"
  (
    set -a; source "$STATE/env"; set +a
    unset RAY_ADDRESS "${!SARJEPA_@}"
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is Ray's single-host switch: without it the job driver
    # and workers reach the head through the machine's interface address instead of loopback
    export PATH="$bin:$PATH" RAY_USAGE_STATS_ENABLED=0 RAY_DATA_DISABLE_PROGRESS_BARS=1 \
      RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
    exec setsid "$bin/ray" start --head --block --node-ip-address=127.0.0.1 --port="$RAY_PORT" \
      --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" --dashboard-agent-listen-port="$AGENT_PORT" \
      --ray-client-server-port="$CLIENT_PORT" --num-cpus="$NUM_CPUS" --temp-dir="$temp" --disable-usage-stats
  ) >"$STATE/ray.log" 2>&1 &
  echo $! >"$STATE/ray.pid"
  wait_for_port "$DASHBOARD_PORT" "$STATE/ray.pid" ray
  echo "Ray head (PID $(cat "$STATE/ray.pid")): GCS 127.0.0.1:$RAY_PORT, job server http://127.0.0.1:$DASHBOARD_PORT (token auth on)"
  echo "S3 endpoint (PID $(cat "$STATE/s3.pid")): http://127.0.0.1:$S3_PORT, bucket s3://$BUCKET"
  echo "jobs run: $PY"
  echo "next: source $STATE/env"
  trap - EXIT
}

down() {
  stop_group "$STATE/ray.pid" "Ray head"
  stop_group "$STATE/s3.pid" "S3 endpoint"
  if [[ -f "$STATE/ray.tempdir" ]]; then
    rm -rf "$(cat "$STATE/ray.tempdir")"
    rm -f "$STATE/ray.tempdir"
  fi
}

status() {
  local rc=0
  if alive "$STATE/ray.pid"; then echo "Ray head: up (PID $(cat "$STATE/ray.pid"))"; else echo "Ray head: down"; rc=1; fi
  if alive "$STATE/s3.pid"; then echo "S3 endpoint: up (PID $(cat "$STATE/s3.pid"))"; else echo "S3 endpoint: down"; rc=1; fi
  return $rc
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
