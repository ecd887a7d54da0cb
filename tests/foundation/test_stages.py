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

    stages.run_stage("prepare", cfg, force=True)
    assert len(CALLS) == 2


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
    with pytest.raises(stages.StageFailed, match="stage 'prepare' failed: ValueError: boom"):
        stages.run_stage("prepare", cfg)
    assert lineage.read_manifest(cfg.layout.prepared) is None


def test_cli_reports_config_errors(capsys):
    from slim_ray.cli import main

    assert main(["prepare", "--set", "data.nope=1"]) == 2
    assert "unknown key 'data.nope'" in capsys.readouterr().err
