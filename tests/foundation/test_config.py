"""Config loading: defaults < YAML (with base:) < --set; errors name the key and the file."""

from __future__ import annotations

import pytest

from slim_ray.config import ConfigError, PipelineConfig, apply_override, load_config


def test_defaults_are_valid_and_sections_exist():
    cfg = load_config()
    assert isinstance(cfg, PipelineConfig)
    assert cfg.teacher.role == "teacher" and cfg.student.role == "student"
    assert cfg.student.model == "distilled"
    assert cfg.layout.items.endswith("prepared/items")


def test_yaml_then_overrides_win_and_are_typed(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("run_dir: /tmp/x\nseed: 3\nteacher:\n  engine: openai\n")
    cfg = load_config(str(f), ["seed=7", "teacher.engine=hf", "ray.num_cpus=2"])
    assert cfg.run_dir == "/tmp/x"
    assert cfg.seed == 7 and isinstance(cfg.seed, int)
    assert cfg.teacher.engine == "hf"
    assert cfg.ray.num_cpus == 2


def test_base_chain_is_merged_relative_to_the_file(tmp_path):
    (tmp_path / "base.yaml").write_text("seed: 1\nrun_dir: from-base\nteacher:\n  num_users: 5\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\nseed: 2\n")
    cfg = load_config(str(tmp_path / "child.yaml"))
    assert (cfg.seed, cfg.run_dir, cfg.teacher.num_users) == (2, "from-base", 5)


def test_unknown_key_names_key_and_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("teacher:\n  engin: hf\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(f))
    assert "teacher.engin" in str(e.value) and str(f) in str(e.value)


def test_wrong_type_names_key(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["seed=abc"])
    assert "'seed'" in str(e.value) and "abc" in str(e.value)


def test_unknown_enum_value_rejected():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["teacher.engine=tgi"])
    assert "teacher.engine" in str(e.value)


def test_unreadable_and_malformed_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file .*nope.yaml"):
        load_config(str(tmp_path / "nope.yaml"))
    f = tmp_path / "broken.yaml"
    f.write_text("seed: [1,\n")
    with pytest.raises(ConfigError, match="broken.yaml: invalid YAML"):
        load_config(str(f))


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="expected key.path=value"):
        apply_override({}, "seed")
    d: dict = {}
    apply_override(d, "a.b.c=[1, 2]")
    assert d == {"a": {"b": {"c": [1, 2]}}}


def test_shipped_configs_load():
    import glob
    import os

    root = os.path.join(os.path.dirname(__file__), "..", "..", "configs")
    files = sorted(glob.glob(os.path.join(root, "*.yaml")))
    assert files, "configs/*.yaml missing"
    for f in files:
        load_config(f)
