"""The main job on embedded defaults: synthetic SAR chips → pretraining → sweep → few-shot.

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
from sarjepa_dist.fewshot.runner import run_fewshot
from sarjepa_dist.local_s3 import create_bucket, local_s3_endpoint
from sarjepa_dist.train.export import export_checkpoint
from sarjepa_dist.train.history import plot_curve
from sarjepa_dist.train.runner import run_pretrain
from sarjepa_dist.tune import run_sweep

log = logging.getLogger(__name__)


def demo_config(data_uri: str, runs_uri: str, report_dir: str, quick: bool) -> Config:
    """The demo's settings: a small ViT on 32 px synthetic chips, a short CPU budget."""
    steps = 40 if quick else 300
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
        "train": {"name": "demo-pretrain", "storage_path": runs_uri, "steps": steps,
                  "checkpoint_every": max(steps // 2, 10), "log_every": max(steps // 10, 5),
                  "num_workers": 1, "cpus_per_worker": 1},
        # the online few-shot probe every third of the run (each probe of these 400 chips costs about
        # a third of a 100-step interval's 5%): the learning curve in demo_out/curves.png
        "probe": {"every": max(steps // 3, 10), "shots": 5, "episodes": 3, "max_per_class": 40,
                  "pooling": "grid4"},
        "tune": {"name": "demo-sweep", "storage_path": runs_uri,
                 "grid": {"mask.target_scale": [[0.1, 0.15], [0.15, 0.25]]}},
        "fewshot": {"data": data_uri, "split_column": "depression_deg", "train_values": [17.0],
                    "test_values": [15.0], "shots": [1, 5, 10] if quick else [1, 2, 5, 10, 20],
                    "seeds": 3 if quick else 5, "linear_epochs": 100, "out": report_dir,
                    # a 300-step run's tokens carry most in their layout: grid4 (the default, mean,
                    # is for longer runs; README: learning curves)
                    "pooling": "grid4"},
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
    summary: dict[str, Any] = {}
    with _storage_root(out_dir) as root:
        data_uri = storage.join(root, "data", "synthetic-32")
        runs_uri = storage.join(root, "runs")
        report_dir = str(out_dir / "fewshot")
        cfg = demo_config(data_uri, runs_uri, report_dir, quick)

        _synthetic_data(data_uri, quick)
        with ray_session(cfg.ray, cfg.storage):
            summary["pretrain"] = _pretrain(cfg, out_dir)
            summary["sweep"] = _sweep(cfg, out_dir)
            summary["fewshot"] = _fewshot(cfg, summary["pretrain"]["checkpoint"])
    summary["seconds"] = round(time.time() - t0, 1)
    (out_dir / "demo_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"\ndone in {summary['seconds']} s.\n  encoder export: {summary['pretrain']['export']}\n"
          f"  sweep table:    {summary['sweep']['table']}\n  few-shot report: {summary['fewshot']['report']}\n")
    print((out_dir / "sweep.md").read_text())
    report_md = Path(report_dir) / "report.md"
    if report_md.exists():
        print(report_md.read_text())
    return summary


def _synthetic_data(data_uri: str, quick: bool) -> None:
    """Step 1: ten classes of synthetic SAR chips, 32 px."""
    print(f"[1/4] synthetic SAR chips → {data_uri}", flush=True)
    per_class = 60 if quick else 200
    manifest = write_synthetic_dataset(data_uri, SynthConfig(num_classes=10, per_class=per_class, size=32, seed=0))
    print(f"      {manifest.num_chips} chips, {len(manifest.class_names)} classes, "
          f"dataset {manifest.dataset_id[:12]}")


def _pretrain(cfg: Config, out_dir: Path) -> dict[str, Any]:
    """Step 2: pretrain, and export the latest checkpoint's EMA encoder."""
    print(f"[2/4] pretraining ({cfg.train.steps} steps, {cfg.model.target_mode}, context "
          f"{cfg.model.context_domain}) → {cfg.train.storage_path}", flush=True)
    result = run_pretrain(cfg)
    checkpoint = result.latest_checkpoint_uri
    curves = str(out_dir / "curves.png")
    plot_curve(result.metrics_history, curves, title=f"demo pretraining ({cfg.train.steps} steps)")
    # the S3 endpoint is in-memory: keep the encoder as a local export
    return {"checkpoint": checkpoint, "step": result.final_step, "curves": curves,
            "export": export_checkpoint(checkpoint, str(out_dir / "encoder"))}


def _sweep(cfg: Config, out_dir: Path) -> dict[str, Any]:
    """Step 3: a short sweep over the demo grid; its table is copied next to the other outputs."""
    sweep_cfg = config_from_dict({**cfg.to_dict(),
                                  "train": {**cfg.to_dict()["train"], "steps": max(cfg.train.steps // 3, 20)}})
    print(f"[3/4] sweep over {sweep_cfg.tune.grid} ({sweep_cfg.train.steps} steps each)", flush=True)
    sweep = run_sweep(sweep_cfg)
    # keep the sweep table locally too (the S3 endpoint is in-memory)
    for name in ("sweep.json", "sweep.md"):
        remote = storage.join(os.path.dirname(sweep.table_uri), name)
        (out_dir / name).write_text(storage.read_text(remote))
    return {"table": str(out_dir / "sweep.md"), "best": sweep.best}


def _fewshot(cfg: Config, checkpoint: str) -> dict[str, Any]:
    """Step 4: the pretrained encoder beside random init and the hand-made features."""
    print("[4/4] few-shot evaluation: pretrained vs random init vs hand-made features", flush=True)
    tree = cfg.to_dict()
    tree["fewshot"]["encoders"] = [checkpoint, "random-init", "raw-pixels", "gradient-maps"]
    return {"report": run_fewshot(config_from_dict(tree)).report_uri}


if __name__ == "__main__":  # pragma: no cover
    run_demo(os.environ.get("SARJEPA_DEMO_OUT", "demo_out"))
