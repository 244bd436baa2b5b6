"""Fixtures of the pretraining tests.

``train_ray`` is a local 4-CPU cluster like the shared ``ray_local``, but started with
``address="local"``: a bare ``ray.init()`` joins any cluster that ``ray start`` (or
``ray.cluster_utils.Cluster``) left named in /tmp/ray/ray_current_cluster on this host, which on a
machine shared by several test runs is someone else's cluster.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def train_ray(s3_endpoint):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=True,
             runtime_env={"env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}})
    try:
        yield ray
    finally:
        ray.shutdown()
