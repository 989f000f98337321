"""Configuration from `TIGHTROPE_*` environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.archive_rules import DEFAULT_ARCHIVE_LIMITS, ArchiveLimits
from schemas.callback_targets import AllowList, parse_allow_list


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TIGHTROPE_", extra="ignore")

    data_dir: Path = Field(default=Path("./.tightrope"), description="Database, blobs, artifacts")
    database_url: str | None = Field(default=None, description="Default: SQLite file in data_dir")
    broker_url: str = "redis://127.0.0.1:6379/0"

    max_upload_bytes: int = 256 * 1024 * 1024
    # Zip archives (TorchScript, .pt2, .npz): checked at upload and again by the sandboxed runner,
    # which gets these values in job.json (schemas.archive_rules, docs/security.md).
    max_archive_entries: int = Field(default=DEFAULT_ARCHIVE_LIMITS.max_entries, ge=1)
    max_archive_uncompressed_bytes: int = Field(
        default=DEFAULT_ARCHIVE_LIMITS.max_uncompressed_bytes, ge=1
    )
    max_compression_ratio: float = Field(default=DEFAULT_ARCHIVE_LIMITS.max_compression_ratio, ge=1)

    # Limits at the edge (docs/security.md, "Request limits"). max_header_bytes: the request
    # line plus headers the server buffers; beyond it `tightrope serve` (service.api.server) answers
    # 431 and closes the connection. max_json_body_bytes: any request body that is not
    # multipart (JSON endpoints); beyond it 413 `payload-too-large`, before the app reads it.
    # max_json_depth: arrays/objects nested deeper are refused with 400 `bad-request`
    # before the JSON is parsed.
    max_header_bytes: int = Field(default=16 * 1024, ge=1024)
    # Slow clients (docs/security.md, "Slow clients"): a request's line and headers must arrive
    # within header_timeout_seconds of its first byte (a new connection: of its opening); a body
    # must bring at least min_body_bytes_per_second averaged over each body_window_seconds (a
    # body that stops for a window fails it); an address holds at most
    # max_connections_per_client connections at once (0: no bound, e.g. behind a proxy that
    # bounds them itself). What is closed is logged (logger tightrope.edge).
    header_timeout_seconds: float = Field(default=10.0, gt=0)
    body_window_seconds: float = Field(default=30.0, gt=0)
    min_body_bytes_per_second: int = Field(default=1024, ge=0)
    max_connections_per_client: int = Field(default=256, ge=0)
    max_json_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    max_json_depth: int = Field(default=64, ge=1)

    # Execution
    sandbox: Literal["bwrap", "off"] = "bwrap"
    # The bubblewrap binary: a name looked up on PATH, or a path (docs/security.md, "Without
    # bubblewrap"). A worker runs a trivial command in the sandbox when it starts, says in its
    # log and its heartbeat whether that worked, and /readyz reports it. A `.pt`, `.pt2` or
    # `.onnx` upload that only workers without a working sandbox get waits with a reason for
    # sandbox_wait_seconds after its upload, then is rejected with that reason.
    bwrap: str = Field(default="bwrap", min_length=1)
    sandbox_wait_seconds: float = Field(default=600.0, ge=0)
    # /readyz answers 200 `degraded` instead of 503 when no live worker can sandbox (`.safetensors`
    # models still run): `tightrope demo` on a machine without bubblewrap sets it.
    ready_without_sandbox: bool = False
    audit_soft_time_limit: int = 3600
    audit_hard_time_limit: int = 3900
    # The probe's budget: an admission, and an audit's plan step (which probes the model through
    # the audit's operator first), each end within it, so a model that never returns costs one
    # such timeout. An audit without budget.wall_seconds then gets probe_seconds times
    # audit_probe_multiple, at least audit_min_time_limit, at most the soft limit.
    admission_time_limit: int = Field(default=60, ge=1)
    audit_probe_multiple: float = Field(default=100_000, gt=0)
    audit_min_time_limit: int = Field(default=600, ge=1)
    # The watchdog of a shard (docs/security.md, "Hung models"): the runner beats every second
    # while it works, except while one call of the model runs without returning; a shard whose
    # runner stays silent longer than watchdog_probe_multiple × the model's probe time per input
    # × the largest batch it was called on, at least watchdog_min_seconds, is killed and its
    # audit fails with `model-hung` (workers/execution/watchdog.py). The time limits above stay
    # the backstop.
    watchdog_probe_multiple: float = Field(default=50, gt=0)
    watchdog_min_seconds: float = Field(default=30, ge=2)
    runner_memory_bytes: int = 16 * 1024 * 1024 * 1024
    # OMP/MKL/OpenBLAS threads of each sandboxed runner: a worker's CPU share. With K CPU
    # workers on a host of C cores, about C/K (1 for the scale-out benchmark).
    runner_threads: int = Field(default=2, ge=1, le=256)
    lease_seconds: float = 60.0
    heartbeat_seconds: float = 5.0
    max_attempts: int = 3
    requeue_after_seconds: float = 60.0
    reconcile_interval_seconds: float = 10.0
    worker_stale_seconds: float = 30.0
    # Fair share (docs/architecture.md, "Shards: one audit over many workers"): per tenant,
    # audits planned and not finished (`running`) at most tenant_max_running_audits (more wait);
    # audits waiting to start at most tenant_max_queued_audits (more: 429 `too-many-audits`).
    tenant_max_running_audits: int = Field(default=4, ge=1)
    tenant_max_queued_audits: int = Field(default=50, ge=1)
    # Job directories a worker process keeps between shards of the same audits (the verified
    # model copy and the audit's inputs, keyed by audit and model sha256); least recently used
    # go first. Each holds one model and the audit's datasets on disk under jobs_dir.
    worker_job_cache_entries: int = Field(default=4, ge=0)
    # A worker keeps the runner of its last shard (the model loaded) only for the next shard of
    # the same audit: it is ended when the audit has no shard left waiting, when the worker runs
    # anything else, and after runner_idle_seconds without a next shard (docs/deployment.md).
    runner_idle_seconds: float = Field(default=10, gt=0)
    # A worker keeps one spare runner that has imported the engine and waits, empty, for its
    # next job (workers/execution/warm_runner.py): a job starts seconds sooner, at the cost of
    # one idle child's memory (docs/deployment.md).
    warm_runner: bool = True
    # The module the sandboxed child runs (`python -m <module> <jobdir>`); tests swap in faults.
    runner_module: str = "workers.sandbox.runner"

    # Where blobs (models, datasets), reports and artifacts are kept (service/storage/objects.py,
    # docs/deployment.md "Object storage"): empty, the data directory (blobs/, artifacts/);
    # `s3://bucket/prefix`, an S3-compatible bucket, with storage_endpoint_url for a service
    # other than AWS (MinIO, Ceph) and credentials from the usual chain (AWS_ACCESS_KEY_ID…,
    # a profile, an instance role). Job directories stay local to each worker, which keeps the
    # blobs it fetched in a cache of at most worker_blob_cache_bytes under data_dir.
    storage_url: str = ""
    storage_endpoint_url: str | None = None
    storage_region: str | None = None
    storage_multipart_threshold: int = Field(default=64 * 1024 * 1024, ge=5 * 1024 * 1024)
    worker_blob_cache_bytes: int = Field(default=20 * 1024 * 1024 * 1024, ge=0)
    # With a bucket: 0 streams every download through the gateway; N > 0 answers a download of
    # an artifact or of report.json with a 307 to a presigned URL of the object, valid N seconds
    # (the client must reach the bucket's endpoint). Documents (report.html, SVG) still come
    # through the gateway, with their Content-Security-Policy.
    storage_presign_seconds: int = Field(default=0, ge=0, le=7 * 24 * 3600)

    # Ed25519 key that signs reports; default <data_dir>/signing/ed25519.pem
    # (service.reports.signatures).
    signing_key_path: Path | None = None

    # callback_url deliveries (workers.execution.callbacks, docs/reports.md): the master secret the
    # per-tenant HMAC secrets derive from (default: generated in <data_dir>/signing/), the time
    # one POST may take, how often a failed delivery is tried, the first retry's delay.
    callback_secret: str | None = None
    # …or a file holding it (a secret file every machine is given), read once at start
    callback_secret_path: Path | None = None
    callback_timeout_seconds: float = 10.0
    callback_max_attempts: int = 6
    callback_backoff_seconds: float = 2.0
    # Destinations a callback may reach although they are internal (loopback, private,
    # link-local…; schemas.callback_targets, docs/security.md): comma-separated `host[:port]`,
    # `[v6]:port`, IP addresses or CIDR networks. Empty: only public addresses.
    callback_allow: str = Field(default="", description="Internal callback destinations allowed")

    # Endpoint models (docs/models.md, "Endpoint models"; docs/security.md, "Endpoints"): the
    # destinations a worker may query although they are internal, read like callback_allow
    # (empty: only public addresses; loopback, private, link-local and metadata addresses are
    # refused), and the key that encrypts the endpoints' auth secrets at rest (a Fernet key,
    # urlsafe base64 of 32 bytes; default: generated in <data_dir>/signing/endpoint-key), or a
    # file holding it. Gateway and workers must have the same values.
    endpoint_allow: str = Field(default="", description="Internal endpoint destinations allowed")
    endpoint_secret_key: str | None = None
    endpoint_secret_key_path: Path | None = None
    # The query budget of an endpoint model's audit (docs/models.md, "Endpoint models"): the
    # inputs its workers may send to the endpoint, retries included, when the audit asks for
    # no other (endpoint_query_budget), and the most any one audit of a tenant may ask for
    # (tenant_max_endpoint_queries); the default must fit under the cap. An audit that spends
    # its budget before it has queried enough fails with `query-budget-exhausted`.
    endpoint_query_budget: int = Field(default=100_000, ge=1)
    tenant_max_endpoint_queries: int = Field(default=1_000_000, ge=1)

    # Database work of the gateway (docs/architecture.md, "Many polling clients"): at most
    # db_pool_size requests use the database at once (the database slots of
    # service/api/db_slots.py; each holds one pooled connection); the
    # others queue, without a thread, for up to db_queue_timeout_seconds and are then answered
    # 503 `busy` with Retry-After. db_max_overflow extra connections serve work outside
    # requests (the /metrics collector); a checkout waits at most db_pool_timeout_seconds.
    # Small on purpose: each slot is a thread contending for the GIL; on 2 cores 2-4 slots
    # served polls fastest (docs/benchmarks.md, "Polling clients"); raise it for a remote
    # PostgreSQL with a long round trip.
    db_pool_size: int = Field(default=8, ge=1)
    db_max_overflow: int = Field(default=5, ge=0)
    db_pool_timeout_seconds: float = Field(default=5.0, gt=0)
    db_queue_timeout_seconds: float = Field(default=10.0, gt=0)
    # How long an authenticated API key is remembered (by its sha256) without asking the
    # database; a revocation by another process takes effect within this time plus at most 1 s
    # (service/api/refresh_cache.py). 0: no cache.
    api_key_cache_seconds: float = Field(default=5.0, ge=0)
    # How long the answer to a status poll, or to a page of the audit list, is reused by this
    # gateway process (service/api/poll_cache.py) while it does not hear the announcements of
    # audit changes (below): a worker's change is then seen within twice this time (one
    # request refreshes, the rest get the last answer meanwhile), this gateway's own (a
    # cancel, a new audit) at once. 0: off.
    poll_cache_seconds: float = Field(default=1.0, ge=0, le=60)
    # Polls the workers keep fresh (docs/architecture.md): every process that writes an audit
    # announces the change on a Redis pub/sub channel (service/db/audit_changes.py), and a
    # gateway subscribed to it keeps an answer for up to poll_cache_subscribed_seconds (a
    # safety net), forgetting it as soon as its audit changes. Not subscribed (Redis
    # unreachable, connection lost, starting), it falls back to poll_cache_seconds. 0: no
    # subscription. audit_changes_channel: the channel; empty: one per Redis database number
    # of broker_url (`tightrope:<db>:audit-changes`).
    poll_cache_subscribed_seconds: float = Field(default=60.0, ge=0, le=3600)
    audit_changes_channel: str = ""

    # The gateway brings the schema to Alembic's head at start-up; turn off where a deployment
    # runs migrations as a separate step (several gateway replicas on one PostgreSQL).
    auto_migrate: bool = True

    @field_validator("storage_url")
    @classmethod
    def _check_storage_url(cls, value: str) -> str:
        if value:
            from service.storage.objects import parse_storage_url

            parse_storage_url(value)  # a bad URL stops the start, naming the setting
        return value

    @field_validator("callback_allow")
    @classmethod
    def _parse_callback_allow(cls, value: str) -> str:
        parse_allow_list(value)  # a bad entry stops the start, rather than a refused callback
        return value

    @property
    def archive_limits(self) -> ArchiveLimits:
        return ArchiveLimits(
            max_entries=self.max_archive_entries,
            max_uncompressed_bytes=self.max_archive_uncompressed_bytes,
            max_compression_ratio=self.max_compression_ratio,
        )

    @property
    def callback_allow_list(self) -> AllowList:
        return parse_allow_list(self.callback_allow)

    @field_validator("endpoint_allow")
    @classmethod
    def _parse_endpoint_allow(cls, value: str) -> str:
        parse_allow_list(value)  # a bad entry stops the start
        return value

    @model_validator(mode="after")
    def _query_budget_under_cap(self) -> Settings:
        if self.endpoint_query_budget > self.tenant_max_endpoint_queries:
            raise ValueError(
                f"endpoint_query_budget ({self.endpoint_query_budget}) is above "
                f"tenant_max_endpoint_queries ({self.tenant_max_endpoint_queries}): the default "
                "query budget of an audit must fit under the per-tenant cap"
            )
        return self

    def endpoint_query_budget_for(self, requested: int | None) -> int:
        """The query budget of one audit: the requested one (or the default), which must not
        exceed the per-tenant cap (ValueError naming both)."""
        budget = self.endpoint_query_budget if requested is None else requested
        if budget < 1:
            raise ValueError(f"a query budget of {budget}: at least 1 query")
        if budget > self.tenant_max_endpoint_queries:
            raise ValueError(
                f"a query budget of {budget} queries is above this tenant's cap of "
                f"{self.tenant_max_endpoint_queries} (TIGHTROPE_TENANT_MAX_ENDPOINT_QUERIES)"
            )
        return budget

    @property
    def endpoint_allow_list(self) -> AllowList:
        return parse_allow_list(self.endpoint_allow)

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'tightrope.db').resolve()}"

    @property
    def blob_dir(self) -> Path:
        return self.data_dir / "blobs"

    @property
    def artifact_dir(self) -> Path:
        return self.data_dir / "artifacts"

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"

    @property
    def visibility_timeout(self) -> int:
        # Above the hard limit so that Redis never redelivers a task that is still running.
        return self.audit_hard_time_limit + 600


@lru_cache
def get_settings() -> Settings:
    return Settings()
