"""The base class every stage config derives from.

Strict on purpose: an unknown key or a wrong type in a YAML file is an error that names the
key, never a silently ignored setting.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StageConfig(BaseModel):
    """Base for stage configs: unknown keys are rejected, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())
