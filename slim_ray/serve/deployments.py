"""Ray Serve deployments of the SLIM recommendation graph.

    HTTP (FastAPI ingress) --> Recommender (@serve.batch; a known user: ONE call, done)
                           --> Reasoner (student LLM, @serve.batch; raw histories) --> Encoder
                               (sentence-transformer, @serve.batch) --> Recommender

Each deployment is a thin shell around a plain class (``slim_ray.encode.encoder``,
``slim_ray.serve.reasoner``, ``slim_ray.serve.recommender.Recommender``); autoscaling and
resources come from ``ServeConfig`` when the graph is built (``slim_ray.serve.app.build_app``).

Request data is parsed as JSON only (never unpickled), bounded (body size, history length,
rationale length, k) and validated by ``RecommendRequest`` before any downstream call; every
client error is a 4xx whose message names the field. A downstream replica that dies or times out
gives 503 with Retry-After. The recommender's model can be swapped while serving through its
``user_config`` (``reconfigure``; ``slim_ray.serve.app.swap``).

(No ``from __future__ import annotations`` here: FastAPI reads the models from real annotations.)
"""

import asyncio
import hashlib
import hmac
import json
import logging
import math
import time
from typing import Any, Literal, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve

from slim_ray._ray_compat import pin_replica_grpc_to_loopback

logger = logging.getLogger("ray.serve")


MAX_INT = 2**63 - 1  # ids are int64 in every contract

# ----------------------------------------------------------------------------- API models


class RecommendRequest(BaseModel):
    """A known user (``user_id``) or a raw history of item ids (an unseen user). Strict types: a
    string is not a number, a float is not an id; unknown fields are rejected."""

    model_config = ConfigDict(strict=True, extra="forbid")

    user_id: Optional[int] = Field(None, ge=0, le=MAX_INT, description="A user of the run: its stored history and rationale.")
    history: Optional[list[int]] = Field(
        None, description="Item ids, oldest first: an unseen user (or overrides the stored history). "
        "At most serve.max_history ids.")
    k: Optional[int] = Field(None, ge=1, le=MAX_INT, description="How many items (default serve.default_k, at most serve.max_k).")
    explain: bool = Field(False, description="Return the rationale behind the user vector: the stored one for a "
                          "known user, the student's for a raw history, the given one otherwise.")
    rationale: Optional[str] = Field(
        None, description="A rationale text to encode instead of generating one (at most serve.max_rationale_chars).")


class Item(BaseModel):
    id: int = Field(description="Item id of the run (items contract).")
    key: Optional[str] = Field(description="The item's source id (item_key).")
    title: Optional[str]
    score: float = Field(description="The model's score; items are best first.")


class RecommenderVersion(BaseModel):
    checkpoint: Optional[str] = Field(description="Run name of the served checkpoint (null: text matching).")
    sha256: Optional[str] = Field(description="SHA-256 of its model.pt.")
    scorer: str
    data_snapshot: Optional[str] = Field(description="Fingerprint of the prepared data the catalogue came from.")
    uri: Optional[str] = None
    backbone: Optional[str] = None
    variant: Optional[str] = None
    role: Optional[str] = None


class StudentVersion(BaseModel):
    model: str = Field(description="Model id of the student reasoner (its folder and content hash).")
    adapter_sha256: Optional[str] = Field(description="Content hash of the distilled LoRA adapter (null: none).")


class Versions(BaseModel):
    recommender: RecommenderVersion
    encoder: str
    student: Optional[StudentVersion] = None
    data_snapshot: Optional[str] = None


Path = Literal["stored-rationale", "student-rationale", "given-rationale", "no-rationale", "history"]


class RecommendResponse(BaseModel):
    user_id: Optional[int]
    path: Path = Field(description="What produced the user vector: a stored rationale (known user), a fresh "
                       "student rationale, the request's rationale, the run's learned no-rationale vector, or "
                       "the history alone (a recommender that reads no rationales).")
    fallback: Optional[Literal["reasoner-deadline", "reasoner-unavailable"]] = Field(
        None, description="Set when the student was asked but did not answer in time: the no-rationale "
        "vector was used instead.")
    rationale: Optional[str] = Field(None, description="With explain=true: the rationale behind the user vector.")
    items: list[Item]
    history_len: int
    versions: Versions
    timings_ms: dict[str, float]


class ErrorResponse(BaseModel):
    detail: str = Field(description="What is wrong, starting with the field at fault.")
    field: Optional[str] = Field(None, description="The request field at fault (body: the body as a whole).")


class DeploymentHealth(BaseModel):
    ready: bool
    detail: str


class HealthResponse(BaseModel):
    ready: bool
    deployments: dict[str, DeploymentHealth]


ERRORS = {s: {"model": ErrorResponse} for s in (400, 401, 404, 413, 422, 503)}

# ----------------------------------------------------------------------------- downstream deployments


@serve.deployment
class EncoderDeployment:
    """Texts -> unit vectors, batched across concurrent requests."""

    def __init__(self, encoder: str, dtype: str, normalize: bool, max_seq_length: Optional[int],
                 max_batch_size: int, batch_wait_timeout_s: float):
        from slim_ray.encode.encoder import encode_texts
        pin_replica_grpc_to_loopback()  # before Serve starts this replica's gRPC server

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
        return list(await asyncio.to_thread(encode_texts, texts, **self.kw))

    def stats(self) -> dict:
        return {"batches": self.n_batches, "texts": self.n_texts, "max_batch": self.max_batch}

    def _probe(self) -> str:
        import numpy as np

        from slim_ray.encode.encoder import encode_texts

        v = encode_texts(["health probe"], **self.kw)[0]
        if not (len(v) and np.isfinite(v).all()):
            raise RuntimeError("the encoder's probe vector is not finite")
        return f"{self.kw['encoder']}: {len(v)} dims"

    def check_health(self) -> None:
        self._probe()

    def ready(self) -> dict:
        return {"ready": True, "detail": self._probe()}


def replica_figures(load_s: Optional[float]) -> dict:
    """This replica's memory and its checkpoint load time (``GET /info``; bench scale reads it)."""
    import resource

    import psutil

    mem = psutil.Process().memory_full_info()
    mib = 2 ** 20
    return {"id": serve.get_replica_context().replica_id.unique_id,
            "load_s": None if load_s is None else round(load_s, 3),
            "rss_mib": round(mem.rss / mib, 1), "uss_mib": round(mem.uss / mib, 1),
            "pss_mib": round(getattr(mem, "pss", mem.rss) / mib, 1),
            # ru_maxrss (KiB on Linux) is updated lazily: never below the RSS just read
            "peak_rss_mib": round(max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, mem.rss) / mib, 1)}


@serve.deployment
class RecommenderDeployment:
    """Catalogue + scorer of one run (``recommender.Recommender``), batched; the checkpoint comes
    from ``user_config: {checkpoint: ...}`` so it can be swapped while serving. The per-user state
    is memory-mapped (``slim_ray.data.userstate``): the first replica of a data version builds
    it, the others map what it published."""

    def __init__(self, cfg_dict: dict, max_batch_size: int, batch_wait_timeout_s: float):
        from slim_ray.config import PipelineConfig
        from slim_ray.serve.recommender import Recommender
        pin_replica_grpc_to_loopback()  # before Serve starts this replica's gRPC server

        self.cfg = PipelineConfig.model_validate(cfg_dict)
        # Loaded once, by reconfigure (Serve calls it with the user_config before the replica
        # serves); deployed without a user_config, by the first call (``_ready``).
        self.checkpoint = self.cfg.serve.checkpoint
        self.rec: Optional[Recommender] = None
        self.answer.set_max_batch_size(max_batch_size)
        self.answer.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.n_batches = self.n_requests = self.max_batch = 0
        self.load_s: Optional[float] = None  # the last checkpoint load (model, catalogue, user state)

    async def reconfigure(self, config: dict) -> None:
        """Swap to another checkpoint (a run name or folder): loaded off the event loop while the
        old one keeps answering, then switched in one assignment; a batch in flight finishes on
        the model it started with."""
        checkpoint = (config or {}).get("checkpoint")
        if self.rec is not None and checkpoint == self.checkpoint:
            return
        rec, load_s = await asyncio.to_thread(self._load, checkpoint)
        await asyncio.to_thread(rec.probe)
        self.rec, self.checkpoint, self.load_s = rec, checkpoint, load_s
        logger.info("recommender now serves %s", rec.version)

    def _load(self, checkpoint: Optional[str]):
        """(Recommender of ``checkpoint``, the seconds its load took: model, catalogue, user state)."""
        from slim_ray.serve.recommender import Recommender

        t0 = time.monotonic()
        rec = Recommender(self.cfg, checkpoint)
        return rec, time.monotonic() - t0

    def _ready(self):
        if self.rec is None:
            self.rec, self.load_s = self._load(self.checkpoint)
        return self.rec

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)  # the real values: set in __init__
    async def answer(self, reqs: list[dict]) -> list[dict]:
        self.n_batches += 1
        self.n_requests += len(reqs)
        self.max_batch = max(self.max_batch, len(reqs))
        return await asyncio.to_thread(self._ready().answer_many, reqs)

    def version(self) -> dict:
        return self._ready().version

    def stats(self) -> dict:
        return {"batches": self.n_batches, "requests": self.n_requests, "max_batch": self.max_batch,
                "replica": serve.get_replica_context().replica_id.unique_id}

    def info(self) -> dict:
        rec = self._ready()
        meta = getattr(rec.scorer, "meta", None) or {}
        return {"scorer": rec.scorer.name, "items": len(rec.catalog.titles),
                "users": len(rec.catalog.users), "user_state": rec.catalog.users.folder,
                "uses_rationales": rec.uses_rationales, "replica": replica_figures(self.load_s),
                **{k: meta[k] for k in ("backbone", "variant", "seed", "best_valid_ndcg@10") if k in meta}}

    def check_health(self) -> None:
        self._ready().probe()

    def ready(self) -> dict:
        rec = self._ready()
        rec.probe()
        return {"ready": True, "detail": f"{rec.scorer.name}: probe scored"}


@serve.deployment
class ReasonerDeployment:
    """The distilled student writing rationales for raw histories (``slim_ray.serve.reasoner``),
    batched: concurrent requests share one ``generate`` call."""

    def __init__(self, cfg_dict: dict, threads: int, max_batch_size: int, batch_wait_timeout_s: float):
        from slim_ray.config import PipelineConfig
        from slim_ray.serve.reasoner import Reasoner
        pin_replica_grpc_to_loopback()  # before Serve starts this replica's gRPC server

        self.reasoner = Reasoner(PipelineConfig.model_validate(cfg_dict), threads=threads)
        self.reason.set_max_batch_size(max_batch_size)
        self.reason.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.n_batches = self.n_requests = self.max_batch = 0

    def version(self) -> dict:
        return self.reasoner.version

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)  # the real values: set in __init__
    async def reason(self, histories: list[list[int]]) -> list[dict]:
        self.n_batches += 1
        self.n_requests += len(histories)
        self.max_batch = max(self.max_batch, len(histories))
        return await asyncio.to_thread(self.reasoner.reason_many, histories)

    def stats(self) -> dict:
        return {"batches": self.n_batches, "requests": self.n_requests, "max_batch": self.max_batch}

    def check_health(self) -> None:
        self.reasoner.probe()

    def ready(self) -> dict:
        return {"ready": True, "detail": self.reasoner.probe()}


# ----------------------------------------------------------------------------- request parsing


class ApiError(Exception):
    """A response other than 200: status, the field at fault, a message, extra headers."""

    def __init__(self, status: int, field: Optional[str], message: str, headers: Optional[dict] = None,
                 timed_out: bool = False):
        super().__init__(message)
        self.status, self.field, self.message, self.headers = status, field, message, headers or {}
        self.timed_out = timed_out


class _Rejected:
    """What the JSON parser puts where a value JSON does not allow (bare NaN/Infinity, an
    overflowing float) or an integer beyond int64 stood, so the error can name the field."""

    def __init__(self, what: str):
        self.what = what


def _parse_constant(name: str) -> _Rejected:
    return _Rejected(f"bare {name} is not valid JSON")


def _parse_int(text: str):
    if len(text.lstrip("-")) > 19 or abs(int(text)) > MAX_INT:
        return _Rejected("integer beyond int64")
    return int(text)


def _parse_float(text: str):
    v = float(text)
    return v if math.isfinite(v) else _Rejected("number out of range")


def _find_rejected(obj: Any, where: str) -> Optional[tuple[str, str]]:
    if isinstance(obj, _Rejected):
        return where, obj.what
    if isinstance(obj, dict):
        for k, v in obj.items():
            hit = _find_rejected(v, k if where == "body" else f"{where}.{k}")
            if hit:
                return hit
    if isinstance(obj, list):
        for i, v in enumerate(obj):
            hit = _find_rejected(v, f"{where}[{i}]")
            if hit:
                return hit
    return None


def parse_request(body: bytes, settings: dict) -> RecommendRequest:
    """Bytes of a request body -> a validated RecommendRequest, or ApiError (4xx) naming the field."""
    if not body.strip():
        raise ApiError(400, "body", "body: empty; send a JSON object such as {\"user_id\": 1}")
    try:
        obj = json.loads(body, parse_constant=_parse_constant, parse_int=_parse_int, parse_float=_parse_float)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, too deep
        msg = str(e).splitlines()[0][:200] if isinstance(e, ValueError) else "nested too deeply"
        raise ApiError(400, "body", f"body: invalid JSON ({msg})") from None
    hit = _find_rejected(obj, "body")
    if hit:
        field = hit[0].split(".")[0].split("[")[0]
        raise ApiError(422, field, f"{hit[0]}: {hit[1]}")
    if not isinstance(obj, dict):
        raise ApiError(422, "body", f"body: expected a JSON object, got {type(obj).__name__}")
    try:
        req = RecommendRequest.model_validate(obj)
    except ValidationError as e:
        err = e.errors(include_input=False, include_url=False)[0]
        loc = ".".join(str(x) for x in err["loc"]) or "body"
        raise ApiError(422, str(err["loc"][0]) if err["loc"] else "body", f"{loc}: {err['msg']}") from None
    if req.k is not None and req.k > settings["max_k"]:
        raise ApiError(422, "k", f"k: {req.k} is above serve.max_k={settings['max_k']}")
    if req.history is not None and len(req.history) > settings["max_history"]:
        raise ApiError(422, "history", f"history: {len(req.history)} items, at most serve.max_history="
                       f"{settings['max_history']}")
    if req.rationale is not None and len(req.rationale) > settings["max_rationale_chars"]:
        raise ApiError(422, "rationale", f"rationale: {len(req.rationale)} characters, at most "
                       f"serve.max_rationale_chars={settings['max_rationale_chars']}")
    return req


def key_digest(key: Optional[str]) -> Optional[str]:
    """What the ingress keeps of the API key: its SHA-256 (the key itself never reaches Serve)."""
    return hashlib.sha256(key.encode()).hexdigest() if key else None


# ----------------------------------------------------------------------------- ingress

api = FastAPI(title="slim_ray recommendations", version="1",
              description="SLIM: student rationale -> text encoder -> recommender")


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse({"detail": exc.message, "field": exc.field}, status_code=exc.status, headers=exc.headers)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's own validation (query/path parameters): the field named, the input never echoed."""
    err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    loc = ".".join(str(x) for x in err["loc"]) or "request"
    return JSONResponse({"detail": f"{loc}: {err['msg']}", "field": loc}, status_code=422)


_BODY_SCHEMA = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": RecommendRequest.model_json_schema()}}}}


@serve.deployment
@serve.ingress(api)
class Ingress:
    """HTTP in front of the graph. Its limits, timeouts and key digest are its ``user_config``
    (``reconfigure``), so they change on a redeploy without restarting it."""

    def __init__(self, recommender, encoder, reasoner, settings: Optional[dict] = None):
        pin_replica_grpc_to_loopback()  # before Serve starts this replica's gRPC server
        self.recommender = recommender
        self.encoder = encoder
        self.reasoner = reasoner
        self.settings = settings or {}
        self._student_version: Optional[dict] = None

    def reconfigure(self, settings: dict) -> None:
        self.settings = dict(settings)

    # --- guards -------------------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        digest = self.settings.get("api_key_sha256")
        if not digest:
            return
        given = request.headers.get("x-api-key")
        if given is None:
            auth = request.headers.get("authorization", "")
            given = auth[7:] if auth[:7].lower() == "bearer " else None
        ok = given is not None and hmac.compare_digest(key_digest(given) or "", digest)
        if not ok:
            raise ApiError(401, "x-api-key", "x-api-key: missing or wrong API key",
                           headers={"WWW-Authenticate": "Bearer"})

    async def _body(self, request: Request) -> bytes:
        limit = self.settings["max_body_bytes"]
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, "body", f"body: {declared} bytes, at most serve.max_body_bytes={limit}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ApiError(413, "body", f"body: more than serve.max_body_bytes={limit} bytes")
        return bytes(body)

    async def _call(self, name: str, handle_method, *args, timeout: Optional[float] = None):
        """A downstream call; a replica that dies, is unavailable or times out -> 503 Retry-After."""
        response = handle_method.remote(*args)
        try:
            return await asyncio.wait_for(response, timeout or self.settings["request_timeout_s"])
        except asyncio.TimeoutError:
            response.cancel()
            raise ApiError(503, None, f"{name}: no answer within {timeout or self.settings['request_timeout_s']} s",
                           headers={"Retry-After": str(self.settings["retry_after_s"])}, timed_out=True) from None
        except ApiError:
            raise
        except Exception as e:  # replica died / unavailable / back-pressure / raised
            logger.warning("%s failed: %s: %s", name, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            raise ApiError(503, None, f"{name}: unavailable ({type(e).__name__})",
                           headers={"Retry-After": str(self.settings["retry_after_s"])}) from None

    # --- endpoints ----------------------------------------------------------------------------

    @api.get("/healthz", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
    async def healthz(self):
        """Per-deployment readiness: every deployment answers its probe (model loaded, a probe scores)."""
        replica = serve.get_replica_context().replica_id.unique_id
        deps = {"Ingress": {"ready": True, "detail": f"serving HTTP (replica {replica})"}}
        targets = {"RecommenderDeployment": self.recommender, "EncoderDeployment": self.encoder}
        if self.reasoner is not None:
            targets["ReasonerDeployment"] = self.reasoner

        async def one(name, handle):
            try:
                deps[name] = await asyncio.wait_for(handle.ready.remote(), self.settings["health_timeout_s"])
            except Exception as e:
                deps[name] = {"ready": False, "detail": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}

        await asyncio.gather(*(one(n, h) for n, h in targets.items()))
        ready = all(d["ready"] for d in deps.values())
        body = {"ready": ready, "deployments": deps}
        if ready:
            return body
        return JSONResponse(body, status_code=503, headers={"Retry-After": str(self.settings["retry_after_s"])})

    async def _student_version_cached(self) -> Optional[dict]:
        if self.reasoner is not None and self._student_version is None:
            self._student_version = await self._call("ReasonerDeployment", self.reasoner.version)
        return self._student_version

    @api.get("/v1/version", response_model=Versions, responses=ERRORS)
    async def version(self, request: Request):
        """The models being served: recommender checkpoint and hash, encoder, student, data snapshot."""
        self._authorize(request)
        rec = await self._call("RecommenderDeployment", self.recommender.version)
        return {"recommender": rec, "encoder": self.settings["encoder"],
                "student": await self._student_version_cached(), "data_snapshot": rec.get("data_snapshot")}

    @api.get("/info", responses=ERRORS)
    async def info(self, request: Request) -> dict:
        self._authorize(request)
        student = await self._student_version_cached()
        return {**(await self._call("RecommenderDeployment", self.recommender.info)),
                "reasoner_model": student["model"] if student else None, "encoder": self.settings["encoder"]}

    @api.post("/v1/recommend", response_model=RecommendResponse, responses=ERRORS, openapi_extra=_BODY_SCHEMA)
    async def recommend_v1(self, request: Request):
        """Top-k items for a known user or a raw history (see RecommendRequest)."""
        return await self._recommend(request)

    @api.post("/recommend", response_model=RecommendResponse, responses=ERRORS, openapi_extra=_BODY_SCHEMA,
              deprecated=True)
    async def recommend(self, request: Request):
        """Alias of /v1/recommend."""
        return await self._recommend(request)

    async def _recommend(self, request: Request) -> dict:
        t0 = time.perf_counter()
        self._authorize(request)
        req = parse_request(await self._body(request), self.settings)
        timings: dict[str, float] = {}
        job = {"user_id": req.user_id, "history": req.history, "k": req.k or self.settings["default_k"],
               "explain": req.explain, "student": self.reasoner is not None and not req.rationale}
        fallback = None
        if req.rationale:
            t = time.perf_counter()
            vec = await self._call("EncoderDeployment", self.encoder.embed, req.rationale)
            timings["encode_ms"] = round(1000 * (time.perf_counter() - t), 1)
            job.update(vector=vec, path="given-rationale", rationale=req.rationale if req.explain else None)

        t = time.perf_counter()
        res = await self._call("RecommenderDeployment", self.recommender.answer, job)
        if res.get("need_rationale"):  # a raw history: the student writes a rationale first
            t1 = time.perf_counter()
            try:
                out = await self._call("ReasonerDeployment", self.reasoner.reason, res["history"],
                                       timeout=self.settings["reasoner_timeout_s"])
            except ApiError as e:
                out, fallback = None, "reasoner-deadline" if e.timed_out else "reasoner-unavailable"
            timings["reason_ms"] = round(1000 * (time.perf_counter() - t1), 1)
            if out is not None:
                t1 = time.perf_counter()
                vec = await self._call("EncoderDeployment", self.encoder.embed, out["text"])
                timings["encode_ms"] = round(1000 * (time.perf_counter() - t1), 1)
                job.update(vector=vec, path="student-rationale", rationale=out["text"] if req.explain else None)
            job.update(history=res["history"], student=False)
            t = time.perf_counter()
            res = await self._call("RecommenderDeployment", self.recommender.answer, job)
        if "error" in res:
            err = res["error"]
            raise ApiError(err["status"], err["field"], err["message"])
        timings["recommend_ms"] = round(1000 * (time.perf_counter() - t), 1)
        timings["total_ms"] = round(1000 * (time.perf_counter() - t0), 1)
        return {"user_id": req.user_id, "path": res["path"], "fallback": fallback, "rationale": res["rationale"],
                "items": res["items"], "history_len": res["history_len"],
                "versions": {"recommender": res["version"], "encoder": self.settings["encoder"],
                             "student": (await self._student_version_cached()
                                         if res["path"] == "student-rationale" else self._student_version),
                             "data_snapshot": res["version"].get("data_snapshot")},
                "timings_ms": timings}

    def check_health(self) -> None:
        if self.recommender is None or self.encoder is None:
            raise RuntimeError("the ingress has no downstream handles")
