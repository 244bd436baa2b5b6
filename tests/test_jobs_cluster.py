"""Real Ray Jobs on the local stack (`infra/dev/cluster.sh`): a `ray start --head` with token auth
and an S3 endpoint, driven the way a user does it: the `sarjepa` CLI in a shell that has
``AWS_REGION`` and ``AWS_ENDPOINT_URL`` set and no ``RAY_AUTH_MODE``.

A tiny pretraining job must reach its checkpoint in S3 (it failed in ``ray_init`` before: the
job's env_vars and the driver's runtime_env repeated the storage variables), and a few-shot job
on that checkpoint must write its report there. Every process the stack starts is stopped by PID,
also when a test fails.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sarjepa_dist.local_s3 import free_port

REPO = Path(__file__).resolve().parents[1]
CLUSTER_SH = REPO / "infra" / "dev" / "cluster.sh"
TINY_PRETRAIN = ["model.depth=2", "model.predictor_depth=1", "train.steps=2", "train.checkpoint_every=2",
                 "train.log_every=1", "data.batch_size=8", "data.shuffle_buffer=16",
                 # the job config's online probe, sized for 12 chips per class
                 "probe.shots=4", "probe.episodes=2"]

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.s3]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """`cluster.sh up` on free loopback ports; `down` afterwards, then SIGKILL to any group it left."""
    state = tmp_path_factory.mktemp("stack")
    ports = {name: str(free_port()) for name in ("RAY", "DASHBOARD", "S3", "AGENT", "CLIENT")}
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("AWS_", "RAY_ADDRESS", "RAY_AUTH_", "SARJEPA_"))}
    script_env = {**base, "SARJEPA_PYTHON": sys.executable, "SARJEPA_CLUSTER_DIR": str(state),
                  "SARJEPA_CLUSTER_CPUS": "4", **{f"SARJEPA_{k}_PORT": v for k, v in ports.items()}}
    groups: list[int] = []
    try:
        up = subprocess.run(["bash", str(CLUSTER_SH), "up"], env=script_env, capture_output=True, text=True,
                            timeout=240)
        groups = [int(p.read_text()) for p in state.glob("*.pid")]
        assert up.returncode == 0, up.stdout + up.stderr + (state / "ray.log").read_text(errors="replace")[-3000:]
        exported = dict(re.findall(r"^export (\w+)=(.*)$", (state / "env").read_text(), re.M))
        exported = {k: shlex.split(v)[0] for k, v in exported.items()}
        # the user's shell: the store's endpoint, region and keys; no RAY_AUTH_MODE, no RAY_ADDRESS
        client_env = {**base, **{k: v for k, v in exported.items() if k.startswith("AWS_")},
                      "PYTHONPATH": str(REPO), "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
        yield {"state": state, "ports": ports, "address": exported["RAY_ADDRESS"], "env": client_env,
               "groups": groups}
    finally:
        subprocess.run(["bash", str(CLUSTER_SH), "down"], env=script_env, capture_output=True, timeout=180)
        for pgid in groups:
            if _group_alive(pgid):
                os.killpg(pgid, signal.SIGKILL)


def sarjepa(stack, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sarjepa_dist.cli", *args], cwd=REPO, env=stack["env"],
                          capture_output=True, text=True, timeout=timeout)


def s3_keys(stack, prefix: str) -> list[str]:
    import boto3

    env = stack["env"]
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_REGION"],
                          aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    return [o["Key"] for o in client.list_objects_v2(Bucket="sarjepa", Prefix=prefix).get("Contents", [])]


def listening_addresses(pgid: int) -> set[tuple[str, int]]:
    """(ip, port) of every TCP socket that a process of group ``pgid`` listens on, from /proc."""
    inodes = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.getpgid(int(pid)) != pgid:
                continue
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    found = set()
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            hex_ip, hex_port = fields[1].split(":")
            raw = bytes.fromhex(hex_ip)
            # /proc stores each 32-bit word little-endian
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, width, 4))
            found.add((ipaddress.ip_address(raw).compressed, int(hex_port, 16)))
    return found


def test_the_head_listens_on_loopback_only_and_keeps_token_auth_on(stack):
    import requests

    anonymous = requests.get(f"{stack['address']}/api/jobs/", timeout=10)
    assert anonymous.status_code == 401, anonymous.status_code
    if not Path("/proc/net/tcp").exists():
        pytest.skip("listening sockets are read from /proc (Linux)")
    addresses = listening_addresses(int((stack["state"] / "ray.pid").read_text()))
    assert int(stack["ports"]["RAY"]) in {port for _, port in addresses}, sorted(addresses)
    assert {ip for ip, _ in addresses} <= {"127.0.0.1", "::ffff:7f00:1"}, sorted(addresses)


def test_pretrain_then_fewshot_jobs_from_a_shell_with_aws_region_and_endpoint(stack, tmp_path):
    assert {"AWS_REGION", "AWS_ENDPOINT_URL"} <= set(stack["env"]) and "RAY_AUTH_MODE" not in stack["env"]
    made = sarjepa(stack, "synth", "s3://sarjepa/data/synth64", "--classes", "2", "--per-class", "12", "--size", "64")
    assert made.returncode == 0, made.stderr[-3000:]

    overrides = [a for s in TINY_PRETRAIN for a in ("--set", s)]
    run = sarjepa(stack, "submit", "jobs/pretrain_local.job.yaml", "--address", stack["address"], "--wait", *overrides)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    job_id = re.search(r"^(pretrain-local-\d+): SUCCEEDED$", run.stdout, re.M).group(1)
    checkpoint = re.search(r"latest checkpoint (s3://sarjepa/runs/cpu-synth64/checkpoint_\S+)", run.stdout).group(1)
    key = checkpoint.removeprefix("s3://sarjepa/")
    assert f"{key}/model.safetensors" in s3_keys(stack, key), s3_keys(stack, "runs/")

    status = sarjepa(stack, "jobs", "status", job_id, "--address", stack["address"])
    assert status.returncode == 0 and f"{job_id}: SUCCEEDED" in status.stdout, status.stdout + status.stderr
    listed = sarjepa(stack, "jobs", "list", "--address", stack["address"])
    assert re.search(rf"^{job_id}\tSUCCEEDED\t", listed.stdout, re.M), listed.stdout
    assert "sarjepa-python-check" not in listed.stdout  # the interpreter probes stay out of the list

    fewshot = sarjepa(stack, "submit", "jobs/fewshot_local.job.yaml", "--address", stack["address"], "--wait",
                      "--set", f"fewshot.encoders=[{checkpoint}, raw-pixels]", "--set", "fewshot.shots=[1, 2]",
                      "--set", "fewshot.seeds=2", "--set", "fewshot.methods=[prototype]")
    assert fewshot.returncode == 0, fewshot.stdout[-6000:] + fewshot.stderr[-3000:]
    report = s3_keys(stack, "fewshot/synth64/")
    assert {"fewshot/synth64/results.json", "fewshot/synth64/report.md"} <= set(report), report

    if shutil.which("aws"):  # docs/DEPLOY.md, section 5: fetch the report and inspect the copy
        fetched = subprocess.run(["aws", "s3", "cp", "--recursive", "s3://sarjepa/fewshot/synth64/",
                                  str(tmp_path / "fewshot-report")], env=stack["env"], capture_output=True,
                                 text=True, timeout=120)
        assert fetched.returncode == 0, fetched.stderr
        inspected = sarjepa(stack, "inspect", str(tmp_path / "fewshot-report"))
        assert inspected.returncode == 0 and "sarjepa-fewshot-report" in inspected.stdout, inspected.stdout + inspected.stderr


def test_job_control_errors_are_one_line(stack):
    missing = sarjepa(stack, "jobs", "logs", "no-such-job", "--address", stack["address"])
    assert missing.returncode != 0 and "no job 'no-such-job'" in missing.stderr and "Traceback" not in missing.stderr
    no_token = {**stack["env"], "RAY_AUTH_TOKEN_PATH": "/nonexistent/auth_token"}
    refused = subprocess.run([sys.executable, "-m", "sarjepa_dist.cli", "jobs", "list", "--address", stack["address"]],
                             cwd=REPO, env=no_token, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "Missing authentication token" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr


def test_down_stops_every_process_it_started(stack):
    """Runs last in this module: `down` leaves none of the recorded process groups behind."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SARJEPA_")}
    env["SARJEPA_CLUSTER_DIR"] = str(stack["state"])
    down = subprocess.run(["bash", str(CLUSTER_SH), "down"], env=env, capture_output=True, text=True, timeout=180)
    assert down.returncode == 0, down.stderr
    deadline = time.time() + 30
    while any(_group_alive(g) for g in stack["groups"]) and time.time() < deadline:
        time.sleep(0.5)
    assert not any(_group_alive(g) for g in stack["groups"]), down.stdout + down.stderr
    assert not list(stack["state"].glob("*.pid"))
