"""The main job on embedded defaults: synthetic SAR chips → ``sarjepa pipeline`` (an ASHA sweep on the
online probe → the best point pretrained → few-shot report).

Everything runs on this machine: a local Ray cluster, a local S3 endpoint (a moto server on
127.0.0.1, so the real object-storage code path is exercised) or, without moto, local folders.
Sized to take minutes on a 2-core laptop; the numbers it prints are real but tiny-budget.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator

from sarjepa_dist import storage
from sarjepa_dist.cluster import ray_session
from sarjepa_dist.config import Config, config_from_dict
from sarjepa_dist.data.synth import SynthConfig, write_synthetic_dataset
from sarjepa_dist.local_s3 import create_bucket, local_s3_endpoint
from sarjepa_dist.pipeline import run_pipeline
from sarjepa_dist.train.export import export_checkpoint
from sarjepa_dist.train.history import plot_curve, read_history

log = logging.getLogger(__name__)


def demo_config(data_uri: str, runs_uri: str, report_dir: str, quick: bool) -> Config:
    """The demo's settings: a small ViT on 32 px synthetic chips, a short CPU budget: four sweep
    trials of an eighth of the full run each, two at a time (each trial's worker claims a whole CPU
    of the 4; Ray Data needs the rest), then the best point for the full run."""
    steps = 40 if quick else 300
    trial_steps = max(steps // 8, 10)
    tree: dict[str, Any] = {
        "ray": {"num_cpus": 4},
        "data": {"path": data_uri, "img_size": 32, "batch_size": 32, "shuffle_buffer": 256,
                 "augment": {"crop_scale": [0.8, 1.0]}},
        "gradient": {"radii": [2, 4, 6, 8]},
        "mask": {"min_keep": 4},
        # context_domain gradient: one set of weights in one domain. With the raw context the
        # EMA encoder embeds a domain its online twin never trains on, and on these synthetic
        # chips that variant stays at random-init accuracy (benchmarks/fewshot_ablation.py).
        "model": {"encoder": "vit_tiny", "patch_size": 4, "depth": 4, "predictor_dim": 96,
                  "predictor_depth": 2, "predictor_heads": 3, "context_domain": "gradient"},
        "optim": {"lr": 1e-3, "warmup_fraction": 0.1},
        # train.steps is each sweep trial's budget; pipeline.steps the full run's
        "train": {"storage_path": runs_uri, "steps": trial_steps, "checkpoint_every": max(steps // 2, 10),
                  "log_every": max(steps // 30, 5), "num_workers": 1, "cpus_per_worker": 1},
        # the online few-shot probe: ASHA's figure in the sweep (rungs at 1/4 and 1/2 of a trial);
        # the full run probes every third of its steps (pipeline.probe_every) for demo_out/curves.png
        "probe": {"every": max(trial_steps // 4, 5), "shots": 5, "episodes": 3, "max_per_class": 40,
                  "pooling": "mean"},
        "tune": {"name": "demo-sweep", "storage_path": runs_uri, "max_concurrent_trials": 2,
                 "scheduler": "asha", "reduction_factor": 2,
                 "search": {"mask.target_scale": {"grid": [[0.1, 0.15], [0.15, 0.25]]},
                            "optim.ema[0]": {"grid": [0.99, 0.996]}}},
        "pipeline": {"name": "demo-pretrain", "steps": steps, "probe_every": max(steps // 3, 10),
                     "compare": ["random-init", "raw-pixels", "gradient-maps"], "out": report_dir},
        "fewshot": {"data": data_uri, "split_column": "depression_deg", "train_values": [17.0],
                    "test_values": [15.0], "shots": [1, 5, 10] if quick else [1, 2, 5, 10, 20],
                    # ten seeds: the encoder's gain at this budget is about one point, and five
                    # seeds' paired interval at K = 10 is as wide as that (README: set-up)
                    "seeds": 3 if quick else 10, "linear_epochs": 100, "out": report_dir,
                    # mean pooling (the default): what pretraining improves. A 4x4 grid of an
                    # untrained ViT's tokens already keeps the chip's layout and scores near the
                    # pretrained one (README: learning curves)
                    "pooling": "mean",
                    # the mirror only: on these 32-px chips after 300 steps the test-time crops
                    # (the MSTAR default) lift random init as much as the encoder, and the paired
                    # gain over random init falls inside the noise (README: learning curves)
                    "tta": "hflip"},
    }
    return config_from_dict(tree)


@contextlib.contextmanager
def _storage_root(out: Path) -> Iterator[str]:
    """A bucket on a local S3 endpoint (moto server), or local folders when moto is missing."""
    with contextlib.ExitStack() as stack:
        try:
            url = stack.enter_context(local_s3_endpoint())
        except RuntimeError as exc:
            log.warning("no local S3 endpoint (%s); using local folders under %s", exc, out)
            yield str(out)
            return
        log.info("local S3 endpoint at %s (moto server on loopback)", url)
        yield create_bucket(url, "sarjepa-demo")


def run_demo(out: str = "demo_out", quick: bool = False) -> dict[str, Any]:
    out_dir = Path(out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with _storage_root(out_dir) as root:
        data_uri = storage.join(root, "data", "synthetic-32")
        report_dir = str(out_dir / "fewshot")
        cfg = demo_config(data_uri, storage.join(root, "runs"), report_dir, quick)
        _synthetic_data(data_uri, quick)
        with ray_session(cfg.ray, cfg.storage):
            summary = _pipeline(cfg, out_dir)
    summary["seconds"] = round(time.time() - t0, 1)
    (out_dir / "demo_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"\ndone in {summary['seconds']} s.\n  sweep table:     {summary['sweep']['table']}\n"
          f"  best config:     {summary['sweep']['best_config']}\n  encoder export:  {summary['pretrain']['export']}\n"
          f"  few-shot report: {summary['fewshot']['report']}\n")
    print((out_dir / "sweep.md").read_text())
    report_md = Path(report_dir) / "report.md"
    if report_md.exists():
        print(report_md.read_text())
    return summary


def _synthetic_data(data_uri: str, quick: bool) -> None:
    """Step 1: ten classes of synthetic SAR chips, 32 px."""
    print(f"[1/2] synthetic SAR chips → {data_uri}", flush=True)
    per_class = 60 if quick else 200
    manifest = write_synthetic_dataset(data_uri, SynthConfig(num_classes=10, per_class=per_class, size=32, seed=0))
    print(f"      {manifest.num_chips} chips, {len(manifest.class_names)} classes, "
          f"dataset {manifest.dataset_id[:12]}")


def _pipeline(cfg: Config, out_dir: Path) -> dict[str, Any]:
    """Step 2: the pipeline; its sweep outputs, the full run's curves and encoder are kept locally
    (the S3 endpoint is in-memory)."""
    grid = " × ".join(f"{k} {v['grid']}" for k, v in cfg.tune.search.items())
    print(f"[2/2] pipeline: sweep over {grid} ({cfg.train.steps} steps each, ASHA on the probe every "
          f"{cfg.probe.every} steps) → the best point pretrained for {cfg.pipeline.steps} steps "
          f"({cfg.model.target_mode}, context {cfg.model.context_domain}) → few-shot report against "
          f"{', '.join(cfg.pipeline.compare)}", flush=True)
    result = run_pipeline(cfg)
    for name, uri in result.sweep.outputs.items():
        if name != "sweep.json":
            (out_dir / name).write_bytes(storage.read_bytes(uri))
    curves = str(out_dir / "curves.png")
    plot_curve(read_history(result.checkpoint), curves,
               title=f"demo pretraining, best sweep point ({cfg.pipeline.steps} steps)")
    return {"sweep": {"table": str(out_dir / "sweep.md"), "plot": str(out_dir / "sweep.png"),
                      "best_config": str(out_dir / "best.yaml"), "best": result.sweep.best},
            "pretrain": {"checkpoint": result.checkpoint, "curves": curves,
                         "export": export_checkpoint(result.checkpoint, str(out_dir / "encoder"))},
            "fewshot": {"report": result.report_uri}, "record": result.record_uri}


if __name__ == "__main__":  # pragma: no cover
    run_demo(os.environ.get("SARJEPA_DEMO_OUT", "demo_out"))
