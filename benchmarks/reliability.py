"""Reliability figures: faults injected into pretraining on a local Ray cluster and survived, steps
lost, recovery time, bad inputs tried and refused clearly, and rows lost (must be 0).

Faults (each one run of ``run_pretrain``, side by side with a clean run of the same config):

    exception   a step hook raises in the train worker after step FAULT_STEP
    sigkill     a step hook SIGKILLs the train worker process after step FAULT_STEP
    bad-shard   one shard truncated (25 % of the rows), under data.max_bad_fraction: quarantined

``steps_lost`` = FAULT_STEP minus the step the run resumed from (at most one checkpoint interval);
``recovery_s`` = the faulted run's wall time minus the clean run's (restart, restore, redone steps).

The heavier faults are the fault suite's tests, run here with pytest (SARJEPA_FAULTS=1); each test
that passes leaves its figures (tests/_figures.py) and a failed one is a row with survived false:

    node removed    Cluster.remove_node under rank 1 of 2 (tests/train/test_node_removal.py);
                    recovery_s = removal to the restarted group's first step
    resume-equal    SIGKILL, resume mid-epoch, parameters equal to an uninterrupted run
                    (tests/train/test_resume_equivalence_ray.py); recovery_s = kill to first step
    S3 outage       the store stalls / refuses for 15 s during an upload and during streaming, and
                    is down for good past the retry budget (tests/train/test_s3_outage_pretrain.py)
    sweep driver    the sweep's driver SIGKILLed mid-trial, relaunched (tests/tune/test_sweep_driver_killed.py)

Bad inputs (each must end in one clear error: a ``SarjepaError`` whose message names the culprit;
through ``sarjepa`` itself where a command takes it, checked for exit status, one
``sarjepa: error:`` line and no traceback): a missing dataset, a tampered checkpoint, a checkpoint
whose optimizer.pt holds a code-running pickle, a second writer into a dataset being written, an
unreadable shard over data.max_bad_fraction, an out-of-range config value.

Rows lost: one evaluation pass (every good row once) over a dataset with NaN chips and a
truncated shard; delivered + counted bad must equal the manifest's rows, and every good row of
the readable shards must arrive.

Usage: ``python benchmarks/reliability.py [--out benchmarks/results/reliability.json] [--no-fault-suite]``
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sarjepa_dist import storage  # noqa: E402
from sarjepa_dist.config import config_from_dict  # noqa: E402
from sarjepa_dist.data import shards  # noqa: E402
from sarjepa_dist.data.synth import SynthConfig, generate  # noqa: E402
from sarjepa_dist.errors import SarjepaError  # noqa: E402

STEPS, CHECKPOINT_EVERY, FAULT_STEP = 12, 4, 7
FAULT_SUITE = ("tests/train/test_node_removal.py", "tests/train/test_resume_equivalence_ray.py",
               "tests/train/test_s3_outage_pretrain.py", "tests/tune/test_sweep_driver_killed.py")
IMG, CHIPS_PER_SHARD, NAN_CHIPS = 32, 40, 2


@dataclass(frozen=True)
class Fault:
    """Step hook: after ``step`` on rank 0, once (marker file), raise or SIGKILL this process."""

    step: int
    marker: str
    kill: bool

    def __call__(self, view: Any) -> None:
        if view.step != self.step or view.rank != 0 or os.path.exists(self.marker):
            return
        Path(self.marker).write_text(f"fault at step {view.step}, pid {os.getpid()}\n")
        if self.kill:
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"injected fault at step {view.step}")


def write_dataset(root: str) -> shards.Manifest:
    """4 classes x 40 synthetic chips in shards of 40, NAN_CHIPS of them NaN."""
    batch = generate(SynthConfig(num_classes=4, per_class=40, size=IMG, seed=0))
    names = list(batch.class_names)
    with shards.ShardWriter(root, class_names=names, command=["reliability"],
                            target_shard_mib=CHIPS_PER_SHARD * IMG * IMG * 4 / 2**20) as w:
        for i in range(len(batch)):
            chip = batch.chips[i].copy()
            if i in (53, 106)[:NAN_CHIPS]:
                chip[0, 0, 0] = np.nan
            w.add(shards.ChipRecord(f"c{i:05d}", chip, label=int(batch.labels[i]),
                                    class_name=names[int(batch.labels[i])]))
        return w.commit()


def truncate_shard(root: str, index: int) -> str:
    manifest = shards.read_manifest(root)
    uri = storage.join(root, manifest.shards[index].path)
    data = storage.read_bytes(uri)
    storage.write_bytes(uri, data[: len(data) // 3])
    return uri


def tiny_config(data: str, runs: str, name: str, **data_kw: Any):
    return config_from_dict({
        "data": {"path": data, "img_size": IMG, "batch_size": 8, "shuffle_buffer": 32, "max_bad_fraction": 0.05,
                 **data_kw},
        "gradient": {"radii": [2, 4]}, "mask": {"min_keep": 4},
        "model": {"encoder": "vit_tiny", "patch_size": 4, "depth": 2, "predictor_dim": 32,
                  "predictor_depth": 1, "predictor_heads": 2},
        "train": {"name": name, "storage_path": runs, "steps": STEPS, "checkpoint_every": CHECKPOINT_EVERY,
                  "log_every": 2, "num_workers": 1, "cpus_per_worker": 0.5, "max_failures": 1},
    })


def run_faults(work: Path) -> list[dict[str, Any]]:
    from sarjepa_dist.train.runner import run_pretrain

    data = str(work / "chips")
    write_dataset(data)
    started = time.perf_counter()
    clean = run_pretrain(tiny_config(data, str(work / "runs"), "clean"))
    clean_s = time.perf_counter() - started
    rows = [{"fault": "none (clean run)", "survived": clean.final_step == STEPS, "final_step": clean.final_step,
             "steps_lost": 0, "wall_s": round(clean_s, 1), "recovery_s": 0.0}]
    for kind in ("exception", "sigkill"):
        marker = str(work / f"{kind}.marker")
        started = time.perf_counter()
        result = run_pretrain(tiny_config(data, str(work / "runs"), kind),
                              step_hooks=[Fault(FAULT_STEP, marker, kill=kind == "sigkill")])
        wall = time.perf_counter() - started
        resumed = [h["resumed_from_step"] for h in result.metrics_history if h["resumed_from_step"] != -1]
        rows.append({"fault": f"{kind} in the train worker at step {FAULT_STEP}",
                     "injected": os.path.exists(marker), "survived": result.final_step == STEPS,
                     "final_step": result.final_step, "resumed_from_step": resumed[0] if resumed else None,
                     "steps_lost": FAULT_STEP - resumed[0] if resumed else None,
                     "wall_s": round(wall, 1), "recovery_s": round(wall - clean_s, 1)})
    bad = str(work / "chips-bad-shard")
    write_dataset(bad)
    quarantined_uri = truncate_shard(bad, 0)
    started = time.perf_counter()
    result = run_pretrain(tiny_config(bad, str(work / "runs"), "bad-shard", max_bad_fraction=0.3))
    last = result.metrics_history[-1]
    rows.append({"fault": "truncated shard (25 % of rows), under data.max_bad_fraction", "survived":
                 result.final_step == STEPS and last["bad_shards_quarantined"] == 1, "final_step": result.final_step,
                 "steps_lost": 0, "quarantined": quarantined_uri, "unreadable_rows": last["bad_rows/unreadable"],
                 "wall_s": round(time.perf_counter() - started, 1),
                 "recovery_s": round(time.perf_counter() - started - clean_s, 1)})
    return rows


def fault_suite(work: Path) -> list[dict[str, Any]]:
    """Run the fault suite's heavy tests (own Ray clusters, one pytest process); their figures."""
    figures = work / "fault-suite.jsonl"
    report = work / "fault-suite.xml"
    env = {**os.environ, "SARJEPA_FAULTS": "1", "SARJEPA_RELIABILITY_FIGURES": str(figures),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
                    *FAULT_SUITE], cwd=ROOT, env=env, check=False)
    rows = [json.loads(line) for line in figures.read_text().splitlines()] if figures.exists() else []
    import xml.etree.ElementTree as ET

    cases = ET.parse(report).getroot().iter("testcase") if report.exists() else []
    for case in cases:
        if case.find("failure") is not None or case.find("error") is not None:
            rows.append({"fault": f"{case.get('classname')}::{case.get('name')}", "survived": False,
                         "test_failed": True})
    return rows


def _clear(run: Callable[[], Any], must_name: str) -> dict[str, Any]:
    """Run ``run``; it must raise a SarjepaError (behind Ray's wrappers, as ``sarjepa`` unwraps
    them) whose message names ``must_name``."""
    from sarjepa_dist.cli import expected_failure

    try:
        run()
    except Exception as exc:  # noqa: BLE001 - judged below
        failure = expected_failure(exc) or exc
        return {"refused": True, "clear": isinstance(failure, SarjepaError) and must_name in str(failure),
                "error": type(failure).__name__, "message": str(failure)[:300]}
    return {"refused": False, "clear": False}


def _cli(argv: list[str], must_name: str) -> dict[str, Any]:
    """``sarjepa <argv>`` in-process: non-zero exit, one 'sarjepa: error:' line naming the culprit."""
    from sarjepa_dist.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    text = err.getvalue()
    clear = (code != 0 and text.startswith("sarjepa: error:") and "Traceback" not in text and must_name in text)
    return {"refused": code != 0, "clear": clear, "exit_code": code, "message": text.strip()[:300]}


def bad_inputs(work: Path) -> list[dict[str, Any]]:
    from sarjepa_dist.engine import build_method
    from sarjepa_dist.model import io as mio
    from sarjepa_dist.optim import build_optimizer
    from sarjepa_dist.train.runner import run_pretrain

    cfg = tiny_config(str(work / "chips"), str(work / "runs"), "clean")
    ckpt = Path(sorted((work / "runs" / "clean").glob("checkpoint_0*"))[-1])
    tampered, pickled = work / "tampered", work / "pickled"
    for target in (tampered, pickled):
        storage.upload_dir(ckpt, str(target))
    (tampered / "model.safetensors").write_bytes((tampered / "model.safetensors").read_bytes()[:-8] + b"\0" * 8)

    class RunsCode:
        def __reduce__(self):
            return (open, (str(work / "payload-ran"), "w"))

    import torch
    torch.save({"state": RunsCode()}, pickled / "optimizer.pt")
    meta = json.loads((pickled / "meta.json").read_text())
    meta["files"]["optimizer.pt"] = mio.file_sha256(pickled / "optimizer.pt")  # an attacker fixes the hash
    (pickled / "meta.json").write_text(json.dumps(meta))

    def load_pickled():
        model, _ = build_method(cfg)
        mio.load_checkpoint_dir(pickled, model, build_optimizer(model, cfg.optim))

    def second_writer():
        with shards.ShardWriter(str(work / "busy"), command=["first"]):
            with shards.ShardWriter(str(work / "busy"), command=["second"]):
                pass

    over = str(work / "chips-over")
    write_dataset(over)
    over_uri = truncate_shard(over, 1)
    cases = {
        "missing dataset (sarjepa inspect)": _cli(["inspect", str(work / "no-such-dataset")], "no-such-dataset"),
        "tampered checkpoint (sarjepa export)": _cli(["export", str(tampered), str(work / "exp")], "model.safetensors"),
        "code-running pickle in optimizer.pt": _clear(load_pickled, "optimizer.pt"),
        "second writer into a DEST being written": _clear(second_writer, shards.LOCK_NAME),
        "unreadable shard over data.max_bad_fraction": _clear(
            lambda: run_pretrain(tiny_config(over, str(work / "runs"), "over", max_bad_fraction=0.05)), over_uri),
        "out-of-range config value (mask scale > 1)": _clear(
            lambda: config_from_dict({"mask": {"target_scale": [0.5, 1.5]}}), "mask.target_scale"),
    }
    assert not (work / "payload-ran").exists(), "a pickled payload ran"
    return [{"input": name, **row} for name, row in cases.items()]


def rows_lost(work: Path) -> dict[str, Any]:
    """One evaluation pass over a dataset with NaN chips and a truncated shard."""
    from sarjepa_dist.config import GradientConfig
    from sarjepa_dist.data.pipeline import build_dataset, dataset_tracker

    root = str(work / "chips-lost")
    write_dataset(root)
    manifest = shards.read_manifest(root)
    truncate_shard(root, 2)
    readable = {f"c{i:05d}" for i in range(len(manifest.shards) * CHIPS_PER_SHARD)
                if i // CHIPS_PER_SHARD != 2 and i not in (53, 106)[:NAN_CHIPS]}
    cfg = tiny_config(root, str(work / "runs"), "lost").data
    ds = build_dataset(cfg, GradientConfig(radii=(2, 4)), need=("x",), training=False, run_name="rows-lost")
    delivered = [cid for batch in ds.iter_batches(batch_size=64, batch_format="numpy") for cid in batch["chip_id"]]
    snap = dataset_tracker(ds).snapshot()
    dataset_tracker(ds).kill()
    return {"manifest_rows": manifest.num_chips, "delivered": len(delivered), "delivered_twice":
            len(delivered) - len(set(delivered)), "counted_bad": sum(snap["counts"].values()),
            "bad_by_reason": snap["counts"], "good_rows_lost": len(readable - set(delivered)),
            "accounted_for": len(delivered) + sum(snap["counts"].values()) == manifest.num_chips}


def main() -> None:
    import ray

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "reliability.json"))
    parser.add_argument("--no-fault-suite", action="store_true", help="skip the heavy fault tests")
    args = parser.parse_args()
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory(prefix="sarjepa-reliability-") as tmp:
            work = Path(tmp)
            faults = run_faults(work)
            inputs = bad_inputs(work)
            lost = rows_lost(work)
    finally:
        ray.shutdown()
    if not args.no_fault_suite:
        with tempfile.TemporaryDirectory(prefix="sarjepa-fault-suite-") as tmp:
            faults += fault_suite(Path(tmp))
    out = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
           "steps": STEPS, "checkpoint_every": CHECKPOINT_EVERY, "faults": faults, "bad_inputs": inputs,
           "rows_lost": lost}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"{'fault':58s} survived  steps lost  recovery s")
    for f in faults:
        print(f"{f['fault']:58s} {str(f['survived']):8s}  {str(f.get('steps_lost')):10s}  {f.get('recovery_s')}")
    print(f"\n{'bad input':50s} refused  clear")
    for b in inputs:
        print(f"{b['input']:50s} {str(b['refused']):7s}  {b['clear']}")
    print(f"\nrows lost: {lost['good_rows_lost']} (delivered {lost['delivered']}, counted bad {lost['counted_bad']}, "
          f"manifest {lost['manifest_rows']})\nsaved {args.out}")


if __name__ == "__main__":
    main()
