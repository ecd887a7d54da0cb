"""The pipeline config: one pydantic model per stage, collected here, loaded from YAML.

Merge order (later wins): the defaults in the stage config classes < the YAML file (which may
name a ``base:`` YAML to start from, resolved relative to itself) < ``--set key.path=value``
overrides on the command line. Unknown keys and wrong types are rejected with the key path and
the file they came from.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Optional

import yaml
from pydantic import Field, ValidationError, model_validator

from slim_ray.configbase import StageConfig
from slim_ray.data.config import PrepareConfig, SynthConfig
from slim_ray.distill.config import DistillConfig
from slim_ray.encode.config import EncodeConfig
from slim_ray.generate.config import GenerateConfig
from slim_ray.layout import RunLayout
from slim_ray.rec.config import EvalConfig, RecConfig
from slim_ray.runtime import RayConfig
from slim_ray.serve.config import ServeConfig


# The student prompt p' names the three steps ("Step 1: ... Step 2: ..."); a repetition penalty
# over the prompt tokens pushes the distilled student away from the very "Step" token it learned
# to start with, so the student generates without one.
STUDENT_DEFAULTS = {"role": "student", "model": "distilled", "num_users": None, "repetition_penalty": 1.0}


def _student_generate_defaults() -> GenerateConfig:
    return GenerateConfig(**STUDENT_DEFAULTS)


class ReportConfig(StageConfig):
    """What the report compares against."""

    paper_reference: bool = Field(True, description="Print the paper's Games figures beside ours.")


class PipelineConfig(StageConfig):
    """Everything a SLIM run needs. Each section is one stage's config."""

    run_dir: str = Field("runs/demo", description="Root folder of this run (local path or URI).")
    seed: int = Field(0, description="Global seed; stages derive their own from it.")
    retry_failed_rows: int = Field(
        2, ge=0, description="How many more times `slim-ray run` reruns a stage that ended with failed "
        "rows (status partial) before moving on; each rerun retries only the failed rows.",
    )
    cache_dir: Optional[str] = Field(
        None, description="Where packaged GGUF models are converted to (default ~/.cache/slim_ray)."
    )
    ray: RayConfig = Field(default_factory=RayConfig)
    data: PrepareConfig = Field(default_factory=PrepareConfig)
    synth: SynthConfig = Field(default_factory=SynthConfig)
    teacher: GenerateConfig = Field(default_factory=GenerateConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    student: GenerateConfig = Field(default_factory=_student_generate_defaults)
    encode: EncodeConfig = Field(default_factory=EncodeConfig)
    rec: RecConfig = Field(default_factory=RecConfig)
    evaluate: EvalConfig = Field(default_factory=EvalConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)

    @model_validator(mode="before")
    @classmethod
    def _student_section_defaults(cls, data: Any) -> Any:
        """A partial ``student:`` section (YAML or --set) keeps the student's defaults (role
        student, model distilled, every user, no repetition penalty) instead of GenerateConfig's
        teacher defaults."""
        if isinstance(data, dict) and isinstance(data.get("student"), dict):
            student = {**STUDENT_DEFAULTS, **data["student"]}
            data = {**data, "student": student}
        return data

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.run_dir)


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and where it came from."""


def _read_yaml(path: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    path = os.path.abspath(path)
    if path in seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    base = data.pop("base", None)
    if base:
        base_path = base if os.path.isabs(base) else os.path.join(os.path.dirname(path), base)
        merged = _read_yaml(base_path, seen + (path,))
        return deep_merge(merged, data)
    return data


def deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``a.b.c=value`` override in place (value parsed as YAML: 5, true, [1,2], null)."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key.path=value")
    key, raw = assignment.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set {assignment!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node = data
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = value


def _format_validation_error(err: ValidationError, origin: str) -> str:
    lines = [f"invalid config ({origin}):"]
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"  unknown key '{loc}'")
        else:
            lines.append(f"  '{loc}': {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def load_config(path: Optional[str] = None, overrides: Iterable[str] = ()) -> PipelineConfig:
    """Defaults < YAML file < overrides. Raises ConfigError naming key and file."""
    data = _read_yaml(path) if path else {}
    overrides = list(overrides)
    for o in overrides:
        apply_override(data, o)
    origin = (path or "defaults") + (f" + --set {' '.join(overrides)}" if overrides else "")
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, origin)) from None


def dump_config(cfg: StageConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
