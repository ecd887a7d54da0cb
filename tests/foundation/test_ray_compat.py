"""The private Ray API slim_ray relies on (slim_ray/_ray_compat.py) is still there and still works.

A Ray upgrade that moves or changes one of these fails here, with the name of what broke. The
file rendezvous is exercised end to end in tests/test_runtime_loopback.py, the worker node in
tests/cluster/test_local_cluster.py; these checks are the fast, early warning.
"""

from __future__ import annotations

import inspect

import ray

from slim_ray import _ray_compat


def test_written_for_this_ray_version():
    assert ray.__version__ == _ray_compat.RAY_VERSION_WRITTEN_FOR, (
        f"Ray {ray.__version__} != {_ray_compat.RAY_VERSION_WRITTEN_FOR}: re-check every item in "
        "slim_ray/_ray_compat.py and update RAY_VERSION_WRITTEN_FOR")


def test_torch_backend_private_api_has_the_expected_shape():
    from ray.train.torch import config as torch_config

    params = inspect.signature(torch_config._setup_torch_process_group).parameters
    assert {"backend", "world_rank", "world_size", "init_method", "timeout_s"} <= set(params)
    assert hasattr(torch_config._TorchBackend, "on_start")
    cfg = _ray_compat.file_rendezvous_torch_config({"MASTER_ADDR": "127.0.0.1"})
    assert isinstance(cfg, torch_config.TorchConfig) and cfg.backend_cls.__name__ == "_FileRendezvousBackend"
    assert issubclass(cfg.backend_cls, torch_config._TorchBackend)


def test_worker_node_private_api_has_the_expected_shape():
    import ray._private.node
    import ray._private.parameter

    params = inspect.signature(ray._private.parameter.RayParams).parameters
    for name in ("gcs_address", "node_ip_address", "temp_dir", "num_cpus", "resources",
                 "object_store_memory", "include_log_monitor", "node_manager_port"):
        assert name in params, name
    node_params = inspect.signature(ray._private.node.Node).parameters
    assert {"ray_params", "head", "shutdown_at_exit", "spawn_reaper"} <= set(node_params)
    assert hasattr(ray._private.node.Node, "kill_all_processes")


def test_small_blocks_splits_without_cpus(ray_session):
    """The zero-CPU repartition yields blocks of the asked size and needs no CPU for its tasks."""
    import ray.data

    ds = _ray_compat.small_blocks(ray.data.range(40, override_num_blocks=1), 8)
    sizes = [len(batch["id"]) for batch in ds.iter_batches(batch_size=None)]
    assert sum(sizes) == 40 and max(sizes) <= 8, sizes
    assert "StreamingRepartition" in str(ds._logical_plan.dag)


def test_serve_private_api_has_the_expected_shape():
    from ray.serve import deployment
    from ray.serve._private import replica

    assert callable(replica.add_port_to_grpc_server)
    params = inspect.signature(replica.add_port_to_grpc_server).parameters
    assert len(params) == 2, params  # (server, address)

    @deployment
    class Probe:
        def __call__(self):
            return "ok"

    assert _ray_compat.with_stable_version(Probe, "v1").version == "v1"
