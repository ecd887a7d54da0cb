"""Shared fixtures: one local (loopback-only) Ray per test session, offline HF, tiny data."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Ray workers unpickle functions defined in test modules by module name: let them import tests/.
_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in [_TESTS_DIR, os.path.dirname(_TESTS_DIR), os.environ.get("PYTHONPATH", "")] if p
)

import pytest


@pytest.fixture(scope="session")
def ray_session():
    """The one Ray instance of the test session (started on first use, loopback only)."""
    from slim_ray.runtime import RayConfig, init_ray, shutdown_ray

    init_ray(RayConfig(num_cpus=4, object_store_memory_mb=1024))
    yield
    shutdown_ray()
