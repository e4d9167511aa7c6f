"""All configuration in one place: read once at start-up (env prefix STREAMREC_) and passed down."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

SASL_PROTOCOLS = ("SASL_PLAINTEXT", "SASL_SSL")
TLS_PROTOCOLS = ("SSL", "SASL_SSL")
PSEUDONYM_BYTES = 34  # "p-" + 32 hex digits (streamrec/pseudonym.py)
# Secrets that may come from a file instead; the validator reads the file into the secret's own field.
SECRET_FILES = {
    "ssl_key_password": "ssl_key_password_file",
    "sasl_password": "sasl_password_file",
    "pseudonym_key": "pseudonym_key_file",
}
SECURITY_FIELDS = (
    "ssl_ca_location",
    "ssl_certificate_location",
    "ssl_key_location",
    "ssl_key_password",
    "ssl_key_password_file",
    "sasl_mechanism",
    "sasl_username",
    "sasl_password",
    "sasl_password_file",
)


class Settings(BaseSettings):
    """Every setting has a default that runs the demo on the embedded broker.

    Each field maps to an environment variable: ``bootstrap_servers`` <- ``STREAMREC_BOOTSTRAP_SERVERS``.
    """

    # hide_input_in_errors: a validation error would otherwise quote every value given, passwords included.
    model_config = SettingsConfigDict(
        env_prefix="STREAMREC_", env_file=None, extra="ignore", hide_input_in_errors=True
    )

    # --- Kafka -----------------------------------------------------------------------------------------
    bootstrap_servers: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers.")
    schema_registry_url: str | None = Field(
        None, description="Confluent Schema Registry URL; unset means Avro single-object encoding."
    )
    events_topic: str = Field("streamrec.events", description="Click, search, purchase and deletion events.")
    catalog_topic: str = Field("streamrec.catalog", description="Catalogue item upserts, keyed by item_id.")
    recommendations_topic: str = Field("streamrec.recommendations", description="Ranked recommendations out.")
    shadow_topic: str = Field(
        "streamrec.recommendations.shadow", description="Recommendations caused by backfill-topic events."
    )
    backfill_topic: str = Field(
        "streamrec.events.backfill", description="Replayed history; co-partitioned with the events topic."
    )
    dead_letter_topic: str = Field("streamrec.dead-letters", description="Rejected input, with reasons.")
    state_changelog_topic: str = Field(
        "streamrec.user-state-changelog", description="Compacted changelog of per-user state."
    )
    schemas_topic: str = Field(
        "streamrec.schemas", description="Writer schemas by fingerprint, so workers decode evolved records."
    )
    model_updates_topic: str = Field("streamrec.model-updates", description="Promoted model versions.")
    triggers_topic: str = Field("streamrec.finetune-triggers", description="Fine-tuning triggers.")
    canary_reports_topic: str = Field(
        "streamrec.canary-reports", description="Workers' online hit rates of a canary and the serving model."
    )
    partitions: int = Field(4, description="Partitions of the events, changelog and output topics.")
    retention_hours: int = Field(
        168,
        ge=1,
        description="How long the events, backfill, recommendations and dead-letter topics keep records "
        "(retention.ms of the topics streamrec creates): an erased user's raw events are gone after it.",
    )
    erasure_hours: int = Field(
        24,
        ge=1,
        description="Within how long the broker removes an erased user's older state records and then the "
        "tombstone from the compacted changelog (the changelog's segment.ms, max.compaction.lag.ms and "
        "delete.retention.ms are each half of it). The embedded broker never compacts.",
    )
    replication_factor: int = Field(1, description="Replication factor for topics that streamrec creates.")
    session_timeout_ms: int = Field(6000, description="Consumer group session timeout.")
    heartbeat_interval_ms: int = Field(1000, description="Consumer group heartbeat interval.")
    assignment_strategy: Literal["range", "roundrobin", "cooperative-sticky"] = Field(
        "range", description="Partition assignment strategy of the event stage's consumer group."
    )
    output_compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = Field(
        "none",
        description="Compression of what workers write for others to read: recommendations, shadow "
        "recommendations, dead letters, triggers. none reaches every client: kafkajs reads only none and "
        "gzip without a plug-in, and gzip cost the worker ~20 us of CPU per event (docs/contracts.md).",
    )
    internal_compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = Field(
        "lz4",
        description="Compression of what only streamrec reads: the state changelog, and the events and "
        "catalogue upserts the Python producer client sends (workers read every codec).",
    )
    producer_buffer_messages: int = Field(
        100_000,
        ge=1,
        description="Most records the producer client (EventProducer) holds while the broker is away or "
        "slow (librdkafka queue.buffering.max.messages); a send beyond it waits up to 10 s for room, then "
        "raises BufferError.",
    )
    producer_delivery_timeout_ms: int = Field(
        120_000,
        ge=1000,
        description="How long the producer client keeps retrying a record before it reports it as not "
        "delivered (librdkafka message.timeout.ms): the longest broker outage a backend rides out "
        "without an error.",
    )
    embedded_broker: bool = Field(
        True,
        description="The broker is the embedded Tansu broker: works around its defects (faust producer "
        "batch size 1; recommendation readers fetch with a 20 ms wait, as it holds a fetch for up to half "
        "its wait). Set false on Apache Kafka.",
    )

    # --- Security and privacy --------------------------------------------------------------------------
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT",
        description="How every Kafka client of streamrec (workers, faust, producer client, readers, trainer, "
        "API, tools) talks to the brokers: SSL is TLS, SASL_SSL is TLS with a SASL login, SASL_PLAINTEXT a "
        "login without TLS (librdkafka security.protocol).",
    )
    ssl_ca_location: Path | None = Field(
        None,
        description="PEM file (or directory) of the CA certificates that verify the brokers' certificates; "
        "unset: the system's CAs. The broker's host name is checked against its certificate.",
    )
    ssl_certificate_location: Path | None = Field(
        None, description="PEM client certificate, for brokers that authenticate clients by TLS (mutual TLS)."
    )
    ssl_key_location: Path | None = Field(None, description="PEM private key of that client certificate.")
    ssl_key_password: SecretStr | None = Field(
        None, description="Password of that private key, when it is encrypted. Never logged."
    )
    ssl_key_password_file: Path | None = Field(
        None, description="A file holding that password (instead of STREAMREC_SSL_KEY_PASSWORD)."
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        None,
        description="SASL login of SASL_PLAINTEXT and SASL_SSL. PLAIN sends the password itself: use it "
        "over SASL_SSL only.",
    )
    sasl_username: str | None = Field(None, description="SASL user name.")
    sasl_password: SecretStr | None = Field(None, description="SASL password. Never logged.")
    sasl_password_file: Path | None = Field(
        None, description="A file holding the SASL password (instead of STREAMREC_SASL_PASSWORD)."
    )
    pseudonym_key: SecretStr | None = Field(
        None,
        description="Key of the producer client's pseudonyms: when set, every user id it is given is sent "
        "as p- and the first 32 hex digits of HMAC-SHA256(key, id), so raw ids never enter Kafka "
        "(docs/privacy.md); at least 32 bytes. Never logged.",
    )
    pseudonym_key_file: Path | None = Field(
        None, description="A file holding the pseudonym key (instead of STREAMREC_PSEUDONYM_KEY)."
    )

    # --- Worker ----------------------------------------------------------------------------------------
    app_id: str = Field("streamrec-worker", description="faust app id (control topics, tables).")
    events_group: str = Field("streamrec-events", description="Consumer group of the batched event stage.")
    worker_id: str | None = Field(None, description="Name of this worker in logs and dead letters.")
    data_dir: Path = Field(Path("var/worker"), description="RocksDB state and faust tables of this worker.")
    batch_size: int = Field(4000, description="Most events taken in one micro-batch.")
    batch_wait_ms: int = Field(
        20,
        description="Fetch wait, and how long an idle event stage waits for a first record. A micro-batch "
        "is what arrived while the previous one was processed, up to the batch size.",
    )
    delivery_pipeline_depth: int = Field(
        4,
        ge=0,
        description="Micro-batches published but not yet delivered before the event stage waits for the "
        "oldest; each is settled (states written, offsets committed) in order once delivered. 0 waits for "
        "each batch's delivery before the next one starts.",
    )
    state_cache_users: int = Field(
        20_000,
        description="Decoded states of the most recently active users kept in memory (LRU; a state with a "
        "full 50-event history takes ~20 KB).",
    )
    state_cache_mb: int = Field(
        512,
        description="Most memory the state cache may take, estimated from each state's encoded size; "
        "whichever of this and state_cache_users is reached first evicts the least recently active.",
    )
    consumer_queue_kbytes: int = Field(
        16_384,
        description="Most kilobytes of records the event stage's consumer prefetches, all partitions "
        "together (librdkafka queued.max.messages.kbytes; its own default, 65536, fills under a backlog).",
    )
    consumer_queue_messages: int = Field(
        10_000,
        description="Records the event stage's consumer tries to keep prefetched per partition "
        "(librdkafka queued.min.messages; its own default is 100000).",
    )
    consumer_fetch_backoff_ms: int = Field(
        10,
        ge=0,
        description="How long the event stage's consumer waits before fetching a partition again once its "
        "prefetch queue is full (librdkafka fetch.queue.backoff.ms; its own default, 1000, let a worker "
        "fetch about one response per partition a second under a backlog).",
    )
    producer_queue_kbytes: int = Field(
        65_536,
        description="Most kilobytes of records waiting in the event stage's producer (a full queue makes the "
        "stage wait for deliveries; librdkafka queue.buffering.max.kbytes, its default 1048576).",
    )
    state_memtable_mb: int = Field(
        8,
        description="RocksDB write buffer per state partition; at most two are held before a flush to disk "
        "(RocksDB's default is 64 MB).",
    )
    state_block_cache_mb: int = Field(
        32, description="RocksDB block cache shared by all of a worker's state partitions."
    )
    top_k: int = Field(10, description="Recommendations per user.")
    history_length: int = Field(
        50,
        description="Events kept per user. The served model encodes the newest of them: its own window "
        "(metadata serve_len: 16, or 50 for models trained on long histories); a worker warns at load when "
        "this is shorter.",
    )
    max_purchased: int = Field(200, description="Purchased items remembered per user (never re-recommended).")
    dedupe_window: int = Field(64, description="Recent event ids remembered per user for de-duplication.")
    user_rate_limit: float = Field(
        20.0,
        ge=0,
        description="Live events per second one user may sustain, by when they reached Kafka (the records' "
        "timestamps, not the events' own); the excess "
        "beyond the burst is dead-lettered as rate_limited (0: no limit). A person clicks far slower.",
    )
    user_rate_burst: int = Field(
        200, ge=1, description="Live events one user may send at once before the rate limit applies."
    )
    bot_min_gap_ms: int = Field(
        250,
        ge=0,
        description="Clicks and searches closer together than this are faster than a person can click "
        "(purchases are not counted: the items of one order arrive together).",
    )
    bot_fast_streak: int = Field(
        30,
        ge=0,
        description="That many such events in a row flag the user as a bot (inhuman_speed): kept in their "
        "state, counted by streamrec_flagged_users, left out of training (0: never).",
    )
    bot_item_repeats: int = Field(
        1000,
        ge=0,
        description="One item clicked this many times more than all other items together flags the user "
        "(repeated_item; 0: never).",
    )
    max_event_age_days: int = Field(
        3650, description="Older live events are dead-lettered as absurd timestamps (backfill: no limit)."
    )
    max_clock_skew_s: int = Field(300, description="Events further in the future are dead-lettered.")
    reject_unknown_items: bool = Field(
        True, description="Dead-letter events about items not in the catalogue."
    )
    max_id_bytes: int = Field(
        256,
        ge=16,
        description="Longest user, item, event or session id accepted, in UTF-8 bytes; longer ones are "
        "dead-lettered as invalid_record (the producer client refuses them).",
    )
    max_query_bytes: int = Field(
        1024, ge=16, description="Longest search query accepted, in UTF-8 bytes (longer: invalid_record)."
    )
    max_item_text_bytes: int = Field(
        16_384,
        ge=64,
        description="Longest catalogue title, category or description accepted, in UTF-8 bytes.",
    )
    max_event_bytes: int = Field(
        65_536,
        ge=1024,
        description="Largest record (key and value) the worker reads on the events and backfill topics; "
        "larger ones are dead-lettered as too_large without being decoded.",
    )
    max_record_bytes: int = Field(
        1_000_000,
        ge=100_000,
        description="Largest record a worker produces (librdkafka message.max.bytes); keep it at most "
        "the broker's message.max.bytes. A dead letter that would be larger carries the first bytes of the "
        "original key and value, and their full sizes.",
    )
    backfill_recommendations: Literal["shadow", "none"] = Field(
        "shadow",
        description="What backfill-topic events publish: recommendations on the shadow topic, or none.",
    )
    web_port: int = Field(6066, description="Worker web server port (health, metrics, lookups).")
    web_host: str = Field("127.0.0.1", description="Worker web server address; 0.0.0.0 in containers.")
    web_enabled: bool = Field(True, description="Run the worker's web server.")
    api_keys: SecretStr | None = Field(
        None,
        description="Comma-separated API keys that may read user data over HTTP (the worker's "
        "/users/{id}/state, the API's /users/{id}/recommendations and /users/{id}/profile); sent as "
        "`Authorization: Bearer KEY` or `X-API-Key: KEY`. Without any key those routes answer 403. Never "
        "logged.",
    )
    api_keys_file: Path | None = Field(
        None, description="A file of API keys, one per line (added to STREAMREC_API_KEYS)."
    )
    log_level: str = Field(
        "warn", description="Log level of the worker and the other commands, Kafka clients' lines included."
    )
    log_format: Literal["text", "json"] = Field(
        "text",
        description="Log lines as text, or as JSON: one object a line with time, level, logger and message, "
        "and the worker id, model version and partition where they apply (docs/operations.md).",
    )
    lag_check_s: float = Field(
        10.0,
        gt=0,
        description="How often a worker measures the consumer lag of its event partitions (committed "
        "offsets against the high watermarks) for /metrics (streamrec_consumer_lag).",
    )

    # --- Models ----------------------------------------------------------------------------------------
    model_registry: Path = Field(Path("var/models"), description="Directory of versioned model directories.")
    model_dir: Path | None = Field(
        None, description="Model to serve; default: the registry's current promoted version."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Encoder device.")
    serving_precision: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="Precision of the served encoder. auto: bfloat16 on a CPU with native bfloat16 products "
        "(AMX or AVX-512 BF16; the production-size encoder about 2x faster, NDCG@10 0.12% lower on Beauty: "
        "docs/performance.md, round 16), else float32. Item scores are float32 either way.",
    )
    serving_compile: bool = Field(
        True,
        description="Compile the served encoder with torch.compile where a C++ compiler is found (CPU): "
        "its elementwise work fused, ~25-30% less encoder time per user and +19% events/s for the "
        "production-size model (docs/performance.md, round 19). A ranking process compiles while it warms "
        "up: ~22 s the first time on 2 cores, 7-9 s once inductor's disk cache (TORCHINDUCTOR_CACHE_DIR) "
        "holds it; a failed compile is logged and the encoder served uncompiled. Scores then depend on "
        "the batch within bfloat16's rounding (lists at near-ties). false: uncompiled, the same bits in "
        "any batch.",
    )
    serving_threads: int = Field(
        1,
        description="CPU threads of the worker's encoder and index search (torch, FAISS). One is steadier "
        "and faster on a shared machine (measured); raise it on a dedicated multi-core host.",
    )
    ranking_process: bool = Field(
        True,
        description="Rank in a child process holding the model, pipelined with the next micro-batch: the "
        "event stage and the ranking each get a core (one process shares one GIL). +18% events/s on a 300k "
        "backlog on 2 cores in round 11; the worker keeps only the item map, the child the model. false: "
        "rank in the worker's own process.",
    )
    ranking_processes: int = Field(
        1,
        ge=1,
        description="Ranking processes per worker (with ranking_process): a batch of at least 512 users is "
        "shared among them in slices of 256 or more, ranked at the same time; a smaller one goes to one "
        "process. Each holds its own copy of the model (~0.5 GB). Give each a core the event stage and the "
        "broker do not use (docs/performance.md, round 17).",
    )
    seed: int = Field(42, description="Random seed for training and simulation.")

    # --- Fine-tuning triggers --------------------------------------------------------------------------
    trigger_min_events: int = Field(50_000, description="New events since training that trigger fine-tuning.")
    trigger_interval_s: int = Field(24 * 3600, description="Time since training that triggers fine-tuning.")
    trigger_drift_ratio: float = Field(
        0.7, description="Trigger when the online hit rate falls below this share of its baseline."
    )
    trigger_check_s: float = Field(10.0, description="How often a worker evaluates the trigger policy.")

    # --- Trainer (`streamrec trainer`) -----------------------------------------------------------------
    trainer_group: str = Field(
        "streamrec-trainer",
        description="Consumer group of the trainer on the triggers topic (one run at a time).",
    )
    trainer_window_events: int = Field(
        200_000,
        ge=100,
        description="Training window: the newest this many valid events of the events and backfill topics.",
    )
    trainer_window_hours: float | None = Field(
        None,
        gt=0,
        description="Training window by time: only events of the last this many hours (with "
        "trainer_window_events, the newest that many of them). Unset: no time limit.",
    )
    trainer_min_events: int = Field(
        1_000, ge=1, description="A window with fewer valid events is not trained on (the run is skipped)."
    )
    trainer_eval_share: float = Field(
        0.1,
        gt=0,
        lt=1,
        description="The newest share of the window (by events) that is never trained on: candidate and "
        "serving model are both scored on it.",
    )
    trainer_eval_cases: int = Field(
        5_000, ge=1, description="Most next-item cases scored on that slice (a seeded sample when more)."
    )
    trainer_epochs: int = Field(5, ge=1, description="Passes over the window's training part per run.")
    trainer_max_minutes: float = Field(
        5.0, gt=0, description="Training time budget of one run (on top: reading the window, scoring)."
    )
    trainer_learning_rate: float | None = Field(
        None, gt=0, description="Fine-tuning learning rate; unset: the serving model's own training rate."
    )
    trainer_full_retrain: bool = Field(
        False,
        description="Train each candidate from fresh weights (the serving model's architecture) instead of "
        "from the serving model's weights.",
    )
    trainer_preset: Literal["tiny", "small", "full"] = Field(
        "small", description="Training preset of a first model, when nothing is served yet."
    )
    trainer_promotion_metric: Literal["hr@10", "ndcg@10", "kept_hr@10", "kept_ndcg@10"] = Field(
        "ndcg@10",
        description="The figure on the newest slice that decides a promotion: seen items excluded, or kept_ "
        "with them left in the ranking, as the worker serves (for shoppers who return to what they saw).",
    )
    trainer_promotion_margin: float = Field(
        0.01,
        ge=0,
        description="A candidate is promoted only if its promotion metric beats the serving model's by this "
        "share (0.01: 1% better); otherwise it is recorded as rejected, with its figures and the reason.",
    )
    trainer_threads: int = Field(2, ge=1, description="CPU threads of a training run (torch).")
    canary_share: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Share of users (a stable hash of the user id) a candidate that passed the trainer's "
        "slice is served to first, as a canary beside the serving model, before the rule below promotes "
        "or rolls it back; 0: promote at once.",
    )
    canary_min_outcomes: int = Field(
        2_000,
        ge=1,
        description="Clicks and purchases each of canary and serving model must have been judged on (live, "
        "summed over workers) before the canary rule decides.",
    )
    canary_tolerance: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="The canary is promoted if its online hit rate is at least the serving model's times "
        "(1 - this), else rolled back.",
    )
    trainer_metrics_port: int = Field(
        6068, ge=0, description="Port of the trainer's Prometheus metrics (on STREAMREC_WEB_HOST); 0: none."
    )

    # --- API (`streamrec api`) ---------------------------------------------------------------------------
    api_host: str = Field("127.0.0.1", description="Address the API listens on; 0.0.0.0 in containers.")
    api_port: int = Field(8080, description="Port of the recommendation and profile API.")
    api_data_dir: Path = Field(
        Path("var/api"),
        description="The API's RocksDB view of the recommendations, state changelog and catalogue topics; "
        "one directory per replica (rebuilt from the topics when lost).",
    )

    # --- Operations (`streamrec status`) -----------------------------------------------------------------
    worker_urls: str = Field(
        "http://127.0.0.1:6066",
        description="Comma-separated web addresses of the workers (STREAMREC_WEB_PORT) that "
        "`streamrec status` reads /health and /metrics from.",
    )
    api_urls: str | None = Field(
        None,
        description="Comma-separated addresses of the API replicas (STREAMREC_API_PORT) that "
        "`streamrec status` shows.",
    )

    @model_validator(mode="after")
    def _secrets_and_security(self) -> Settings:
        """Secrets from their files, then a configuration a Kafka client could not connect with is refused
        here, at start-up, naming the variables, instead of by each client later."""
        for name, file_field in SECRET_FILES.items():
            path = getattr(self, file_field)
            if path is None:
                continue
            if getattr(self, name) is not None:
                raise ValueError(f"set STREAMREC_{name.upper()} or STREAMREC_{name.upper()}_FILE, not both")
            try:
                secret = Path(path).read_text().rstrip("\r\n")
            except OSError as exc:
                raise ValueError(f"STREAMREC_{name.upper()}_FILE: {exc.strerror}: {path}") from None
            setattr(self, name, SecretStr(secret))
        problems = self._security_problems()
        if self.pseudonym_key is not None:
            if len(self.pseudonym_key.get_secret_value().encode()) < 32:
                problems.append(
                    "STREAMREC_PSEUDONYM_KEY is shorter than 32 bytes (make one with `openssl rand -hex 32`)"
                )
            if self.max_id_bytes < PSEUDONYM_BYTES:
                problems.append(f"STREAMREC_MAX_ID_BYTES must be at least {PSEUDONYM_BYTES} for pseudonyms")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _security_problems(self) -> list[str]:
        protocol = f"STREAMREC_SECURITY_PROTOCOL={self.security_protocol}"
        problems = []
        if self.security_protocol in SASL_PROTOCOLS:
            missing = [
                f"STREAMREC_{name.upper()}"
                for name in ("sasl_mechanism", "sasl_username", "sasl_password")
                if not _given(getattr(self, name))
            ]
            if missing:
                problems.append(f"{protocol} needs {', '.join(missing)}")
        else:
            given = [
                f"STREAMREC_{n.upper()}"
                for n in ("sasl_mechanism", "sasl_username", "sasl_password")
                if getattr(self, n) is not None
            ]
            if given:
                problems.append(f"{', '.join(given)} set, but {protocol} logs in without SASL")
        tls = ("ssl_ca_location", "ssl_certificate_location", "ssl_key_location", "ssl_key_password")
        if self.security_protocol not in TLS_PROTOCOLS:
            given = [f"STREAMREC_{n.upper()}" for n in tls if getattr(self, n) is not None]
            if given:
                problems.append(f"{', '.join(given)} set, but {protocol} does not use TLS")
        if (self.ssl_certificate_location is None) != (self.ssl_key_location is None):
            problems.append("STREAMREC_SSL_CERTIFICATE_LOCATION and STREAMREC_SSL_KEY_LOCATION go together")
        if self.ssl_key_password is not None and self.ssl_key_location is None:
            problems.append("STREAMREC_SSL_KEY_PASSWORD without STREAMREC_SSL_KEY_LOCATION")
        for name in tls[:3]:
            path = getattr(self, name)
            if path is not None and not Path(path).exists():
                problems.append(f"STREAMREC_{name.upper()}: no such file: {path}")
        return problems

    def worker_url_list(self) -> list[str]:
        return [u.strip().rstrip("/") for u in self.worker_urls.split(",") if u.strip()]

    def api_url_list(self) -> list[str]:
        return [u.strip().rstrip("/") for u in (self.api_urls or "").split(",") if u.strip()]

    def api_key_list(self) -> list[str]:
        """Every configured API key: ``api_keys`` and the lines of ``api_keys_file`` (blank lines skipped)."""
        keys = self.api_keys.get_secret_value().split(",") if self.api_keys is not None else []
        if self.api_keys_file is not None:
            keys += self.api_keys_file.read_text().splitlines()
        return [k.strip() for k in keys if k.strip()]


def _given(value: object) -> bool:
    """Set and not blank (an empty variable, or a secret file with nothing in it, counts as not given)."""
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    return value is not None and str(value).strip() != ""


# Where each group of settings starts, in the class's order (docs/settings.md has a heading for each).
_SECTIONS = {
    "bootstrap_servers": "Kafka",
    "security_protocol": "Security and privacy",
    "app_id": "Worker",
    "model_registry": "Models",
    "trigger_min_events": "Fine-tuning triggers",
    "api_host": "API",
    "worker_urls": "Operations",
}


def settings_reference() -> str:
    """docs/settings.md: every setting with its variable, default and meaning (``make docs`` writes it; a
    test keeps it equal to this)."""
    lines = [
        "# Settings",
        "",
        "Every setting of streamrec, generated from `streamrec/settings.py` by `make docs` (a test keeps the",
        "two equal). Each is read from the environment once, at start-up; `STREAMREC_API_KEYS` and the other",
        "secrets are never logged.",
    ]
    for name, field in Settings.model_fields.items():
        if name in _SECTIONS:
            lines += ["", f"## {_SECTIONS[name]}", "", "| variable | default | meaning |", "|---|---|---|"]
        default = "unset" if field.default is None else str(field.default)
        meaning = (field.description or "").replace("|", "\\|")
        lines.append(f"| `STREAMREC_{name.upper()}` | `{default}` | {meaning} |")
    return "\n".join(lines) + "\n"
