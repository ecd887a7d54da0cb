"""ServeConfig -> the Ray Serve application: autoscaling and resources per deployment."""

from __future__ import annotations

from slim_ray.config import load_config


def _deployments(app) -> dict:
    """name -> Deployment of the graph (Ray 2.60: Application._bound_deployment, init_args)."""
    ingress = app._bound_deployment
    out = {ingress.name: ingress}
    for arg in ingress.init_args:
        if hasattr(arg, "_bound_deployment"):
            out[arg._bound_deployment.name] = arg._bound_deployment
    return out


def test_autoscaling_and_resources_come_from_the_config():
    from slim_ray.serve.app import app_builder, build_app

    cfg = load_config(None, ["serve.encoder_scaling.max_replicas=4", "serve.reasoner_scaling.num_gpus=1",
                             "serve.recommender_scaling.min_replicas=2"])
    # A partial override keeps the deployment's other defaults (target 8 for the batched encoder).
    assert cfg.serve.encoder_scaling.target_ongoing_requests == 8.0
    deps = _deployments(build_app(cfg))
    assert set(deps) == {"Ingress", "EncoderDeployment", "RecommenderDeployment", "ReasonerDeployment"}
    enc = deps["EncoderDeployment"]._deployment_config.autoscaling_config
    assert (enc.min_replicas, enc.max_replicas, enc.target_ongoing_requests) == (1, 4, 8.0)
    rec = deps["RecommenderDeployment"]._deployment_config.autoscaling_config
    assert (rec.min_replicas, rec.initial_replicas, rec.max_replicas) == (2, 2, 2)
    assert deps["ReasonerDeployment"].ray_actor_options == {"num_cpus": 1.0, "num_gpus": 1.0}
    assert deps["Ingress"].ray_actor_options["num_cpus"] == 0.1
    total = sum(d.ray_actor_options["num_cpus"] for d in _deployments(build_app(load_config())).values())
    assert total <= 2.0  # one replica of each fits a 2-core machine

    # Without the reasoner the graph has three deployments; the builder takes config + overrides.
    deps = _deployments(app_builder({"set": ["serve.reasoner=false", "serve.ingress_scaling.max_replicas=3"]}))
    assert "ReasonerDeployment" not in deps
    assert deps["Ingress"]._deployment_config.autoscaling_config.max_replicas == 3


def test_a_rebuilt_graph_keeps_its_versions_so_a_swap_only_reconfigures(monkeypatch):
    """The premise of a model swap without a restart: the recommender's checkpoint lives in its
    user_config (never in its init args), and rebuilding the graph gives every deployment the same
    Serve version; the API key reaches Serve only as its SHA-256."""
    import hashlib

    from slim_ray.serve.app import build_app

    monkeypatch.setenv("SLIM_RAY_API_KEY", "k3y")
    cfg = load_config(None, ["serve.checkpoint=sasrec-slim-student-s0"])
    first, second = _deployments(build_app(cfg)), _deployments(build_app(cfg, "gru4rec-slim-student-s1"))
    assert {n: d.version for n, d in first.items()} == {n: d.version for n, d in second.items()}
    assert all(d.version for d in first.values())
    rec1, rec2 = first["RecommenderDeployment"], second["RecommenderDeployment"]
    assert rec1._deployment_config.user_config == {"checkpoint": "sasrec-slim-student-s0"}
    assert rec2._deployment_config.user_config == {"checkpoint": "gru4rec-slim-student-s1"}
    assert "checkpoint" not in rec1.init_args[0]["serve"] and "max_history" not in rec1.init_args[0]["serve"]
    settings = first["Ingress"]._deployment_config.user_config
    assert settings["api_key_sha256"] == hashlib.sha256(b"k3y").hexdigest()
    assert "k3y" not in repr(settings) and "k3y" not in repr(first["Ingress"].init_args)
    # another limit changes only the ingress's user_config, not its version
    limited = _deployments(build_app(load_config(None, ["serve.max_history=10"])))
    assert limited["Ingress"].version == first["Ingress"].version
    assert limited["Ingress"]._deployment_config.user_config["max_history"] == 10
    # the ingress is rebuilt when its downstream graph changes (a reasoner added or removed)
    without = _deployments(build_app(load_config(None, ["serve.reasoner=false"])))
    assert without["Ingress"].version != first["Ingress"].version
    assert first["Ingress"]._deployment_config.max_ongoing_requests == 64
    assert first["ReasonerDeployment"]._deployment_config.max_ongoing_requests == 8
