"""Where a rank's training starts: the first epoch's stream, then the loop.

A Ray Train worker imports the function it runs before running it. The loop's module pulls in the
model code (timm: ~1.5 s on a small machine), and while that import ran, Ray Data's split
coordinator and the first read tasks had not been asked for, so the first batch came that much
later. This module imports only the config, the session and the batch stream: it asks for this
rank's dataset and starts the first epoch's stream, then imports the loop, which builds the model
while the pipeline starts. The step hooks travel pickled (``encode_step_hooks``) for the same
reason: an online probe's module imports the model too.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import Any, Sequence

from sarjepa_dist import storage
from sarjepa_dist.cluster import quiet_train_worker_console
from sarjepa_dist.config import Config, config_from_dict
from sarjepa_dist.train.batches import EpochStream, epoch_stream
from sarjepa_dist.train.session import LoopSession, RayTrainSession

__all__ = ["LoopStart", "decode_step_hooks", "encode_step_hooks", "ray_train_fn", "start_loop",
           "train_loop_per_worker"]


@dataclass
class LoopStart:
    """What a rank has asked for before the loop's module is imported."""

    cfg: Config  # the run's validated config (``loop_config["config"]``)
    trainer_shard: Any  # this rank's DataIterator of the dataset the driver built (None: none)
    checkpoint: Any  # the checkpoint to resume from, or None
    first_stream: EpochStream | None  # a fresh run's first epoch, already on its way


def encode_step_hooks(hooks: Sequence[Any]) -> bytes:
    """The step hooks as bytes for ``loop_config``: unpickled by the loop, after the first epoch's
    stream has started, not by Ray when it hands the worker its arguments."""
    import ray.cloudpickle

    return ray.cloudpickle.dumps(list(hooks))


def decode_step_hooks(blob: bytes | None) -> list[Any]:
    return list(pickle.loads(blob)) if blob else []


def start_loop(loop_config: dict[str, Any], session: LoopSession) -> LoopStart:
    """Ask for this rank's dataset and checkpoint; a fresh run's first epoch starts streaming now
    (a resumed run starts its saved epoch in the loop)."""
    cfg = config_from_dict(loop_config["config"])
    storage.configure(cfg.storage.endpoint_url, cfg.storage.region)
    shard = session.first_dataset()
    checkpoint = session.restored_checkpoint()
    first = None
    if shard is not None and checkpoint is None and int(loop_config["run"].get("trainer_dataset_epoch", 0)) == 0:
        first = epoch_stream(shard, cfg.data, epoch=0, device=session.device, rank=session.rank)
    return LoopStart(cfg=cfg, trainer_shard=shard, checkpoint=checkpoint, first_stream=first)


def train_loop_per_worker(loop_config: dict[str, Any], session: LoopSession | None = None) -> list[dict[str, Any]]:
    """Run one rank's training. Returns rank 0's metrics history (Ray puts it in ``Result.return_value``).

    ``loop_config``: ``config`` (a Config as a dict), ``run`` (a RunInfo as a dict) and, optionally,
    ``step_hooks`` (``encode_step_hooks`` of a list of :data:`~sarjepa_dist.train.loop.StepHook`).
    ``session``: where the loop runs; None: a Ray Train worker.
    """
    session = session if session is not None else RayTrainSession()
    start = start_loop(loop_config, session)
    try:
        from sarjepa_dist.train.loop import run_loop  # the model code: imported while the stream starts
    except BaseException:
        if start.first_stream is not None:
            start.first_stream.close()
        raise
    return run_loop(loop_config, session, start)


def ray_train_fn(loop_config: dict[str, Any]) -> list[dict[str, Any]]:
    """What each Ray Train worker runs: the loop, with Ray Train's per-report metrics dump off unless -v."""
    quiet_train_worker_console()
    return train_loop_per_worker(loop_config)
