"""The stage table: what each stage reads, which config sections shape it, where it writes.

``run_stage(name, cfg)`` is the one way a stage is executed (by the CLI and by ``slim-ray run``):
it computes the stage's fingerprint from its config sections and input fingerprints, skips the
stage when its output is fresh (unless forced), calls the stage's plain function, and writes
``config.yaml`` + ``manifest.json`` next to the output only once the stage has finished -- an
interrupted stage never looks complete. A stage whose summary reports ``failed_rows > 0`` is
published with ``status: partial``: it is never fresh, so the next run retries exactly what failed.

While a stage runs, the driver's log records go to ``<run_dir>/logs/<stage>.log`` (the full trace
of a failure too); the console gets one line per stage start and end, and off a terminal one
progress line every ``PROGRESS_EVERY_S`` seconds.

A stage function has the signature ``run_<stage>(cfg: PipelineConfig) -> dict`` (a JSON-able
summary: counts, timings, model ids) and imports its heavy dependencies itself.
"""

from __future__ import annotations

import importlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

from slim_ray.config import PipelineConfig, dump_config
from slim_ray.errors import StageFailed
from slim_ray.layout import FULL_PREFIX_SUFFIX
from slim_ray.lineage import is_fresh, read_manifest, stage_fingerprint, write_manifest
from slim_ray.stagelog import stage_console

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    name: str
    target: str  # "module:function"
    sections: tuple[str, ...]
    inputs: Callable[[PipelineConfig], dict[str, str]]
    output: Callable[[PipelineConfig], str]
    doc: str
    code: tuple[str, ...] = ()  # slim_ray sub-packages/modules it runs: their source is in the fingerprint

    def function(self) -> Callable[[PipelineConfig], dict[str, Any]]:
        module, fn = self.target.split(":")
        return getattr(importlib.import_module(module), fn)


def _data_inputs(cfg: PipelineConfig) -> dict[str, str]:
    from slim_ray.data.stage import raw_inputs  # the data stage knows its raw files

    return raw_inputs(cfg)


STAGES: dict[str, Stage] = {
    s.name: s
    for s in [
        Stage(
            "prepare", "slim_ray.data.stage:run_prepare", ("data",), _data_inputs,
            lambda c: c.layout.prepared,
            "raw logs -> items + sequences (k-core, dense ids, leave-one-out)",
            ("data",),
        ),
        Stage(
            "teach", "slim_ray.generate.stage:run_teach", ("teacher", "seed"),
            lambda c: {"prepared": c.layout.prepared},
            lambda c: c.layout.rationales("teacher"),
            "teacher LLM writes step-by-step rationales for a seeded sample of users",
            ("generate", "prompts"),
        ),
        Stage(
            "distill", "slim_ray.distill.stage:run_distill", ("distill", "student", "seed"),
            lambda c: {"teacher_rationales": c.layout.rationales("teacher"), "prepared": c.layout.prepared},
            lambda c: c.layout.distill,
            "LoRA + DeepSpeed ZeRO fine-tune of the student on teacher rationales (Ray Train)",
            ("distill", "prompts"),
        ),
        Stage(
            "reason", "slim_ray.generate.stage:run_reason", ("student", "seed"),
            lambda c: {"prepared": c.layout.prepared, "student": c.layout.distill},
            lambda c: c.layout.rationales("student"),
            "the distilled student writes a rationale for every user",
            ("generate", "prompts"),
        ),
        Stage(
            "encode", "slim_ray.encode.stage:run_encode", ("encode",),
            lambda c: {
                "prepared": c.layout.prepared,
                "teacher_rationales": c.layout.rationales("teacher"),
                "student_rationales": c.layout.rationales("student"),
                # the evaluation-time sets (rationales/<role>-full/), when encode.roles names them
                **{f"{r}_rationales": c.layout.rationales(r) for r in c.encode.roles if r.endswith(FULL_PREFIX_SUFFIX)},
            },
            lambda c: c.layout.embeddings,
            "sentence-transformer embeddings of item texts and user rationales",
            ("encode",),
        ),
        Stage(
            "train", "slim_ray.rec.stage:run_train", ("rec", "seed"),
            lambda c: {"prepared": c.layout.prepared, "embeddings": c.layout.embeddings},
            lambda c: c.layout.rec,
            "SASRec / GRU4Rec / SRGNN x modes x seeds on Ray Train",
            ("rec",),
        ),
        Stage(
            "evaluate", "slim_ray.rec.stage:run_evaluate", ("evaluate",),
            lambda c: {"prepared": c.layout.prepared, "rec": c.layout.rec},
            lambda c: c.layout.eval,
            "sampled-100 and full-ranking metrics, mean +- std over seeds, significance",
            ("rec",),
        ),
        Stage(
            "report", "slim_ray.report:run_report", ("report",),
            lambda c: {"eval": c.layout.eval},
            lambda c: c.layout.report,
            "report.md + plots",
            ("report.py",),
        ),
    ]
}

PIPELINE_ORDER = ["prepare", "teach", "distill", "reason", "encode", "train", "evaluate", "report"]


def _sections(cfg: PipelineConfig, names: tuple[str, ...]) -> dict[str, Any]:
    dumped = cfg.model_dump(mode="json")
    return {n: dumped[n] for n in names}


def fingerprint(name: str, cfg: PipelineConfig) -> str:
    st = STAGES[name]
    return stage_fingerprint(name, _sections(cfg, st.sections), st.inputs(cfg), st.code)


def run_stage(name: str, cfg: PipelineConfig, force: bool = False) -> dict[str, Any]:
    """Run one stage unless its output is fresh.

    Returns {'stage', 'skipped', 'seconds', 'status', 'summary'}; raises StageFailed (naming the
    stage, the root cause and the log file) when the stage function raises.
    """
    st = STAGES[name]
    out_dir = st.output(cfg)
    fp = fingerprint(name, cfg)
    if not force and is_fresh(out_dir, fp):
        m = read_manifest(out_dir) or {}
        return {"stage": name, "skipped": True, "seconds": 0.0, "status": "complete",
                "summary": m.get("summary", {})}
    t0 = time.time()
    with stage_console(name, st.doc, out_dir, cfg.layout.logs) as console:
        try:
            summary = st.function()(cfg) or {}
        except KeyboardInterrupt:
            raise
        except Exception as e:  # keep earlier outputs; name the stage, the cause and the log
            console.record_failure(e)
            raise StageFailed(name, e, log_path=console.log_path) from e
    seconds = time.time() - t0
    summary = {**summary, "seconds": round(seconds, 2)}
    status = "partial" if int(summary.get("failed_rows") or 0) > 0 else "complete"
    write_manifest(
        out_dir,
        stage=name,
        fingerprint=fp,
        inputs=st.inputs(cfg),
        config_yaml=dump_config(cfg),
        summary=summary,
        status=status,
    )
    return {"stage": name, "skipped": False, "seconds": seconds, "status": status, "summary": summary}
