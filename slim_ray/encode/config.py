"""Config of the encode stage: one text encoder for item descriptions and user rationales."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from slim_ray.configbase import StageConfig


class EncodeConfig(StageConfig):
    """Sentence-transformer embeddings of item texts and user rationales (Ray Data actor pool)."""

    encoder: str = Field(
        "all-minilm-l6-v2",
        description="Packaged encoder name (all-minilm-l6-v2) or a local sentence-transformers folder.",
    )
    batch_size: int = Field(64, ge=1, description="Texts per encoder forward pass (and per Ray Data batch).")
    num_actors: int = Field(
        1, ge=1, description="Size of the Ray Data actor pool; each actor holds one encoder copy."
    )
    actor_start_timeout_s: float = Field(
        600.0, gt=0, description="How long encoding waits for every encoder actor to load its model "
        "before it starts (so the work spreads over the whole pool); a pool the cluster cannot place "
        "in this time fails the stage with Ray Data's 'Timed out while starting actors'.",
    )
    num_cpus_per_actor: float = Field(1.0, gt=0, description="CPUs reserved per encoder actor.")
    num_gpus_per_actor: Optional[float] = Field(
        None,
        ge=0,
        description="GPUs per encoder actor. None: 1 when the Ray cluster has GPUs, else 0.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Torch device inside an actor; auto = cuda when visible, else cpu."
    )
    dtype: Literal["float32", "bfloat16"] = Field(
        "bfloat16",
        description="Encoder weights' precision. bfloat16 is 2-3x faster on CPUs with bf16 support "
        "(cosine to the float32 vector >= 0.999 on MovieLens-100K); output vectors are float32 either way.",
    )
    normalize: bool = Field(
        True,
        description="L2-normalise every vector (dot product = cosine). all-MiniLM-L6-v2 already ends "
        "in a Normalize module; this makes the property hold for any encoder.",
    )
    max_seq_length: Optional[int] = Field(
        None, ge=8, description="Truncate inputs to this many tokens (None: the encoder's own, 256 for MiniLM)."
    )
    roles: list[Literal["teacher", "student", "teacher-full", "student-full"]] = Field(
        default_factory=lambda: ["teacher", "student"],
        description="Whose rationales to embed as user vectors (a missing rationales folder is skipped). "
        "<role>-full: the evaluation-time set written from the whole training prefix "
        "(generation eval_rationale=full_prefix; its whole text only), read by evaluate.rationales.",
    )
    rationale_parts: list[Literal["text", "step1", "step2", "step3"]] = Field(
        default_factory=lambda: ["text"],
        description="What of each rationale to embed: text (the whole answer, embeddings/<role>/) and, "
        "for the per-step ablation, step1 / step2 / step3 (only that step, embeddings/<role>-<step>/, "
        "read by the rec variants slim:<role>-<step>; users whose answer lacks the step get none).",
    )
    forward_passes_per_batch: int = Field(
        16, ge=1, description="Forward passes per Ray Data batch sent to an encoder actor; the "
        "encoder sorts a batch by text length, so a larger batch means less padding.",
    )
    rows_per_file: int = Field(
        50_000, ge=1, description="Target rows per Parquet part (about 75 MiB of 384-d float32 "
        "vectors); parts are written by Ray Data tasks as results stream in.",
    )
