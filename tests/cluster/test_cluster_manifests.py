"""cluster/ and jobs/: every manifest parses and is consistent with the code it points at."""

from __future__ import annotations

import glob
import importlib
import os

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _docs(path: str) -> list[dict]:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def _kind(kind: str) -> dict:
    found = [d for p in glob.glob(os.path.join(ROOT, "cluster", "kuberay", "*.yaml")) for d in _docs(p)
             if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind} manifest, found {len(found)}"
    return found[0]


def _repo_path(path_in_image: str) -> str:
    assert path_in_image.startswith("/app/"), path_in_image  # the image copies the repo to /app
    return os.path.join(ROOT, path_in_image[len("/app/"):])


def test_every_yaml_parses():
    paths = glob.glob(os.path.join(ROOT, "cluster", "**", "*.yaml"), recursive=True)
    paths += glob.glob(os.path.join(ROOT, "jobs", "*.yaml"))
    assert len(paths) >= 5
    for p in paths:
        assert _docs(p), f"{p} is empty"


def _check_cluster_spec(spec: dict, where: str) -> None:
    import ray

    assert spec["rayVersion"] == ray.__version__, f"{where}: rayVersion != installed Ray"
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"].startswith("ghcr.io/slim-ray/slim-ray:")
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert {"cpu", "gpu"} <= set(groups), where
    for g in groups.values():
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], f"{where}: {g['groupName']} replicas"
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["nvidia.com/gpu"] == "1"
    cpu = groups["cpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in cpu


def test_kuberay_manifests_point_at_real_code():
    rc = _kind("RayCluster")
    _check_cluster_spec(rc["spec"], "RayCluster")
    assert rc["spec"]["enableInTreeAutoscaling"] is True

    job = _kind("RayJob")
    _check_cluster_spec(job["spec"]["rayClusterSpec"], "RayJob")
    argv = job["spec"]["entrypoint"].split()
    assert argv[0] == "python" and os.path.isfile(_repo_path(argv[1]))
    assert os.path.isfile(_repo_path(argv[argv.index("--config") + 1]))
    yaml.safe_load(job["spec"]["runtimeEnvYAML"])

    svc = _kind("RayService")
    _check_cluster_spec(svc["spec"]["rayClusterConfig"], "RayService")
    serve_cfg = yaml.safe_load(svc["spec"]["serveConfigV2"])
    (app,) = serve_cfg["applications"]
    module, fn = app["import_path"].split(":")
    builder = getattr(importlib.import_module(module), fn)
    # The builder accepts exactly these args and yields a Ray Serve application (not started).
    args = dict(app["args"], config=_repo_path(app["args"]["config"]))
    from ray.serve import Application

    assert isinstance(builder(args), Application)


def test_autoscaler_yaml_is_valid_for_the_cluster_launcher():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(_docs(os.path.join(ROOT, "cluster", "autoscaler.yaml"))[0])
    validate_config(cfg)  # Ray's own schema check
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    assert types["gpu_worker"]["node_config"]["InstanceType"].startswith(("g", "p"))  # GPU instances
    assert not types["cpu_worker"]["node_config"]["InstanceType"].startswith(("g", "p"))
    assert all(types[t]["max_workers"] >= 1 for t in ("cpu_worker", "gpu_worker"))
    assert not any("ray stop" in c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"])


def test_job_runtime_env_and_entrypoint():
    renv = _docs(os.path.join(ROOT, "jobs", "runtime_env.yaml"))[0]
    assert set(renv) <= {"working_dir", "excludes", "env_vars", "pip", "py_modules"}
    assert renv["env_vars"]["HF_HUB_OFFLINE"] == "1"
    assert ".venv/" in renv["excludes"] and "runs/" in renv["excludes"]
    import subprocess
    import sys

    out = subprocess.run([sys.executable, os.path.join(ROOT, "jobs", "run_pipeline.py"), "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--until" in out.stdout and "address" in out.stdout
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "jobs", "run_pipeline.py"), "--set", "nope=1"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown key 'nope'" in bad.stderr
