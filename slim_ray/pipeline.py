"""``slim-ray run``: the whole SLIM chain, each stage skipped when its output is fresh.

prepare -> teach -> distill -> reason -> encode -> train -> evaluate -> report

``force`` redoes one stage and everything after it; ``until`` stops after a stage. A failure names
the stage and leaves every earlier output intact (each stage's manifest is written only when it
completes).
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Optional

from slim_ray.config import PipelineConfig
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
        results.append(res)
        state = "skipped (fresh)" if res["skipped"] else f"done in {res['seconds']:.1f}s"
        print(f"[slim-ray run] {name:<9} {state}", flush=True)
    total = time.time() - t0
    print(f"[slim-ray run] finished {len(order)} stages in {total:.1f}s -> {cfg.run_dir}", flush=True)
    os.makedirs(cfg.run_dir, exist_ok=True)
    with open(os.path.join(cfg.run_dir, "run_summary.json"), "w") as f:
        json.dump({"seconds": round(total, 2), "stages": results}, f, indent=2, default=str)
    return results
