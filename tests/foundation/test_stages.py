"""Stage runner + lineage: manifests, skip when fresh, rerun on change, failures name the stage."""

from __future__ import annotations

import json
import os

import pytest

from slim_ray import lineage, stages
from slim_ray.config import load_config

CALLS: list[str] = []


def _fake_prepare(cfg):
    CALLS.append(cfg.run_dir)
    os.makedirs(cfg.layout.prepared, exist_ok=True)
    with open(os.path.join(cfg.layout.prepared, "out.txt"), "w") as f:
        f.write("x")
    return {"rows": 3}


def _failing(cfg):
    raise ValueError("boom")


PARTIAL_RUNS: list[int] = []


def _partial_then_complete(cfg):
    """Fails two rows on the first call, one on the second, none after."""
    PARTIAL_RUNS.append(1)
    return {"failed_rows": max(0, 3 - len(PARTIAL_RUNS)), "done_rows": 10}


@pytest.fixture
def fake_stage(monkeypatch, tmp_path):
    raw = tmp_path / "raw.txt"
    raw.write_text("v1")
    st = stages.Stage(
        "prepare", f"{__name__}:_fake_prepare", ("data",), lambda c: {"raw": str(raw)},
        lambda c: c.layout.prepared, "fake",
    )
    monkeypatch.setitem(stages.STAGES, "prepare", st)
    CALLS.clear()
    return raw


def test_manifest_written_and_fresh_stage_skipped(fake_stage, tmp_path):
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}"])
    r1 = stages.run_stage("prepare", cfg)
    assert not r1["skipped"] and CALLS == [cfg.run_dir]
    m = json.load(open(os.path.join(cfg.layout.prepared, "manifest.json")))
    assert m["status"] == "complete" and m["summary"]["rows"] == 3
    assert m["inputs"]["raw"]["fingerprint"].startswith("sha256:")
    assert os.path.isfile(os.path.join(cfg.layout.prepared, "config.yaml"))

    r2 = stages.run_stage("prepare", cfg)
    assert r2["skipped"] and len(CALLS) == 1
    # A damaged output (a part truncated or replaced after the manifest was written) is not fresh.
    with open(os.path.join(cfg.layout.prepared, "out.txt"), "w") as f:
        f.write("")
    assert not stages.run_stage("prepare", cfg)["skipped"] and len(CALLS) == 2
    assert stages.run_stage("prepare", cfg)["skipped"] and len(CALLS) == 2

    stages.run_stage("prepare", cfg, force=True)
    assert len(CALLS) == 3


def test_changed_input_or_config_reruns(fake_stage, tmp_path):
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}"])
    stages.run_stage("prepare", cfg)
    fake_stage.write_text("v2")
    assert not stages.run_stage("prepare", cfg)["skipped"]
    cfg2 = load_config(None, [f"run_dir={tmp_path / 'run'}", "data.min_item_count=7"])
    assert stages.fingerprint("prepare", cfg2) != stages.fingerprint("prepare", cfg)


def test_downstream_fingerprint_follows_upstream_manifest(tmp_path):
    up = tmp_path / "up"
    lineage.write_manifest(str(up), stage="a", fingerprint="f1", inputs={}, config_yaml="", summary={})
    fp1 = lineage.fingerprint_path(str(up))
    lineage.write_manifest(str(up), stage="a", fingerprint="f2", inputs={}, config_yaml="", summary={})
    assert fp1 == "stage:f1" and lineage.fingerprint_path(str(up)) == "stage:f2"


def test_failure_names_stage_and_leaves_no_manifest(monkeypatch, tmp_path):
    st = stages.Stage("prepare", f"{__name__}:_failing", ("data",), lambda c: {},
                      lambda c: c.layout.prepared, "fails")
    monkeypatch.setitem(stages.STAGES, "prepare", st)
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}"])
    with pytest.raises(stages.StageFailed) as err:
        stages.run_stage("prepare", cfg)
    log = os.path.join(cfg.layout.logs, "prepare.log")
    assert str(err.value) == f"stage 'prepare' failed: boom (full trace in {log})"
    assert "Traceback" in open(log).read() and "_failing" in open(log).read()
    assert lineage.read_manifest(cfg.layout.prepared) is None


def test_error_line_unwraps_ray_task_errors():
    """The cause our code raised inside a Ray task, not Ray's wrapper with its traceback."""
    from ray.exceptions import RayTaskError

    from slim_ray.errors import one_line

    try:
        raise ValueError("reviews.json.gz: line 4915: malformed JSON")
    except ValueError as e:
        inner = e
    wrapped = RayTaskError("map_batches", "Traceback ...\n  File x\nValueError: ...", inner)
    assert one_line(wrapped) == "reviews.json.gz: line 4915: malformed JSON"
    assert one_line(KeyError("user_id")) == "KeyError: 'user_id'"
    # Ray Data's UserCodeException carries no cause across processes: the trace's last error line
    from ray.exceptions import UserCodeException

    trace = ("ray::MapBatches(PartWriter)() (pid=1, ip=127.0.0.1)\n  File \"w.py\", line 3, in write\n"
             "OSError: [Errno 28] No space left on device: '/r/part-1.parquet'\n\n"
             "ray.exceptions.UserCodeException: UDF failed to process a data block.")
    udf = RayTaskError("MapBatches", trace, UserCodeException("UDF failed to process a data block."))
    assert one_line(udf) == "OSError: [Errno 28] No space left on device: '/r/part-1.parquet'"


def test_find_error_finds_a_stage_input_error_through_ray_wrappers():
    """A stage re-raises its own input error, not Ray's wrapper: through the chain, or (chain lost
    across processes) from the trace text."""
    from ray.exceptions import RayTaskError, UserCodeException

    from slim_ray.errors import find_error

    class InputError(ValueError):
        pass

    try:
        raise InputError("items.parquet: column 'title' missing\nmore")
    except InputError as e:
        chained = RayTaskError("map", "trace", e)
    found = find_error(chained, InputError)
    assert type(found) is InputError and str(found) == "items.parquet: column 'title' missing"
    lost = RayTaskError("map", "x\nInputError: row 3: empty text\n", UserCodeException("UDF failed"))
    assert str(find_error(lost, InputError)) == "row 3: empty text"
    assert find_error(RuntimeError("other"), InputError) is None


def test_partial_stage_is_not_fresh_and_run_retries_it(monkeypatch, tmp_path):
    from slim_ray.pipeline import run_pipeline

    st = stages.Stage("prepare", f"{__name__}:_partial_then_complete", ("data",), lambda c: {},
                      lambda c: c.layout.prepared, "partial")
    monkeypatch.setitem(stages.STAGES, "prepare", st)
    PARTIAL_RUNS.clear()
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", "retry_failed_rows=0"])
    first = stages.run_stage("prepare", cfg)
    assert first["status"] == "partial" and lineage.read_manifest(cfg.layout.prepared)["status"] == "partial"
    assert not lineage.is_fresh(cfg.layout.prepared, stages.fingerprint("prepare", cfg))
    # `slim-ray run` reruns a partial stage (retry_failed_rows more times) before moving on.
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", "retry_failed_rows=2"])
    res = run_pipeline(cfg, until="prepare")
    assert len(PARTIAL_RUNS) == 3 and res[0]["attempts"] == 2 and res[0]["status"] == "complete"
    assert lineage.read_manifest(cfg.layout.prepared)["summary"]["failed_rows"] == 0


def test_editing_a_stage_source_changes_its_fingerprint(monkeypatch, tmp_path):
    """Code identity: the hash of the files a stage runs is part of its fingerprint."""
    import shutil

    pkg = tmp_path / "pkg"
    shutil.copytree(os.path.dirname(lineage.__file__), pkg, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(lineage, "_PACKAGE_DIR", str(pkg))
    lineage.source_hash.cache_clear()
    before = lineage.stage_fingerprint("report", {}, {}, ("report.py",))
    other = lineage.stage_fingerprint("report", {}, {}, ("rec",))
    with open(pkg / "report.py", "a") as f:
        f.write("\n# edited\n")
    lineage.source_hash.cache_clear()
    after = lineage.stage_fingerprint("report", {}, {}, ("report.py",))
    assert before != after and lineage.stage_fingerprint("report", {}, {}, ("rec",)) == other
    lineage.source_hash.cache_clear()


def test_cli_reports_config_errors(capsys):
    from slim_ray.cli import main

    assert main(["prepare", "--set", "data.nope=1"]) == 2
    assert "unknown key 'data.nope'" in capsys.readouterr().err
