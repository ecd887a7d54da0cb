"""Prompt templates: plain text files with a version string (slim_ray/prompts/templates/*.txt).

File format::

    # comment lines
    version: teacher-cot-v1
    [system]
    ...text with {placeholders}...
    [user]
    ...text with {placeholders}...

The version goes into every ``rationale_key``, so editing a template's wording without bumping its
version is the one way to get stale rationales counted as done: bump it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import lru_cache

TEMPLATE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates")

#: Template used by each role unless the config names another one.
DEFAULT_TEMPLATE = {"teacher": "teacher_cot", "student": "student"}

_PLACEHOLDER = re.compile(r"\{(noun|category_label|history|n_shown|n_recs)\}")


@dataclass(frozen=True)
class Template:
    name: str
    version: str
    system: str
    user: str

    def render(self, **values: object) -> list[dict[str, str]]:
        """Chat messages with the known ``{placeholders}`` filled (other braces are left alone)."""

        def fill(text: str) -> str:
            return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), text)

        msgs = []
        if self.system:
            msgs.append({"role": "system", "content": fill(self.system)})
        msgs.append({"role": "user", "content": fill(self.user)})
        return msgs


def parse_template(text: str, name: str = "<string>") -> Template:
    version = None
    sections: dict[str, list[str]] = {}
    current = None
    for lineno, line in enumerate(text.splitlines(), 1):
        if current is None and (line.startswith("#") or not line.strip()):
            continue
        if current is None and line.startswith("version:"):
            version = line.split(":", 1)[1].strip()
            continue
        m = re.fullmatch(r"\[(system|user)\]\s*", line)
        if m:
            current = m.group(1)
            sections[current] = []
            continue
        if current is None:
            raise ValueError(f"template {name}, line {lineno}: expected 'version:' or a [system]/[user] header")
        sections[current].append(line)
    if not version:
        raise ValueError(f"template {name}: missing 'version: ...' line")
    if "user" not in sections:
        raise ValueError(f"template {name}: missing [user] section")
    body = {k: "\n".join(v).strip() for k, v in sections.items()}
    if "{history}" not in body["user"]:
        raise ValueError(f"template {name}: the [user] section must contain {{history}}")
    return Template(name=name, version=version, system=body.get("system", ""), user=body["user"])


@lru_cache(maxsize=None)
def load_template(name_or_path: str) -> Template:
    """A packaged template by name (``teacher_cot``, ``student``) or a template file path."""
    path = name_or_path
    if not os.path.isfile(path):
        path = os.path.join(TEMPLATE_DIR, f"{name_or_path}.txt")
    if not os.path.isfile(path):
        available = sorted(f[:-4] for f in os.listdir(TEMPLATE_DIR) if f.endswith(".txt"))
        raise FileNotFoundError(f"prompt template '{name_or_path}' not found; packaged: {available}")
    with open(path) as f:
        return parse_template(f.read(), name=os.path.basename(path).rsplit(".", 1)[0])
