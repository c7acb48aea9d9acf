"""Configuration: environment variables (or a ``.env`` file), each with a default that runs on one
machine with no services. Built in ``main()`` / ``create_app()``, never at import time."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

PLACEHOLDER_SECRETS = {"changethis", "changeme", "xoxb-your-token", "xapp-your-token", "secret"}

MiB = 1024 * 1024


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    database_url: SecretStr = Field(
        SecretStr("sqlite:///./var/finetune.db"),
        description="Any SQLAlchemy URL; postgresql+psycopg://user:password@host/db for "
        "PostgreSQL. A secret (it may hold the password): read it with ``db_url``; logs and "
        "messages show ``db_url_redacted``.",
    )
    artifact_dir: Path = Field(
        Path("./var/artifacts"), description="Datasets, checkpoints, eval reports and plots."
    )
    base_model: str | None = Field(
        None,
        description="A local model directory or a ModelScope id; unset means the tiny local "
        "model built under ARTIFACT_DIR/models/tiny.",
    )
    slack_bot_token: SecretStr | None = None
    slack_signing_secret: SecretStr | None = None
    slack_app_token: SecretStr | None = None
    slack_api_url: str = "https://slack.com/api/"
    serving_url: str = "http://127.0.0.1:8000"
    approvers: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Slack user ids and/or user-group ids, comma-separated."
    )
    user_max_queued_jobs: int = Field(
        3,
        ge=1,
        description="Most jobs one Slack user may have waiting in the queue; a start, evaluate "
        "or export beyond it is refused (approvers too).",
    )
    user_max_running_jobs: int = Field(
        2,
        ge=1,
        description="Most jobs one Slack user may have running (or evaluating) at once; while "
        "they have that many, a start, evaluate or export is refused (approvers too).",
    )
    home_refresh_seconds: float = Field(
        10.0,
        gt=0,
        description="Least seconds between two republications of one user's App Home when "
        "their jobs change state (opening the Home tab always shows it fresh).",
    )

    max_upload_bytes: int = Field(50 * MiB, gt=0, description="Largest uploaded file accepted.")
    max_archive_bytes: int = Field(
        200 * MiB, gt=0, description="Largest total uncompressed size of a zip upload."
    )
    max_archive_files: int = Field(64, gt=0, description="Most members a zip upload may hold.")
    cutoff_len: int = Field(
        2048, gt=0, description="Token length the validation report compares samples with."
    )

    runner_devices: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="GPU ids this runner uses, one job per GPU (e.g. 0,1); empty: every visible "
        "GPU, or one CPU slot when there is none.",
    )
    runner_lease_seconds: float = Field(
        60.0, gt=0, description="How long a claimed job stays leased without a heartbeat."
    )
    runner_max_attempts: int = Field(
        3, ge=1, description="Attempts (claims) a job gets before an expired lease fails it."
    )
    runner_poll_seconds: float = Field(2.0, gt=0, description="How often an idle runner polls.")
    runner_ingest_slots: int = Field(
        1,
        ge=0,
        le=16,
        description="Dataset checks (uploads shared in Slack) this runner validates and stores at "
        "once, in processes of their own beside the GPU slots (0: the GPU slots take them too).",
    )
    runner_distill_slots: int = Field(
        1,
        ge=0,
        le=16,
        description="Distillations (`/finetune distill`: a teacher over HTTP, no GPU) this runner "
        "runs at once, in processes of their own (0: the GPU slots take them too).",
    )
    max_concurrent_uploads: int = Field(
        2,
        ge=1,
        le=64,
        description="Uploads the bot downloads from Slack at once (the rest wait their turn).",
    )
    job_event_retention_days: float = Field(
        90,
        gt=0,
        description="Delivered job events of finished jobs older than this are deleted (hourly, "
        "by the runner); jobs, checkpoints, evaluations, promotions and the audit log are kept.",
    )
    sweep_max_runs: int = Field(
        8,
        ge=2,
        le=64,
        description="The most runs one `/finetune sweep` may queue (the product of its lists).",
    )
    feedback_retention_days: float = Field(
        180,
        gt=0,
        description="Corrections and confirmations of `/classify` answers (the headline text, "
        "who, which checkpoint) older than this are deleted, exported or not (hourly, by the "
        "runner); a dataset exported from them keeps its copy.",
    )
    runner_token_budget: int = Field(
        16384, ge=256, description="Most tokens in one packed micro-batch."
    )
    runner_cpu_threads: int = Field(
        1,
        ge=0,
        description="torch threads of a job on the CPU (0: torch's default, one per core). "
        "Small models gain nothing from more, and on cores shared with serving a second "
        "thread mostly waits.",
    )
    runner_warm_worker: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Run a device slot's jobs one after another in one long-lived process that "
        "keeps the base model resident in host memory and kernels compiled (auto: on GPUs).",
    )
    runner_warm_idle_seconds: float = Field(
        600.0, gt=0, description="A warm worker with no job for this long exits (memory back)."
    )
    runner_compile: bool = Field(
        False,
        description="torch.compile each decoder layer on GPU: faster steps after a "
        "one-time compile (~1 min cold for a 7B; see docs/benchmarks.md).",
    )
    runner_cuda_graphs: bool = Field(
        True,
        description="Replay the decoder layers of a LoRA step as CUDA graphs on GPU (steps "
        "padded to buckets planned from the job's step sizes; see runner/train/graphs.py and "
        "docs/benchmarks.md).",
    )
    eval_backend: str = Field(
        "auto",
        pattern="^(auto|vllm|transformers)$",
        description="Prediction for evaluation: auto (vLLM when installed), vllm, transformers.",
    )
    eval_max_model_len: int = Field(
        2048,
        ge=128,
        description="Context length for evaluation (prompt + answer); a longer prompt keeps its "
        "last tokens and is counted in the report.",
    )
    eval_gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)] | Literal["auto"] = Field(
        "auto",
        description="Share of the GPU vLLM takes for evaluation and export checks; auto: the "
        "memory free at start as a share of the whole, minus 0.05, at most 0.9. When vLLM "
        "cannot start with it, evaluation falls back to transformers and the report says so.",
    )
    eval_general_benchmark: str | None = Field(
        None,
        description="A benchmark dataset (`python -m runner ingest PATH --name NAME --benchmark`: "
        "C-Eval, CMMLU or MMLU CSVs) that every evaluation scores base and checkpoint on: the "
        "report shows general ability and its change against the base.",
    )
    eval_max_general_drop: float = Field(
        2.0,
        ge=0,
        le=100,
        description="Points of general-benchmark accuracy a checkpoint may lose against the base "
        "before the Approve button's confirm dialog warns.",
    )
    distill_concurrency: int = Field(
        4, ge=1, le=256, description="Teacher requests in flight at once (`runner distill`)."
    )
    distill_requests_per_second: float = Field(
        10.0, gt=0, le=1000, description="Most teacher requests a second (`runner distill`)."
    )
    distill_timeout_seconds: float = Field(
        60.0, gt=0, le=3600, description="How long one teacher request may take."
    )
    distill_teachers: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Teacher API base URLs `/finetune distill` may send a channel's data to, "
        "comma-separated (a URL under one of them is allowed); empty: our own serving only "
        "(SERVING_URL).",
    )
    distill_api_key: SecretStr | None = Field(
        None,
        description="Bearer token sent to a teacher of DISTILL_TEACHERS (our own serving gets "
        "SERVING_API_KEY instead); never typed in Slack.",
    )
    eval_merge_adapter: bool | Literal["auto"] = Field(
        "auto",
        description="Transformers evaluation: merge the LoRA adapter into the evaluation's own "
        "copy of the base weights before predicting (no adapter matmuls per token; the merged "
        "bf16 weights round differently from base + adapter). auto: on GPUs, not on CPU.",
    )
    eval_kv_cache: Literal["auto", "dynamic", "static", "graphed"] = Field(
        "auto",
        description="Transformers evaluation's KV cache: graphed (a static cache of our own, each "
        "decode step replayed as one CUDA graph; on CPU the same loop eagerly), dynamic or static "
        "(generate's; static compiles the forward: slow the first time in a process), auto: "
        "graphed on GPUs, dynamic on CPU. See docs/benchmarks.md.",
    )
    eval_cpu_kv_cache_mib: int = Field(
        256, ge=1, description="vLLM-CPU KV cache size for evaluation and export checks."
    )
    serving_api_key: SecretStr | None = Field(
        None, description="Bearer token for the serving API; promote and rollback need it."
    )
    serving_backend: str = Field("auto", pattern="^(auto|vllm|transformers)$")
    serving_max_loras: int = Field(
        3, ge=2, description="vLLM LoRA slots: current + previous + one empty (vLLM-CPU trap)."
    )
    serving_max_lora_rank: int = Field(64, ge=1, le=512)
    serving_dtype: str = Field("auto", description="auto: bfloat16 on GPU, float32 on CPU.")
    serving_gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    serving_cpu_kv_cache_mib: int = Field(256, ge=16, description="vLLM-CPU KV cache size.")
    serving_max_model_len: int = Field(2048, ge=128)
    serving_max_new_tokens: int = Field(256, ge=1, description="Longest answer /classify makes.")
    serving_max_text_chars: int = Field(2000, ge=1, description="Longest text /classify takes.")
    serving_min_confidence: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Below this label probability /classify answers 'uncertain' (unset: off).",
    )
    serving_max_body_bytes: int = Field(
        1 * MiB, ge=1024, description="Largest request body the serving API reads (413 above)."
    )
    serving_max_messages: int = Field(
        64, ge=1, description="Most messages one /v1/chat/completions request may carry."
    )
    serving_max_chat_chars: int = Field(
        16000,
        ge=1,
        description="Most characters (all messages together) one /v1/chat/completions request "
        "may carry.",
    )
    serving_sync_seconds: float = Field(
        5.0,
        ge=0,
        description="How often serving checks storage for a promotion or rollback made through "
        "another replica, and follows it (0: never).",
    )
    modelscope_endpoint: str | None = Field(
        None, description="ModelScope hub URL (default: the public hub)."
    )

    @field_validator("artifact_dir")
    @classmethod
    def _absolute_artifact_dir(cls, value: Path) -> Path:
        """Relative to where the process started, resolved once: every child process (started
        elsewhere) gets the same absolute folder."""
        return value.expanduser().absolute()

    @field_validator("database_url")
    @classmethod
    def _absolute_sqlite_path(cls, secret: SecretStr) -> SecretStr:
        """A relative SQLite file resolved once, like ``artifact_dir``: children share it."""
        from sqlalchemy.engine import make_url

        value = secret.get_secret_value()
        try:
            url = make_url(value)
        except Exception:
            return secret  # not a URL this module judges; make_engine reports it
        database = url.database
        if (
            url.get_backend_name() != "sqlite"
            or not database
            or database == ":memory:"
            or database.startswith("file:")
            or Path(database).is_absolute()
        ):
            return secret
        absolute = str(Path(database).expanduser().absolute())
        return SecretStr(url.set(database=absolute).render_as_string(hide_password=False))

    @field_validator("runner_devices", mode="before")
    @classmethod
    def _split_devices(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("approvers", "distill_teachers", mode="before")
    @classmethod
    def _split_approvers(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator(
        "slack_bot_token",
        "slack_signing_secret",
        "slack_app_token",
        "serving_api_key",
        "distill_api_key",
    )
    @classmethod
    def _refuse_placeholder(cls, value: SecretStr | None) -> SecretStr | None:
        """A placeholder is refused; a blank value (``SLACK_SIGNING_SECRET=`` as .env.example
        ships it) is unset."""
        if value is None or not value.get_secret_value().strip():
            return None
        if value.get_secret_value().strip().lower() in PLACEHOLDER_SECRETS:
            raise ValueError("is a placeholder: set the real value or leave it unset")
        return value

    @property
    def db_url(self) -> str:
        """The database URL, password included: for engines and child processes only."""
        return self.database_url.get_secret_value()

    @property
    def db_url_redacted(self) -> str:
        """The database URL with its password masked, for logs and messages."""
        from sqlalchemy.engine import make_url

        try:
            return make_url(self.db_url).render_as_string(hide_password=True)
        except Exception:
            return "(an unparsable DATABASE_URL)"

    @property
    def slack_configured(self) -> bool:
        return self.slack_bot_token is not None and (
            self.slack_signing_secret is not None or self.slack_app_token is not None
        )
