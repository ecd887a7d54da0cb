"""``slim-ray serve``: the SLIM recommendation graph on Ray Serve, HTTP on 127.0.0.1.

    slim-ray serve --config configs/demo.yaml [--set serve.port=8000 serve.reasoner=false]

    curl -s 127.0.0.1:8000/v1/recommend -H 'content-type: application/json' -d '{"user_id": 1, "k": 5}'
    curl -s 127.0.0.1:8000/v1/recommend -H 'content-type: application/json' \
         -d '{"history": [50, 172, 181], "k": 5, "explain": true}'

Endpoints: ``POST /v1/recommend`` (``/recommend``: alias), ``GET /v1/version``, ``GET /info``,
``GET /healthz``, ``GET /openapi.json``; see docs/serve.md. With ``$SLIM_RAY_API_KEY`` set
(``serve.api_key_env``) every endpoint but /healthz needs ``X-API-Key``.
On a cluster (KubeRay RayService, ``serve run``) the import path is
``slim_ray.serve.app:app_builder`` with args ``{"config": "configs/demo.yaml", "set": [...]}``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import threading
from typing import Any, Optional

from slim_ray import __version__
from slim_ray._ray_compat import with_stable_version

logger = logging.getLogger(__name__)


#: the packages a replica runs (their source hash is part of every deployment's version)
_SERVED_CODE = ("serve", "rec", "encode", "generate", "prompts", "data")


#: serve settings the recommender / reasoner replicas read (the rest is the ingress's user_config)
_REPLICA_SERVE_KEYS = ("recommender", "user_embeddings", "reasoner_model", "reasoner_max_new_tokens",
                       "recommender_scaling", "reasoner_scaling")


def _pinned(deployment, scaling, cfg, *init_args):
    """``deployment.options(...)`` with a version derived from what the replica is built from, so
    that a redeploy where only ``user_config`` changed (a model swap) reconfigures the running
    replicas instead of replacing them (Serve otherwise gives every ``serve.run`` a new version)."""
    from slim_ray.lineage import source_hash

    s = cfg.serve
    opts = scaling.serve_options(s.health_check_period_s, s.health_check_timeout_s)
    code = source_hash(_SERVED_CODE)  # new code: new replicas
    blob = json.dumps([deployment.name, __version__, code, opts, init_args], sort_keys=True, default=repr)
    version = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return with_stable_version(deployment.options(**opts), version)


def build_app(cfg, checkpoint: Optional[str] = None):
    """The serving graph as a Ray Serve Application (nothing starts until ``serve.run``).

    ``checkpoint`` (default ``serve.checkpoint``) goes into the recommender's ``user_config``:
    deploying the same graph again with another one swaps the model without restarting replicas."""
    from slim_ray.encode.encoder import EncoderSpec
    from slim_ray.serve.deployments import (EncoderDeployment, Ingress, ReasonerDeployment,
                                            RecommenderDeployment, key_digest)

    s, e = cfg.serve, cfg.encode
    # What the recommender and reasoner replicas are built from: the run and the serve settings
    # they read. Not the checkpoint (user_config) nor the ingress's limits, so changing those
    # reconfigures instead of restarting.
    base = cfg.model_dump(mode="json")
    base["serve"] = {k: v for k, v in base["serve"].items() if k in _REPLICA_SERVE_KEYS}
    spec = EncoderSpec.from_config(e)
    enc_args = (spec.path, e.dtype, e.normalize, e.max_seq_length, s.max_batch_size, s.batch_wait_timeout_s)
    encoder_d = _pinned(EncoderDeployment, s.encoder_scaling, cfg, *enc_args)
    rec_args = (base, s.max_batch_size, s.recommender_batch_wait_timeout_s)
    recommender_d = _pinned(RecommenderDeployment, s.recommender_scaling, cfg, *rec_args)
    reasoner_d = None
    if s.reasoner:
        threads = max(1, int(round(s.reasoner_scaling.num_cpus)))
        rs_args = (base, threads, s.reasoner_max_batch_size, s.reasoner_batch_wait_timeout_s)
        reasoner_d = _pinned(ReasonerDeployment, s.reasoner_scaling, cfg, *rs_args)
    encoder = encoder_d.bind(*enc_args)
    recommender = recommender_d.options(
        user_config={"checkpoint": checkpoint if checkpoint is not None else s.checkpoint}).bind(*rec_args)
    reasoner = reasoner_d.bind(*rs_args) if reasoner_d is not None else None
    settings = {
        "default_k": s.default_k, "max_k": s.max_k, "encoder": spec.model_id,
        "max_body_bytes": s.max_body_bytes, "max_history": s.max_history,
        "max_rationale_chars": s.max_rationale_chars, "request_timeout_s": s.request_timeout_s,
        "retry_after_s": s.retry_after_s, "reasoner_timeout_s": s.reasoner_timeout_s,
        "health_timeout_s": s.health_check_timeout_s,
        # only the key's SHA-256 reaches Serve (and its stored config)
        "api_key_sha256": key_digest(os.environ.get(s.api_key_env) or None),
    }
    # the ingress is built from its downstream handles: their versions are part of its own
    downstream = [d.version if d is not None else None for d in (recommender_d, encoder_d, reasoner_d)]
    return (_pinned(Ingress, s.ingress_scaling, cfg, *downstream).options(user_config=settings)
            .bind(recommender, encoder, reasoner))


def app_builder(args: dict[str, Any]):
    """Ray Serve application builder (``serve run slim_ray.serve.app:app_builder config=...``)."""
    from slim_ray.config import load_config

    overrides = args.get("set") or []
    if isinstance(overrides, str):
        overrides = overrides.split()
    return build_app(load_config(args.get("config"), overrides))


def start(cfg) -> str:
    """Start Serve on ``serve.host:serve.port`` in the current Ray and deploy the graph. Returns the URL."""
    from ray import serve

    from slim_ray.runtime import init_ray

    init_ray(cfg.ray)
    s = cfg.serve
    prepare_user_state(cfg)
    serve.start(http_options={"host": s.host, "port": s.port})
    deploy(cfg)
    return f"http://{s.host}:{s.port}{s.route_prefix.rstrip('/')}"


def prepare_user_state(cfg, checkpoint: Optional[str] = None) -> str:
    """Build the run's memory-mapped per-user state (``slim_ray.data.userstate``) in one Ray task
    when it is missing, so the replicas only map it and this driver never holds per-user data.
    Returns its URI."""
    import ray

    from slim_ray.serve.recommender import user_state_spec
    from slim_ray.data.userstate import ensure_published

    role, vectors = user_state_spec(cfg, checkpoint)
    task = ray.remote(num_cpus=1, max_retries=1)(ensure_published)
    return ray.get(task.remote(cfg.layout.root, role, vectors))


def deploy(cfg, checkpoint: Optional[str] = None) -> None:
    """Deploy the graph in the running Serve, or update it in place: a deployment whose replicas
    are built from the same arguments keeps its replicas, and only what changed in its
    ``user_config`` is applied (``reconfigure``): the recommender's checkpoint, the ingress's
    limits, timeouts and API key."""
    from ray import serve

    s = cfg.serve
    serve.run(build_app(cfg, checkpoint), name=s.app_name, route_prefix=s.route_prefix, blocking=False,
              logging_config={"log_level": s.log_level})


def swap(cfg, checkpoint: str) -> None:
    """Serve another recommender checkpoint (a run name under ``<run_dir>/rec/`` or a run folder /
    URI) without dropping requests: the same graph is deployed again with only the recommender's
    ``user_config`` changed, so Serve calls ``reconfigure`` on the running replicas (each loads the
    new model beside the old one and switches when it is ready)."""
    prepare_user_state(cfg, checkpoint)  # another run may read another role's rationales
    deploy(cfg, checkpoint)


def stop(cfg) -> None:
    """Remove the application and stop Serve (only Serve, in the Ray this process is connected to)."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        return
    try:
        serve.delete(cfg.serve.app_name)
    finally:
        serve.shutdown()


def serve_until_stopped(cfg) -> int:
    """``slim-ray serve`` (its arguments are parsed in ``slim_ray.cli``): start the graph, serve
    until SIGINT/SIGTERM, then drain and stop."""
    # SIGINT/SIGTERM stop the server cleanly, also during start-up (a shell's background job
    # inherits SIGINT as ignored; installing the handlers here takes that back).
    done, started = threading.Event(), threading.Event()

    def on_signal(signum, frame):
        if not started.is_set():
            raise KeyboardInterrupt
        done.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    try:
        url = start(cfg)
        started.set()
        print(f"[slim-ray serve] {url}/v1/recommend ready (Ctrl-C stops)", flush=True)
        done.wait()
    except KeyboardInterrupt:
        pass
    finally:
        print("[slim-ray serve] stopping", flush=True)
        try:
            stop(cfg)
        except Exception as e:  # Serve may not have started
            logger.warning("stopping Serve: %s", e)
        from slim_ray.runtime import shutdown_ray

        shutdown_ray()
    return 0
