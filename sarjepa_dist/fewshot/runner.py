"""``sarjepa fewshot``: compare encoders (and hand-made baselines) under one few-shot protocol.

    run_fewshot(cfg) -> FewshotResult

1. read the labels/metadata of ``fewshot.data`` (and ``fewshot.test_data``) and split them
   (``splits.make_split``); check every K fits every class of the pool before any feature work;
2. resolve every entry of ``fewshot.encoders`` to a feature source (``sources.resolve_sources``);
3. features once per source and dataset: from ``<out>/features/*.npz`` when cached, else Ray Data
   batch inference (``extract.extract_features``), then cached (``cache.features_for``);
4. the protocol (``protocol.run_protocol``): K shots × S seeds × methods, support sets shared by
   every source; mean ± t-interval per cell (``protocol.summarise``);
5. ``results.json``, ``report.md`` and ``fewshot.png`` under ``fewshot.out`` (``report.write_report``).

``quick_score(checkpoint, cfg)`` is the one-number version a sweep trial ranks by.
"""

from __future__ import annotations

import datetime as _dt
import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from sarjepa_dist import storage
from sarjepa_dist.cluster import ray_session
from sarjepa_dist.config import Config, ConfigError
from sarjepa_dist.fewshot.cache import features_for
from sarjepa_dist.fewshot.classifiers import LinearProbeConfig
from sarjepa_dist.fewshot.extract import FeatureTable
from sarjepa_dist.fewshot.protocol import (EncoderFeatures, RunResult, SummaryRow, paired_differences,
                                           run_protocol, summarise)
from sarjepa_dist.fewshot.report import write_report
from sarjepa_dist.fewshot.sources import FeatureSource, encoder_source, resolve_sources
from sarjepa_dist.fewshot.splits import (LabelledSet, Split, SplitError, check_shots, load_labelled_set,
                                         make_split)
from sarjepa_dist.fewshot.stats import Interval, t_quantile

log = logging.getLogger(__name__)

RESULTS_FORMAT = 1


@dataclass
class FewshotResult:
    out: str
    report_uri: str
    results_uri: str
    figure_uri: str
    results: dict[str, Any]
    runs: list[RunResult] = field(default_factory=list)
    summary: list[SummaryRow] = field(default_factory=list)

    def interval(self, encoder: str, method: str, shots: int) -> Interval:
        for row in self.summary:
            if (row.encoder, row.method, row.shots) == (encoder, method, int(shots)):
                return row.interval
        raise KeyError(f"no result for encoder {encoder!r}, method {method!r}, K = {shots}")

    @property
    def encoders(self) -> list[str]:
        return [e["name"] for e in self.results["encoders"]]


# --------------------------------------------------------------------------- data and split


@dataclass
class PreparedSplit:
    """The labelled sets, their split, and the datasets whose features are needed."""

    pool_set: LabelledSet
    test_set: LabelledSet
    split: Split
    datasets: dict[str, str]  # dataset_id -> root


def _check_unique_ids(ds: LabelledSet) -> None:
    ids, counts = np.unique(ds.chip_ids, return_counts=True)
    if (counts > 1).any():
        raise SplitError(f"{ds.root}: chip ids are not unique (e.g. {ids[counts > 1][0]!r} appears "
                         f"{int(counts.max())} times); features are matched to labels by chip id")


def prepare_split(cfg: Config, *, check_k: bool = True) -> PreparedSplit:
    """Read labels/metadata, split them as configured and (``check_k``) check every K fits."""
    few = cfg.fewshot
    if not few.data:
        raise ConfigError("fewshot.data is empty: give a labelled shard dataset (local path or s3://)")
    pool_set = load_labelled_set(few.data)
    test_set = load_labelled_set(few.test_data) if few.test_data else None
    for ds in (pool_set, test_set):
        if ds is not None:
            _check_unique_ids(ds)
            if not (ds.labels >= 0).any():
                raise SplitError(f"{ds.root} holds no labelled chips; few-shot evaluation needs labels")
    split = make_split(pool_set, test_set, split_column=few.split_column, train_values=few.train_values,
                       test_values=few.test_values, test_fraction=few.test_fraction, seed=few.seed)
    if check_k:
        check_shots(pool_set.labels[split.pool], few.shots, pool_set.class_names)
    test_set = test_set if test_set is not None else pool_set
    datasets = {pool_set.dataset_id: few.data}
    datasets.setdefault(test_set.dataset_id, few.test_data or few.data)
    return PreparedSplit(pool_set, test_set, split, datasets)


def _align(prep: PreparedSplit, sources: Sequence[FeatureSource],
           tables: dict[str, dict[str, FeatureTable]]) -> tuple[dict[str, EncoderFeatures], np.ndarray,
                                                                 np.ndarray, int]:
    """Pool/test feature matrices in split order; rows any source could not decode are dropped."""
    pool_ids = prep.pool_set.chip_ids[prep.split.pool]
    test_ids = prep.test_set.chip_ids[prep.split.test]
    raw: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    pool_ok = np.ones(len(pool_ids), dtype=bool)
    test_ok = np.ones(len(test_ids), dtype=bool)
    for src in sources:
        fp, okp = tables[src.name][prep.pool_set.dataset_id].take(pool_ids)
        ft, okt = tables[src.name][prep.test_set.dataset_id].take(test_ids)
        pool_ok &= okp
        test_ok &= okt
        raw[src.name] = (fp, ft)
    dropped = int((~pool_ok).sum() + (~test_ok).sum())
    if dropped:
        log.warning("dropping %d chip(s) that could not be decoded", dropped)
        prep.split.pool = prep.split.pool[pool_ok]
        prep.split.test = prep.split.test[test_ok]
    feats = {name: EncoderFeatures(pool=fp[pool_ok], test=ft[test_ok]) for name, (fp, ft) in raw.items()}
    return feats, prep.pool_set.labels[prep.split.pool], prep.test_set.labels[prep.split.test], dropped


def _feature_tables(cfg: Config, prep: PreparedSplit, sources: Sequence[FeatureSource], out: str | None
                    ) -> tuple[dict[str, dict[str, FeatureTable]], dict[str, dict[str, Any]]]:
    """``cache.features_for`` the split's datasets; Ray is joined (or started, and then shut down)
    only when some features are not in the cache."""
    with ray_session(cfg.ray, cfg.storage, log_to_driver=False, lazy=True) as connect:
        return features_for(sources, prep.datasets, out, batch_size=cfg.fewshot.batch_size, ensure_ray=connect)


# --------------------------------------------------------------------------- the job


def _method_details(cfg: Config, probe: LinearProbeConfig) -> dict[str, str]:
    return {
        "linear": (f"frozen features → BatchNorm1d(affine=False, support statistics) → Linear; AdamW "
                   f"lr {probe.lr:g}, weight decay {probe.weight_decay:g}, {cfg.fewshot.linear_epochs} "
                   f"full-batch epochs"),
        "knn": (f"k = {cfg.fewshot.knn_k} nearest support chips by cosine similarity after centring on the "
                f"support mean (CL2N); majority vote, ties to the larger summed similarity"),
        "prototype": ("nearest class mean by cosine similarity, after centring on the support mean and "
                      "L2-normalising (CL2N)"),
    }


def _encoder_record(src: FeatureSource, dim: int, extraction: dict[str, Any]) -> dict[str, Any]:
    info = src.info
    lineage = dict(info.get("lineage") or {})
    return {
        "name": src.name,
        "key": src.key,
        "spec": src.spec,
        "source": info.get("source", "baseline" if src.is_baseline else "encoder"),
        "weights": info.get("weights"),
        "domain": src.domain,
        "input": src.recipe.input,
        "domain_description": src.domain_description,
        "pooling": src.recipe.pooling,
        "feature_dim": int(dim),
        "img_size": src.recipe.img_size,
        "conditioning": src.recipe.conditioning,
        "gradient": src.recipe.gradient,
        "context_domain": info.get("context_domain"),
        "target_mode": info.get("target_mode"),
        "fingerprint": src.fingerprint,
        "lineage": {"checkpoint_id": lineage.get("checkpoint_id"), "dataset_id": lineage.get("dataset_id"),
                    "run_name": lineage.get("run_name"), "step": lineage.get("step"),
                    "checkpoint": lineage.get("checkpoint"), "config": lineage.get("config")},
        "notes": list(src.notes),
        "extraction": extraction,
    }


def run_fewshot(cfg: Config) -> FewshotResult:
    """Evaluate every ``cfg.fewshot.encoders`` entry; write and return the report."""
    few = cfg.fewshot
    if cfg.storage.endpoint_url or cfg.storage.region:
        storage.configure(cfg.storage.endpoint_url, cfg.storage.region)
    prep = prepare_split(cfg)
    class_names = prep.pool_set.class_names
    log.info("few-shot split: %s (pool %d, test %d)", prep.split.description, len(prep.split.pool),
             len(prep.split.test))
    sources = resolve_sources(cfg)
    tables, records = _feature_tables(cfg, prep, sources, few.out)
    feats, pool_y, test_y, dropped = _align(prep, sources, tables)
    check_shots(pool_y, few.shots, class_names)
    probe = LinearProbeConfig(epochs=few.linear_epochs)
    runs = run_protocol(feats, pool_y, test_y, class_names, shots=few.shots, seeds=few.seeds,
                        methods=few.methods, base_seed=few.seed, knn_k=few.knn_k, linear_epochs=few.linear_epochs)
    summary = summarise(runs)
    split_dict = prep.split.to_dict(prep.pool_set, prep.test_set, class_names)
    split_dict["dropped_bad_chips"] = dropped
    results: dict[str, Any] = {
        "kind": "sarjepa-fewshot-report",
        "format_version": RESULTS_FORMAT,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "feature_domain": few.feature_domain,
        "class_names": list(class_names),
        "split": split_dict,
        "protocol": {
            "shots": [int(k) for k in few.shots], "seeds": few.seeds, "base_seed": few.seed,
            "methods": list(few.methods), "method_details": _method_details(cfg, probe),
            "interval": "mean ± t_{0.975,S-1}·sd/√S over seeds (undefined for S = 1)",
            "t_quantile": t_quantile(0.975, few.seeds - 1) if few.seeds > 1 else None,
            "support_sets": "drawn per (base_seed, K, seed) from the pool labels; identical for every encoder",
        },
        "encoders": [_encoder_record(s, feats[s.name].pool.shape[1], records[s.name]) for s in sources],
        "summary": [r.to_dict() for r in summary],
        "paired": [row for enc in sources if not enc.is_baseline for ref in sources
                   if ref.is_reference and ref is not enc for row in paired_differences(runs, enc.name, ref.name)],
        "runs": [r.to_dict() for r in runs],
        "config": storage.redact_tree(cfg.to_dict()),
    }
    uris = write_report(few.out, results)
    log.info("few-shot report: %s", uris["report"])
    return FewshotResult(out=few.out, report_uri=uris["report"], results_uri=uris["results"],
                         figure_uri=uris["figure"], results=results, runs=runs, summary=summary)


def quick_score(checkpoint: str, cfg: Config, *, method: str | None = None,
                shots: int | None = None) -> dict[str, Any]:
    """One number for a sweep trial: the mean accuracy of ``checkpoint`` over ``cfg.fewshot.seeds``
    seeds, with ``method`` (default: the first of ``fewshot.methods``) at ``shots`` (default: the
    largest K of ``fewshot.shots`` that every pool class can supply). Writes nothing."""
    few = cfg.fewshot
    prep = prepare_split(cfg, check_k=False)
    method = method or few.methods[0]
    counts = np.bincount(prep.pool_set.labels[prep.split.pool])
    min_pool = int(counts[counts > 0].min())
    if shots is None:
        fitting = [k for k in few.shots if k <= min_pool]
        if not fitting:
            raise SplitError(f"no K in fewshot.shots = {few.shots} fits the smallest pool class ({min_pool} chips)")
        shots = max(fitting)
    src = encoder_source(checkpoint, cfg)
    tables, _ = _feature_tables(cfg, prep, [src], None)
    feats, pool_y, test_y, _ = _align(prep, [src], tables)
    runs = run_protocol(feats, pool_y, test_y, prep.pool_set.class_names, shots=[shots], seeds=few.seeds,
                        methods=[method], base_seed=few.seed, knn_k=few.knn_k, linear_epochs=few.linear_epochs)
    iv = summarise(runs)[0].interval
    return {"accuracy": iv.mean, "half_width": iv.half_width, "method": method, "shots": int(shots),
            "seeds": few.seeds, "feature_domain": few.feature_domain, "encoder": src.name}
