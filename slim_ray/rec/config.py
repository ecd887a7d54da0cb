"""Configs of the recommender stages (train, evaluate)."""

from __future__ import annotations

from pydantic import Field

from slim_ray.configbase import StageConfig


class RecConfig(StageConfig):
    backbone: str = Field("sasrec", description="sasrec | gru4rec | srgnn")
    mode: str = Field("id", description="id | id_text | slim | text")


class EvalConfig(StageConfig):
    ks: list[int] = Field(default_factory=lambda: [5, 10, 20], description="Cut-offs K.")
