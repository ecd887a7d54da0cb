"""``slim-ray serve``: the SLIM recommendation graph on Ray Serve, HTTP on 127.0.0.1.

    slim-ray serve --config configs/demo.yaml [--set serve.port=8000 serve.reasoner=false]

    curl -s 127.0.0.1:8000/recommend -H 'content-type: application/json' -d '{"user_id": 1, "k": 5}'
    curl -s 127.0.0.1:8000/recommend -d '{"history": [50, 172, 181], "k": 5}' -H 'content-type: application/json'

Endpoints: ``POST /recommend`` (see ``RecommendRequest``), ``GET /info``, ``GET /healthz``.
On a cluster (KubeRay RayService, ``serve run``) the import path is
``slim_ray.serve.app:app_builder`` with args ``{"config": "configs/demo.yaml", "set": [...]}``.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from typing import Any, Optional

logger = logging.getLogger(__name__)


def build_app(cfg):
    """The serving graph as a Ray Serve Application (nothing starts until ``serve.run``)."""
    from slim_ray.encode.encoder import EncoderSpec
    from slim_ray.serve.deployments import EncoderDeployment, Ingress, ReasonerDeployment, RecommenderDeployment

    s, e = cfg.serve, cfg.encode
    spec = EncoderSpec.from_config(e)
    encoder = EncoderDeployment.options(**s.encoder_scaling.serve_options()).bind(
        spec.path, e.dtype, e.normalize, e.max_seq_length, s.max_batch_size, s.batch_wait_timeout_s
    )
    recommender = RecommenderDeployment.options(**s.recommender_scaling.serve_options()).bind(
        cfg.model_dump(mode="json")
    )
    reasoner = None
    if s.reasoner:
        threads = max(1, int(round(s.reasoner_scaling.num_cpus)))
        reasoner = ReasonerDeployment.options(**s.reasoner_scaling.serve_options()).bind(
            cfg.model_dump(mode="json"), threads
        )
    settings = {"default_k": s.default_k, "max_k": s.max_k, "encoder": spec.model_id}
    return Ingress.options(**s.ingress_scaling.serve_options()).bind(recommender, encoder, reasoner, settings)


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
    serve.start(http_options={"host": s.host, "port": s.port})
    serve.run(build_app(cfg), name=s.app_name, route_prefix=s.route_prefix, blocking=False,
              logging_config={"log_level": s.log_level})
    return f"http://{s.host}:{s.port}{s.route_prefix.rstrip('/')}"


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


def main(argv: Optional[list[str]] = None) -> int:
    from slim_ray.cli import add_config_args, config_from_args
    from slim_ray.config import ConfigError

    parser = argparse.ArgumentParser(prog="slim-ray serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--port", type=int, help="shortcut for --set serve.port=N")
    args = parser.parse_args(argv)
    if args.port is not None:
        args.overrides.append([f"serve.port={args.port}"])
    try:
        cfg = config_from_args(args)
    except ConfigError as e:
        print(f"slim-ray serve: {e}", file=sys.stderr)
        return 2
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
        print(f"[slim-ray serve] {url}/recommend ready (Ctrl-C stops)", flush=True)
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
