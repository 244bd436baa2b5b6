"""The online few-shot probe as a train-loop step hook: every ``probe.every`` steps (and at the last
step) rank 0 probes its evaluation encoder (EMA, or the context encoder for ``gradient-features``)
on a small labelled set and the figures join the next report (console, TensorBoard, Ray results,
the checkpoint's metrics history and ``meta.json``)."""

from __future__ import annotations

import time
from typing import Any

from sarjepa_dist import storage
from sarjepa_dist.config import Config, ConfigError
from sarjepa_dist.data.shards import ShardError, load_arrays, read_manifest
from sarjepa_dist.model.jepa import CONTEXT_INPUT
from sarjepa_dist.probe import ProbeSet, build_probe_set, run_probe
from sarjepa_dist.train.loop import StepView


def probe_data_uri(cfg: Config) -> str:
    return cfg.probe.data or cfg.data.path


def check_probe_data(cfg: Config) -> None:
    """On the driver, before Ray starts work: the probe dataset exists and is labelled."""
    uri = probe_data_uri(cfg)
    try:
        manifest = read_manifest(uri)
    except (ShardError, FileNotFoundError, OSError) as exc:
        raise ConfigError(f"probe.data: cannot read the probe dataset {storage.redact(uri)}: {exc}") from exc
    if len(manifest.class_names) < 2:
        raise ConfigError(f"probe.data: the dataset {storage.redact(uri)} has {len(manifest.class_names)} "
                          f"labelled class(es); the online probe needs a labelled dataset with two or more "
                          f"(set probe.data, or probe.every: 0 to turn the probe off)")
    probe = cfg.probe
    for name, count in manifest.per_class_counts.items():
        n = min(count, probe.max_per_class or count)
        pool = n - int(min(max(round(n * probe.test_fraction), 1), max(n - 1, 1)))
        if pool < probe.shots:
            raise ConfigError(f"probe.shots = {probe.shots} but class {name!r} of {storage.redact(uri)} leaves "
                              f"only {pool} pool chip(s) for the probe ({count} chips, probe.max_per_class = "
                              f"{probe.max_per_class}, probe.test_fraction = {probe.test_fraction}); lower "
                              f"probe.shots or point probe.data at a larger labelled dataset")


class OnlineProbe:
    """A picklable ``StepHook``; the probe chips are loaded and transformed once, on first use."""

    def __init__(self, cfg: Config):
        self.every = cfg.probe.every
        self._probe_set: ProbeSet | None = None

    def __call__(self, view: StepView) -> dict[str, Any] | None:
        last = view.step >= view.cfg.train.steps
        if view.rank != 0 or self.every <= 0 or (view.step % self.every and not last):
            return None
        cfg = view.cfg
        t0 = time.perf_counter()
        key = CONTEXT_INPUT[cfg.model.context_domain]  # the fewshot default: the context domain
        if self._probe_set is None:
            arrays = load_arrays(probe_data_uri(cfg))
            self._probe_set = build_probe_set(arrays.chips, arrays.labels, cfg.probe, cfg.data, cfg.gradient,
                                              keys=(key,))
        out: dict[str, Any] = run_probe(view.model.eval_encoder, self._probe_set, key, cfg.probe)
        out["probe_step"] = view.step
        out["probe_seconds"] = time.perf_counter() - t0
        return out
