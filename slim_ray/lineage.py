"""Lineage manifests: what each stage output was made from, and whether it is still fresh.

Next to every stage output the stage runner writes:
    config.yaml     the resolved pipeline config of the run that made it
    manifest.json   stage, fingerprint, inputs (path + fingerprint), code version, models,
                    the stage's summary (counts, timings), and status ("complete" only at the end)

A stage output is *fresh* when its manifest is complete and its fingerprint equals the one
computed now from (stage name, the stage's config sections, input fingerprints, code version).
The fingerprint of an input that is itself a stage output is that stage's fingerprint, so a
change anywhere upstream invalidates everything downstream.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import subprocess
from typing import Any, Mapping, Optional

from slim_ray import __version__

MANIFEST = "manifest.json"
CONFIG = "config.yaml"
_SMALL_FILE = 64 * 1024 * 1024


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def code_version() -> str:
    """Package version + git commit of the source tree when available."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(
            ["git", "-C", here, "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=5,
        ).stdout.strip()
    except Exception:
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__


def read_manifest(out_dir: str) -> Optional[dict[str, Any]]:
    try:
        with open(os.path.join(out_dir, MANIFEST)) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def fingerprint_path(path: str) -> str:
    """Identity of an input: a stage output's own fingerprint, else content (small files) or
    name+size+mtime (large files and folders)."""
    manifest = read_manifest(path) if os.path.isdir(path) else None
    if manifest and manifest.get("status") == "complete":
        return "stage:" + manifest["fingerprint"]
    if os.path.isfile(path):
        st = os.stat(path)
        if st.st_size <= _SMALL_FILE:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            return "sha256:" + h.hexdigest()
        return "stat:" + _sha([st.st_size, st.st_mtime_ns])
    if os.path.isdir(path):
        entries = []
        for root, _, files in os.walk(path):
            for name in sorted(files):
                if name in (MANIFEST, CONFIG):
                    continue
                p = os.path.join(root, name)
                st = os.stat(p)
                entries.append([os.path.relpath(p, path), st.st_size, st.st_mtime_ns])
        return "tree:" + _sha(sorted(entries))
    return "missing"


def stage_fingerprint(stage: str, config_sections: Mapping[str, Any], inputs: Mapping[str, str]) -> str:
    return _sha(
        {
            "stage": stage,
            "config": config_sections,
            "inputs": {k: fingerprint_path(v) for k, v in sorted(inputs.items())},
            "code": __version__,
        }
    )


def is_fresh(out_dir: str, fingerprint: str) -> bool:
    m = read_manifest(out_dir)
    return bool(m and m.get("status") == "complete" and m.get("fingerprint") == fingerprint)


def write_manifest(
    out_dir: str,
    *,
    stage: str,
    fingerprint: str,
    inputs: Mapping[str, str],
    config_yaml: str,
    summary: Mapping[str, Any],
    status: str = "complete",
) -> dict[str, Any]:
    os.makedirs(out_dir, exist_ok=True)
    manifest = {
        "stage": stage,
        "status": status,
        "fingerprint": fingerprint,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "code_version": code_version(),
        "inputs": {k: {"path": v, "fingerprint": fingerprint_path(v)} for k, v in inputs.items()},
        "summary": dict(summary),
    }
    with open(os.path.join(out_dir, CONFIG), "w") as f:
        f.write(config_yaml)
    tmp = os.path.join(out_dir, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2, default=str)
    os.replace(tmp, os.path.join(out_dir, MANIFEST))
    return manifest
