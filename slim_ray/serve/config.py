"""Config of the serving stage: the SLIM recommendation graph on Ray Serve.

The encoder settings (model, dtype, normalisation) are not repeated here: serving uses the
``encode:`` section, so request-time vectors live in the same space as the stored item vectors.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from slim_ray.configbase import StageConfig


class AutoscalingConfig(StageConfig):
    """Replica autoscaling of one deployment (Ray Serve ``autoscaling_config``)."""

    min_replicas: int = Field(1, ge=0, description="Replicas kept when idle.")
    max_replicas: int = Field(2, ge=1, description="Upper bound on replicas.")
    target_ongoing_requests: float = Field(
        2.0, gt=0, description="Requests in flight per replica that autoscaling aims at."
    )
    upscale_delay_s: float = Field(5.0, ge=0, description="Load must persist this long before scaling up.")
    downscale_delay_s: float = Field(60.0, ge=0, description="Idle this long before scaling down.")
    max_ongoing_requests: int = Field(
        32, ge=1, description="Requests a replica takes at once (more wait in the proxy / caller); keep it "
        "well above target_ongoing_requests, or autoscaling never sees the load.")
    num_cpus: float = Field(0.5, gt=0, description="CPUs reserved per replica.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs reserved per replica.")

    def serve_options(self, health_check_period_s: float = 10.0, health_check_timeout_s: float = 30.0) -> dict:
        return {
            "health_check_period_s": health_check_period_s,
            "health_check_timeout_s": health_check_timeout_s,
            "autoscaling_config": {
                "min_replicas": self.min_replicas,
                "initial_replicas": max(1, self.min_replicas),
                "max_replicas": max(self.max_replicas, self.min_replicas, 1),
                "target_ongoing_requests": self.target_ongoing_requests,
                "upscale_delay_s": self.upscale_delay_s,
                "downscale_delay_s": self.downscale_delay_s,
            },
            "max_ongoing_requests": max(self.max_ongoing_requests, int(self.target_ongoing_requests) + 1),
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
        }


# One subclass per deployment, so that a partial override (--set serve.encoder_scaling.max_replicas=4)
# keeps that deployment's other defaults. The default CPU reservations add up to 1.85: one replica
# of each fits a 2-core machine.
class IngressScaling(AutoscalingConfig):
    """HTTP ingress: light, many requests in flight per replica."""

    target_ongoing_requests: float = Field(8.0, gt=0, description="Requests in flight per replica that autoscaling aims at.")
    max_ongoing_requests: int = Field(64, ge=1, description="Requests a replica takes at once (async: many).")
    num_cpus: float = Field(0.1, gt=0, description="CPUs reserved per replica.")


class EncoderScaling(AutoscalingConfig):
    """Encoder: batched, so several requests in flight per replica fill a batch."""

    target_ongoing_requests: float = Field(8.0, gt=0, description="Requests in flight per replica that autoscaling aims at.")


class RecommenderScaling(AutoscalingConfig):
    """Recommender: one matrix-vector product per request."""

    target_ongoing_requests: float = Field(4.0, gt=0, description="Requests in flight per replica that autoscaling aims at.")
    num_cpus: float = Field(0.25, gt=0, description="CPUs reserved per replica.")


class ReasonerScaling(AutoscalingConfig):
    """Student LLM: a request holds a replica for seconds; few, heavy replicas."""

    max_replicas: int = Field(1, ge=1, description="Upper bound on replicas.")
    target_ongoing_requests: float = Field(1.0, gt=0, description="Requests in flight per replica that autoscaling aims at.")
    max_ongoing_requests: int = Field(8, ge=1, description="Requests a replica takes at once (two reasoner batches).")
    num_cpus: float = Field(1.0, gt=0, description="CPUs reserved per replica (also the replica's torch threads).")


class ServeConfig(StageConfig):
    """HTTP ingress -> (student reasoner) -> encoder -> recommender, on 127.0.0.1 by default."""

    host: str = Field("127.0.0.1", description="HTTP host; loopback by default.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")
    app_name: str = Field("slim", description="Ray Serve application name.")
    route_prefix: str = Field("/", description="URL prefix of the application.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Ray Serve log level of the replicas (INFO logs every request)."
    )
    recommender: Literal["auto", "checkpoint", "text"] = Field(
        "auto",
        description="auto: a trained checkpoint when one exists under the run's rec/ folder, else "
        "text matching on item vectors. checkpoint: require one. text: ID-agnostic text matching.",
    )
    checkpoint: Optional[str] = Field(
        None, description="Recommender run folder to serve (default: picked under <run_dir>/rec/)."
    )
    user_embeddings: Literal["student", "teacher", "none"] = Field(
        "student", description="Stored rationale vectors used for known users (user_id requests)."
    )
    reasoner: bool = Field(
        True, description="Serve the student reasoner: users given as a raw history get a fresh rationale."
    )
    reasoner_model: Optional[str] = Field(
        None,
        description="Student LLM of the reasoner (default: student.model, i.e. the run's distilled "
        "export; the packaged smollm2-135m-instruct, with a warning, while the run has none). "
        "Prompt settings (template, history length, token budget) come from the student: section.",
    )
    reasoner_max_new_tokens: int = Field(
        128, ge=8, description="Tokens a served rationale may have (greedy decoding)."
    )
    default_k: int = Field(10, ge=1, description="Top-k when a request does not say.")
    max_k: int = Field(100, ge=1, description="Largest k a request may ask for (larger: 422).")
    max_body_bytes: int = Field(65536, ge=256, description="Largest request body in bytes (larger: 413).")
    max_history: int = Field(1000, ge=1, description="Most item ids a request's history may hold (more: 422).")
    max_rationale_chars: int = Field(
        4000, ge=1, description="Longest rationale text a request may send (longer: 422).")
    api_key_env: str = Field(
        "SLIM_RAY_API_KEY",
        description="Environment variable holding the API key. When it is set (non-empty) where the "
        "graph is built, every endpoint but /healthz needs the header 'X-API-Key: <key>' "
        "(or 'Authorization: Bearer <key>'); 401 without it. Only its SHA-256 reaches Serve.",
    )
    request_timeout_s: float = Field(
        30.0, gt=0, description="How long the ingress waits for a downstream deployment; then 503 + Retry-After.")
    retry_after_s: int = Field(2, ge=1, description="Retry-After of a 503 (a downstream replica died or timed out).")
    reasoner_timeout_s: float = Field(
        30.0, gt=0,
        description="Deadline of a student rationale; past it the run's learned no-rationale vector is "
        "used and the response says so (fallback: reasoner-deadline).",
    )
    max_batch_size: int = Field(16, ge=1, description="@serve.batch size of the encoder and recommender deployments.")
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="How long an encoder batch waits to fill.")
    recommender_batch_wait_timeout_s: float = Field(
        0.0, ge=0,
        description="How long a recommender batch waits to fill. 0: a batch takes what is queued; under "
        "load batches still fill while the previous one is scored, and at low load no request waits "
        "(measured idle, 1 client: p50 15.7 -> 12.5 ms against 2 ms; 16 clients: same QPS).")
    reasoner_max_batch_size: int = Field(4, ge=1, description="@serve.batch size of the student reasoner.")
    reasoner_batch_wait_timeout_s: float = Field(
        0.05, ge=0, description="How long a reasoner batch waits to fill.")
    health_check_period_s: float = Field(10.0, gt=0, description="Serve health-check period of every deployment.")
    health_check_timeout_s: float = Field(30.0, gt=0, description="A health check slower than this fails.")
    ingress_scaling: IngressScaling = Field(default_factory=IngressScaling, description="Autoscaling of the HTTP ingress.")
    encoder_scaling: EncoderScaling = Field(
        default_factory=EncoderScaling, description="Autoscaling of the encoder deployment (batched)."
    )
    recommender_scaling: RecommenderScaling = Field(
        default_factory=RecommenderScaling, description="Autoscaling of the recommender deployment."
    )
    reasoner_scaling: ReasonerScaling = Field(
        default_factory=ReasonerScaling, description="Autoscaling of the student reasoner (an LLM: few, heavy replicas)."
    )
