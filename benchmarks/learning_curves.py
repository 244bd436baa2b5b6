"""Learning curves per pretraining recipe: online few-shot probe accuracy against steps, then a
few-shot score of the final encoders on a split kept apart from the one the curves tune on.

    python benchmarks/learning_curves.py --mstar ../shared/data/mstar_soc_17deg \
        --variants base,ctx-gradient --steps 600 --probe-every 100

Data (MSTAR 17°, ingested at ``--chip-size``, centre crop): the fewshot default split (stratified,
30% of each class held out, seed 0) gives the *report* pool and test set. Pretraining sees the
report pool's chips only, without labels (``--pretrain-data``: or those plus synthetic chips, or
synthetic chips alone). The curves probe a *validation* split inside the report
pool (``probe.test_fraction`` of each class, ``probe.seed`` 1), so what the curves tune on is never
what the final table reports. The final table scores each encoder, its random init (the same
weights at step 0) and the hand-made baselines with the ``sarjepa fewshot`` protocol (same support
draws, classifiers and intervals) on the report split.

Training is the project's own step (``engine.train_step``, masks, schedules, transforms) in a bare
in-process loop, no Ray: the variants differ only in their config. Prints a table and saves
``benchmarks/results/learning_curves.json`` and ``learning_curves.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sarjepa_dist.config import DataConfig, ProbeConfig, load_config, merge_tree
from sarjepa_dist.data.shards import load_arrays
from sarjepa_dist.engine import build_method, train_step
from sarjepa_dist.fewshot.protocol import EncoderFeatures, paired_differences, run_protocol, summarise
from sarjepa_dist.fewshot.sources import baseline_source
from sarjepa_dist.masks import mask_generator
from sarjepa_dist.model.collapse import collapse_stats
from sarjepa_dist.model.jepa import CONTEXT_INPUT
from sarjepa_dist.optim import Schedules, build_optimizer
from sarjepa_dist.probe import build_probe_set, embed, run_probe, stratified_rows
from sarjepa_dist.transforms import augment_batch, center_resize, prepare_inputs

RESULTS = Path(__file__).resolve().parent / "results"

# The base recipe: what `sarjepa pretrain` ran for the earlier ablation (ViT-tiny, 6 blocks, 64 px).
BASE = {
    "data": {"img_size": 64, "batch_size": 32},
    "model": {"encoder": "vit_tiny", "patch_size": 8, "depth": 6, "predictor_dim": 96,
              "predictor_depth": 3, "predictor_heads": 3},
    "optim": {"lr": 1e-3, "warmup_fraction": 0.1},
}
# Named variants: config overrides on BASE (dotted keys, YAML values).
VARIANTS: dict[str, list[str]] = {
    "base": [],
    "ctx-gradient": ["model.context_domain=gradient"],
    "ema-pixel": ["model.target_mode=ema-pixel"],
    "gradient-features": ["model.target_mode=gradient-features", "model.context_domain=gradient"],
}
# what the variants pretrain on, for the "Data" rows (transfer from synthetic chips)
PRETRAIN_DATA = ("mstar", "mstar+synthetic", "synthetic")
POOLINGS = ("mean", "grid2", "grid4", "centre")
# test-time views scored on the report split (model/pooling.py encode_tokens); the curves use none
REPORT_TTAS = ("none", "hflip")


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``name`` (a preset) or ``name:key=value;key=value`` (overrides on BASE)."""
    if ":" not in text:
        if text not in VARIANTS:
            raise SystemExit(f"unknown variant {text!r}; presets: {sorted(VARIANTS)}")
        return text, VARIANTS[text]
    name, rest = text.split(":", 1)
    return name, [kv for kv in rest.split(";") if kv]


def variant_config(overrides: list[str], steps: int) -> Any:
    return load_config(None, overrides, base=merge_tree(BASE, {"train": {"steps": steps}}))


def eval_key(cfg: Any) -> str:
    """The context domain feeds the evaluation encoder (fewshot.feature_domain: context)."""
    return CONTEXT_INPUT[cfg.model.context_domain]


def pretrain(cfg: Any, chips: torch.Tensor, probe_set: Any, probe_cfg: ProbeConfig, seed: int,
             log_prefix: str) -> tuple[Any, dict[str, torch.Tensor], list[dict[str, Any]], float]:
    """Bare loop over ``engine.train_step``; returns (model, init eval-encoder state, curve, seconds)."""
    torch.manual_seed(seed)
    model, sampler = build_method(cfg)
    init_state = {k: v.clone() for k, v in model.eval_encoder.state_dict().items()}
    need = model.required_inputs()
    optimizer = build_optimizer(model, cfg.optim)
    batch = cfg.data.batch_size
    schedules = Schedules(cfg.optim, cfg.train.steps, lr_scale=cfg.optim.scale_for(batch))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(chips))
    cursor, curve, train_s = 0, [], 0.0
    key = eval_key(cfg)
    aug = cfg.data.augment

    def probe(step: int, loss: float | None, inputs: Any = None, masks: Any = None) -> None:
        row = {"step": step, "loss": loss,
               **run_probe(model.eval_encoder, probe_set, key, probe_cfg, extra_poolings=POOLINGS)}
        if inputs is not None:  # are the targets or the predictions collapsing? (eval mode, last batch)
            model.eval()
            with torch.no_grad():
                out = model(inputs, masks)
            model.train()
            for part in ("target", "pred"):
                stats = collapse_stats(out[part])
                row[f"std_{part}"], row[f"eff_rank_{part}"] = stats["std"], stats["effective_rank"]
        curve.append(row)
        print(f"{log_prefix} step {step:5d} loss {loss if loss is None else round(loss, 4)} "
              f"knn {row['probe_knn']:.3f} " + " ".join(f"{p} {row.get(f'probe_knn/{p}', row['probe_knn']):.3f}"
                                                      for p in POOLINGS) +
              f" eff-rank {row['probe_eff_rank']:.1f} target/pred {row.get('eff_rank_target', 0):.1f}/"
              f"{row.get('eff_rank_pred', 0):.1f}", flush=True)

    probe(0, None)
    model.train()
    for step in range(cfg.train.steps):
        t0 = time.perf_counter()
        if cursor + batch > len(order):
            order, cursor = rng.permutation(len(chips)), 0
        idx = torch.from_numpy(order[cursor:cursor + batch])
        cursor += batch
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        amp = augment_batch(chips[idx], cfg.data.img_size, tuple(aug.crop_scale), aug.flips, aug.rot90, gen,
                            vertical_flips=aug.vertical_flips)
        inputs = prepare_inputs(amp, cfg.data, cfg.gradient, need)
        masks = sampler.sample(batch, mask_generator(seed, 0, step))
        sm = train_step(model, optimizer, schedules, inputs, masks, step, grad_clip=cfg.optim.grad_clip)
        train_s += time.perf_counter() - t0
        if (step + 1) % probe_cfg.every == 0 or step + 1 == cfg.train.steps:
            probe(step + 1, float(sm.loss), inputs, masks)
    return model, init_state, curve, train_s


def report_features(encoder: Any, amp_eval: torch.Tensor, cfg: Any, key: str) -> dict[str, np.ndarray]:
    """``<pooling>`` and ``<pooling>+<tta>`` features for every pooling and test-time view."""
    x = prepare_inputs(amp_eval, cfg.data, cfg.gradient, need=(key,))[key]
    out: dict[str, np.ndarray] = {}
    for tta in REPORT_TTAS:
        suffix = "" if tta == "none" else f"+{tta}"
        out.update({p + suffix: f.numpy() for p, f in embed(encoder, x, POOLINGS, tta=tta).items()})
    return out


def crops_recipe(cfg: Any, key: str) -> Any:
    """The ``sarjepa fewshot`` recipe with ``tta: hflip+crops`` for an encoder whose mean-pooled
    tokens embed the ``key`` input (the baselines' come from ``fewshot.sources.baseline_source``)."""
    from sarjepa_dist.config import to_plain
    from sarjepa_dist.fewshot.compute import FeatureRecipe

    return FeatureRecipe(kind="encoder", img_size=cfg.data.img_size, channels=cfg.data.channels,
                         conditioning=cfg.data.conditioning, gradient=to_plain(cfg.gradient), input=key,
                         pooling="mean", tta="hflip+crops")


def crops_features(chips: torch.Tensor, recipe: Any, encoder: Any = None, batch: int = 256) -> np.ndarray:
    """Stored chips (before any resize) → features, in batches, by ``fewshot.compute``."""
    from sarjepa_dist.fewshot.compute import compute_features

    if encoder is not None:
        encoder.eval()
    return np.concatenate([compute_features(chips[i:i + batch], recipe, encoder) for i in range(0, len(chips), batch)])


def validation_chips(data: str) -> tuple[torch.Tensor, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """The report pool's stored chips (float32), their labels, the validation split the curves
    probe (the pool cut 70/30, seed 1: pool rows, test rows) and the class names, from the MSTAR
    shards at ``data``; the report split's test chips are never read."""
    from sarjepa_dist.fewshot.splits import load_labelled_set, stratified_split

    arrays, labelled = load_arrays(data), load_labelled_set(data)
    report = stratified_split(labelled, 0.3, seed=0)
    labels = arrays.labels[report.pool]
    val_pool, val_test = stratified_rows(labels, None, 0.3, 1)
    return (torch.from_numpy(arrays.chips[report.pool].astype(np.float32)), labels, val_pool, val_test,
            list(labelled.class_names))


def load_saved(path: str) -> tuple[Any, dict[str, torch.Tensor], list[str]]:
    """A saved encoder file (final and init eval-encoder states, overrides) as (model, init, overrides)."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    model, _ = build_method(variant_config(list(saved["overrides"]), 1))
    model.eval_encoder.load_state_dict(saved["final"])
    return model, saved["init"], list(saved["overrides"])


def baseline_features(amp_eval: torch.Tensor, cfg: Any) -> dict[str, np.ndarray]:
    """raw log-amplitude pixels (flattened) and gradient-by-ratio maps pooled 8×8 (flattened)."""
    inp = prepare_inputs(amp_eval, DataConfig(img_size=cfg.data.img_size, conditioning="log"),
                         cfg.gradient, need=("x", "gfeat"))
    return {"raw-pixels": inp["x"].flatten(1).numpy(),
            "gradient-maps": torch.nn.functional.adaptive_avg_pool2d(inp["gfeat"], (8, 8)).flatten(1).numpy()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    data = ap.add_mutually_exclusive_group(required=True)
    data.add_argument("--mstar", help="MSTAR class-per-folder JPEGs")
    data.add_argument("--synthetic", type=int, metavar="PER_CLASS",
                      help="instead of MSTAR: ten classes of synthetic SAR chips (sarjepa synth), this many each")
    ap.add_argument("--pretrain-data", choices=PRETRAIN_DATA, default="mstar",
                    help="what the variants pretrain on (MSTAR: the report pool's chips; synthetic: "
                         "sarjepa synth chips at --chip-size, --synthetic-per-class of each of ten classes); "
                         "the probe and the report stay on MSTAR")
    ap.add_argument("--synthetic-per-class", type=int, default=200)
    ap.add_argument("--out", default="runs/learning_curves")
    ap.add_argument("--chip-size", type=int, default=128, help="centre crop at ingest (synthetic: chip side)")
    ap.add_argument("--variants", default="base,ctx-gradient", help="comma-separated presets")
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME:key=value;key=value (overrides on the base recipe); repeatable")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--probe-every", type=int, default=100)
    ap.add_argument("--shots", default="10,20")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="", help="suffix of the saved result files")
    ap.add_argument("--no-report", action="store_true", help="curves only (no report-split table)")
    ap.add_argument("--report-crops", action="store_true",
                    help="also score the report split with fewshot.tta hflip+crops (the sarjepa fewshot code path): "
                         "encoders' mean-pooled tokens and both baselines averaged over the chip and 5 crops")
    ap.add_argument("--rescore", action="append", default=[], metavar="NAME=ENCODER.pt",
                    help="score an encoder this script saved (and its init) on the report split, no training")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("SARJEPA_THREADS", torch.get_num_threads())))

    from sarjepa_dist.data.ingest import ingest_images
    from sarjepa_dist.data.synth import SynthConfig, write_synthetic_dataset
    from sarjepa_dist.fewshot.splits import load_labelled_set, stratified_split

    out = Path(args.out).resolve()
    if args.synthetic and args.pretrain_data != "mstar":
        raise SystemExit("--pretrain-data is for MSTAR runs (--mstar); --synthetic already pretrains on synthetic chips")
    if args.synthetic:
        uri = str(out / f"data/synth{args.chip_size}x{args.synthetic}")
        if not (Path(uri) / "manifest.json").exists():
            write_synthetic_dataset(uri, SynthConfig(num_classes=10, per_class=args.synthetic, size=args.chip_size))
    else:
        uri = str(out / f"data/mstar{args.chip_size}")
        if not (Path(uri) / "manifest.json").exists():
            ingest_images(args.mstar, uri, args.chip_size)
    arrays = load_arrays(uri)
    labelled = load_labelled_set(uri)
    assert list(labelled.chip_ids) == list(arrays.chip_ids), "row order differs between readers"
    split = stratified_split(labelled, 0.3, seed=0)  # the report split (fewshot defaults)
    chips = torch.from_numpy(arrays.chips.astype(np.float32))
    labels = arrays.labels
    pool_chips = chips[split.pool]
    pretrain_chips = pool_chips
    if args.pretrain_data != "mstar":
        synth_uri = str(out / f"data/synth{args.chip_size}x{args.synthetic_per_class}")
        if not (Path(synth_uri) / "manifest.json").exists():
            write_synthetic_dataset(synth_uri, SynthConfig(num_classes=10, per_class=args.synthetic_per_class,
                                                           size=args.chip_size))
        synth_chips = torch.from_numpy(load_arrays(synth_uri).chips.astype(np.float32))
        pretrain_chips = synth_chips if args.pretrain_data == "synthetic" else torch.cat([pool_chips, synth_chips])
    probe_cfg = ProbeConfig(every=args.probe_every, shots=10, episodes=5, test_fraction=0.3,
                            max_per_class=None, methods=["knn", "linear"], pooling="mean", seed=1)
    shots = [int(k) for k in args.shots.split(",")]
    results: dict[str, Any] = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version(), "load_avg": os.getloadavg()},
        "data": {"dataset": uri, "chips": len(labels), "pretrain_data": args.pretrain_data,
                 "pretrain_chips": len(pretrain_chips),
                 "report_pool": len(split.pool), "report_test": len(split.test)},
        "base": BASE, "variants": {}}
    report_feats: dict[str, EncoderFeatures] = {}
    rescore = dict(r.split("=", 1) for r in args.rescore)
    for text in [v for v in args.variants.split(",") if v] + args.variant + list(rescore):
        if text in rescore:
            name = text
            model, init_state, overrides = load_saved(rescore[name])
            cfg = variant_config(overrides, args.steps)
            results["variants"][name] = {"overrides": overrides, "rescored": rescore[name]}
        else:
            name, overrides = parse_variant(text)
            cfg = variant_config(overrides, args.steps)
            probe_set = build_probe_set(pool_chips.numpy(), labels[split.pool], probe_cfg, cfg.data, cfg.gradient,
                                        keys=("x", "gx"))
            t0 = time.time()
            model, init_state, curve, train_s = pretrain(cfg, pretrain_chips, probe_set, probe_cfg, args.seed, name)
            results["variants"][name] = {"overrides": overrides, "curve": curve, "train_seconds": round(train_s, 1),
                                         "wall_seconds": round(time.time() - t0, 1)}
            # the final evaluation encoder and its init, for later protocols without retraining
            torch.save({"final": model.eval_encoder.state_dict(), "init": init_state, "overrides": overrides},
                       out / f"encoder_{name}{'_' + args.tag if args.tag else ''}.pt")
        if args.no_report:
            continue
        amp_pool = center_resize(chips[split.pool], cfg.data.img_size)
        amp_test = center_resize(chips[split.test], cfg.data.img_size)
        key = eval_key(cfg)
        enc = model.eval_encoder
        for tag, state in (("", None), ("random-init/", init_state)):
            if state is not None:
                enc.load_state_dict(state)
            fp, ft = report_features(enc, amp_pool, cfg, key), report_features(enc, amp_test, cfg, key)
            for p in fp:
                report_feats[f"{tag}{name}/{p}"] = EncoderFeatures(fp[p], ft[p])
            if args.report_crops:
                recipe = crops_recipe(cfg, key)
                report_feats[f"{tag}{name}/mean+hflip+crops"] = EncoderFeatures(
                    crops_features(chips[split.pool], recipe, enc), crops_features(chips[split.test], recipe, enc))
        if "raw-pixels" not in report_feats:
            bp, bt = baseline_features(amp_pool, cfg), baseline_features(amp_test, cfg)
            for b in bp:
                report_feats[b] = EncoderFeatures(bp[b], bt[b])
                if args.report_crops:  # the fewshot default (hflip+crops) applies to the baselines too
                    recipe = baseline_source(b, dataclasses.replace(
                        cfg, fewshot=dataclasses.replace(cfg.fewshot, tta="hflip+crops"))).recipe
                    report_feats[f"{b}+crops"] = EncoderFeatures(crops_features(chips[split.pool], recipe),
                                                                 crops_features(chips[split.test], recipe))
    if report_feats:
        runs = run_protocol(report_feats, labels[split.pool], labels[split.test], labelled.class_names,
                            shots=shots, seeds=args.seeds, methods=["linear", "knn"])
        table = {f"{r.encoder}|{r.method}|{r.shots}": [round(100 * r.interval.mean, 1),
                                                        round(100 * (r.interval.half_width or 0), 1)]
                 for r in summarise(runs)}
        paired = {**paired_table(runs, report_feats), **linear_vs_knn_table(runs, report_feats)}
        results["report"] = {"split": split.description, "shots": shots, "seeds": args.seeds,
                             "accuracy_pct_mean_halfwidth": table, "paired_pct_mean_halfwidth": paired}
        print("\nreport split: accuracy % (mean ± 95% interval)")
        for k, (m, h) in table.items():
            print(f"  {k:50s} {m:5.1f} ± {h:4.1f}")
        print("\npaired differences (percentage points, mean ± 95% interval over the same support sets)")
        for k, (m, h) in paired.items():
            print(f"  {k:70s} {m:+5.1f} ± {h:4.1f}")
    RESULTS.mkdir(exist_ok=True)
    stem = f"learning_curves{'_' + args.tag if args.tag else ''}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=2, default=float))
    plot(results, RESULTS / f"{stem}.png")
    print(f"saved {RESULTS / stem}.json/.png")


def linear_vs_knn_table(runs: Any, feats: dict[str, EncoderFeatures]) -> dict[str, list[float]]:
    """Each pretrained encoder under the linear probe minus each baseline under k-NN: the pairing
    the goal needs (an encoder's best probe on the validation split is linear, every baseline's is
    k-NN). Every (K, seed) shares its support set across encoders and methods, so it pairs."""
    from sarjepa_dist.fewshot.stats import mean_interval

    acc = {(r.encoder, r.method, r.shots, r.seed): r.accuracy for r in runs}
    baselines = [n for n in feats if "/" not in n]
    out = {}
    for name in feats:
        if "/" not in name or name.startswith("random-init/"):
            continue
        for ref in baselines:
            for k in sorted({key[2] for key in acc}):
                diffs = [a - acc[(ref, "knn", k, seed)] for (e, m, kk, seed), a in acc.items()
                         if e == name and m == "linear" and kk == k and (ref, "knn", k, seed) in acc]
                if diffs:
                    iv = mean_interval(diffs)
                    out[f"{name} (linear) − {ref} (knn)|{k}"] = [round(100 * iv.mean, 1),
                                                                 round(100 * (iv.half_width or 0), 1)]
    return out


def paired_table(runs: Any, feats: dict[str, EncoderFeatures]) -> dict[str, list[float]]:
    """Each pretrained encoder minus its own random init (same pooling) and minus each baseline."""
    baselines = [n for n in feats if "/" not in n]
    out = {}
    for name in feats:
        if "/" not in name or name.startswith("random-init/"):
            continue
        for ref in [f"random-init/{name}", *baselines]:
            for row in paired_differences(runs, name, ref):
                out[f"{name} − {ref}|{row['method']}|{row['shots']}"] = [
                    round(100 * row["mean"], 1), round(100 * (row["half_width"] or 0), 1)]
    return out


def plot(results: dict[str, Any], dest: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, v in results["variants"].items():
        if "curve" not in v:  # rescored without training
            continue
        steps = [r["step"] for r in v["curve"]]
        axes[0].plot(steps, [r["probe_knn"] for r in v["curve"]], label=f"{name} mean")
        axes[0].plot(steps, [r["probe_knn/grid4"] for r in v["curve"]], "--", label=f"{name} grid4")
        axes[1].plot(steps[1:], [r["loss"] for r in v["curve"][1:]], label=name)
        axes[2].plot(steps, [r["probe_eff_rank"] for r in v["curve"]], label=name)
    axes[0].set(title="validation 10-shot 1-NN", xlabel="step", ylabel="accuracy")
    axes[1].set(title="JEPA loss", xlabel="step")
    axes[2].set(title="effective rank (mean-pooled)", xlabel="step")
    for a in axes:
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(dest, dpi=100)


if __name__ == "__main__":
    main()
