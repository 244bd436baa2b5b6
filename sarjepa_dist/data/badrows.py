"""Bad-row accounting for the streaming pipeline: counted per reason across every Ray Data worker.

A bad row (undecodable bytes, a shape that differs from the manifest's ``chip_shape``, NaN/Inf, ...;
see ``shards.BAD_REASONS``) is skipped where it is met, inside a Ray Data ``map_batches`` task. Those
tasks run in many processes, so the counts live in one small named actor per run
(``_BadRowCounter``); the tasks report to it and the training loop reads it:

- ``counts()`` / ``total_seen()`` feed the metrics a run reports;
- ``check(max_bad_fraction)`` stops the run with ``BadDataError`` (carrying the counts) once more
  than the allowed fraction of the rows seen so far is bad;
- ``examples()`` keeps the first few bad rows (chip_id, shard file, reason, detail) so the warnings
  that name them can be raised where someone reads them (the train worker), not only in a Ray Data
  worker log.

Why an actor and not a column in the stream: bad rows are dropped before batching, so nothing of
them can ride along in the batches without taking a slot in a batch (which would upset the equal
per-rank batch counts DDP needs). One RPC per ``map_batches`` call (hundreds of rows) is cheap.

Reports are synchronous (the task waits for the actor to record them before its block is
returned), so once a consumer has received a block, the rows behind it are already counted.
Counts are cumulative over the life of the actor (all epochs of a run); a Ray Data task that is
retried after a worker crash reports its rows again, so the counts are an upper bound then.
"""

from __future__ import annotations

import functools
import logging
import uuid
import warnings
from types import ModuleType
from typing import Any

from sarjepa_dist.errors import SarjepaError

NAMESPACE = "sarjepa"
_ACTOR_PREFIX = "sarjepa-badrows-"
MAX_EXAMPLES = 100  # bad-row examples kept by the actor (the counts are always complete)

logger = logging.getLogger(__name__)


class BadDataError(SarjepaError, RuntimeError):
    """Too many bad rows: more than ``max_bad_fraction`` of the rows seen. Carries the counts."""

    def __init__(self, counts: dict[str, int], seen: int, max_bad_fraction: float,
                 examples: list[dict[str, Any]] | None = None):
        self.counts = dict(counts)
        self.seen = seen
        self.max_bad_fraction = max_bad_fraction
        self.examples = list(examples or [])
        bad = sum(self.counts.values())
        frac = bad / seen if seen else 1.0
        shown = "; ".join(f"{e['reason']}: {e['chip_id']} in {e['shard']}" for e in self.examples[:3])
        super().__init__(
            f"{bad} of {seen} rows are bad ({frac:.2%} > data.max_bad_fraction = {max_bad_fraction:g}); "
            f"counts by reason: {self.counts}" + (f"; e.g. {shown}" if shown else "")
            + ". Fix or re-ingest the dataset ('sarjepa inspect' lists bad rows), or raise "
              "data.max_bad_fraction if these rows may be skipped."
        )

    def __reduce__(self):
        # raised in train workers: Ray pickles it back to the driver, which must rebuild it
        return type(self), (self.counts, self.seen, self.max_bad_fraction, self.examples)


class BadRowWarning(UserWarning):
    """A bad row was skipped; the message names its chip_id, shard file and reason."""


def _ray() -> ModuleType:
    import ray  # here, not at the top: ingest, inspect and the CLI import the data layer without Ray

    return ray


class _BadRowCounter:
    """The per-run tally (a Ray actor, see ``_counter_actor_class``)."""

    def __init__(self, max_examples: int = MAX_EXAMPLES):
        self._counts: dict[str, int] = {}
        self._seen = 0
        self._examples: list[dict[str, Any]] = []
        self._max_examples = max_examples

    def report(self, seen: int, bad: dict[str, int], examples: list[dict[str, Any]]) -> None:
        self._seen += int(seen)
        for reason, n in bad.items():
            self._counts[reason] = self._counts.get(reason, 0) + int(n)
        room = self._max_examples - len(self._examples)
        if room > 0:
            self._examples.extend(examples[:room])

    def snapshot(self) -> dict[str, Any]:
        return {"counts": dict(self._counts), "seen": self._seen, "examples": list(self._examples)}

    def reset(self) -> None:
        self._counts, self._seen, self._examples = {}, 0, []


@functools.cache
def _counter_actor_class() -> Any:
    """``_BadRowCounter`` as a Ray actor class. Zero CPUs: it must never take a CPU from Ray Data or
    the train workers."""
    return _ray().remote(num_cpus=0, max_restarts=0)(_BadRowCounter)


class BadRowTracker:
    """Handle on one run's bad-row tally (a named actor in namespace ``sarjepa``).

    ``BadRowTracker(run_name)`` creates the actor or attaches to the existing one, so the driver
    that builds the dataset, the Ray Data tasks (which get the handle pickled into them) and the
    train workers (which attach by name) all see the same counts. The actor is owned by whoever
    created it first (normally the driver) and ends with it.
    """

    def __init__(self, run_name: str | None = None):
        self.run_name = run_name or f"anon-{uuid.uuid4().hex[:12]}"
        self._actor = _counter_actor_class().options(
            name=_ACTOR_PREFIX + self.run_name, namespace=NAMESPACE, get_if_exists=True,
        ).remote()
        self._warned = 0  # examples already turned into warnings by this handle

    @classmethod
    def attach(cls, run_name: str) -> "BadRowTracker":
        """The existing tracker of ``run_name`` (train workers); ``ValueError`` when there is none,
        rather than silently starting a fresh, empty tally under a mistyped name."""
        try:
            _ray().get_actor(_ACTOR_PREFIX + run_name, namespace=NAMESPACE)
        except ValueError as exc:
            raise ValueError(f"no bad-row tracker for run {run_name!r}: build_dataset(..., run_name="
                             f"{run_name!r}) creates it; is the name the same?") from exc
        return cls(run_name)

    # -- pickling: a Ray actor handle travels fine; the warned-count is per process
    def __getstate__(self) -> dict[str, Any]:
        return {"run_name": self.run_name, "_actor": self._actor, "_warned": 0}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"BadRowTracker(run_name={self.run_name!r})"

    # -- writing (Ray Data tasks)
    def report(self, seen: int, bad: dict[str, int], examples: list[dict[str, Any]]) -> None:
        """Record one batch's tally; waits for the actor so counts never lag the delivered data."""
        _ray().get(self._actor.report.remote(seen, bad, examples))

    def reset(self) -> None:
        _ray().get(self._actor.reset.remote())

    # -- reading (driver, training loop)
    def snapshot(self) -> dict[str, Any]:
        return _ray().get(self._actor.snapshot.remote())

    def counts(self) -> dict[str, int]:
        """Bad rows so far, by reason (``shards.BAD_REASONS``); cumulative over epochs."""
        return self.snapshot()["counts"]

    def total_seen(self) -> int:
        """Rows looked at so far, good and bad; cumulative over epochs."""
        return int(self.snapshot()["seen"])

    def examples(self) -> list[dict[str, Any]]:
        """The first bad rows met: dicts with chip_id, shard, reason, detail."""
        return self.snapshot()["examples"]

    def metrics(self, prefix: str = "data/bad_rows") -> dict[str, float]:
        """Flat metrics for the run's reporter: total, fraction and one entry per reason."""
        snap = self.snapshot()
        bad = sum(snap["counts"].values())
        out: dict[str, float] = {f"{prefix}": float(bad), f"{prefix}_seen": float(snap["seen"]),
                                 f"{prefix}_fraction": bad / snap["seen"] if snap["seen"] else 0.0}
        for reason, n in sorted(snap["counts"].items()):
            out[f"{prefix}/{reason}"] = float(n)
        return out

    def warn_new(self, snapshot: dict[str, Any] | None = None, limit: int = 20) -> None:
        """Raise a ``BadRowWarning`` per example not yet warned about by this handle (up to ``limit``)."""
        snap = snapshot if snapshot is not None else self.snapshot()
        new = snap["examples"][self._warned:]
        for ex in new[: max(0, limit - self._warned)]:
            warnings.warn(f"skipped bad row {ex['chip_id']!r} in {ex['shard']}: {ex['reason']} "
                          f"({ex['detail']})", BadRowWarning, stacklevel=3)
        self._warned += len(new)

    def check(self, max_bad_fraction: float, *, min_seen: int = 0) -> dict[str, Any]:
        """Raise ``BadDataError`` when bad/seen > ``max_bad_fraction``; return the snapshot otherwise.

        ``min_seen`` defers judging until enough rows were seen: a fraction over the first few rows
        is noise (one bad row in the first 32 is 3 %). Pass 0 at the end of an epoch.
        """
        snap = self.snapshot()
        seen, bad = snap["seen"], sum(snap["counts"].values())
        if bad and seen >= min_seen and bad > max_bad_fraction * seen:
            raise BadDataError(snap["counts"], seen, max_bad_fraction, snap["examples"])
        return snap

    def kill(self) -> None:
        """End the actor (tests, or a driver that builds many runs); counts are lost."""
        _ray().kill(self._actor)
