"""Ray Serve deployments of the SLIM recommendation graph.

    HTTP (FastAPI ingress) --> Reasoner (student LLM; only for users given as a raw history)
                           --> Encoder (sentence-transformer, @serve.batch)
                           --> Recommender (trained checkpoint or text matching; top-k minus history)

Each deployment is a thin shell around a plain class (``slim_ray.encode.encoder``,
``slim_ray.serve.reasoner``, ``slim_ray.serve.recommender``); autoscaling and resources come from
``ServeConfig`` when the graph is built (``slim_ray.serve.app.build_app``).

(No ``from __future__ import annotations`` here: FastAPI reads the request model from the real
annotation of ``Ingress.recommend``.)
"""

import time
from typing import Any, Optional

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field
from ray import serve


class RecommendRequest(BaseModel):
    """A known user (``user_id``) or a raw history of item ids (an unseen user)."""

    user_id: Optional[int] = Field(None, description="A user of the run: stored history and rationale vector.")
    history: Optional[list[int]] = Field(None, description="Item ids, oldest first (overrides the stored one).")
    rationale: Optional[str] = Field(None, description="A rationale text to use instead of generating one.")
    reason: Optional[bool] = Field(
        None, description="Generate a rationale with the student (default: for a raw history without "
        "user_id, when the recommender reads rationales).")
    k: Optional[int] = Field(None, ge=1, description="How many items to return.")


@serve.deployment
class EncoderDeployment:
    """Texts -> unit vectors, batched across concurrent requests."""

    def __init__(self, encoder: str, dtype: str, normalize: bool, max_seq_length: Optional[int],
                 max_batch_size: int, batch_wait_timeout_s: float):
        from slim_ray.encode.encoder import encode_texts

        self.kw = dict(encoder=encoder, dtype=dtype, normalize=normalize, max_seq_length=max_seq_length,
                       batch_size=max_batch_size)
        self.embed.set_max_batch_size(max_batch_size)
        self.embed.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.n_batches = self.n_texts = self.max_batch = 0
        encode_texts(["warm up"], **self.kw)  # load the model before the first request

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)  # the real values: set in __init__
    async def embed(self, texts: list[str]) -> list[Any]:
        from slim_ray.encode.encoder import encode_texts

        self.n_batches += 1
        self.n_texts += len(texts)
        self.max_batch = max(self.max_batch, len(texts))
        return list(encode_texts(texts, **self.kw))

    def stats(self) -> dict:
        return {"batches": self.n_batches, "texts": self.n_texts, "max_batch": self.max_batch}


@serve.deployment
class RecommenderDeployment:
    """Catalogue + scorer of one run; top-k item ids with scores, never an item of the history."""

    def __init__(self, cfg_dict: dict):
        from slim_ray.config import PipelineConfig
        from slim_ray.serve.recommender import Catalog, load_scorer

        cfg = PipelineConfig.model_validate(cfg_dict)
        self.catalog = Catalog.load(cfg.layout, cfg.serve.user_embeddings)
        self.scorer = load_scorer(cfg)

    def lookup(self, user_id: int) -> dict:
        """A known user's history and stored rationale vector (a checkpoint's own table first)."""
        stored = getattr(self.scorer, "stored_user_vector", None)
        vec = stored(user_id) if stored is not None else self.catalog.user_vectors.get(user_id)
        return {"known": user_id in self.catalog.histories,
                "history": list(self.catalog.histories.get(user_id, [])), "vector": vec}

    def uses_rationales(self) -> bool:
        return bool(getattr(self.scorer, "uses_rationales", True))

    def unknown_items(self, item_ids: list[int]) -> list[int]:
        return self.catalog.unknown_items(item_ids)

    def recommend(self, history: list[int], k: int, user_vec: Optional[Any]) -> list[dict]:
        from slim_ray.serve.recommender import top_k

        scores = self.scorer.scores(history, user_vec)
        return [{"item_id": i, "score": round(s, 6), "title": self.catalog.titles.get(i)}
                for i, s in top_k(scores, history, k)]

    def info(self) -> dict:
        meta = getattr(self.scorer, "meta", None) or {}
        return {"scorer": self.scorer.name, "items": len(self.catalog.titles),
                "users": len(self.catalog.histories), "uses_rationales": self.uses_rationales(),
                **{k: meta[k] for k in ("backbone", "variant", "seed", "best_valid_ndcg@10") if k in meta}}


@serve.deployment
class ReasonerDeployment:
    """The distilled student writing a rationale for a raw history (slim_ray.serve.reasoner)."""

    def __init__(self, cfg_dict: dict, threads: int):
        from slim_ray.config import PipelineConfig
        from slim_ray.serve.reasoner import Reasoner

        self.reasoner = Reasoner(PipelineConfig.model_validate(cfg_dict), threads=threads)

    def model(self) -> str:
        return self.reasoner.model_id

    def reason(self, item_ids: list[int]) -> dict:
        return self.reasoner.reason(item_ids)


api = FastAPI(title="slim_ray recommendations",
              description="SLIM: student rationale -> text encoder -> recommender")


@serve.deployment
@serve.ingress(api)
class Ingress:
    def __init__(self, recommender, encoder, reasoner, settings: dict):
        self.recommender = recommender
        self.encoder = encoder
        self.reasoner = reasoner
        self.settings = settings

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"ok": True}

    @api.get("/info")
    async def info(self) -> dict:
        reasoner = None if self.reasoner is None else await self.reasoner.model.remote()
        return {**(await self.recommender.info.remote()), "reasoner_model": reasoner,
                "encoder": self.settings["encoder"]}

    @api.post("/recommend")
    async def recommend(self, req: RecommendRequest) -> dict:
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        k = req.k or self.settings["default_k"]
        if k > self.settings["max_k"]:
            raise HTTPException(400, f"k={k} is above serve.max_k={self.settings['max_k']}")
        user_vec, history, path, rationale, known_user = None, None, "history", None, False
        if req.user_id is not None:
            known = await self.recommender.lookup.remote(req.user_id)
            if not known["known"] and req.history is None:
                raise HTTPException(404, f"unknown user_id {req.user_id}; send its history instead")
            history, known_user = known["history"], known["known"]
            if known["vector"] is not None and req.history is None and not req.rationale and not req.reason:
                user_vec, path = known["vector"], "stored-rationale"
        if req.history is not None:
            history = req.history
        if not history:
            raise HTTPException(400, "give a user_id of the run or a non-empty history of item ids")
        unknown = await self.recommender.unknown_items.remote(history)
        if unknown:
            raise HTTPException(400, f"history: unknown item ids {unknown[:10]}")

        if user_vec is None:
            # By default only users given as a raw history get a fresh student rationale, and only
            # when the recommender reads rationales at all (id / id_text checkpoints do not).
            want_reason = req.reason if req.reason is not None else not (known_user or req.rationale)
            if req.reason is None and want_reason:
                want_reason = await self.recommender.uses_rationales.remote()
            if req.rationale:
                rationale, path = req.rationale, "given-rationale"
            elif want_reason and self.reasoner is not None:
                t = time.perf_counter()
                out = await self.reasoner.reason.remote(history)
                rationale, path = out["text"], "student-rationale"
                timings["reason_ms"] = round(1000 * (time.perf_counter() - t), 1)
            elif req.reason:
                raise HTTPException(400, "reason=true but this deployment has no reasoner (serve.reasoner)")
            if rationale:
                t = time.perf_counter()
                user_vec = await self.encoder.embed.remote(rationale)
                timings["encode_ms"] = round(1000 * (time.perf_counter() - t), 1)

        t = time.perf_counter()
        try:
            items = await self.recommender.recommend.remote(history, k, user_vec)
        except ValueError as e:  # e.g. a rationale vector of the wrong width; Ray keeps the type
            raise HTTPException(400, str(e).strip().splitlines()[-1]) from None
        timings["recommend_ms"] = round(1000 * (time.perf_counter() - t), 1)
        timings["total_ms"] = round(1000 * (time.perf_counter() - t0), 1)
        return {"user_id": req.user_id, "path": path, "history_len": len(history),
                "rationale": rationale, "items": items, "timings_ms": timings}
