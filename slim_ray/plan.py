"""``slim-ray run --dry-run``: the whole run's plan, checked without GPUs, weights or Ray.

For a config meant for a GPU cluster (configs/paper.yaml) this is what can be known on a laptop:
every stage's config resolves; the storage URIs the stages will read and write; the engine,
replicas and resources of each stage; and checks of combinations that would only fail hours into
a run:
- the student is a chat/instruct model (the distilled prompt is a chat turn; LLaMA-2-7b-chat,
  not the base model), judged from a local tokenizer config when the folder is here, else by name;
- an engine or trainer that asks for GPUs names how many;
- a model of 7B parameters or more is distilled with ZeRO-3 (or a full fine-tune of it would not
  fit on a single GPU's memory with DDP);
- the vllm engine gets GPUs;
- no credentials are written in the config (keys come from environment variables).
Nothing is loaded or started; the exit status is 0 when every check passes, 2 otherwise.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from typing import Any

from slim_ray import storage
from slim_ray.config import PipelineConfig, dump_config
from slim_ray.runtime import is_local
from slim_ray.stages import PIPELINE_ORDER, STAGES

_CHAT_NAME = re.compile(r"(chat|instruct|-it\b|distilled)", re.IGNORECASE)
_BILLIONS = re.compile(r"(\d+(?:\.\d+)?)\s*b\b", re.IGNORECASE)
_SECRET = re.compile(r"(sk-[A-Za-z0-9]{16,}|AKIA[0-9A-Z]{16})")


def _params_billions(name: str) -> float:
    m = _BILLIONS.search(name.replace("_", "-").replace("/", " ").replace("-", " "))
    return float(m.group(1)) if m else 0.0


def _has_chat_template(model: str) -> tuple[bool, str]:
    tok_cfg = os.path.join(model, "tokenizer_config.json")
    if os.path.isfile(tok_cfg):
        with open(tok_cfg) as f:
            ok = bool(json.load(f).get("chat_template")) or os.path.isfile(
                os.path.join(model, "chat_template.jinja"))
        return ok, f"tokenizer config {tok_cfg}"
    return bool(_CHAT_NAME.search(model)), "its name (the folder is not on this machine)"


def check(cfg: PipelineConfig) -> list[str]:
    """Problems that would stop or spoil the run; empty when the plan is sound."""
    problems = []
    base = cfg.distill.base_model
    ok, how = _has_chat_template(base)
    if not ok:
        problems.append(f"distill.base_model={base}: not a chat/instruct model (judged by {how}); the "
                        "student is prompted as a chat turn: use the chat variant (e.g. Llama-2-7b-chat-hf)")
    size = _params_billions(base)
    d = cfg.distill
    if size >= 7 and d.method == "full" and not (d.strategy == "deepspeed" and d.zero_stage == 3):
        problems.append(f"distill: a full fine-tune of a {size:g}B model needs strategy=deepspeed with "
                        f"zero_stage=3 (got {d.strategy}, zero_stage={d.zero_stage})")
    if size >= 7 and d.strategy == "deepspeed" and d.zero_stage < 3 and not d.use_gpu:
        problems.append(f"distill: a {size:g}B model on CPU workers needs ZeRO-3 (got zero_stage={d.zero_stage})")
    for role in ("teacher", "student"):
        g = getattr(cfg, role)
        if g.engine == "vllm" and g.gpus_per_worker <= 0 and not is_local(cfg.ray):
            problems.append(f"{role}.engine=vllm on a cluster needs {role}.gpus_per_worker > 0")
    text = dump_config(cfg)
    if _SECRET.search(text):
        problems.append("the config holds what looks like a credential; use api_key_env / the "
                        "standard AWS_* / GOOGLE_* environment variables instead")
    return problems


def _resources(cfg: PipelineConfig, stage: str) -> str:
    if stage in ("teach", "reason"):
        g = cfg.teacher if stage == "teach" else cfg.student
        who = "all users" if g.num_users is None else f"{g.num_users} users"
        where = g.base_url if g.engine == "openai" else f"{g.num_workers} replicas x " \
            f"({g.cpus_per_worker} CPU, {g.gpus_per_worker} GPU)"
        return f"engine={g.engine} model={g.model} ({who}); {where}"
    if stage == "distill":
        d = cfg.distill
        gpu = "GPU" if d.use_gpu else "CPU"
        return (f"{d.method} of {d.base_model}; {d.strategy}"
                + (f" ZeRO-{d.zero_stage}" if d.strategy == "deepspeed" else "")
                + f"; {d.num_workers} Ray Train workers on {gpu}")
    if stage == "encode":
        e = cfg.encode
        return f"encoder={e.encoder}; {e.num_actors} actors x {e.num_gpus_per_actor} GPU"
    if stage == "train":
        r = cfg.rec
        backbones, modes, seeds = (v if isinstance(v, list) else [v] for v in (r.backbone, r.mode, r.seeds))
        runs = len(r.runs())
        per_protocol = f" x {len(r.protocols)} protocols" if len(r.protocols) > 1 else ""
        return (f"{runs} runs ({', '.join(backbones)} x {len(modes)} modes x {len(seeds)} seeds{per_protocol}); "
                f"{r.num_workers} workers each, GPU={r.use_gpu}")
    return ""


def plan(cfg: PipelineConfig) -> list[dict[str, Any]]:
    # Raw inputs on the cluster's storage need not exist here; the prepare stage reports them.
    logging.getLogger("slim_ray.data.stage").setLevel(logging.ERROR)
    return [
        {"stage": name, "output": STAGES[name].output(cfg), "inputs": STAGES[name].inputs(cfg),
         "resources": _resources(cfg, name)}
        for name in PIPELINE_ORDER
    ]


def print_plan(cfg: PipelineConfig) -> int:
    where = "a local Ray on 127.0.0.1" if is_local(cfg.ray) else f"the Ray cluster at {cfg.ray.address}"
    kind = "local folder" if storage.is_local(cfg.run_dir) else f"{storage.scheme(cfg.run_dir)} storage"
    print(f"plan: {len(PIPELINE_ORDER)} stages on {where}; run folder {cfg.layout.root} ({kind})")
    for step in plan(cfg):
        print(f"  {step['stage']:<9} -> {step['output']}")
        if step["resources"]:
            print(f"  {'':<9}    {step['resources']}")
    problems = check(cfg)
    for p in problems:
        print(f"problem: {p}", file=sys.stderr)
    print("dry run: nothing was loaded or started; " +
          ("all checks passed" if not problems else f"{len(problems)} problem(s)"))
    return 0 if not problems else 2
