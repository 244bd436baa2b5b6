"""Shared pieces of the pretraining tests: tiny configs, small chip datasets with a few bad rows, and
step hooks (a fault injector and a metric recorder) for ``run_pretrain(step_hooks=...)``."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import ray.cloudpickle

from sarjepa_dist import storage
from sarjepa_dist.config import Config, config_from_dict, merge_tree
from sarjepa_dist.data import shards
from sarjepa_dist.train.loop import StepView

# The train workers cannot import this module (tests/train is not on their path), so the step
# hooks defined here travel to them by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

IMG = 32
NUM_BAD = 2  # NaN chips written into every test dataset (so bad-row counts are non-zero)


def write_chip_dataset(root: str, *, num_classes: int = 4, per_class: int = 40, seed: int = 0,
                       num_bad: int = NUM_BAD, shard_chips: int = 40,
                       shard_sizes: Sequence[int] | None = None) -> shards.Manifest:
    """Synthetic SAR chips (32 px), ids ``c00000``, ``c00001``, ..., plus ``num_bad`` NaN chips (at
    :func:`bad_chip_ids`), as shards of ~``shard_chips`` chips or of exactly ``shard_sizes`` chips."""
    from sarjepa_dist.data.synth import SynthConfig, generate

    batch = generate(SynthConfig(num_classes=num_classes, per_class=per_class, size=IMG, seed=seed))
    chip_bytes = IMG * IMG * 4
    names = list(batch.class_names)
    bad = set(bad_chip_ids(len(batch), num_bad))
    cuts = set(np.cumsum(shard_sizes).tolist()) if shard_sizes else set()
    shard_mib = 1024 if shard_sizes else shard_chips * chip_bytes / 2**20
    with shards.ShardWriter(root, class_names=names, command=["test"], target_shard_mib=shard_mib) as w:
        for i in range(len(batch)):
            chip = batch.chips[i]
            if f"c{i:05d}" in bad:
                chip = chip.copy()
                chip[0, 0, 0] = np.nan
            lab = int(batch.labels[i])
            w.add(shards.ChipRecord(f"c{i:05d}", chip, label=lab, class_name=names[lab]))
            if i + 1 in cuts:
                w._flush()  # cut a shard here: unequal shard sizes on purpose
        manifest = w.commit()
    if shard_sizes:
        assert [s.rows for s in manifest.shards] == list(shard_sizes)
    return manifest


def bad_chip_ids(num_chips: int, num_bad: int = NUM_BAD) -> list[str]:
    """The ids of the NaN chips :func:`write_chip_dataset` writes: spread evenly, never first or last."""
    if not num_bad:
        return []
    return [f"c{i:05d}" for i in np.linspace(0, num_chips - 1, num_bad + 2)[1:-1].astype(int).tolist()]


def tiny_config(data_path: str, storage_path: str, name: str, **sections: dict[str, Any]) -> Config:
    """A model small enough for a 2-core CI box: ViT depth 2 on 32 px chips, patch 4 (8x8 grid)."""
    tree: dict[str, Any] = {
        "data": {"path": data_path, "img_size": IMG, "batch_size": 8, "shuffle_buffer": 32,
                 "max_bad_fraction": 0.05, "augment": {"crop_scale": [0.8, 1.0]}},
        "gradient": {"radii": [2, 4]},
        "mask": {"min_keep": 4},
        "model": {"encoder": "vit_tiny", "patch_size": 4, "depth": 2, "predictor_dim": 32,
                  "predictor_depth": 1, "predictor_heads": 2},
        "optim": {"warmup_fraction": 0.2},
        "train": {"name": name, "storage_path": storage_path, "steps": 8, "checkpoint_every": 4,
                  "log_every": 2, "num_workers": 1, "cpus_per_worker": 0.5, "num_to_keep": 2},
    }
    return config_from_dict(merge_tree(tree, sections))


def read_json(uri: str) -> dict[str, Any]:
    return json.loads(storage.read_text(uri))


def assert_finite_losses(history: list[dict[str, Any]]) -> None:
    assert history, "no metrics were reported"
    for row in history:
        assert math.isfinite(row["loss"]), row


class InjectedFault(RuntimeError):
    """The failure ``FailOnce`` raises in a train worker."""


@dataclass(frozen=True)
class FailOnce:
    """Step hook: fail the worker of ``rank`` right after step ``step``, once: raise
    ``InjectedFault``, or with ``sigkill`` kill the worker process outright.

    The marker file records the fault, so the worker Ray restarts from the checkpoint carries on.
    """

    step: int
    marker: str
    rank: int = 0
    sigkill: bool = False

    def __call__(self, view: StepView) -> None:
        if view.step != self.step or view.rank != self.rank or os.path.exists(self.marker):
            return
        how = f"SIGKILL, pid {os.getpid()}" if self.sigkill else "exception"
        with open(self.marker, "w") as f:
            f.write(f"fault injected at step {view.step} on rank {view.rank} ({how})\n")
        if self.sigkill:
            os.kill(os.getpid(), signal.SIGKILL)
        raise InjectedFault(f"injected fault at step {view.step} on rank {view.rank}")


@dataclass(frozen=True)
class RecordEvery:
    """Step hook: on rank 0, every ``every`` steps, a metric ``hook_step`` holding that step."""

    every: int

    def __call__(self, view: StepView) -> dict[str, Any] | None:
        if view.rank != 0 or view.step % self.every:
            return None
        return {"hook_step": view.step}


@dataclass(frozen=True)
class RecordChips:
    """Step hook: append (epoch, step, rank, world, node, pid, chip ids) to ``<folder>/rank-<pid>.jsonl``
    (the folder is shared by every node of a simulated cluster)."""

    folder: str

    def __call__(self, view: StepView) -> None:
        row = {"epoch": view.epoch, "step": view.step, "rank": view.rank, "world": view.world_size,
               "node": ray.get_runtime_context().get_node_id(), "chips": list(view.chip_ids),
               "t": time.time()}
        with open(os.path.join(self.folder, f"rank-{os.getpid()}.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")


def read_records(folder: str) -> list[dict[str, Any]]:
    """Every :class:`RecordChips` row in ``folder``, oldest first."""
    rows = []
    for name in os.listdir(folder):
        with open(os.path.join(folder, name)) as f:
            rows += [json.loads(line) for line in f if line.strip()]
    return sorted(rows, key=lambda r: r["t"])


def final_attempt_by_epoch(rows: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    """Per epoch, the records of the worker group that finished it: the world size of its last
    record (a group replaced by a resize leaves records of steps that were redone)."""
    by_epoch: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_epoch[r["epoch"]].append(r)
    return {e: [r for r in rs if r["world"] == rs[-1]["world"]] for e, rs in sorted(by_epoch.items())}


def assert_exactly_once(epoch: int, rows: list[dict[str, Any]], chips: set[str], *, batch: int,
                        missed: int = 0) -> None:
    """One epoch's records: every rank took the same number of full batches, on a node of its own,
    no chip was read twice or came from outside ``chips``, and exactly ``missed`` of ``chips`` were
    never read (what an equal split and drop_last leave out, or the rest of an unfinished epoch)."""
    world = rows[0]["world"]
    batches = Counter(r["rank"] for r in rows)
    assert sorted(batches) == list(range(world)), f"epoch {epoch}: ranks {sorted(batches)}"
    assert len(set(batches.values())) == 1, f"epoch {epoch}: unequal batches per rank {dict(batches)}"
    assert all(len(r["chips"]) == batch for r in rows)
    seen = Counter(c for r in rows for c in r["chips"])
    twice = [c for c, n in seen.items() if n > 1]
    assert not twice, f"epoch {epoch}: chips read more than once: {twice[:10]}"
    strangers = set(seen) - chips
    assert not strangers, f"epoch {epoch}: chips that should never be read: {sorted(strangers)[:10]}"
    never = len(chips - set(seen))
    assert never == missed, f"epoch {epoch}: {never} chips never read, expected {missed}"
    assert len({r["node"] for r in rows}) == world, f"epoch {epoch}: ranks shared a node"


MiB = 2**20


@contextlib.contextmanager
def simulated_cluster(worker_nodes: int, worker_cpus: float) -> Iterator[Any]:
    """``ray.cluster_utils.Cluster``: a head node (1 CPU, for Ray Data) and ``worker_nodes`` nodes of
    ``worker_cpus`` CPUs and one ``node_slot`` each, so each train worker gets a node of its own."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "object_store_memory": 96 * MiB, "include_dashboard": False})
    for _ in range(worker_nodes):
        add_worker_node(cluster, worker_cpus)
    cluster.wait_for_nodes()
    _forget_as_current_cluster(cluster.address)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def add_worker_node(cluster: Any, cpus: float = 1) -> None:
    cluster.add_node(num_cpus=cpus, resources={"node_slot": 1}, object_store_memory=96 * MiB)


def _forget_as_current_cluster(address: str) -> None:
    """``Cluster`` names itself in /tmp/ray/ray_current_cluster, so every bare ``ray.init()`` on this
    host (other test runs included) would join it. Drop the pointer when it still names this cluster;
    the tests connect by explicit address."""
    from ray._common.utils import get_ray_address_file

    path = get_ray_address_file(None)
    try:
        with open(path) as f:
            if f.read().strip() == address:
                os.remove(path)
    except OSError:
        pass
