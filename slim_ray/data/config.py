"""Configs of the data stages (prepare, synth). Owned by the data stage; fields are the docs."""

from __future__ import annotations

from pydantic import Field

from slim_ray.configbase import StageConfig


class PrepareConfig(StageConfig):
    """Raw logs -> items + sequences contracts."""

    source: str = Field("movielens", description="movielens | amazon | tabular")
    dataset: str = Field("ml-100k", description="Packaged dataset name, or ignored when paths are set.")


class SynthConfig(StageConfig):
    """Synthetic Amazon-format logs at scale."""

    num_users: int = Field(1000, description="Number of users to generate.")
