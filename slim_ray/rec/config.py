"""Configs of the recommender stages (``train``, ``evaluate``). Field descriptions are the docs.

Merge order of a run's hyper-parameters (later wins):
``slim_ray/rec/defaults/<backbone>.yaml`` < the explicit fields below (when not None) <
``rec.params`` (any key of the backbone YAML).
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import Field, field_validator

from slim_ray.configbase import StageConfig

BACKBONES = ("sasrec", "gru4rec", "srgnn")
# Spelling of the variants: "<mode>" or "<mode>:<rationale role>".
#   id            the backbone alone
#   id_text       "backbone+": item text fused with the item ID embedding
#   slim:teacher  SLIM-minus: ID fusion with the TEACHER's rationales (no distillation)
#   slim:student  SLIM: ID fusion with the distilled STUDENT's rationales   ("slim" = "slim:student")
#   text:student  ID-agnostic text matching (no ID embeddings anywhere)    ("text" = "text:student")
#   text:teacher  the same with teacher rationales
MODES = ("id", "id_text", "slim", "text")
ROLES = ("teacher", "student")


def parse_variant(spec: str) -> tuple[str, Optional[str]]:
    """``"slim:teacher"`` -> ``("slim", "teacher")``; ``"slim"`` -> ``("slim", "student")``;
    ``"id"`` -> ``("id", None)``. Raises ValueError naming the bad spelling."""
    mode, _, role = spec.strip().partition(":")
    if mode not in MODES:
        raise ValueError(f"unknown rec mode {spec!r}: expected one of {', '.join(MODES)} "
                         "(slim and text take an optional ':teacher' or ':student')")
    if mode in ("id", "id_text"):
        if role:
            raise ValueError(f"rec mode {spec!r}: {mode} uses no rationales, drop ':{role}'")
        return mode, None
    role = role or "student"
    if role not in ROLES:
        raise ValueError(f"rec mode {spec!r}: rationale role must be teacher or student")
    return mode, role


def variant_name(mode: str, role: Optional[str]) -> str:
    return mode if role is None else f"{mode}:{role}"


def _as_list(v: Any) -> list:
    if isinstance(v, (str, int)):
        return [v]
    return list(v)


class RecConfig(StageConfig):
    """Sequential recommenders (SASRec, GRU4Rec, SRGNN) x modes x seeds, trained on Ray Train."""

    backbone: Union[str, list[str]] = Field(
        "sasrec",
        description="Backbone, or a list of backbones to sweep: sasrec | gru4rec | srgnn. "
        "Their defaults live in slim_ray/rec/defaults/<backbone>.yaml.",
    )
    mode: Union[str, list[str]] = Field(
        "id",
        description="Variant, or a list to sweep: id | id_text | slim:teacher (SLIM-minus) | "
        "slim:student (SLIM; 'slim' alone means this) | text:student (ID-agnostic; 'text' alone "
        "means this) | text:teacher.",
    )
    seeds: Union[int, list[int]] = Field(
        default_factory=lambda: [0],
        description="Seeds to sweep; each (backbone, mode, seed) is one run in rec/<backbone>-<mode>[-<role>]-s<seed>/.",
    )
    epochs: Optional[int] = Field(None, ge=1, description="Max epochs (None: the backbone YAML's).")
    patience: Optional[int] = Field(
        None, ge=1,
        description="Early stopping: stop after this many validations without a better valid NDCG@10 "
        "(full ranking); the best epoch's weights are kept. None: the backbone YAML's.",
    )
    eval_every: int = Field(1, ge=1, description="Validate every this many epochs.")
    loss: Optional[Literal["bce", "softmax"]] = Field(
        None,
        description="bce: binary cross-entropy of each target against `num_negatives` uniformly sampled "
        "negatives (the paper); softmax: cross-entropy over all items. None: the backbone YAML's.",
    )
    num_negatives: Optional[int] = Field(None, ge=1, description="Negatives per target for loss=bce.")
    batch_size: Optional[int] = Field(None, ge=1, description="Training sequences per step (global, split over workers).")
    lr: Optional[float] = Field(None, gt=0, description="Adam learning rate.")
    max_len: Optional[int] = Field(None, ge=2, description="Longest history the backbone reads (most recent items).")
    hidden: Optional[int] = Field(None, ge=4, description="ID / model dimension d.")
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="Any other key of the backbone YAML, e.g. {dropout: 0.5, num_layers: 1}. Unknown keys are an error.",
    )
    missing_rationale: Literal["error", "learned", "zeros"] = Field(
        "error",
        description="slim/text modes when a user has no rationale vector: error (names how many and the "
        "first ids), learned (one trained 'no rationale' vector), zeros (a zero text vector). "
        "Fallback users are counted in the run's meta.json and in metrics.json.",
    )
    rationale_protocol: Literal["consistent", "leaky"] = Field(
        "consistent",
        description="slim/text modes: which training positions fuse a user's rationale. consistent: only "
        "targets at positions >= the rationale's cut c (its prefix_len, read from rationales/<role>/), "
        "earlier positions fuse a learned 'no rationale' vector, so the rationale never informs a target "
        "it has read (as at test time). leaky: every position fuses it, including targets the rationale "
        "was written from (the first implementation; kept for comparison). See docs/rec.md.",
    )
    num_workers: int = Field(1, ge=1, description="Ray Train workers (DDP; gloo on CPU, nccl on GPU).")
    use_gpu: Optional[bool] = Field(None, description="None: use a GPU per worker when the cluster has GPUs.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per Ray Train worker.")
    torch_threads: Optional[int] = Field(
        None, ge=1, description="torch intra-op threads per worker (None: cpus_per_worker rounded)."
    )
    max_users: Optional[int] = Field(
        None, ge=1, description="Use only the first N users (smoke runs). None: all."
    )
    force: bool = Field(False, description="Retrain runs even when a finished run with the same settings exists.")

    @field_validator("backbone")
    @classmethod
    def _check_backbone(cls, v):
        for b in _as_list(v):
            if b not in BACKBONES:
                raise ValueError(f"unknown backbone {b!r}: expected one of {', '.join(BACKBONES)}")
        return v

    @field_validator("mode")
    @classmethod
    def _check_mode(cls, v):
        for m in _as_list(v):
            parse_variant(m)
        return v

    @property
    def backbones(self) -> list[str]:
        return _as_list(self.backbone)

    @property
    def variants(self) -> list[tuple[str, Optional[str]]]:
        """[(mode, rationale_role)] in the order given, duplicates removed."""
        out: list[tuple[str, Optional[str]]] = []
        for m in _as_list(self.mode):
            v = parse_variant(m)
            if v not in out:
                out.append(v)
        return out

    @property
    def seed_list(self) -> list[int]:
        return [int(s) for s in _as_list(self.seeds)]


class EvalConfig(StageConfig):
    """Leave-one-out test metrics of every trained run: sampled-100 and full ranking."""

    ks: list[int] = Field(default_factory=lambda: [5, 10, 20], description="Cut-offs K of HR/NDCG/MRR@K.")
    num_negatives: int = Field(
        100, ge=1,
        description="Sampled protocol: negatives per user, uniformly drawn from items NOT in the user's "
        "whole sequence, drawn once (seeded) and stored in eval/candidates.parquet.",
    )
    candidates_seed: int = Field(2024, description="Seed of the stored sampled candidates.")
    protocols: list[Literal["sampled", "full"]] = Field(
        default_factory=lambda: ["sampled", "full"],
        description="sampled: target vs the stored negatives (paper); full: target vs every item not in "
        "the user's history (unbiased).",
    )
    significance_metric: str = Field(
        "ndcg@10", description="Per-user metric of the paired significance test (full ranking and sampled)."
    )
    batch_users: int = Field(1024, ge=1, description="Users scored per batched matmul.")
