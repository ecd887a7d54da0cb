"""Config of the generation stages (teach, reason)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from slim_ray.configbase import StageConfig


class GenerateConfig(StageConfig):
    role: Literal["teacher", "student"] = Field("teacher", description="Whose rationales these are.")
    model: str = Field("qwen2.5-coder-0.5b-instruct", description="Packaged model name or HF folder.")
    engine: Literal["hf", "vllm", "openai"] = Field("hf", description="Generation engine.")
    num_users: int | None = Field(200, description="Seeded sample size; None = every user.")
