"""Training telemetry: interval meters, the console progress line and TensorBoard event files.

Nothing here talks to Ray; the loop feeds numbers in and decides who writes (rank 0).

*Data-wait fraction* is the share of a step's wall time spent blocked on the next batch. It is the
number that says whether the Ray Data pipeline keeps the accelerator fed: near zero means the
pipeline is ahead, a large value means more CPUs (or ``transform_placement: device``) are needed.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Mapping

from tensorboardX import SummaryWriter

from sarjepa_dist import storage

__all__ = ["IntervalMeter", "format_progress", "scalar_metrics", "TensorBoardLogger"]

_log = logging.getLogger(__name__)


@dataclass
class IntervalMeter:
    """Accumulates per-step timings and sums between two reports.

    ``add`` is called once per optimiser step with the time spent waiting for the batch and the
    whole step's wall time (wait included); ``flush`` returns the interval's figures and resets.
    ``loss`` may be a device tensor: it is only converted (one host sync) in ``flush``.
    """

    steps: int = 0
    chips: int = 0  # global: summed over ranks by the caller
    wait_s: float = 0.0
    step_s: float = 0.0
    loss_sum: Any = 0.0  # a float, or a device tensor (summed without a host sync until flush)
    _started: float = 0.0

    def __post_init__(self) -> None:
        self._started = time.perf_counter()

    def add(self, *, wait_s: float, step_s: float, chips: int, loss: Any) -> None:
        self.steps += 1
        self.chips += chips
        self.wait_s += wait_s
        self.step_s += step_s
        self.loss_sum += loss

    def flush(self) -> dict[str, float]:
        wall = max(time.perf_counter() - self._started, 1e-9)
        steps = max(self.steps, 1)
        out = {
            "interval_steps": float(self.steps),
            "loss_mean": float(self.loss_sum) / steps,
            "ms_per_step": 1000.0 * self.step_s / steps,
            "chips_per_s": self.chips / max(self.step_s, 1e-9) if self.steps else 0.0,
            "chips_per_s_wall": self.chips / wall,
            "data_wait_fraction": self.wait_s / self.step_s if self.step_s > 0 else 0.0,
        }
        self.steps = self.chips = 0
        self.wait_s = self.step_s = self.loss_sum = 0.0
        self._started = time.perf_counter()
        return out


def _fmt(value: Any, spec: str) -> str:
    if isinstance(value, (int, float)) and math.isfinite(float(value)):
        return format(value, spec)
    return "n/a" if value is None else str(value)


def format_progress(metrics: Mapping[str, Any], total_steps: int) -> str:
    """One console line per report: what an operator scans a log for."""
    width = len(str(total_steps))
    parts = [
        f"step {int(metrics.get('step', 0)):>{width}}/{total_steps}",
        f"loss {_fmt(metrics.get('loss'), '.4f')}",
        f"lr {_fmt(metrics.get('lr'), '.2e')}",
        f"tau {_fmt(metrics.get('tau'), '.4f')}",
        f"{_fmt(metrics.get('chips_per_s'), '.1f')} chips/s",
        f"wait {_fmt(100.0 * metrics['data_wait_fraction'] if 'data_wait_fraction' in metrics else None, '.1f')}%",
    ]
    if "eff_rank_target" in metrics:
        parts.append(f"eff-rank {_fmt(metrics.get('eff_rank_target'), '.1f')}"
                     f"/{_fmt(metrics.get('eff_rank_pred'), '.1f')}")
    for method in ("knn", "linear"):
        if f"probe_{method}" in metrics:
            parts.append(f"probe {method} {_fmt(metrics[f'probe_{method}'], '.3f')}")
    bad = metrics.get("bad_rows_total")
    if bad:
        parts.append(f"bad rows {int(bad)}")
    return " | ".join(parts)


def scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite-or-not numeric entries (bools excluded), as floats: what TensorBoard can plot."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        out[k] = float(v)
    return out


class TensorBoardLogger:
    """tensorboardX event files under the run's folder in storage.

    Event files are append-only streams, which object stores cannot append to. So events are
    always written to a local folder: the run's own ``tensorboard/`` folder when storage is local
    (live in TensorBoard), else a local staging folder whose files ``sync`` copies to
    ``<run>/tensorboard/`` (called with every checkpoint and at the end). Each writer makes a new
    event file, so a resumed run adds a file beside the old ones rather than overwriting them.
    Without ``local_staging_dir`` an s3:// run stages in a temporary folder that ``close`` removes.
    """

    def __init__(self, run_uri: str, local_staging_dir: str | None = None):
        self.dest_uri = storage.join(run_uri, "tensorboard")
        self.remote = storage.is_s3(run_uri)
        self._own_staging = self.remote and local_staging_dir is None
        if not self.remote:
            self.logdir = storage.resolve(self.dest_uri)[1]
        elif self._own_staging:
            self.logdir = tempfile.mkdtemp(prefix="sarjepa-tb-")
        else:
            self.logdir = local_staging_dir
        os.makedirs(self.logdir, exist_ok=True)
        self._writer = SummaryWriter(logdir=self.logdir, flush_secs=30)
        self._synced: dict[str, int] = {}

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        for k, v in scalar_metrics(metrics).items():
            if k == "step" or not math.isfinite(v):
                continue
            self._writer.add_scalar(f"train/{k}", v, global_step=step)

    def sync(self) -> None:
        """Flush; for remote storage upload the files that grew since the last sync."""
        self._writer.flush()
        if not self.remote:
            return
        for name in sorted(os.listdir(self.logdir)):
            path = os.path.join(self.logdir, name)
            if not os.path.isfile(path):
                continue
            size = os.path.getsize(path)
            if self._synced.get(name) == size:
                continue
            with open(path, "rb") as f:
                storage.write_bytes(storage.join(self.dest_uri, name), f.read())
            self._synced[name] = size

    def close(self) -> None:
        try:
            self.sync()
        finally:
            self._writer.close()
            if self._own_staging:
                shutil.rmtree(self.logdir, ignore_errors=True)
