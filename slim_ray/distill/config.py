"""Config of the distillation stage."""

from __future__ import annotations

from pydantic import Field

from slim_ray.configbase import StageConfig


class DistillConfig(StageConfig):
    base_model: str = Field("smollm2-135m-instruct", description="Student base model.")
