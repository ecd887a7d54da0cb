"""Every use of Ray's private API in slim_ray, in one place, each with why and the version it was
written against (Ray 2.60.0). ``tests/foundation/test_ray_compat.py`` exercises each one, so a Ray
upgrade that breaks them fails there, loudly, not in the middle of a run.

1. ``file_rendezvous_torch_config``: Ray Train's torch backend meets its workers through a TCPStore
   that listens on ``*:port`` (``ray.train.torch.config._TorchBackend.on_start`` with
   ``init_method="env://"``; measured with ``ss -ltnp`` during a two-worker fit). On one machine a
   ``file://`` rendezvous avoids any listener. Ray has no public hook for the init method, so this
   subclasses the private ``_TorchBackend`` and calls its private helpers
   ``_setup_torch_process_group`` and ``_set_torch_distributed_env_vars``.
2. ``start_worker_node``: a second Ray node on this machine that joins a head listening on
   127.0.0.1. ``ray start --address`` cannot do it: with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (what
   keeps Ray on loopback) it refuses to join ("Multi-node Ray clusters are not supported"), and with
   it unset it rewrites ``127.0.0.1`` to the host's address (``services.resolve_ip_for_localhost``)
   and never reaches the loopback GCS. ``ray._private.node.Node`` -- what ``ray.cluster_utils.Cluster``
   uses -- starts the node without either.
3. ``small_blocks``: ``ds.repartition(target_num_rows_per_block=n)`` as a zero-CPU operator. The
   public call schedules its split tasks with 1 CPU each; on a 2-core node whose CPUs the engine
   actors hold they never start and the generation job waits forever (measured: not finished after
   120 s on a 1-CPU node; without any repartition all 64 rows left the engine as one block, so the
   writer got rows only at the end). Ray 2.60's public API exposes neither the operator's remote args
   nor per-operator output block sizes, so the private ``StreamingRepartition`` logical operator is
   built here (``Dataset._from_parent``, ``ds._logical_plan``).
4. ``pin_replica_grpc_to_loopback``: Ray Serve 2.60 starts an inter-deployment gRPC server in every
   replica bound to ``[::]:0`` (all interfaces; ``ray/serve/_private/replica.py``), with no option to
   change it. On a node whose Ray address is loopback (``slim-ray serve`` on one machine), the
   address is rewritten to 127.0.0.1; on a cluster node (a routable node IP) it is left as Ray chose
   it, since replicas on other nodes must reach it. ``tests/serve/test_serve_graph.py`` scans the
   listeners of every Serve process, so an upgrade that moves this code fails there.
5. ``with_stable_version``: ``Deployment.options(version=...)`` is accepted only with the private
   ``_internal=True`` in Ray 2.60. A version derived from what a replica is built from lets a
   redeploy where only ``user_config`` changed (a model swap) reconfigure the running replicas in
   place instead of replacing them (Serve otherwise gives every ``serve.run`` a new version).
"""

from __future__ import annotations

import os
import tempfile
import uuid
from dataclasses import dataclass
from typing import Mapping, Optional

RAY_VERSION_WRITTEN_FOR = "2.60.0"

_FILE_CFG_CLS = None


def file_rendezvous_torch_config(loopback_env: Mapping[str, str]):
    """A ``TorchConfig`` whose process group meets through a file, not a TCPStore on ``*``."""
    return _file_rendezvous_config_cls(dict(loopback_env))()


def _file_rendezvous_config_cls(loopback_env: dict[str, str]):
    global _FILE_CFG_CLS
    if _FILE_CFG_CLS is not None:
        return _FILE_CFG_CLS

    import ray
    from ray.train.torch.config import (
        TorchConfig,
        _set_torch_distributed_env_vars,
        _setup_torch_process_group,
        _TorchBackend,
    )

    class _FileRendezvousBackend(_TorchBackend):
        def on_start(self, worker_group, backend_config):
            resources = worker_group.get_resources_per_worker()
            backend = backend_config.backend or ("nccl" if resources.get("GPU", 0) > 0 else "gloo")
            path = os.path.join(tempfile.gettempdir(), f"slim_ray_rdzv_{uuid.uuid4().hex}")
            url = f"file://{path}"

            def _env():
                os.environ.update(loopback_env)
                os.environ["MASTER_PORT"] = "0"

            worker_group.execute(_env)
            worker_group.execute(_set_torch_distributed_env_vars)
            futures = [
                worker_group.execute_single_async(
                    i,
                    _setup_torch_process_group,
                    backend=backend,
                    world_rank=i,
                    world_size=len(worker_group),
                    init_method=url,
                    timeout_s=backend_config.timeout_s,
                )
                for i in range(len(worker_group))
            ]
            ray.get(futures)

    @dataclass
    class FileRendezvousTorchConfig(TorchConfig):
        """TorchConfig whose process group meets through a file, not a TCPStore on ``*``."""

        @property
        def backend_cls(self):
            return _FileRendezvousBackend

    _FILE_CFG_CLS = FileRendezvousTorchConfig
    return _FILE_CFG_CLS


def start_worker_node(
    gcs_address: str,
    temp_dir: str,
    num_cpus: Optional[int] = None,
    resources: Optional[dict[str, float]] = None,
    object_store_memory: Optional[int] = None,
):
    """Start a Ray worker node on 127.0.0.1 that joins the head at ``gcs_address``. Returns the
    ``Node``; ``node.kill_all_processes(check_alive=False, allow_graceful=True)`` stops it."""
    import ray._private.node
    import ray._private.parameter

    params = ray._private.parameter.RayParams(
        gcs_address=gcs_address,
        node_ip_address="127.0.0.1",
        temp_dir=temp_dir,
        num_cpus=num_cpus,
        num_gpus=0,
        resources=resources or {},
        object_store_memory=object_store_memory,
        include_log_monitor=True,
        node_manager_port=0,
        min_worker_port=0,
        max_worker_port=0,
    )
    return ray._private.node.Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)


def _worker_node_main(argv: Optional[list[str]] = None) -> int:
    """``python -m slim_ray._ray_compat --gcs 127.0.0.1:PORT --temp-dir D [...]``: run a worker
    node until SIGTERM (cluster/local_start.sh starts one per WORKER_NODES)."""
    import argparse
    import json
    import signal
    import threading

    p = argparse.ArgumentParser(prog="python -m slim_ray._ray_compat")
    p.add_argument("--gcs", required=True)
    p.add_argument("--temp-dir", required=True)
    p.add_argument("--num-cpus", type=int)
    p.add_argument("--resources", default="{}")
    p.add_argument("--object-store-mb", type=int)
    a = p.parse_args(argv)
    if os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") != "0":
        raise SystemExit("set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 so the node stays on 127.0.0.1")
    node = start_worker_node(a.gcs, a.temp_dir, a.num_cpus, json.loads(a.resources),
                             a.object_store_mb * 1024 * 1024 if a.object_store_mb else None)
    print(f"worker node {node.node_id} joined {a.gcs}", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    node.kill_all_processes(check_alive=False, allow_graceful=True)
    return 0


def small_blocks(ds, rows: int):
    """``ds.repartition(target_num_rows_per_block=rows)`` (streaming) that needs no CPU (item 3)."""
    import ray.data
    from ray.data._internal.logical.interfaces import LogicalPlan
    from ray.data._internal.logical.operators.map_operator import StreamingRepartition

    op = StreamingRepartition(target_num_rows_per_block=rows, input_dependencies=[ds._logical_plan.dag],
                              ray_remote_args={"num_cpus": 0})
    return ray.data.Dataset._from_parent(ds, LogicalPlan(op, ds.context))


def _node_is_loopback() -> bool:
    import ipaddress

    import ray

    return ipaddress.ip_address(ray.util.get_node_ip_address()).is_loopback


def pin_replica_grpc_to_loopback() -> None:
    """Patch Serve's replica gRPC bind address (item 4; idempotent)."""
    from ray.serve._private import replica

    original = replica.add_port_to_grpc_server
    if getattr(original, "_slim_ray_loopback", False):
        return

    def add_port(server, address: str):
        if address.startswith("[::]:") and _node_is_loopback():
            address = "127.0.0.1:" + address.rsplit(":", 1)[1]
        return original(server, address)

    add_port._slim_ray_loopback = True
    replica.add_port_to_grpc_server = add_port


def with_stable_version(deployment, version: str):
    """``deployment.options(version=...)`` (item 5)."""
    return deployment.options(version=version, _internal=True)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(_worker_node_main())
