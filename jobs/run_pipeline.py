"""``ray job submit`` entrypoint: the whole SLIM pipeline (or part of it) on an existing Ray cluster.

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml \\
        -- python jobs/run_pipeline.py --config configs/demo.yaml [--set k=v ...] [--until encode]

Inside a job, Ray sets RAY_ADDRESS, so ``address=auto`` joins the cluster that runs the job
(``--address`` overrides). Stages skip when their outputs are fresh, exactly as ``slim-ray run``;
``run_dir`` must be a path every node can reach (a shared volume or a pyarrow/fsspec URI) on a
multi-node cluster. The exit status is 0 on success and 1 when a stage failed (named on stderr).
"""

from __future__ import annotations

import argparse
import os
import sys

# The working dir uploaded by `ray job submit` is the repository root: make `slim_ray` importable
# even where the package is not installed in the cluster's image.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from slim_ray.cli import add_config_args, config_from_args  # noqa: E402
from slim_ray.config import ConfigError  # noqa: E402
from slim_ray.stages import PIPELINE_ORDER, StageFailed  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jobs/run_pipeline.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--address", default="auto", help="Ray address to join (default: auto)")
    parser.add_argument("--force", choices=PIPELINE_ORDER, help="redo this stage and all after it")
    parser.add_argument("--until", choices=PIPELINE_ORDER, help="stop after this stage")
    args = parser.parse_args(argv)
    args.overrides.append([f"ray.address={args.address}"])
    try:
        cfg = config_from_args(args)
    except ConfigError as e:
        print(f"run_pipeline: {e}", file=sys.stderr)
        return 2

    import ray

    from slim_ray.pipeline import run_pipeline
    from slim_ray.runtime import init_ray

    init_ray(cfg.ray)
    print(f"[run_pipeline] joined Ray at {cfg.ray.address}: {ray.cluster_resources()}", flush=True)
    try:
        run_pipeline(cfg, force=args.force, until=args.until)
    except StageFailed as e:
        print(f"run_pipeline: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
