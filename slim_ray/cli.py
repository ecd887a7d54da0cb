"""``slim-ray``: one entry point for every stage and for the whole pipeline.

    slim-ray run      --config configs/demo.yaml [--set k=v ...] [--force STAGE] [--until STAGE]
    slim-ray prepare  --config configs/demo.yaml [--set data.min_item_count=5]
    slim-ray teach | distill | reason | encode | train | evaluate | report   (same flags)
    slim-ray synth    --config ... --set synth.num_users=1000000 synth.out=/data/synth
    slim-ray serve-llm ...   OpenAI-compatible endpoint on Ray Serve (see --help)
    slim-ray serve     ...   the SLIM recommendation graph on Ray Serve (see --help)
    slim-ray run --config configs/paper.yaml --dry-run    the plan, checked, without loading models
    slim-ray bench scale --users 10000,100000,1000000     every stage measured at each size (docs/scale.md)

Before anything imports Ray, a local run, or one joining a cluster on 127.0.0.1, pins Ray to loopback
(``runtime.pin_loopback``):
Ray reads that setting once, at import. A failing stage ends with one line on stderr (stage, cause,
log file) and exit status 1; ``--debug`` also prints the full trace.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import traceback
from typing import Optional

from slim_ray.config import ConfigError, PipelineConfig, load_config
from slim_ray.errors import StageFailed
from slim_ray.runtime import is_local, joins_loopback, pin_loopback
from slim_ray.scale.harness import STAGES as SCALE_STAGES
from slim_ray.stages import PIPELINE_ORDER, STAGES, run_stage


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """``--config`` and ``--set`` (shared by every command)."""
    parser.add_argument("--config", "-c", help="YAML config (see configs/).")
    parser.add_argument("--debug", action="store_true", help="print the full trace of a failure")
    parser.add_argument(
        "--set", dest="overrides", action="append", nargs="+", default=[], metavar="KEY=VALUE",
        help="dotted override, e.g. --set rec.backbone=gru4rec teacher.engine=openai",
    )


def config_from_args(args: argparse.Namespace) -> PipelineConfig:
    flat = [o for group in args.overrides for o in group]
    command = getattr(args, "command", None)  # shortcuts that are overrides too
    if command == "synth":
        flat += ([f"synth.num_users={args.users}"] if args.users else []) + \
            ([f"synth.out={args.out}"] if args.out else [])
    if command == "serve" and args.port is not None:
        flat.append(f"serve.port={args.port}")
    return load_config(args.config, flat)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slim-ray", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="the whole pipeline, skipping fresh stages")
    add_config_args(run)
    run.add_argument("--force", choices=PIPELINE_ORDER, help="redo this stage and all after it")
    run.add_argument("--until", choices=PIPELINE_ORDER, help="stop after this stage")
    run.add_argument("--dry-run", action="store_true",
                     help="resolve and check every stage's config, print the plan, load nothing")
    for name, st in STAGES.items():
        p = sub.add_parser(name, help=st.doc)
        add_config_args(p)
        p.add_argument("--force", action="store_true", help="run even if the output is fresh")
    _add_serve_llm_parser(sub)
    synth = sub.add_parser(
        "synth", help="synthetic Amazon-format (or Parquet) review logs: Zipf popularity, heavy-tailed "
        "lengths, vocabulary titles/categories/brands; settings under `synth.` (docs/data.md)")
    add_config_args(synth)
    synth.add_argument("--users", type=int, help="shortcut for --set synth.num_users=N")
    synth.add_argument("--out", help="shortcut for --set synth.out=PATH")
    serve = sub.add_parser("serve", help="the SLIM recommendation graph on Ray Serve over a finished run "
                           "(loopback by default; docs/serve.md)")
    add_config_args(serve)
    serve.add_argument("--port", type=int, help="shortcut for --set serve.port=N")
    _add_bench_parser(sub)
    return parser


def _add_bench_parser(sub) -> None:
    bench = sub.add_parser("bench", help="measurements (docs/scale.md)")
    kinds = bench.add_subparsers(dest="bench", required=True)
    p = kinds.add_parser("scale", help="every stage at several numbers of users (synthetic log, LLM stand-in)")
    p.add_argument("--users", default="10000,100000,1000000", help="comma-separated sizes")
    p.add_argument("--out", default="runs/bench-scale", help="work folder (one sub-folder per size)")
    p.add_argument("--stages", default=",".join(SCALE_STAGES), help="comma-separated, in pipeline order")
    p.add_argument("--address", help="a Ray cluster to run on (default: a local Ray per stage)")
    p.add_argument("--latency-ms", type=float, default=20.0, help="the stand-in's answer latency")
    p.add_argument("--words", type=int, default=48, help="words per stand-in answer")
    p.add_argument("--kill-reason", action="store_true",
                   help="also SIGKILL reason at half way, rerun it and count rows and duplicate keys")
    p.add_argument("--markdown", default="BENCHMARKS.md", help="where to write the table ('' for none)")
    p.add_argument("--render-only", action="store_true",
                   help="only write the markdown (and plots) again from <out>/results.json")
    p.add_argument("--also-out", action="append", default=[], metavar="FOLDER",
                   help="append the results of another bench folder (another --set) to the markdown")
    p.add_argument("--real-engine", choices=["hf", "vllm"], help="also time a real engine at demo scale "
                   "(SmolLM2-135M, 16 MovieLens users) and extrapolate to the largest size")
    p.add_argument("--set", dest="overrides", action="append", nargs="+", default=[], metavar="KEY=VALUE",
                   help="extra overrides of configs/scale.yaml for every stage")


def _bench(args: argparse.Namespace) -> int:
    from slim_ray.scale.harness import run_bench

    try:
        sizes = [int(x.replace("_", "")) for x in args.users.split(",") if x.strip()]
    except ValueError:
        print(f"slim-ray: --users {args.users!r}: expected comma-separated integers", file=sys.stderr)
        return 2
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in SCALE_STAGES]
    if unknown or not sizes:
        print(f"slim-ray: unknown stage(s) {unknown}; stages: {', '.join(SCALE_STAGES)}" if unknown
              else "slim-ray: --users is empty", file=sys.stderr)
        return 2
    if args.render_only:
        from slim_ray.scale.harness import render

        render(args.out, args.markdown or "BENCHMARKS.md", tuple(args.also_out))
        return 0
    try:
        run_bench(sizes, args.out, stages, address=args.address, latency_ms=args.latency_ms, words=args.words,
                  kill_reason=args.kill_reason, extra_sets=[o for g in args.overrides for o in g],
                  markdown=args.markdown or None, real=args.real_engine, also_outs=tuple(args.also_out))
    except (RuntimeError, ConfigError) as e:  # a stage failed: its own log has the trace
        print(f"slim-ray: bench scale: {e}", file=sys.stderr)
        return 1
    return 0


def _add_serve_llm_parser(sub) -> None:
    p = sub.add_parser("serve-llm", help="an OpenAI-compatible endpoint for a packaged or local LLM "
                       "on Ray Serve (loopback by default)")
    add_config_args(p)
    p.add_argument("--model", help="packaged model name or HF folder (default: the config's teacher.model)")
    p.add_argument("--name", help="model name clients send (default: --model)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--cpus-per-replica", type=float, default=1.0)
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--batch-wait-ms", type=float, default=50.0)
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    p.add_argument("--max-tokens", type=int, default=256, help="default max_tokens of a request")


def _serve_llm(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    from slim_ray.generate.serve_llm import serve_until_stopped

    return serve_until_stopped(cfg, model=args.model, name=args.name, host=args.host, port=args.port,
                               replicas=args.replicas, cpus_per_replica=args.cpus_per_replica,
                               max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms,
                               dtype=args.dtype, max_tokens=args.max_tokens)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Ctrl-C must stop a run even when the shell started us with SIGINT ignored (a background job):
    # finished parts are kept and the same command resumes.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    args = _build_parser().parse_args(argv)
    if args.command == "bench":
        return _bench(args)
    try:
        cfg = config_from_args(args)
    except ConfigError as e:
        print(f"slim-ray: {e}", file=sys.stderr)
        return 2
    if args.command == "run" and args.dry_run:
        from slim_ray.plan import print_plan

        return print_plan(cfg)
    if is_local(cfg.ray) or joins_loopback(cfg.ray):  # a local Ray, or a cluster on 127.0.0.1
        pin_loopback()
    if args.command == "serve-llm":
        return _serve_llm(cfg, args)
    if args.command == "serve":
        from slim_ray.serve.app import serve_until_stopped

        return serve_until_stopped(cfg)
    if args.command == "synth":
        from slim_ray.data.synth import run_synth

        print(json.dumps(run_synth(cfg.synth, cfg.ray), indent=2))
        return 0
    try:
        if args.command == "run":
            from slim_ray.pipeline import run_pipeline

            run_pipeline(cfg, force=args.force, until=args.until)
        else:
            res = run_stage(args.command, cfg, force=args.force)
            print(f"[slim-ray] {args.command}: " + ("skipped (fresh)" if res["skipped"] else
                  f"{res['status']} in {res['seconds']:.1f}s"), file=sys.stderr, flush=True)
    except StageFailed as e:
        if args.debug:
            traceback.print_exception(type(e.cause), e.cause, e.cause.__traceback__, file=sys.stderr)
        print(f"slim-ray: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("slim-ray: interrupted; finished parts are kept, rerun the same command to resume",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
