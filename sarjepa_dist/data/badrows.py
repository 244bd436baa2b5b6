"""Bad-row accounting for the streaming pipeline: exact, per reason, across every Ray Data worker,
every retry and every relaunch of a run.

A bad row (undecodable bytes, a shape that differs from the manifest's ``chip_shape``, NaN/Inf, ...;
see ``shards.BAD_REASONS``) is skipped where it is met, inside a Ray Data task. A shard file that
cannot be read (truncated, corrupt pages, missing columns) is quarantined the same way: its rows
that were not delivered count as ``unreadable`` and the shard is listed with its reason. Those tasks
run in many processes, so the tally lives in one small named actor per run (``_BadRowCounter``);
the tasks report to it and the training loop reads it:

- ``counts()`` / ``total_seen()`` feed the metrics a run reports;
- ``check(max_bad_fraction)`` stops the run with ``BadDataError`` (carrying the counts and the
  quarantined shards) once more than the allowed fraction of the rows seen so far is bad;
- ``examples()`` keeps the first few bad rows (chip_id, shard file, reason, detail) so the warnings
  that name them can be raised where someone reads them (the train worker), not only in a Ray Data
  worker log.

Exact under retries. Every report carries an idempotent key: the epoch plus a digest of the chip
ids of the Ray Data batch it describes (or the shard path, for a quarantined shard). A retried
task re-reads the same block, cuts the same batches and sends the same keys, and the actor keeps
the first report of a key only. Keys are kept per epoch while the epoch can still be re-read;
``state(close_before=e)`` folds epochs before ``e`` into plain totals.

Persistent. The training loop saves ``state(close_before=epoch, include_blocks=True)`` in every
checkpoint and hands it back with ``restore`` when a run resumes (after a worker restart or on a
relaunch under the same name). The resumed epoch is read again from its start, and its keys are
already known, so nothing is counted twice and nothing counted before the crash is lost.

Why an actor and not a column in the stream: bad rows are dropped before batching, so nothing of
them can ride along in the batches without taking a slot in a batch (which would upset the equal
per-rank batch counts DDP needs). One RPC per ``map_batches`` call (hundreds of rows) is cheap.
Reports are synchronous (the task waits for the actor to record them before its block is
returned), so once a consumer has received a block, the rows behind it are already counted.
"""

from __future__ import annotations

import functools
import hashlib
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
    """Too many bad rows: more than ``max_bad_fraction`` of the rows seen. Carries the counts and
    the shards that could not be read."""

    def __init__(self, counts: dict[str, int], seen: int, max_bad_fraction: float,
                 examples: list[dict[str, Any]] | None = None, quarantined: list[dict[str, Any]] | None = None):
        self.counts = dict(counts)
        self.seen = seen
        self.max_bad_fraction = max_bad_fraction
        self.examples = list(examples or [])
        self.quarantined = list(quarantined or [])
        bad = sum(self.counts.values())
        frac = bad / seen if seen else 1.0
        shards = "; ".join(f"{q['shard']} ({q['detail']})" for q in self.quarantined[:3])
        rows = [e for e in self.examples if e.get("reason") != "unreadable"]
        shown = "; ".join(f"{e['reason']}: {e['chip_id']} in {e['shard']}" for e in rows[:3])
        super().__init__(
            f"{bad} of {seen} rows are bad ({frac:.2%} > data.max_bad_fraction = {max_bad_fraction:g}); "
            f"counts by reason: {self.counts}"
            + (f"; unreadable shard(s), quarantined: {shards}" if shards else "")
            + (f"; e.g. {shown}" if shown else "")
            + ". Fix or re-ingest the dataset ('sarjepa inspect' lists bad rows), or raise "
              "data.max_bad_fraction if these rows may be skipped."
        )

    def __reduce__(self):
        # raised in train workers: Ray pickles it back to the driver, which must rebuild it
        return type(self), (self.counts, self.seen, self.max_bad_fraction, self.examples, self.quarantined)


class BadRowWarning(UserWarning):
    """A bad row was skipped; the message names its chip_id, shard file and reason."""


def _ray() -> ModuleType:
    import ray  # here, not at the top: ingest, inspect and the CLI import the data layer without Ray

    return ray


def block_key(epoch: int, chip_ids: Any) -> str:
    """The idempotent key of one batch of rows: the same rows in the same epoch give the same key."""
    h = hashlib.blake2b(digest_size=12)
    h.update(str(int(epoch)).encode())
    for cid in chip_ids:
        h.update(b"\x1f" + str(cid).encode("utf-8"))
    return h.hexdigest()


def _add_counts(into: dict[str, int], more: dict[str, int]) -> None:
    for reason, n in more.items():
        into[reason] = into.get(reason, 0) + int(n)


class _BadRowCounter:
    """The per-run tally (a Ray actor, see ``_counter_actor_class``).

    ``_base_*``: totals of the epochs before ``_closed_before`` (folded, no keys kept);
    ``_blocks[epoch][key] = (seen, {reason: n})`` for the open epochs.
    """

    def __init__(self, max_examples: int = MAX_EXAMPLES):
        self._max_examples = max_examples
        self.reset()

    def reset(self) -> None:
        self._base_counts: dict[str, int] = {}
        self._base_seen = 0
        self._closed_before = 0
        self._blocks: dict[int, dict[str, tuple[int, dict[str, int]]]] = {}
        self._examples: list[dict[str, Any]] = []
        self._quarantined: dict[str, dict[str, Any]] = {}
        self._duplicates = 0

    def report(self, seen: int, bad: dict[str, int], examples: list[dict[str, Any]], key: str | None = None,
               epoch: int = 0, quarantined: dict[str, Any] | None = None) -> bool:
        """Record one batch's tally; False when ``key`` was recorded before (a retried task)."""
        epoch = int(epoch)
        if epoch < self._closed_before:  # an epoch already folded: its keys are gone, add as is
            self._base_seen += int(seen)
            _add_counts(self._base_counts, bad)
        else:
            blocks = self._blocks.setdefault(epoch, {})
            key = key if key is not None else f"unkeyed-{len(blocks)}"
            if key in blocks:
                self._duplicates += 1
                return False
            blocks[key] = (int(seen), {r: int(n) for r, n in bad.items()})
        if quarantined is not None:
            self._quarantined.setdefault(quarantined["shard"], dict(quarantined))
        room = self._max_examples - len(self._examples)
        if room > 0:
            self._examples.extend(examples[:room])
        return True

    def report_many(self, reports: list[dict[str, Any]]) -> int:
        """``report`` for each of ``reports`` (its keyword arguments); how many were new."""
        return sum(self.report(**r) for r in reports)

    def _totals(self) -> tuple[dict[str, int], int]:
        counts, seen = dict(self._base_counts), self._base_seen
        for blocks in self._blocks.values():
            for n, bad in blocks.values():
                seen += n
                _add_counts(counts, bad)
        return counts, seen

    def snapshot(self) -> dict[str, Any]:
        counts, seen = self._totals()
        return {"counts": counts, "seen": seen, "examples": list(self._examples),
                "quarantined": list(self._quarantined.values()), "duplicates": self._duplicates}

    def state(self, close_before: int | None = None, include_blocks: bool = True) -> dict[str, Any]:
        """The tally as plain JSON-able data; ``close_before`` first folds the epochs before it."""
        if close_before is not None and close_before > self._closed_before:
            for epoch in [e for e in self._blocks if e < close_before]:
                for n, bad in self._blocks.pop(epoch).values():
                    self._base_seen += n
                    _add_counts(self._base_counts, bad)
            self._closed_before = int(close_before)
        out = {**self.snapshot(), "base_counts": dict(self._base_counts), "base_seen": self._base_seen,
               "closed_before": self._closed_before}
        if include_blocks:
            out["blocks"] = {str(e): {k: [n, bad] for k, (n, bad) in b.items()} for e, b in self._blocks.items()}
        return out

    def restore(self, saved: dict[str, Any]) -> None:
        """Merge a saved ``state``: the base that folded more epochs wins, keys are united."""
        saved_closed = int(saved.get("closed_before", 0))
        if saved_closed > self._closed_before:
            self._base_counts = {r: int(n) for r, n in saved.get("base_counts", {}).items()}
            self._base_seen = int(saved.get("base_seen", 0))
            self._closed_before = saved_closed
            self._blocks = {e: b for e, b in self._blocks.items() if e >= saved_closed}
        for epoch_text, blocks in (saved.get("blocks") or {}).items():
            epoch = int(epoch_text)
            if epoch < self._closed_before:
                continue  # already inside this tally's base
            mine = self._blocks.setdefault(epoch, {})
            for key, (n, bad) in blocks.items():
                mine.setdefault(key, (int(n), {r: int(c) for r, c in bad.items()}))
        for q in saved.get("quarantined", []):
            self._quarantined.setdefault(q["shard"], dict(q))
        known = {(e.get("chip_id"), e.get("shard"), e.get("reason")) for e in self._examples}
        for e in saved.get("examples", []):
            if len(self._examples) < self._max_examples and (e.get("chip_id"), e.get("shard"), e.get("reason")) not in known:
                self._examples.append(dict(e))


@functools.cache
def _counter_actor_class() -> Any:
    """``_BadRowCounter`` as a Ray actor class. Zero CPUs: it must never take a CPU from Ray Data or
    the train workers."""
    return _ray().remote(num_cpus=0, max_restarts=0)(_BadRowCounter)


def _on_this_node() -> Any:
    """Keep the tally on the creator's node (normally the driver's, which the run cannot outlive
    anyway). Ray places a zero-CPU actor on any node, and one on a worker node that is removed or
    preempted took the tally, and with it the run, down (tests/train/test_node_removal.py)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(_ray().get_runtime_context().get_node_id(), soft=True)


class BadRowTracker:
    """Handle on one run's bad-row tally (a named actor in namespace ``sarjepa``).

    ``BadRowTracker(run_name)`` creates the actor or attaches to the existing one, so the driver
    that builds the dataset, the Ray Data tasks (which get the handle pickled into them) and the
    train workers (which attach by name) all see the same counts. The actor is owned by whoever
    created it first (normally the driver), lives on that process's node and ends with it.
    """

    def __init__(self, run_name: str | None = None):
        self.run_name = run_name or f"anon-{uuid.uuid4().hex[:12]}"
        self._actor = _counter_actor_class().options(
            name=_ACTOR_PREFIX + self.run_name, namespace=NAMESPACE, get_if_exists=True,
            scheduling_strategy=_on_this_node(),
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
    def report_many(self, reports: list[dict[str, Any]]) -> int:
        """Several tallies in one call to the actor, each the keyword arguments of
        ``_BadRowCounter.report`` (``key``: see ``block_key``; a key seen before is ignored); how
        many were new. Read tasks call it through ``TaskTallies``."""
        return _ray().get(self._actor.report_many.remote(reports)) if reports else 0

    def reset(self) -> None:
        _ray().get(self._actor.reset.remote())

    # -- persistence (the training loop's checkpoints)
    def state(self, close_before: int | None = None) -> dict[str, Any]:
        """The whole tally as JSON-able data (for a checkpoint); epochs before ``close_before`` are
        folded into totals first, since a resumed run never reads them again."""
        return _ray().get(self._actor.state.remote(close_before, True))

    def restore(self, saved: dict[str, Any]) -> None:
        """Merge a tally saved by ``state`` (a resumed run): idempotent, nothing counted twice."""
        _ray().get(self._actor.restore.remote(saved))

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

    def quarantined(self) -> list[dict[str, Any]]:
        """The shards that could not be read: dicts with shard, reason, detail, rows, epoch."""
        return self.snapshot()["quarantined"]

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
            what = f"bad row {ex['chip_id']!r} in" if ex.get("chip_id") is not None else "the rest of shard"
            warnings.warn(f"skipped {what} {ex['shard']}: {ex['reason']} ({ex['detail']})",
                          BadRowWarning, stacklevel=3)
        self._warned += len(new)

    def check(self, max_bad_fraction: float, *, min_seen: int = 0) -> dict[str, Any]:
        """Raise ``BadDataError`` when bad/seen > ``max_bad_fraction``; return the snapshot otherwise.

        ``min_seen`` defers judging until enough rows were seen: a fraction over the first few rows
        is noise (one bad row in the first 32 is 3 %). Pass 0 at the end of an epoch.
        """
        snap = self.snapshot()
        seen, bad = snap["seen"], sum(snap["counts"].values())
        if bad and seen >= min_seen and bad > max_bad_fraction * seen:
            raise BadDataError(snap["counts"], seen, max_bad_fraction, snap["examples"], snap["quarantined"])
        return snap

    def kill(self) -> None:
        """End the actor (tests, or a driver that builds many runs); counts are lost."""
        _ray().kill(self._actor)


class TaskTallies:
    """The tallies of one Ray Data read task, kept in the task and sent to its ``BadRowTracker``
    in one call (``flush``) when the task's reading ends.

    Why not one call per block: a task that waits on ``ray.get`` gives its CPU back to Ray for the
    wait, so Ray may start the next queued read task (in a freshly started worker process if
    none is idle) beside it, which oversubscribes the node's CPUs; and each wait is a round trip
    to the one actor every read task of a large cluster reports to. The task flushes before it
    completes, so when an epoch's iteration ends every delivered row is counted; during the
    epoch the counts lag the delivered rows by the tasks still reading. A retried task sends the
    same keys again, which the actor ignores."""

    def __init__(self, tracker: BadRowTracker):
        self.tracker = tracker
        self.pending: list[dict[str, Any]] = []

    def report(self, seen: int, bad: dict[str, int], examples: list[dict[str, Any]], *, key: str | None = None,
               epoch: int = 0, quarantined: dict[str, Any] | None = None) -> None:
        self.pending.append({"seen": int(seen), "bad": dict(bad), "examples": list(examples), "key": key,
                             "epoch": int(epoch), "quarantined": quarantined})

    def flush(self) -> int:
        """Send what is pending; how many of the tallies were new to the tracker."""
        pending, self.pending = self.pending, []
        return self.tracker.report_many(pending)
