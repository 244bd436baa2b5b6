"""Shared pieces of the sweep tests: a tiny labelled dataset, a tiny sweep config, and step hooks
that script the probe figure or fail a trial, for ``run_sweep(step_hooks=...)``."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

import ray.cloudpickle

from sarjepa_dist.config import Config, config_from_dict, merge_tree
from sarjepa_dist.train.loop import StepView

# Trial and train workers cannot import tests/tune: the hooks travel by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def write_labelled_chips(root: str, per_class: int = 24) -> str:
    from sarjepa_dist.data.synth import SynthConfig, write_synthetic_dataset

    write_synthetic_dataset(root, SynthConfig(num_classes=3, per_class=per_class, size=32, seed=0))
    return root


def tiny_sweep_config(data: str, runs: str, name: str, **sections: dict[str, Any]) -> Config:
    """ViT depth 2 on 32 px chips; the probe every 4 steps on the (labelled) training data."""
    tree: dict[str, Any] = {
        "ray": {"num_cpus": 4},
        "data": {"path": data, "img_size": 32, "batch_size": 8, "shuffle_buffer": 32},
        "gradient": {"radii": [2, 4]},
        "mask": {"min_keep": 4},
        "model": {"patch_size": 8, "depth": 2, "predictor_dim": 32, "predictor_depth": 1, "predictor_heads": 2},
        "train": {"steps": 12, "checkpoint_every": 4, "log_every": 2, "cpus_per_worker": 0.5,
                  "storage_path": runs},
        "probe": {"every": 4, "shots": 2, "episodes": 1, "max_per_class": 10},
        "tune": {"name": name, "storage_path": runs, "grace_period": 4, "reduction_factor": 2},
        "fewshot": {"data": data, "split_column": "depression_deg", "train_values": [17.0],
                    "test_values": [15.0], "shots": [2], "seeds": 2, "methods": ["prototype"],
                    "out": os.path.join(runs, "fewshot")},
    }
    return config_from_dict(merge_tree(tree, sections))


@dataclass(frozen=True)
class ScriptedProbe:
    """Step hook: on rank 0, ``probe_knn`` = ``top - 0.1 * train.seed`` every step, so ASHA's
    choices are known in advance (it runs after the real probe and overrides its figure)."""

    top: float = 0.9

    def __call__(self, view: StepView) -> dict[str, Any] | None:
        if view.rank != 0:
            return None
        return {"probe_knn": self.top - 0.1 * view.cfg.train.seed}


@dataclass(frozen=True)
class FailTrial:
    """Step hook: the trial with ``train.seed == seed`` fails after ``step``, every attempt, each
    failure appended to the file ``record``."""

    seed: int
    step: int
    record: str

    def __call__(self, view: StepView) -> None:
        if view.cfg.train.seed != self.seed or view.step != self.step or view.rank != 0:
            return
        with open(self.record, "a") as f:
            f.write(f"failed at step {view.step}\n")
        raise RuntimeError(f"injected trial failure at step {view.step} (train.seed {self.seed})")
