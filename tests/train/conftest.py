"""Fixtures of the pretraining tests.

``train_ray`` is the shared ``ray_local`` cluster (4 logical CPUs, ``address="local"``).
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def train_ray(ray_local):
    return ray_local
