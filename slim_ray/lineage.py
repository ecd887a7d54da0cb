"""Lineage manifests: what each stage output was made from, and whether it is still fresh.

Next to every stage output the stage runner writes (through ``slim_ray.storage``, so a run
folder may be a local path or a URI such as ``s3://bucket/prefix``):
    config.yaml     the resolved pipeline config of the run that made it
    manifest.json   stage, status, fingerprint, inputs (path + fingerprint), code identity, the
                    stage's summary (counts, timings, node ids)

``manifest.json`` is the commit marker of a stage output: it is written last, as one whole
object. A stage output is *fresh* when its manifest says ``complete`` and its fingerprint equals
the one computed now from (stage name, the stage's config sections, input fingerprints, the hash
of the source files the stage runs). The fingerprint of an input that is itself a stage output is
that stage's fingerprint, so a change anywhere upstream -- config or code -- invalidates everything
downstream; and the files it lists (``outputs``) are still the ones it was written over, so a part
damaged or removed after the stage finished makes it stale. ``status: partial`` marks an output whose stage finished with failed rows: it is never
fresh, so the next run retries it.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import os
import subprocess
from typing import Any, Iterable, Mapping, Optional

from pyarrow.fs import FileType

from slim_ray import __version__, storage

MANIFEST = "manifest.json"
CONFIG = "config.yaml"
_SMALL_FILE = 64 * 1024 * 1024
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def code_version() -> str:
    """Package version + git commit of the source tree when available (informational)."""
    try:
        sha = subprocess.run(
            ["git", "-C", _PACKAGE_DIR, "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__


@functools.lru_cache(maxsize=None)
def source_hash(parts: tuple[str, ...]) -> str:
    """sha256 over the ``.py`` files of the given package parts (sub-packages or modules of
    ``slim_ray``, e.g. ``("generate", "prompts", "report.py")``): the code identity of a stage."""
    h = hashlib.sha256()
    for part in sorted(parts):
        path = os.path.join(_PACKAGE_DIR, part)
        files = [path] if os.path.isfile(path) else sorted(
            os.path.join(root, f) for root, _, names in os.walk(path) for f in names
            if f.endswith((".py", ".yaml", ".txt", ".jinja"))
        )
        if not files:
            raise FileNotFoundError(f"lineage: no source files under slim_ray/{part}")
        for f in files:
            h.update(os.path.relpath(f, _PACKAGE_DIR).encode())
            with open(f, "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


def read_manifest(out_dir: str) -> Optional[dict[str, Any]]:
    m = storage.read_json(storage.join(out_dir, MANIFEST))
    return m if isinstance(m, dict) else None


def fingerprint_path(path: str) -> str:
    """Identity of an input: a stage output's own fingerprint, else content (small files) or
    name+size+mtime (large files and folders)."""
    fi = storage.info(path)
    if fi.type == FileType.Directory or not storage.is_local(path):
        manifest = read_manifest(path)
        if manifest and manifest.get("status") == "complete":
            return "stage:" + manifest["fingerprint"]
    if fi.type == FileType.File:
        if (fi.size or 0) <= _SMALL_FILE:
            return "sha256:" + hashlib.sha256(storage.read_bytes(path)).hexdigest()
        return "stat:" + _sha([fi.size, fi.mtime_ns])
    listing = storage.tree_listing(path, skip=(MANIFEST, CONFIG))
    if listing:
        return "tree:" + _sha([list(x) for x in listing])
    return "missing"


def stage_fingerprint(
    stage: str,
    config_sections: Mapping[str, Any],
    inputs: Mapping[str, str],
    code: Iterable[str] = (),
) -> str:
    return _sha(
        {
            "stage": stage,
            "config": config_sections,
            "inputs": {k: fingerprint_path(v) for k, v in sorted(inputs.items())},
            "code": __version__,
            "source": source_hash(tuple(code)) if code else None,
        }
    )


def output_listing(out_dir: str) -> str:
    """Identity of what a stage output holds (names, sizes, mtimes of its files, not the manifest
    and config): a part truncated or removed after the manifest was written no longer matches.
    Internal paths (a component starting with ``_`` or ``.``: Ray Train's run storage, temp files,
    content indexes) are left out: Ray may still write there after the stage has returned."""
    return _sha([list(x) for x in storage.tree_listing(out_dir, skip=(MANIFEST, CONFIG))
                 if not any(p.startswith(("_", ".")) for p in x[0].split("/"))])


def is_fresh(out_dir: str, fingerprint: str) -> bool:
    m = read_manifest(out_dir)
    if not (m and m.get("status") == "complete" and m.get("fingerprint") == fingerprint):
        return False
    return "outputs" not in m or m["outputs"] == output_listing(out_dir)


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
    """Write config.yaml, then manifest.json (the commit marker) as one whole object."""
    manifest = {
        "stage": stage,
        "status": status,
        "fingerprint": fingerprint,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "code_version": code_version(),
        "inputs": {k: {"path": v, "fingerprint": fingerprint_path(v)} for k, v in inputs.items()},
        "summary": dict(summary),
        "outputs": output_listing(out_dir),
    }
    storage.makedirs(out_dir)
    storage.write_text(storage.join(out_dir, CONFIG), config_yaml)
    storage.write_json(storage.join(out_dir, MANIFEST), manifest)
    return manifest
