"""Configs of the recommender stages (``train``, ``evaluate``). Field descriptions are the docs.

Merge order of a run's hyper-parameters (later wins):
``slim_ray/rec/defaults/<backbone>.yaml`` < the explicit fields below (when not None) <
``rec.params`` (any key of the backbone YAML). The YAML files stay data; the merged result is
validated by the backbone's pydantic model (``SASRecParams``, ``GRU4RecParams``, ``SRGNNParams``)
when the config is loaded, so a misspelt key or a wrong type fails before any run starts, naming
the key.
"""

from __future__ import annotations

import copy
import functools
import os
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from slim_ray.configbase import StageConfig
from slim_ray.layout import full_prefix_set

BACKBONES = ("sasrec", "gru4rec", "srgnn")
# Spelling of the variants: "<mode>" or "<mode>:<rationale role>".
#   id            the backbone alone
#   id_text       "backbone+": item text fused with the item ID embedding
#   slim:teacher  SLIM-minus: ID fusion with the TEACHER's rationales (no distillation)
#   slim:student  SLIM: ID fusion with the distilled STUDENT's rationales   ("slim" = "slim:student")
#   text:student  ID-agnostic text matching (no ID embeddings anywhere)    ("text" = "text:student")
#   text:teacher  the same with teacher rationales
#   slim:teacher-step1   (and step2, step3) the per-step ablation: only Step k of each rationale is
#                 embedded (encode.rationale_parts), users whose answer lacks Step k fall back
MODES = ("id", "id_text", "slim", "text")
ROLES = ("teacher", "student")
#: Rationale parts the encode stage can embed on their own (the per-step ablation).
STEP_PARTS = ("step1", "step2", "step3")


def base_role(role: str) -> str:
    """``"teacher-step1"`` -> ``"teacher"`` (whose rationales folder holds the cut)."""
    return role.split("-", 1)[0]


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
    who, _, part = role.partition("-")
    if who not in ROLES or (part and part not in STEP_PARTS):
        raise ValueError(f"rec mode {spec!r}: rationale role must be teacher or student, optionally with "
                         f"one step of the answer ({', '.join('-' + p for p in STEP_PARTS)})")
    return mode, role


def variant_name(mode: str, role: Optional[str], protocol: Optional[str] = None) -> str:
    """``slim:student``; a run under the leaky protocol is ``slim:student@leaky`` so both protocols'
    runs can sit in one ``rec/`` folder and be compared by one evaluation."""
    name = mode if role is None else f"{mode}:{role}"
    return f"{name}@{protocol}" if role is not None and protocol == "leaky" else name


#: Variant suffix of a consistent-protocol run scored with the rationale written from the whole
#: training prefix (evaluate.rationales: full_prefix), e.g. ``slim:student+full``.
FULL_PREFIX_VARIANT = "+full"


def split_variant_name(name: str) -> tuple[str, str, str, bool]:
    """The inverse of ``variant_name`` (plus the ``+full`` reading), for reports:
    ``slim:student-step1@leaky`` -> (``slim:student``, ``step1``, ``leaky``, False);
    ``slim:student+full`` -> (``slim:student``, ``""``, ``""``, True)."""
    full = name.endswith(FULL_PREFIX_VARIANT)
    base, _, protocol = name.removesuffix(FULL_PREFIX_VARIANT).partition("@")
    base, _, part = base.partition("-")
    return base, part, protocol, full


def full_prefix_role(role: str) -> str:
    """``"student-step1"`` or ``"student"`` -> ``"student-full"``: the folder of that role's second set."""
    return full_prefix_set(base_role(role))


# --------------------------------------------------------------------------- backbone hyper-parameters

DEFAULTS_DIR = os.path.join(os.path.dirname(__file__), "defaults")
# rec.* fields that override the backbone YAML when set
EXPLICIT = ("epochs", "patience", "loss", "num_negatives", "sampled_negatives", "batch_size", "lr", "max_len",
            "hidden")
# Training losses. "softmax" is the older spelling of "full_softmax" (checkpoints written before
# the sampled softmax existed carry it); "auto" picks one of the two softmaxes (see choose_loss).
LOSSES = ("auto", "full_softmax", "sampled_softmax", "bce", "softmax")
SAMPLERS = ("uniform", "popularity")
# Sampled-softmax settings when their rec.params key is absent.
SAMPLED_NEGATIVES = 1024
FULL_SOFTMAX_MAX_BYTES = 2 * 1024**3  # 2 GiB of float32 logits per global batch
# rec.params keys every backbone accepts without a YAML default (absent: the behaviour named here)
OPTIONAL_PARAMS = {
    "prefixes_per_user": "with train_on=prefixes: every prefix of every user",
    "linear_init_std": "PyTorch's default initialisation of every linear and attention layer",
    "sampled_negatives": f"{SAMPLED_NEGATIVES} negatives shared by each batch (loss=sampled_softmax)",
    "sampled_distribution": "uniform: negatives drawn uniformly over the catalog (loss=sampled_softmax)",
    "full_softmax_max_bytes": f"{FULL_SOFTMAX_MAX_BYTES} (2 GiB): loss=auto's threshold on one batch's logits",
    "window_stride": "max_len: train_on=all_positions cuts each history into windows that do not overlap "
                     "(so does any stride of max_len or more)",
    "lr_plateau_factor": "a constant learning rate (set: multiply it by this after lr_plateau_patience "
                         "validations without a better valid NDCG@10)",
    "lr_plateau_patience": "2 (with lr_plateau_factor)",
    "window_jitter": "windows end at the same places every epoch (set true: each epoch shifts every user's window "
                     "ends by a new random amount below window_stride, so a target is read in another context)",
    "ema_decay": "validation and the published model use the trained weights themselves (set: an exponential "
                 "moving average of the weights, this decay per step after a warm-up)",
}
TRAIN_ON = ("all_positions", "prefixes")


def _not_bool(v: Any) -> Any:
    if isinstance(v, bool):  # a float field would take True as 1.0
        raise ValueError("expected a number, got a boolean")
    return v


# Counts are strict (64.0, "64" and true are refused); reals take ints and YAML's "1e-3" strings.
Count = Annotated[int, Field(strict=True, ge=1)]
Real = Annotated[float, BeforeValidator(_not_bool)]


class BackboneParams(BaseModel):
    """The keys every backbone's hyper-parameters have (values come from its YAML, no defaults here)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hidden: Annotated[Count, Field(ge=4)]
    dropout: Annotated[Real, Field(ge=0.0, lt=1.0)]
    max_len: Annotated[Count, Field(ge=2)]
    loss: Literal["auto", "full_softmax", "sampled_softmax", "bce", "softmax"]
    num_negatives: Count
    lr: Annotated[Real, Field(gt=0.0)]
    weight_decay: Annotated[Real, Field(ge=0.0)]
    batch_size: Count
    epochs: Count
    patience: Count
    train_on: Literal["all_positions", "prefixes"]
    prefixes_per_user: Optional[Count] = None
    linear_init_std: Optional[Annotated[Real, Field(gt=0.0)]] = None
    sampled_negatives: Optional[Count] = None
    sampled_distribution: Optional[Literal["uniform", "popularity"]] = None
    full_softmax_max_bytes: Optional[Count] = None
    window_stride: Optional[Count] = None  # at least max_len: windows that do not overlap
    lr_plateau_factor: Optional[Annotated[Real, Field(gt=0.0, lt=1.0)]] = None
    lr_plateau_patience: Optional[Count] = None
    ema_decay: Optional[Annotated[Real, Field(gt=0.0, lt=1.0)]] = None
    window_jitter: Optional[bool] = None


class SASRecParams(BackboneParams):
    num_layers: Count
    num_heads: Count
    inner: Count

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> "SASRecParams":
        if self.hidden % self.num_heads:
            raise ValueError(f"hidden={self.hidden} is not divisible by num_heads={self.num_heads}")
        return self


class GRU4RecParams(BackboneParams):
    gru_hidden: Count
    num_layers: Count


class SRGNNParams(BackboneParams):
    step: Count


BACKBONE_PARAMS: dict[str, type[BackboneParams]] = {
    "sasrec": SASRecParams, "gru4rec": GRU4RecParams, "srgnn": SRGNNParams,
}


@functools.lru_cache(maxsize=None)
def _read_defaults(backbone: str) -> dict[str, Any]:
    import yaml

    with open(os.path.join(DEFAULTS_DIR, f"{backbone}.yaml")) as f:
        return yaml.safe_load(f)


def backbone_defaults(backbone: str) -> dict[str, Any]:
    """The packaged YAML of a backbone (part of the code, not run data); a fresh copy."""
    return copy.deepcopy(_read_defaults(backbone))


def validate_hparams(backbone: str, hp: dict[str, Any], source=None) -> BackboneParams:
    """``hp`` checked by the backbone's model. Raises ValueError naming the key: ``source(key)``
    says where a key came from (default ``rec.params.<key>``)."""
    model = BACKBONE_PARAMS[backbone]
    where = source or (lambda k: f"rec.params.{k}")
    unknown = sorted(set(hp) - set(model.model_fields))
    if unknown:
        raise ValueError(f"rec.params: unknown key(s) {unknown} for backbone {backbone} "
                         f"(known: {', '.join(sorted(model.model_fields))})")
    try:
        return model.model_validate(hp)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            msg = err["msg"].removeprefix("Value error, ")
            if err["loc"]:
                key = str(err["loc"][0])
                problems.append(f"{where(key)}={hp.get(key)!r} for backbone {backbone}: {msg}")
            else:
                problems.append(f"rec.params for backbone {backbone}: {msg}")
        raise ValueError("; ".join(problems)) from None


def resolve_hparams(rc: "RecConfig", backbone: str) -> dict[str, Any]:
    """Backbone YAML < explicit rec.* fields < rec.params, validated by the backbone's model.
    Returns the merged values as given (what run fingerprints hash), not the model's dump."""
    hp = backbone_defaults(backbone)
    origin = {k: f"slim_ray/rec/defaults/{backbone}.yaml: {k}" for k in hp}
    for k in EXPLICIT:
        v = getattr(rc, k)
        if v is not None:
            hp[k], origin[k] = v, f"rec.{k}"
    hp.update(rc.params)
    origin.update({k: f"rec.params.{k}" for k in rc.params})
    validate_hparams(backbone, hp, lambda k: origin.get(k, f"rec.params.{k}"))
    return hp


def full_softmax_logit_bytes(hp: dict[str, Any], n_items: int) -> int:
    """Bytes of one global batch's float32 logits under the full softmax: batch_size x positions x
    (n_items + 1), where positions = max_len when every position predicts (train_on=all_positions)
    and 1 when only the last one does (train_on=prefixes, SR-GNN). The +1 is the padding column."""
    positions = int(hp["max_len"]) if hp["train_on"] == "all_positions" else 1
    return int(hp["batch_size"]) * positions * (int(n_items) + 1) * 4


def choose_loss(hp: dict[str, Any], n_items: int) -> str:
    """The loss a run trains with: ``full_softmax``, ``sampled_softmax`` or ``bce``.

    ``auto`` keeps the full softmax while one batch's logits (``full_softmax_logit_bytes``) stay
    within ``full_softmax_max_bytes`` (default 2 GiB) and switches to the sampled softmax above it:
    the logits, their softmax and their gradient all live at once, so a 2 GiB batch already needs
    about 6 GiB on the worker, and the catalog sets that size, not the model.
    """
    loss = hp["loss"]
    if loss == "softmax":
        return "full_softmax"
    if loss != "auto":
        return loss
    limit = hp.get("full_softmax_max_bytes") or FULL_SOFTMAX_MAX_BYTES
    return "full_softmax" if full_softmax_logit_bytes(hp, n_items) <= int(limit) else "sampled_softmax"


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
    loss: Optional[Literal["auto", "full_softmax", "sampled_softmax", "bce", "softmax"]] = Field(
        None,
        description="auto: full_softmax while one batch's logits (batch_size x max_len x n_items x 4 bytes) "
        "fit in rec.params.full_softmax_max_bytes (default 2 GiB), sampled_softmax above; full_softmax "
        "(or softmax): cross-entropy over all items; sampled_softmax: cross-entropy of each target "
        "against `sampled_negatives` negatives shared by the batch, logQ-corrected; bce: binary "
        "cross-entropy of each target against `num_negatives` uniform negatives (the paper). "
        "None: the backbone YAML's (auto).",
    )
    num_negatives: Optional[int] = Field(None, ge=1, description="Negatives per target for loss=bce.")
    sampled_negatives: Optional[int] = Field(
        None, ge=1,
        description="Negatives shared by each batch for loss=sampled_softmax (None: 1024; the whole "
        "catalog when it has fewer items). rec.params.sampled_distribution picks uniform (default) "
        "or popularity-proportional draws.",
    )
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
    rationale_protocol: Union[Literal["consistent", "leaky"], list[Literal["consistent", "leaky"]]] = Field(
        "consistent",
        description="slim/text modes: which training positions fuse a user's rationale. consistent: only "
        "targets at positions >= the rationale's cut c (its prefix_len, read from rationales/<role>/), "
        "earlier positions fuse a learned 'no rationale' vector, so the rationale never informs a target "
        "it has read (as at test time). leaky: every position fuses it, including targets the rationale "
        "was written from (the first implementation; kept for comparison). A list trains every "
        "rationale variant under each (leaky runs are named <variant>@leaky). See docs/rec.md.",
    )
    num_workers: int = Field(1, ge=1, description="Ray Train workers (DDP; gloo on CPU, nccl on GPU).")
    use_gpu: Optional[bool] = Field(None, description="None: use a GPU per worker when the cluster has GPUs.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per Ray Train worker.")
    torch_threads: Optional[int] = Field(
        None, ge=1, description="torch intra-op threads per worker (None: cpus_per_worker rounded)."
    )
    max_users: Optional[int] = Field(
        None, ge=1, description="Use only the first N users (smoke runs; rec.ingest=memory). None: all."
    )
    ingest: Literal["auto", "memory", "dataset"] = Field(
        "auto",
        description="How users reach the Ray Train workers. memory: every worker reads all sequences and "
        "rationale vectors (one global batch order: 1 and N workers take the same steps). dataset: a Ray "
        "Dataset of user rows over the run's memory-mapped user state, split across workers "
        "(ray.train.get_dataset_shard); no worker holds every user. auto: dataset above "
        "rec.ingest_min_users users. See docs/rec.md, 'Training at scale'.",
    )
    ingest_min_users: int = Field(200_000, ge=0, description="rec.ingest=auto: users above which dataset ingest is used.")
    max_steps: Optional[int] = Field(
        None, ge=1,
        description="Stop each run after this many optimizer steps (then validate and publish), e.g. to "
        "time a fixed amount of training. None: rec.epochs and early stopping decide.",
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

    @model_validator(mode="after")
    def _check_hparams(self) -> "RecConfig":
        """Every swept backbone's merged hyper-parameters are valid (fails at load, naming the key)."""
        for b in self.backbones:
            resolve_hparams(self, b)
        return self

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

    def runs(self) -> list[tuple[str, str, Optional[str], int, Optional[str]]]:
        """(backbone, mode, rationale role, seed, protocol) of every run of the sweep; a variant
        without rationales runs once (protocol None), a rationale variant once per protocol."""
        return [(b, m, r, s, p) for b in self.backbones for (m, r) in self.variants
                for p in (self.protocols if r else [None]) for s in self.seed_list]

    @property
    def protocols(self) -> list[str]:
        """The rationale protocols swept, duplicates removed (id / id_text runs have none)."""
        return list(dict.fromkeys(_as_list(self.rationale_protocol)))

    @property
    def seed_list(self) -> list[int]:
        return [int(s) for s in _as_list(self.seeds)]


class EvalConfig(StageConfig):
    """Leave-one-out test metrics of every trained run: sampled-100 and full ranking."""

    ks: list[int] = Field(default_factory=lambda: [5, 10, 20], description="Cut-offs K of HR/NDCG/MRR@K.")
    num_negatives: int = Field(
        100, ge=1,
        description="Sampled protocol: negatives per user, uniformly drawn from items NOT in the user's "
        "whole sequence, drawn per user from (seed, user_id) and stored in the eval/candidates/ dataset.",
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
    rationales: list[Literal["cut", "full_prefix"]] = Field(
        default_factory=lambda: ["cut"],
        description="Which rationale a consistent-protocol rationale run reads at evaluation. cut: the "
        "one it was trained with. full_prefix: the second rationale written from the whole training "
        "prefix (embeddings/<role>-full/, generation eval_rationale=full_prefix); the same trained "
        "model is scored again as variant <variant>+full. Both: one evaluation, paired tests for both.",
    )
    batch_users: int = Field(1024, ge=1, description="Users scored per batched matmul.")
