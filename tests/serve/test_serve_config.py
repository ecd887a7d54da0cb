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
