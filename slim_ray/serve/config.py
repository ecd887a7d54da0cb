"""Config of the serving stage."""

from __future__ import annotations

from pydantic import Field

from slim_ray.configbase import StageConfig


class ServeConfig(StageConfig):
    host: str = Field("127.0.0.1", description="HTTP host; loopback by default.")
    port: int = Field(8000, description="HTTP port.")
