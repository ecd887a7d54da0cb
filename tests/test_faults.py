"""The fast cases of the fault campaign (bench/faults.py runs them all, with random kill points).

Each case runs the real ``slim-ray`` command in a subprocess, on a MovieLens-100K slice with the
``openai`` teacher pointed at a deterministic stand-in server on 127.0.0.1 (tests/faultlib.py), and
compares the result with an uninterrupted run of the same config by an order-independent content
hash of the rationales contract:

- Ctrl-C mid-teach: exit 130, no complete manifest; then one of the parts it left is truncated; the
  rerun drops that part, generates only the missing rows, and ends with identical content.
- an unreachable teacher endpoint: exit 1 with one line naming the URL; the rerun against the
  endpoint fills every row, once.
- a truncated or altered packaged GGUF: a clear refusal naming the file; the installed model is
  never touched (the damaged copy shadows the package through PYTHONPATH).
"""

from __future__ import annotations

import os
import shutil
import signal

import pytest

import faultlib as fl

USERS = 30
RATIONALES_KEY = ("user_id", "rationale_key")


def overrides(run: str, url: str) -> list[str]:
    return [f"run_dir={run}", f"data.max_users={USERS}", "teacher.engine=openai", "teacher.model=stand-in",
            f"teacher.base_url={url}", "teacher.num_users=16", "teacher.rows_per_file=4", "teacher.batch_size=4",
            "teacher.max_concurrent_requests=4", "teacher.request_timeout_s=5", "teacher.max_retries=1",
            "teacher.retry_base_s=0.1", "teacher.retry_max_wait_s=1"]


def command(verb: list[str], run: str, url: str) -> list[str]:
    return [*verb, "--config", "configs/quick.yaml", "--set", *overrides(run, url)]


def teacher_dir(run: str) -> str:
    return os.path.join(run, "rationales", "teacher")


@pytest.fixture(scope="module")
def server():
    srv = fl.StandIn()
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def clean(tmp_path_factory, server):
    """An uninterrupted `slim-ray run --until teach` (prepare, then teach against the stand-in).
    Returns (run folder, digest of the rationales)."""
    run = str(tmp_path_factory.mktemp("faults") / "clean")
    out = fl.run_slim_ray(command(["run", "--until", "teach"], run, server.url), run + ".log", 400)
    assert out.rc == 0, out.output[-3000:]
    digest = fl.contract_digest(teacher_dir(run), RATIONALES_KEY)
    assert digest.rows == 16 and digest.duplicates == 0 and not digest.unreadable
    assert fl.manifest(os.path.join(run, "prepared"))["status"] == "complete"
    return run, digest


def from_prepared(clean_run: str, tmp_path, name: str) -> str:
    """A run folder holding the clean run's (complete) prepared/ only."""
    run = str(tmp_path / name)
    shutil.copytree(os.path.join(clean_run, "prepared"), os.path.join(run, "prepared"))
    return run


def assert_same_as_clean(run: str, clean_digest: fl.Digest) -> None:
    got = fl.contract_digest(teacher_dir(run), RATIONALES_KEY)
    cmp = got.compare(clean_digest)
    assert (cmp["lost"], cmp["duplicates"], got.unreadable) == (0, 0, []), cmp
    assert cmp["identical"], (got.rows, clean_digest.rows)
    m = fl.manifest(teacher_dir(run))
    assert m["status"] == "complete" and m["summary"]["done_rows"] == 16 and m["summary"]["failed_rows"] == 0


def test_ctrl_c_then_a_damaged_part_the_rerun_matches_the_clean_run(clean, server, tmp_path):
    clean_run, clean_digest = clean
    run = from_prepared(clean_run, tmp_path, "ctrl-c")
    args = command(["run", "--until", "teach"], run, server.url)
    log = run + ".log"
    server.delay_s = 1.0  # 16 rows, 4 at a time: a few seconds of generation to interrupt
    try:
        for _ in range(3):  # a start whose local Ray missed Ray's 30 s start-up limit is tried again
            proc = fl.start_slim_ray(args, log)
            # interrupt once the first part is published: mid-stage, with work on disk
            assert fl.wait_for(lambda: fl.parquet_parts(teacher_dir(run)) or proc.poll() is not None, 180)
            tree = fl.process_tree(proc.pid)
            if proc.poll() is None:
                break
            fl.reap(proc, tree)
            with open(log) as f:
                assert fl.ray_startup_timed_out(f.read()), "slim-ray ended before the interrupt"
        os.kill(proc.pid, signal.SIGINT)
        rc = proc.wait(timeout=120)
        fl.reap(proc, tree)
    finally:
        server.delay_s = 0.0
    with open(log) as f:
        printed = f.read()
    assert rc == 130, printed[-3000:]
    assert "interrupted; finished parts are kept" in printed
    assert fl.manifest(teacher_dir(run)) is None  # nothing published as complete
    parts = fl.parquet_parts(teacher_dir(run))
    assert 1 <= len(parts) < 4, parts
    # and one of the parts it left is damaged (a truncated copy, a disk error): the rerun must drop
    # it and generate its rows again instead of failing on it
    fl.corrupt_file(parts[0], "truncate")
    assert fl.contract_digest(teacher_dir(run), RATIONALES_KEY).unreadable

    before = server.completions
    out = fl.run_slim_ray(args, log, 300)
    assert out.rc == 0, out.output[-3000:]
    assert "unreadable part" in out.output and os.path.basename(parts[0]) in out.output
    assert_same_as_clean(run, clean_digest)
    assert fl.manifest(teacher_dir(run))["summary"]["unreadable_parts_dropped"] == 1
    # the intact parts were kept: the rerun asked only for the rows not on disk (the damaged part's
    # 4 and those not yet written)
    assert server.completions - before <= 16 - 4 * (len(parts) - 1)


def test_unreachable_endpoint_fails_in_one_line_and_the_rerun_fills_every_row(clean, tmp_path):
    clean_run, clean_digest = clean
    run = from_prepared(clean_run, tmp_path, "unreachable")
    port = fl.free_port()  # nothing listens there
    url = f"http://127.0.0.1:{port}/v1"
    args = command(["run", "--until", "teach"], run, url)
    out = fl.run_slim_ray(args, run + ".log", 300)
    errors = [ln for ln in out.output.splitlines() if ln.startswith("slim-ray:")]
    assert out.rc == 1, out.output[-3000:]
    assert len(errors) == 1 and "stage 'teach' failed" in errors[0] and f"127.0.0.1:{port}" in errors[0], errors
    assert "Traceback" not in out.output
    assert (fl.manifest(teacher_dir(run)) or {}).get("status") != "complete"

    srv = fl.StandIn(port=port)  # the endpoint comes up
    try:
        out = fl.run_slim_ray(args, run + ".log", 300)
    finally:
        srv.close()
    assert out.rc == 0, out.output[-3000:]
    assert srv.completions == 16 and max(srv.prompts.values()) == 1  # every row, each asked once
    assert_same_as_clean(run, clean_digest)


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_damaged_packaged_gguf_is_refused_naming_the_file(clean, tmp_path, how):
    from slim_ray.assets import LLMS

    spec = LLMS["smollm2-135m-instruct"]
    real = spec.source_files()[0]
    before = os.stat(real)
    pkg = tmp_path / "pkgs" / spec.parts[0][0]
    pkg.mkdir(parents=True)
    shutil.copy(real.parent / "__init__.py", pkg)
    copy = str(pkg / spec.parts[0][1])
    shutil.copy(real, copy)
    if how == "truncate":
        fl.corrupt_file(copy, "truncate")
    else:  # same size, one byte altered
        with open(copy, "r+b") as f:
            f.seek(os.path.getsize(copy) // 2)
            b = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([b[0] ^ 0xFF]))
    run = from_prepared(clean[0], tmp_path, "gguf")
    args = ["teach", "--config", "configs/quick.yaml", "--set", f"run_dir={run}", f"data.max_users={USERS}",
            "teacher.engine=hf", "teacher.model=smollm2-135m-instruct", f"cache_dir={tmp_path / 'cache'}"]
    out = fl.run_slim_ray(args, run + ".log", 300, env={"PYTHONPATH": str(tmp_path / "pkgs")})
    errors = [ln for ln in out.output.splitlines() if ln.startswith("slim-ray:")]
    assert out.rc == 1, out.output[-3000:]
    assert len(errors) == 1 and "stage 'teach' failed" in errors[0], errors
    assert "sha256 mismatch" in errors[0] and copy in errors[0] and "refusing" in errors[0], errors[0]
    assert not fl.parquet_parts(teacher_dir(run))
    after = os.stat(real)  # the installed model is never modified
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
