"""``slim-ray``: one entry point for every stage and for the whole pipeline.

    slim-ray run      --config configs/demo.yaml [--set k=v ...] [--force STAGE] [--until STAGE]
    slim-ray prepare  --config configs/demo.yaml [--set data.min_item_count=5]
    slim-ray teach | distill | reason | encode | train | evaluate | report   (same flags)
    slim-ray synth    --config ... --set synth.num_users=1000000 synth.out=/data/synth
    slim-ray serve-llm ...   OpenAI-compatible endpoint on Ray Serve (see --help)
    slim-ray serve     ...   the SLIM recommendation graph on Ray Serve (see --help)
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Optional

from slim_ray.config import ConfigError, PipelineConfig, load_config
from slim_ray.stages import PIPELINE_ORDER, STAGES, StageFailed, run_stage

# Commands that own their argument parsing: name -> "module:function(argv) -> int".
DELEGATED = {
    "synth": "slim_ray.data.synth:main",
    "serve-llm": "slim_ray.generate.serve_llm:main",
    "serve": "slim_ray.serve.app:main",
}


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """``--config`` and ``--set`` (shared by every command)."""
    parser.add_argument("--config", "-c", help="YAML config (see configs/).")
    parser.add_argument(
        "--set", dest="overrides", action="append", nargs="+", default=[], metavar="KEY=VALUE",
        help="dotted override, e.g. --set rec.backbone=gru4rec teacher.engine=openai",
    )


def config_from_args(args: argparse.Namespace) -> PipelineConfig:
    flat = [o for group in args.overrides for o in group]
    return load_config(args.config, flat)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slim-ray", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="the whole pipeline, skipping fresh stages")
    add_config_args(run)
    run.add_argument("--force", choices=PIPELINE_ORDER, help="redo this stage and all after it")
    run.add_argument("--until", choices=PIPELINE_ORDER, help="stop after this stage")
    for name, st in STAGES.items():
        p = sub.add_parser(name, help=st.doc)
        add_config_args(p)
        p.add_argument("--force", action="store_true", help="run even if the output is fresh")
    for name in DELEGATED:
        sub.add_parser(name, help=f"see slim-ray {name} --help", add_help=False)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    if argv and argv[0] in DELEGATED:
        module, fn = DELEGATED[argv[0]].split(":")
        return int(getattr(importlib.import_module(module), fn)(argv[1:]) or 0)
    args = _build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ConfigError as e:
        print(f"slim-ray: {e}", file=sys.stderr)
        return 2
    try:
        if args.command == "run":
            from slim_ray.pipeline import run_pipeline

            run_pipeline(cfg, force=args.force, until=args.until)
        else:
            res = run_stage(args.command, cfg, force=args.force)
            print(f"[slim-ray {args.command}] " + ("skipped (fresh)" if res["skipped"] else
                  f"done in {res['seconds']:.1f}s"), flush=True)
    except StageFailed as e:
        print(f"slim-ray: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
