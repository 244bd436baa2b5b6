"""What the training loop asks of the process it runs in: its rank, device and first dataset, the
checkpoint to resume from, and where reports and checkpoints go.

``RayTrainSession`` is a Ray Train worker (``TorchTrainer``): Ray Train keeps the run's checkpoint
index and restarts. A sweep's one-worker trial runs the loop in the Tune trial's own process
instead (``tune/trial.py``'s ``TrialSession``), where Tune keeps the checkpoints.
"""

from __future__ import annotations

from typing import Any, Protocol

import ray
import ray.train
import ray.train.torch
import torch

__all__ = ["LoopSession", "RayTrainSession"]


class LoopSession(Protocol):
    rank: int
    world_size: int
    device: torch.device

    def node_id(self) -> str: ...

    def restored_checkpoint(self) -> Any:
        """The checkpoint to resume from (has ``as_directory()``), or None for a fresh run."""

    def first_dataset(self) -> Any:
        """This rank's ``DataIterator`` of the dataset the driver built (RunInfo.trainer_dataset_epoch)."""

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None,
               checkpoint_id: str | None = None) -> None:
        """Publish one report; with ``checkpoint_dir`` (a complete local folder) persist it as
        ``checkpoint_id`` before returning (the folder may be deleted afterwards)."""


class RayTrainSession:
    """A rank of a Ray Train worker group."""

    def __init__(self) -> None:
        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def restored_checkpoint(self) -> ray.train.Checkpoint | None:
        return ray.train.get_checkpoint()

    def first_dataset(self) -> Any:
        return ray.train.get_dataset_shard("train")

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None,
               checkpoint_id: str | None = None) -> None:
        checkpoint = None if checkpoint_dir is None else ray.train.Checkpoint.from_directory(checkpoint_dir)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_id)
