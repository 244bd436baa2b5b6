"""Every expected failure of every subcommand ends in one ``sarjepa: error:`` block naming the culprit.

Each case runs ``cli.main`` as a user would and asserts: the exit status (2 for a wrong command
line, config or job spec, 1 otherwise), stderr that starts with ``sarjepa: error:``, names the
offending path or key, holds exactly one error line and no traceback. None of them needs a Ray
cluster: pretrain, sweep and few-shot must refuse a missing dataset before Ray starts. A few run as
a separate process through ``python -m sarjepa_dist.cli``, and Ray's wrappers around a worker's
failure are unwrapped to the failure itself.
"""

from __future__ import annotations

import http.server
import io
import os
import pickle
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sarjepa_dist import storage
from sarjepa_dist.cli import main
from sarjepa_dist.data.badrows import BadDataError
from sarjepa_dist.data.synth import SynthConfig, write_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]
CANARY_SECRET = "cli-errors-canary-secret-9f3b"


def _png(seed: int, size: int = 20) -> bytes:
    buf = io.BytesIO()
    arr = np.random.default_rng(seed).integers(1, 255, size=(size, size), dtype=np.uint8)
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, str]:
    """Paths the cases refer to as ``{name}``; ``missing`` is never created."""
    root = tmp_path_factory.mktemp("cli-errors")
    (root / "afile.txt").write_text("not an artefact\n")
    (root / "bad.yaml").write_text("train: [steps: 5\n")
    images = root / "images"
    for cls in ("a", "b"):
        (images / cls).mkdir(parents=True)
        for i in range(3):
            (images / cls / f"{i}.png").write_bytes(_png(10 * i + len(cls)))
    good = _png(99)
    (images / "b" / "truncated.png").write_bytes(good[: len(good) // 2])
    (images / "b" / "empty.png").write_bytes(b"")
    dataset = root / "dataset"
    write_synthetic_dataset(str(dataset), SynthConfig(num_classes=2, per_class=6, size=16))
    return {"root": str(root), "missing": str(root / "missing"), "afile": str(root / "afile.txt"),
            "bad_yaml": str(root / "bad.yaml"), "images": str(images), "dataset": str(dataset)}


class _AccessDenied(http.server.BaseHTTPRequestHandler):
    """An S3 endpoint that answers every request as S3 does for credentials without rights."""

    def _deny(self) -> None:
        body = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
                b"<Message>Access Denied</Message></Error>")
        self.send_response(403)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _deny

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def endpoints():
    """``refusing``: answers 403 AccessDenied; ``closed``: a loopback port nothing listens on."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _AccessDenied)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    try:
        yield {"refusing": f"http://127.0.0.1:{server.server_address[1]}", "closed": f"http://127.0.0.1:{closed_port}"}
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def s3_env(monkeypatch):
    """Fresh S3 settings per case, dummy credentials, and no instance-metadata lookup (it would wait)."""
    monkeypatch.setattr(storage, "_settings_override", None)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "cli-errors-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CANARY_SECRET)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    # these cases test the message, not the retry budget: an unreachable endpoint gives up after two tries
    monkeypatch.setenv("SARJEPA_S3_RETRY_ATTEMPTS", "2")
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def assert_one_error_block(err: str, rc: int, expected_rc: int, needles: list[str]) -> None:
    assert rc == expected_rc, err
    assert err.startswith("sarjepa: error: "), err
    assert err.count("sarjepa: error:") == 1, err
    assert "Traceback" not in err, err
    assert CANARY_SECRET not in err
    for needle in needles:
        assert needle in err, (needle, err)


# (case id, argv, S3 endpoint or None, exit status, what stderr must name); {name} -> world[name]
CASES = [
    ("config-out-of-range", ["pretrain", "--set", "optim.lr=-1"], None, 2, ["optim.lr = -1.0"]),
    ("config-unknown-key", ["sweep", "--set", "tune.bogus=1"], None, 2, ["'tune.bogus'"]),
    ("config-file-missing", ["fewshot", "--config", "{missing}/f.yaml"], None, 2, ["{missing}/f.yaml"]),
    ("config-not-yaml", ["pretrain", "--config", "{bad_yaml}"], None, 2, ["{bad_yaml}", "not valid YAML"]),
    ("config-no-dataset", ["pretrain"], None, 2, ["data.path is empty"]),
    ("ingest-bad-files-over-budget", ["ingest", "images", "{images}", "{root}/never-written", "--size", "16"],
     None, 1, ["2 of 8 inputs are bad", "b/truncated.png", "b/empty.png", "--max-bad-fraction"]),
    ("ingest-images-missing-folder", ["ingest", "images", "{missing}", "{root}/out", "--size", "64"],
     None, 1, ["{missing}: no such file or folder"]),
    ("ingest-arrays-missing-file", ["ingest", "arrays", "{missing}/stack.npz", "{root}/out"],
     None, 1, ["{missing}/stack.npz"]),
    ("ingest-scene-missing-file", ["ingest", "scene", "{missing}/scene.tif", "{root}/out", "--tile", "16"],
     None, 1, ["{missing}/scene.tif"]),
    ("synth-dest-under-a-file", ["synth", "{afile}/ds", "--classes", "2", "--per-class", "2", "--size", "16"],
     None, 1, ["{afile}/ds", "cannot write"]),
    ("inspect-missing-path", ["inspect", "{missing}"], None, 1, ["{missing}: no such file or folder"]),
    ("inspect-unknown-file", ["inspect", "{afile}"], None, 1, ["{afile}: not a dataset"]),
    ("export-missing-path", ["export", "{missing}", "{root}/enc"], None, 1, ["{missing}: no such file or folder"]),
    ("export-given-a-file", ["export", "{afile}", "{root}/enc"], None, 1, ["{afile}: is a file"]),
    ("export-folder-without-checkpoint", ["export", "{dataset}", "{root}/enc"], None, 1,
     ["{dataset}: neither a checkpoint folder", "checkpoint_<step>_<id>"]),
    ("pretrain-missing-dataset", ["pretrain", "--set", "data.path={missing}"], None, 1,
     ["{missing}: no manifest.json"]),
    ("sweep-missing-dataset", ["sweep", "--set", "data.path={missing}", "--set", "probe.every=5",
                               "--set", "tune.search={{optim.lr: [0.001]}}"],
     None, 1, ["{missing}: no manifest.json"]),
    ("sweep-invalid-search-point", ["sweep", "--set", "data.path={dataset}", "--set", "probe.every=5",
                                    "--set", "tune.search={{optim.lr: {{loguniform: [1.0e-4, 20.0]}}}}"],
     None, 2, ["tune.search.optim.lr: the value 20.0 is invalid", "optim.lr = 20.0 is out of range"]),
    ("fewshot-missing-dataset", ["fewshot", "--set", "fewshot.data={missing}"], None, 1,
     ["{missing}: no manifest.json"]),
    ("fewshot-missing-checkpoint", ["fewshot", "--set", "fewshot.data={dataset}", "--set",
                                    "fewshot.encoders=[{missing}/checkpoint_00000010_abc]", "--set",
                                    "fewshot.shots=[1]", "--set", "data.img_size=16"],
     None, 1, ["{missing}/checkpoint_00000010_abc", "no such file or folder"]),
    ("pretrain-storage-access-denied", ["pretrain", "--set", "data.path=s3://bucket/ds"], "refusing", 1,
     ["s3://bucket/ds/manifest.json: cannot read", "ACCESS_DENIED"]),
    ("inspect-storage-unreachable", ["inspect", "s3://bucket/ds"], "closed", 1,
     ["s3://bucket/ds: cannot read", "connect"]),
    ("ingest-storage-unreachable", ["ingest", "images", "s3://bucket/src", "{root}/out", "--size", "16"],
     "closed", 1, ["s3://bucket/src: cannot read"]),
    ("export-storage-access-denied", ["export", "s3://bucket/run", "{root}/enc"], "refusing", 1,
     ["s3://bucket/run: cannot read", "ACCESS_DENIED"]),
    ("submit-missing-spec", ["submit", "{missing}/pretrain.job.yaml"], None, 2, ["{missing}/pretrain.job.yaml"]),
    ("demo-out-under-a-file", ["demo", "--out", "{afile}/demo"], None, 1, ["{afile}/demo"]),
]


@pytest.mark.parametrize("argv, endpoint, expected_rc, needles", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_expected_failure_is_one_clear_error(argv, endpoint, expected_rc, needles, world, endpoints, s3_env, capsys):
    if endpoint:
        s3_env.setenv("AWS_ENDPOINT_URL", endpoints[endpoint])
    rc = main([a.format(**world) for a in argv])
    captured = capsys.readouterr()
    assert_one_error_block(captured.err, rc, expected_rc, [n.format(**world) for n in needles])
    assert captured.out == ""


def test_refused_ingest_leaves_no_dataset(world, capsys):
    dest = Path(world["root"]) / "refused-ingest"
    assert main(["ingest", "images", world["images"], str(dest), "--size", "16"]) == 1
    assert not dest.exists()
    # the same files within budget are ingested, the bad ones quarantined
    assert main(["ingest", "images", world["images"], str(dest), "--size", "16", "--max-bad-fraction", "0.3"]) == 0
    assert "wrote 6 chips" in capsys.readouterr().out


def test_pretrain_refuses_a_missing_dataset_before_ray_starts(world, s3_env, capsys):
    import ray

    assert not ray.is_initialized()
    assert main(["pretrain", "--set", f"data.path={world['missing']}"]) == 1
    assert not ray.is_initialized()
    assert "no manifest.json" in capsys.readouterr().err


@pytest.mark.parametrize("flag_first", [True, False])
def test_verbose_adds_the_traceback(world, capsys, flag_first):
    argv = ["inspect", world["missing"]]
    assert main(["-v", *argv] if flag_first else [*argv, "-v"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "InputNotFoundError" in err
    assert err.rstrip().splitlines()[-1] == f"sarjepa: error: {world['missing']}: no such file or folder"


def test_a_bug_keeps_its_traceback(world, monkeypatch):
    import sarjepa_dist.lineage as lineage

    def broken(artefact):
        raise KeyError("a bug, not a user error")

    monkeypatch.setattr(lineage, "describe", broken)
    with pytest.raises(KeyError, match="a bug"):
        main(["inspect", world["dataset"]])


def _fail_pretrain_with(monkeypatch, exc: BaseException) -> None:
    import sarjepa_dist.train.runner as runner

    def failing(cfg, **kwargs):
        raise exc

    monkeypatch.setattr(runner, "run_pretrain", failing)


def test_a_train_workers_expected_failure_is_reported_without_rays_wrapping(world, monkeypatch, capsys):
    from ray.train import WorkerGroupError

    example = {"reason": "nan_or_inf", "chip_id": "c-17", "shard": "s0.parquet"}
    # raised in a train worker, it reaches the driver pickled
    bad = pickle.loads(pickle.dumps(BadDataError({"nan_or_inf": 7}, 40, 0.05, [example])))
    _fail_pretrain_with(monkeypatch, WorkerGroupError("Traceback (most recent call last): ...", {0: bad, 1: bad}))
    rc = main(["pretrain", "--set", f"data.path={world['dataset']}"])
    assert_one_error_block(capsys.readouterr().err, rc, 1,
                           ["7 of 40 rows are bad", "data.max_bad_fraction = 0.05", "c-17 in s0.parquet"])


def test_a_remote_storage_failure_is_reported_without_the_remote_traceback(world, monkeypatch, capsys):
    from ray.exceptions import RayTaskError

    cause = storage.StorageError("s3://bucket/run/checkpoint_00000020_ab12cd/model.safetensors: cannot write: "
                                 "AWS Error NETWORK_CONNECTION")
    wrapped = RayTaskError("upload", "Traceback (most recent call last):\n  File 'x.py'", cause).as_instanceof_cause()
    _fail_pretrain_with(monkeypatch, wrapped)
    rc = main(["pretrain", "--set", f"data.path={world['dataset']}"])
    assert_one_error_block(capsys.readouterr().err, rc, 1,
                           ["checkpoint_00000020_ab12cd/model.safetensors: cannot write"])


def test_a_bug_inside_a_train_worker_keeps_its_traceback(world, monkeypatch):
    from ray.train import WorkerGroupError

    _fail_pretrain_with(monkeypatch, WorkerGroupError("worker 0 failed", {0: ZeroDivisionError("division by zero")}))
    with pytest.raises(WorkerGroupError):
        main(["pretrain", "--set", f"data.path={world['dataset']}"])


def _run_cli(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0", **(env or {})}
    return subprocess.run([sys.executable, "-m", "sarjepa_dist.cli", *argv], capture_output=True, text=True,
                          env=full_env, cwd=REPO, timeout=300)


@pytest.mark.parametrize("argv, needle", [
    (["inspect", "{missing}"], "{missing}"),
    (["export", "{missing}", "{root}/out"], "{missing}"),
    (["ingest", "images", "{missing}", "{root}/out", "--size", "64"], "{missing}"),
], ids=["inspect", "export", "ingest"])
def test_as_a_process(world, argv, needle):
    proc = _run_cli(*[a.format(**world) for a in argv])
    assert_one_error_block(proc.stderr, proc.returncode, 1, [needle.format(**world)])


def test_a_refused_job_submission(world, endpoints):
    """No job server at the address: the submission is refused with the address named."""
    proc = _run_cli("submit", str(REPO / "jobs" / "pretrain.job.yaml"), "--address", endpoints["closed"])
    err_line = [line for line in proc.stderr.splitlines() if line.startswith("sarjepa: error:")]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert len(err_line) == 1 and endpoints["closed"] in err_line[0] and "cannot reach" in err_line[0], proc.stderr
