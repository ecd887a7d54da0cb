"""Config of the encode stage."""

from __future__ import annotations

from pydantic import Field

from slim_ray.configbase import StageConfig


class EncodeConfig(StageConfig):
    encoder: str = Field("all-minilm-l6-v2", description="Packaged encoder name or a local folder.")
