"""Target-mode ablation under one fixed CPU pretraining budget, scored by few-shot accuracy.

For each dataset (MSTAR SOC 17° when ``--mstar`` points at it, and synthetic chips), pretrain one
encoder per variant (``ema-gradient``, ``ema-pixel``, ...) with the same budget (steps × batch ×
architecture), then evaluate them side by side with ``random-init`` and the hand-made baselines
(log-amplitude pixels, pooled gradient-by-ratio maps) in one few-shot report per dataset.

    python benchmarks/fewshot_ablation.py --mstar ../shared/data/mstar_soc_17deg --steps 600

Prints a table of K-shot linear-probe accuracy (mean ± 95% t-interval over seeds) and saves
``benchmarks/results/fewshot_ablation.json`` plus the full reports under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep the local cluster on loopback

VARIANTS = {
    "ema-gradient": {"model.target_mode": "ema-gradient", "model.context_domain": "raw"},
    "ema-gradient/ctx-gradient": {"model.target_mode": "ema-gradient", "model.context_domain": "gradient"},
    "ema-pixel": {"model.target_mode": "ema-pixel", "model.context_domain": "raw"},
}


def base_tree(args: argparse.Namespace, data_uri: str, runs: str) -> dict:
    return {
        "ray": {"num_cpus": 4},
        "data": {"path": data_uri, "img_size": args.img_size, "batch_size": args.batch_size,
                 "shuffle_buffer": 512},
        "model": {"encoder": "vit_tiny", "patch_size": args.patch_size, "depth": args.depth,
                  "predictor_dim": 96, "predictor_depth": args.predictor_depth, "predictor_heads": 3},
        "optim": {"lr": args.lr, "warmup_fraction": 0.1},
        "train": {"storage_path": runs, "steps": args.steps, "checkpoint_every": args.steps,
                  "log_every": max(args.steps // 10, 10), "cpus_per_worker": 2, "seed": 0},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mstar", default=None, help="MSTAR class-per-folder JPEGs (ingested at --crop)")
    ap.add_argument("--no-synth", action="store_true")
    ap.add_argument("--out", default="runs/ablation")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--img-size", type=int, default=64)
    ap.add_argument("--patch-size", type=int, default=8)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--predictor-depth", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--synth-per-class", type=int, default=300)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--shots", default="1,5,10,20")
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args()

    from sarjepa_dist.cluster import ray_session
    from sarjepa_dist.config import config_from_dict, set_dotted
    from sarjepa_dist.data.ingest import ingest_images
    from sarjepa_dist.data.synth import SynthConfig, write_synthetic_dataset
    from sarjepa_dist.fewshot.runner import run_fewshot
    from sarjepa_dist.train.runner import run_pretrain

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    variants = [v for v in args.variants.split(",") if v]
    shots = [int(k) for k in args.shots.split(",")]
    datasets: dict[str, dict] = {}
    if args.mstar:
        uri = str(out / f"data/mstar{args.crop}")
        if not (Path(uri) / "manifest.json").exists():
            ingest_images(args.mstar, uri, args.crop)
        datasets["mstar"] = {"uri": uri, "fewshot": {"test_fraction": 0.3}}
    if not args.no_synth:
        uri = str(out / f"data/synth{args.img_size}")
        if not (Path(uri) / "manifest.json").exists():
            write_synthetic_dataset(uri, SynthConfig(num_classes=10, per_class=args.synth_per_class,
                                                     size=args.img_size, seed=0))
        datasets["synthetic"] = {"uri": uri, "fewshot": {"split_column": "depression_deg",
                                                         "train_values": [17.0], "test_values": [15.0]}}

    results: dict = {"budget": {"steps": args.steps, "batch_size": args.batch_size, "img_size": args.img_size,
                                "patch_size": args.patch_size, "encoder": f"vit_tiny depth {args.depth}",
                                "predictor": f"96 wide x {args.predictor_depth}", "workers": 1,
                                "cpus_per_worker": 2},
               "machine": {"cpus": os.cpu_count(), "python": platform.python_version()}, "datasets": {}}
    runs_uri = str(out / "runs")
    first = config_from_dict(base_tree(args, next(iter(datasets.values()))["uri"], runs_uri))
    with ray_session(first.ray, first.storage):
        for name, ds in datasets.items():
            checkpoints = {}
            timings = {}
            for variant in variants:
                tree = base_tree(args, ds["uri"], runs_uri)
                for k, v in VARIANTS[variant].items():
                    set_dotted(tree, k, v)
                tree["train"]["name"] = f"ablation-{name}-{variant.replace('/', '-')}"
                cfg = config_from_dict(tree)
                t0 = time.time()
                res = run_pretrain(cfg)
                timings[variant] = round(time.time() - t0, 1)
                checkpoints[variant] = res.latest_checkpoint_uri
                last = res.metrics_history[-1] if res.metrics_history else {}
                print(f"{name} {variant}: step {res.final_step}, loss {last.get('loss')}, "
                      f"eff-rank target/pred {last.get('eff_rank_target')}/{last.get('eff_rank_pred')}, "
                      f"{timings[variant]} s", flush=True)
            tree = base_tree(args, ds["uri"], runs_uri)
            tree["fewshot"] = {"data": ds["uri"], "encoders": list(checkpoints.values()) + [
                "random-init", "raw-pixels", "gradient-maps"], "shots": shots, "seeds": args.seeds,
                "out": str(out / f"fewshot-{name}"), **ds["fewshot"]}
            report = run_fewshot(config_from_dict(tree))
            names = dict(zip(list(checkpoints.values()) + ["random-init", "raw-pixels", "gradient-maps"],
                             report.encoders))
            table = {}
            for label, enc in [(v, names[c]) for v, c in checkpoints.items()] + [
                    (b, names[b]) for b in ("random-init", "raw-pixels", "gradient-maps")]:
                table[label] = {}
                for method in ("linear", "knn", "prototype"):
                    table[label][method] = {k: [round(100 * report.interval(enc, method, k).mean, 1),
                                                round(100 * report.interval(enc, method, k).half_width, 1)]
                                            for k in shots}
            results["datasets"][name] = {"uri": ds["uri"], "report": report.report_uri, "pretrain_seconds": timings,
                                         "accuracy_pct_mean_halfwidth": table}
            print(f"\n{name}: linear-probe accuracy % (mean ± 95% interval, {args.seeds} seeds)")
            print("| encoder | " + " | ".join(f"K={k}" for k in shots) + " |")
            print("|---|" + "---:|" * len(shots))
            for label, per in table.items():
                print(f"| {label} | " + " | ".join(f"{m:.1f} ± {h:.1f}" for m, h in
                                                   (per["linear"][k] for k in shots)) + " |")
    dest = Path(__file__).resolve().parent / "results" / "fewshot_ablation.json"
    dest.write_text(json.dumps(results, indent=2))
    print(f"\nsaved {dest}")


if __name__ == "__main__":
    main()
