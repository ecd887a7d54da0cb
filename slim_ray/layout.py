"""Where every stage reads and writes inside one run folder.

All stages talk only through these paths, so a run folder is self-describing:

    <run_dir>/prepared/items/            items contract (Parquet dataset)
    <run_dir>/prepared/sequences/        sequences contract (Parquet dataset)
    <run_dir>/rationales/teacher/        rationales contract, role=teacher
    <run_dir>/rationales/student/        rationales contract, role=student
    <run_dir>/rationales/<role>-full/    the evaluation-time set from the whole training prefix
    <run_dir>/distill/                   Ray Train storage, adapter/, merged/, eval
    <run_dir>/embeddings/items/          embeddings contract, kind=item
    <run_dir>/embeddings/teacher/        embeddings contract, kind=user (teacher rationales)
    <run_dir>/embeddings/student/        embeddings contract, kind=user (student rationales)
    <run_dir>/rec/<backbone>-<mode>-s<seed>/   recommender checkpoints + metrics
    <run_dir>/eval/                      candidates, metrics.json
    <run_dir>/report/                    report.md + plots

Each stage output folder also holds ``config.yaml`` (the resolved config) and
``manifest.json`` (lineage), written by ``slim_ray.lineage``.
"""

from __future__ import annotations

from dataclasses import dataclass

from slim_ray import storage

#: Folder suffix of a role's second, evaluation-time rationale set (generation
#: ``eval_rationale=full_prefix``): ``rationales/student-full/``, ``embeddings/student-full/``.
FULL_PREFIX_SUFFIX = "-full"


def full_prefix_set(role: str) -> str:
    """``"student"`` -> ``"student-full"``: the folder name of that role's evaluation-time set."""
    return role + FULL_PREFIX_SUFFIX


@dataclass(frozen=True)
class RunLayout:
    root: str  # a local path or a storage URI (s3://bucket/prefix, ...), see slim_ray.storage

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", storage.normalize(self.root))

    def _p(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    @property
    def prepared(self) -> str:
        return self._p("prepared")

    @property
    def items(self) -> str:
        return self._p("prepared", "items")

    @property
    def sequences(self) -> str:
        return self._p("prepared", "sequences")

    def rationales(self, role: str) -> str:
        return self._p("rationales", role)

    @property
    def distill(self) -> str:
        return self._p("distill")

    @property
    def student_adapter(self) -> str:
        return self._p("distill", "adapter")

    @property
    def student_merged(self) -> str:
        return self._p("distill", "merged")

    @property
    def embeddings(self) -> str:
        return self._p("embeddings")

    @property
    def logs(self) -> str:
        return self._p("logs")

    @property
    def item_embeddings(self) -> str:
        return self._p("embeddings", "items")

    def user_embeddings(self, role: str) -> str:
        return self._p("embeddings", role)

    @property
    def rec(self) -> str:
        return self._p("rec")

    def rec_run(self, backbone: str, mode: str, seed: int, rationale_role: str | None = None,
                protocol: str | None = None) -> str:
        """``rec/<backbone>-<mode>[-<role>][-leaky]-s<seed>``: the consistent protocol (the default)
        keeps the plain name, so runs of both protocols can share one ``rec/`` folder."""
        tag = (f"{backbone}-{mode}" + (f"-{rationale_role}" if rationale_role else "")
               + ("-leaky" if rationale_role and protocol == "leaky" else "") + f"-s{seed}")
        return self._p("rec", tag)

    @property
    def eval(self) -> str:
        return self._p("eval")

    @property
    def report(self) -> str:
        return self._p("report")
