"""Inside Ray Train workers, the file rendezvous (slim_ray/_ray_compat.py) and gloo listen only on loopback.

This test runs in the test session's own Ray (the conftest pins loopback before Ray is imported, as
the CLI does). The check of the real `slim-ray` command, started in a clean environment, is
tests/test_e2e_quick.py::test_real_command_listens_only_on_loopback.
"""

from __future__ import annotations

import json
import os

import psutil

from listeners import ListenerWatch
from listeners import non_loopback_listeners as _non_loopback_listeners
from listeners import process_tree as _descendants_and_ray_processes


def _train_loop(config):
    import torch
    import torch.distributed as dist
    import ray.train

    t = torch.tensor([float(ray.train.get_context().get_world_rank() + 1)])
    dist.all_reduce(t)
    rank = ray.train.get_context().get_world_rank()
    # While the process group is alive (TCPStore, gloo pairs): what does this worker listen on?
    bad = _non_loopback_listeners([psutil.Process()])
    dist.barrier()
    with open(os.path.join(config["out"], f"rank{rank}.json"), "w") as f:
        json.dump({"sum": float(t.item()), "world": dist.get_world_size(), "bad": bad}, f)
    ray.train.report({"sum": float(t.item())})


def test_local_runtime_listens_only_on_loopback(ray_session, tmp_path):
    import ray
    import ray.data
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from slim_ray.runtime import train_backend_config

    # Poll every process the test started while the jobs run (listeners can be short-lived).
    with ListenerWatch(os.getpid(), every=0.3) as watch:
        ds = ray.data.range(1000).map_batches(lambda b: {"id": b["id"] * 2})
        assert ds.sum("id") == 2 * sum(range(1000))

        trainer = TorchTrainer(
            _train_loop,
            train_loop_config={"out": str(tmp_path)},
            torch_config=train_backend_config(),
            scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
            run_config=RunConfig(name=f"loopback-{os.getpid()}", storage_path=str(tmp_path)),
        )
        trainer.fit()
        for rank in (0, 1):
            got = json.loads((tmp_path / f"rank{rank}.json").read_text())
            assert got["sum"] == 3.0 and got["world"] == 2  # 1 + 2 all-reduced over two gloo ranks
            assert got["bad"] == [], f"rank {rank}: " + "; ".join(got["bad"])
    seen_bad = watch.bad | set(_non_loopback_listeners(_descendants_and_ray_processes(os.getpid())))
    assert not seen_bad, "non-loopback listeners: " + "; ".join(sorted(seen_bad))


def test_a_cluster_on_loopback_is_joined_on_loopback(monkeypatch):
    """Ray turns a loopback cluster address into the machine's outward IP unless loopback is pinned
    (a head on 127.0.0.1 never answers there): the CLI pins it for such an address."""
    import socket

    from slim_ray.runtime import RayConfig, joins_loopback

    with socket.socket() as head:  # a listener on loopback only, like cluster/local_start.sh's head
        head.bind(("127.0.0.1", 0))
        head.listen()
        port = head.getsockname()[1]
        for address in (f"127.0.0.1:{port}", f"localhost:{port}", f"ray://127.0.0.1:{port}"):
            assert joins_loopback(RayConfig(address=address)), address
        monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
        assert joins_loopback(RayConfig(address="auto"))
    for address in (None, "local", "10.0.0.5:6379", "ray://head.example:10001", "127.0.0.1"):
        assert not joins_loopback(RayConfig(address=address)), address
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert not joins_loopback(RayConfig(address="auto"))
