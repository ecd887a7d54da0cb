"""Start or join Ray, with every listener on loopback when local.

``init_ray(cfg)`` either starts a local Ray whose processes listen only on 127.0.0.1, or connects
to a cluster (``auto``, ``ray://host:10001``, ``host:6379``). The runtime_env (env vars such as
``DS_ACCELERATOR`` and ``HF_HUB_OFFLINE``) is set once here so every stage's workers see it.

Why the environment variables (measured with Ray 2.60 on Linux):
- ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` keeps GCS/raylet/worker listeners on 127.0.0.1 for a
  local cluster (``--node-ip-address`` alone is not honoured);
- ``GLOO_SOCKET_IFNAME=lo`` makes gloo's pair sockets bind loopback;
- Ray Train's default torch rendezvous opens a TCPStore on ``*:port``; ``train_backend_config()``
  returns a TorchConfig whose rendezvous is a shared file instead (one machine only).

Ray reads ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` once, when ``ray`` is imported: setting it inside
``init_ray`` is too late. Every entry point (the CLI, ``jobs/``, ``bench/``) calls
``pin_loopback()`` before anything imports Ray; ``init_ray`` refuses to start a local Ray that
would listen on every interface.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Literal, Optional

from pydantic import Field

from slim_ray.configbase import StageConfig

logger = logging.getLogger(__name__)

LOOPBACK_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "GLOO_SOCKET_IFNAME": "lo",
    "MASTER_ADDR": "127.0.0.1",
}

# Seen by every worker process of every stage.
WORKER_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "DS_ACCELERATOR": "cpu",  # replaced by "cuda" when GPUs are present, see _accelerator_env
    "RAY_TRAIN_V2_ENABLED": "1",
    "PYTHONWARNINGS": "ignore::DeprecationWarning",
}


class RayConfig(StageConfig):
    """How to reach Ray."""

    address: Optional[str] = Field(
        None,
        description="None: start a new local loopback-only Ray (even when another Ray runs on this "
        "machine). Otherwise 'auto' (RAY_ADDRESS, or the cluster `ray start` recorded here), "
        "'ray://host:10001' or 'host:6379' to join an existing cluster.",
    )
    num_cpus: Optional[int] = Field(None, description="CPUs of a local Ray (default: all).")
    object_store_memory_mb: Optional[int] = Field(
        None, description="Object store size of a local Ray in MiB (default: Ray's, ~30% of RAM)."
    )
    include_dashboard: bool = Field(True, description="Ray Train V2 needs the state API.")
    env_vars: dict[str, str] = Field(
        default_factory=dict, description="Extra env vars for every worker (runtime_env)."
    )
    working_dir: Optional[str] = Field(
        None, description="runtime_env working_dir when joining a remote cluster."
    )
    train_placement: Literal["PACK", "SPREAD"] = Field(
        "PACK", description="Ray Train workers' placement (ScalingConfig.placement_strategy): PACK "
        "fills a node first; SPREAD puts the workers of a run on different nodes where it can.",
    )
    log_to_driver: bool = Field(
        False, description="Echo every Ray worker's stdout/stderr on the console. Off: worker logs "
        "stay in Ray's session log folder (linked as <run_dir>/logs/ray for a local run).",
    )


def is_local(cfg: Optional[RayConfig] = None) -> bool:
    return cfg is None or cfg.address in (None, "", "local")


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


def _outward_ip() -> Optional[str]:
    """The address this machine would reach the network from (what Ray calls the node IP); a
    UDP socket's connect sends nothing. None without a route."""
    import socket

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("8.8.8.8", 80))  # as Ray's node_ip_address_from_perspective; no packet is sent
            return s.getsockname()[0]
    except OSError:
        return None


def _answers(host: str, port: int) -> bool:
    import socket

    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


def joins_loopback(cfg: Optional[RayConfig] = None) -> bool:
    """True when ``ray.address`` (or ``RAY_ADDRESS`` for ``auto``) names a cluster on this machine's
    loopback that does not answer on its outward IP (a head started on 127.0.0.1, as by
    cluster/local_start.sh). Ray replaces a loopback host by the outward IP before it connects
    unless loopback is pinned, so such a driver would wait for ever. A head that listens on every
    interface answers there too, and is joined as before."""
    if is_local(cfg):
        return False
    address = cfg.address if cfg.address != "auto" else os.environ.get("RAY_ADDRESS", "")
    host, _, port = (address or "").split("://", 1)[-1].rpartition(":")
    if host not in LOOPBACK_HOSTS or not port.isdigit():
        return False
    outward = _outward_ip()
    return outward is None or outward.startswith("127.") or not _answers(outward, int(port))


def pin_loopback() -> None:
    """Keep a local Ray on 127.0.0.1. Must run before ``import ray`` in this process."""
    if "ray" in sys.modules and os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") != "0":
        logger.warning("pin_loopback() called after `import ray`: a local Ray started by this process "
                       "would listen on every interface")
    os.environ.update(LOOPBACK_ENV)


def _loopback_pinned_in_ray() -> bool:
    from ray._private import ray_constants  # the value Ray read at import

    return not ray_constants.ENABLE_RAY_CLUSTER


def _accelerator_env() -> dict[str, str]:
    try:
        import torch
    except ImportError:  # torch missing is fine for pure-data stages
        return {}
    return {"DS_ACCELERATOR": "cuda"} if torch.cuda.is_available() else {}


def worker_env(cfg: Optional[RayConfig] = None) -> dict[str, str]:
    env = dict(WORKER_ENV)
    env.update(_accelerator_env())
    if is_local(cfg):
        env.update(LOOPBACK_ENV)
    if cfg is not None:
        env.update(cfg.env_vars)
    return env


def runtime_env(cfg: Optional[RayConfig] = None) -> dict[str, Any]:
    renv: dict[str, Any] = {"env_vars": worker_env(cfg)}
    if cfg is not None and cfg.working_dir and not is_local(cfg):
        renv["working_dir"] = cfg.working_dir
    return renv


def init_ray(cfg: Optional[RayConfig] = None, **overrides: Any):
    """Start (local, loopback only) or join Ray. A no-op when Ray is already initialised."""
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context()
    cfg = cfg or RayConfig()
    if is_local(cfg) and not _loopback_pinned_in_ray():
        raise RuntimeError(
            "a local Ray would listen on every interface: call slim_ray.runtime.pin_loopback() (or set "
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0) before `import ray` in this process")
    if not _loopback_pinned_in_ray() and joins_loopback(cfg):  # pinned: no need to probe the address
        raise RuntimeError(
            f"ray.address {cfg.address!r} is on loopback, but Ray would connect to this machine's outward "
            "IP instead: call slim_ray.runtime.pin_loopback() (or set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0) "
            "before `import ray` in this process")
    env = worker_env(cfg)
    # The driver's environment is inherited by the raylet and its workers of a local cluster;
    # it must be in place before ray.init() starts them.
    os.environ.update(env)
    kwargs: dict[str, Any] = dict(
        runtime_env=runtime_env(cfg),
        include_dashboard=cfg.include_dashboard,
        log_to_driver=cfg.log_to_driver,
        logging_level=logging.WARNING,
    )
    if is_local(cfg):
        # "local": always a new instance. Without it Ray 2.60 joins the cluster that the last
        # `ray start` on this machine recorded in /tmp/ray/ray_current_cluster (anyone's).
        kwargs.update(address="local", dashboard_host="127.0.0.1")
        if cfg.num_cpus is not None:
            kwargs["num_cpus"] = cfg.num_cpus
        if cfg.object_store_memory_mb is not None:
            kwargs["object_store_memory"] = cfg.object_store_memory_mb * 1024 * 1024
    else:
        kwargs["address"] = cfg.address
        kwargs.pop("include_dashboard")
        # Inside `ray job submit` the job already has a runtime_env (jobs/runtime_env.yaml); both
        # set env_vars such as HF_HUB_OFFLINE, which Ray refuses as a conflict ("Failed to merge
        # the Job's runtime env") unless told to combine them (ours win for the keys both set).
        os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")
    kwargs.update(overrides)
    ctx = ray.init(**kwargs)
    _quiet_ray_data()
    return ctx


def _quiet_ray_data() -> None:
    """Ray Data's progress bars on a terminal; off one (a log file, CI) they print a dump every
    few seconds, so there the stage runner's progress lines replace them."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = sys.stderr.isatty()
    ctx.print_on_execution_start = False
    # Ray Data logs every finished dataset at INFO on the console; keep them in its log file
    # (ray-data.log in the session logs) and show warnings only.
    # Its errors are the tracebacks of a failing task, which reaches the stage runner as the
    # exception it reports in one line (full trace in the stage's log file): drop them here.
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)
            handler.addFilter(lambda record: record.levelno < logging.ERROR)


def ray_logs_dir() -> Optional[str]:
    """This node's Ray session log folder (worker stdout/stderr), when Ray runs here."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    return node.get_logs_dir_path() if node is not None else None


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


# --------------------------------------------------------------------------- Ray Train backend


def train_backend_config(cfg: Optional[RayConfig] = None):
    """TorchConfig for Ray Train: file-based rendezvous when local (no TCPStore on ``*``)."""
    from ray.train.torch import TorchConfig

    from slim_ray._ray_compat import file_rendezvous_torch_config

    if not is_local(cfg):
        return TorchConfig()
    return file_rendezvous_torch_config(LOOPBACK_ENV)
