"""``slim-ray run``: the whole SLIM chain, each stage skipped when its output is fresh.

prepare -> teach -> distill -> reason -> encode -> train -> evaluate -> report

``force`` redoes one stage and everything after it; ``until`` stops after a stage. A failure names
the stage and leaves every earlier output intact (each stage's manifest is written only when it
completes). A stage that ends ``partial`` (rows failed, e.g. an endpoint that kept answering 429)
is rerun up to ``cfg.retry_failed_rows`` more times -- each rerun retries only the failed rows --
and the pipeline then moves on with what it has, saying so.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

from slim_ray import storage
from slim_ray.config import PipelineConfig
from slim_ray.stagelog import console
from slim_ray.stages import PIPELINE_ORDER, run_stage

logger = logging.getLogger(__name__)


def run_pipeline(
    cfg: PipelineConfig, force: Optional[str] = None, until: Optional[str] = None
) -> list[dict[str, Any]]:
    for name in (force, until):
        if name is not None and name not in PIPELINE_ORDER:
            raise ValueError(f"unknown stage '{name}'; stages: {', '.join(PIPELINE_ORDER)}")
    order = PIPELINE_ORDER[: PIPELINE_ORDER.index(until) + 1] if until else PIPELINE_ORDER
    forced_from = PIPELINE_ORDER.index(force) if force else len(PIPELINE_ORDER)
    results = []
    t0 = time.time()
    for i, name in enumerate(order):
        res = run_stage(name, cfg, force=i >= forced_from)
        attempts = 1
        while res["status"] == "partial" and attempts <= cfg.retry_failed_rows:
            failed = res["summary"].get("failed_rows")
            console(f"{name}: {failed} rows failed; retrying them (attempt {attempts + 1} of "
                    f"{cfg.retry_failed_rows + 1})")
            res = run_stage(name, cfg)
            attempts += 1
        res["attempts"] = attempts
        results.append(res)
        console(f"{name}: {_state(res)}")
    total = time.time() - t0
    console(f"finished {len(order)} stages in {total:.1f}s -> {cfg.run_dir}")
    storage.write_json(storage.join(cfg.run_dir, "run_summary.json"),
                       {"seconds": round(total, 2), "stages": results})
    return results


def _state(res: dict[str, Any]) -> str:
    if res["skipped"]:
        return "skipped (fresh)"
    if res["status"] == "partial":
        return (f"PARTIAL after {res['attempts']} attempts: {res['summary'].get('failed_rows')} rows "
                f"failed (recorded with their error; the next run retries them), {res['seconds']:.1f}s")
    return f"done in {res['seconds']:.1f}s"
