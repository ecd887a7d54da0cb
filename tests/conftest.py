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
def ray_session(s3_server):
    """The one Ray instance of the test session (started on first use, loopback only). It starts
    after the S3 server, so its workers inherit the endpoint and credentials of s3:// run folders."""
    from slim_ray.runtime import RayConfig, init_ray, shutdown_ray

    init_ray(RayConfig(num_cpus=4, object_store_memory_mb=1024))
    yield
    shutdown_ray()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's standalone S3 server on 127.0.0.1 (the real S3 protocol), stopped by its PID.

    Yields the environment a client needs (AWS_ENDPOINT_URL and dummy credentials); the variables
    are also set in this process, so ``pyarrow.fs`` and the Ray workers started after it see them.
    """
    import subprocess
    import sys
    import time
    import urllib.request

    port = _free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    exe = os.path.join(os.path.dirname(sys.executable), "moto_server")
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(env["AWS_ENDPOINT_URL"], timeout=2).read()
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"moto_server did not start on port {port}")
            time.sleep(0.2)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def make_bucket(name: str) -> str:
    """Create a bucket on the S3 server of ``s3_server``; returns ``s3://name``."""
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(allow_bucket_creation=True, endpoint_override=os.environ["AWS_ENDPOINT_URL"])
    fs.create_dir(name)
    return f"s3://{name}"
