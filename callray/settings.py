"""The one configuration model: the ``args`` of the Serve application.

``config/serve.yaml`` (and its architecture variants) hold an instance of ``CallraySettings``
under ``applications[0].args``. Strings may use ``${VAR}`` or ``${VAR:-default}`` to read the
environment (e.g. ``url: ${REDIS_URL}``). Invalid settings fail at start with
:class:`SettingsError`, which names the field (and the file when loaded from one).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from callray import tracing
from callray.env import EnvSection, SettingsError, describe_validation, moved
from callray.guard import SocketGuardSettings
from callray.logs import configure_logging

if TYPE_CHECKING:
    from callray.privacy import Redactor

PROJECT_DIR = Path(__file__).resolve().parent.parent


class AgentsSettings(EnvSection):
    default: str = Field(default="clinic", description="Agent used by the plain route /llm-websocket/{call_id}.")
    files: dict[str, str] = Field(
        default_factory=lambda: {"clinic": "config/agents/clinic.yaml"},
        description="Agent name -> YAML definition. Relative paths resolve against the current "
        "directory, then the callray project directory.",
    )
    by_retell_agent_id: dict[str, str] = Field(
        default_factory=dict,
        description="Retell agent_id -> agent name, applied when call_details arrives before the first turn.",
    )

    @model_validator(mode="after")
    def _default_is_defined(self) -> "AgentsSettings":
        if self.default not in self.files:
            raise ValueError(f"default agent {self.default!r} is not one of files: {sorted(self.files)}")
        unknown = {a for a in self.by_retell_agent_id.values() if a not in self.files}
        if unknown:
            raise ValueError(f"by_retell_agent_id maps to undefined agents {sorted(unknown)}")
        return self

    def resolve(self, name: str) -> Path:
        """The file of agent ``name`` (first relative to the cwd, then to the project)."""
        raw = Path(self.files[name])
        if raw.is_absolute() or raw.exists():
            return raw
        return PROJECT_DIR / raw


class GatewaySettings(EnvSection):
    path_prefix: str = Field(default="/llm-websocket", description="WebSocket route prefix; Retell's llm_websocket_url points here.")
    max_frame_bytes: int = Field(default=8 << 20, ge=1024, le=16 << 20, description="Largest inbound frame; larger closes the socket with 1009 (the call's state is kept). Retell resends the whole transcript with word timings on every event, twice with transcript_with_tool_calls: about 2 MB after two hours of continuous talk, so the default leaves four times that (Serve's proxy takes up to 16 MiB).")
    auto_reconnect: bool = Field(default=True, description="Ask Retell for ping_pong keepalives and reconnects (sent in the config frame).")
    call_details: bool = Field(default=True, description="Ask Retell to send the call object (call_details) after connecting.")
    transcript_with_tool_calls: bool = Field(default=True, description="Ask Retell to send the transcript with the tool calls and results in place, so an LLM agent remembers what its tools returned (each request then carries both transcripts).")
    activate_timeout_s: float = Field(default=30.0, gt=0, description="How long a new socket waits for its call to be activated (its state store or host restarting) before the connection is dropped without a close frame (Retell reconnects, as after a replica's death).")
    max_frames_per_s: float = Field(default=30.0, ge=1, description="Frames one socket may send per second on average (bursts of three seconds' worth); a socket that sends faster is closed with 1008. Retell sends a few per second.")
    max_queued_frames: int = Field(default=1000, ge=16, description="Outbound frames one socket may have waiting for a reader that does not read; beyond, it is closed with 1013 and what it held is freed.")
    read_token: str | None = Field(default="${CALLRAY_READ_TOKEN:-}", description="Bearer token of the read routes (GET /calls/{id}, /analytics, /ui), which serve callers' words and numbers. Unset or empty: those routes are off (404), never open.")
    admin_token: str | None = Field(default="${CALLRAY_ADMIN_TOKEN:-}", description="Bearer token of the erasure routes (DELETE /calls/{id}, DELETE /callers/{number}), which remove callers' data for good. Unset or empty: those routes are off (404). Must differ from read_token: reading is not erasing.")
    guard: SocketGuardSettings = Field(default_factory=SocketGuardSettings, description="Who may open a socket: shared secret in the URL, IP allowlist, rate and call limits.")
    ingress: Literal["proxy", "haproxy"] = Field(default="proxy", description="The Serve ingress this deployment is meant to run behind, chosen when Ray starts (docs/operations.md, 'The ingress'): proxy = Serve's Python proxy (the default of Ray); haproxy = HAProxy in front of replicas that serve sockets themselves (start Ray with RAY_SERVE_ENABLE_HA_PROXY=1). A replica behind the other one logs how to start Ray for this one, and serves anyway.")

    _moved = moved(host_retry_s="is now activate_timeout_s (how long a socket waits for its call's activation, "
                                "whatever the placement)")

    @field_validator("read_token", "admin_token")
    @classmethod
    def _empty_is_off(cls, v: str | None) -> str | None:
        return v or None

    @model_validator(mode="after")
    def _admin_is_not_reader(self) -> "GatewaySettings":
        if self.admin_token is not None and self.admin_token == self.read_token:
            raise ValueError("admin_token must differ from read_token (CALLRAY_ADMIN_TOKEN, CALLRAY_READ_TOKEN): "
                             "whoever may read records must not be able to erase them")
        return self

    @field_validator("path_prefix")
    @classmethod
    def _slash(cls, v: str) -> str:
        if not v.startswith("/") or v.endswith("/"):
            raise ValueError(f"must start with '/' and not end with one, got {v!r}")
        return v


class HostsSettings(EnvSection):
    placement: Literal["local", "dedicated"] = Field(default="local", description="Where a call's actor lives. local: in the gateway replica that holds its socket (no Ray call on a turn's path). dedicated: in a Ray actor of its own, from a warm pool (process isolation, ~160 MB a call).")
    warm_pool: int = Field(default=4, ge=0, description="dedicated placement: actors kept started and idle.")
    namespace: str = Field(default="callray", description="Ray namespace of the named host actors.")
    idle_timeout_s: float = Field(default=3600.0, gt=0, description="A call with no event for this long is deactivated (saved and dropped from memory).")
    detached_timeout_s: float = Field(default=300.0, gt=0, description="A call with no socket for this long is deactivated.")
    max_detached_calls: int = Field(default=10_000, ge=1, description="Calls without a socket one process keeps in memory (for a reconnect) at most; beyond, the longest-detached is deactivated at once.")
    max_concurrency: int = Field(default=10_000, ge=16, description="Concurrent actor calls per host (each connected call holds one).")
    handover_timeout_s: float = Field(default=1.0, gt=0, le=10, description="local placement with Redis: a call activating on one replica first asks the replica that held it to save it and let it go, so the last turn's checkpoint lands before the new claim fences it off; the claim goes ahead after this long without an answer (that replica hung).")


class TurnSettings(EnvSection):
    latency_budget_ms: float = Field(default=800.0, gt=0, description="If no speech is ready this long after a request, a holding phrase goes out (800/500/300 for the three architectures).")
    holding_phrases: list[str] = Field(
        default_factory=lambda: ["One moment.", "Let me check that.", "Just a second.", "Sure, one moment."],
        min_length=1,
        description="Short phrases said when the budget is missed; rotated per call.",
    )
    agent_timeout_s: float = Field(default=20.0, gt=0, description="A turn still unfinished after this long is completed with the agent's fallback line.")
    max_agent_state_bytes: int = Field(default=64 * 1024, ge=1024, description="Largest turn.state an agent may keep per call (as JSON); a bigger or non-JSON state is refused for that turn (logged) and the call keeps its last good state.")
    turns_kept: int = Field(default=50, ge=1, le=10_000, description="Answered turns kept in a call's state (the newest); the transcript archive keeps every turn.")
    greeting_wait_ms: float | None = Field(default=None, ge=0, le=5000, description="Hold response 0 up to this long for call_details, so the greeting can use call data and agent_id routing applies to it. Unset: up to 1000 ms, only when the agent's greeting uses call data or agent_id routing is configured; 0: greet at once.")


class RedisSettings(EnvSection):
    """The one Redis of a deployment: every section whose backend is Redis uses it, and so do the
    command channel between replicas and the webhook dedupe."""

    url: str = Field(default="${REDIS_URL:-redis://127.0.0.1:6379/0}", description="Redis URL (redis:// or rediss://); used only when a section's backend is Redis. Put the password in REDIS_URL, not in the file.")
    timeout_s: float = Field(default=1.0, gt=0, le=30, description="Connect, command and pool-wait timeout: a turn never waits on Redis longer (commands are not retried; the write-behind store and the bus retry in the background).")
    max_connections: int = Field(default=128, ge=1, description="Connections per process; beyond, a command waits up to timeout_s for one.")


class StateSettings(EnvSection):
    backend: Literal["memory", "redis"] = Field(default="memory", description="memory: lost with the host (single architecture). redis: survives any process.")
    ttl_s: float = Field(default=3600.0, gt=0, description="Call state expires this long after the last activity.")

    _moved = moved(redis_url="moved to the top-level redis section: write 'redis: {url: ...}'")


class CacheSettings(EnvSection):
    enabled: bool = Field(default=True, description="Serve repeated cacheable answers from the response cache.")
    backend: Literal["memory", "redis"] = Field(default="memory", description="memory: per host LRU. redis: shared by all hosts.")
    ttl_s: float = Field(default=3600.0, gt=0, description="How long a cached answer lives.")
    max_entries: int = Field(default=10_000, ge=1, description="memory backend: LRU size per host.")
    lookup_deadline_ms: float = Field(default=50.0, gt=0, le=1000, description="redis backend: a lookup slower than this counts as a miss and the turn goes on (a healthy Redis answers in a few ms); the cache is then skipped for cooldown_s.")
    cooldown_s: float = Field(default=5.0, gt=0, description="redis backend: how long the cache is skipped after a lookup missed its deadline.")


class EscalationRules(EnvSection):
    """When to hand a caller to a human, and how."""

    human_phrases: list[str] = Field(
        default_factory=lambda: [
            "speak to a human", "talk to a human", "speak to a person", "talk to a person", "real person",
            "human being", "speak to someone", "talk to someone", "speak to an agent", "representative", "operator",
        ],
        description="Caller phrases asking for a human (matched on normalised text at word boundaries).",
    )
    max_fallback_turns: int = Field(
        default=2, ge=0,
        description="Escalate after this many fallback turns in a row (the agent failed to answer); 0 disables.",
    )
    negative_phrases: list[str] = Field(
        default_factory=lambda: ["this is useless", "not helping", "you're useless", "ridiculous", "so frustrated",
                                 "waste of time"],
        description="Caller phrases showing frustration (normalised, word boundaries).",
    )
    repeated_question: int = Field(
        default=3, ge=0,
        description="Escalate when the caller says the same (normalised) thing this many times; 0 disables.",
    )
    keywords: list[str] = Field(
        default_factory=list,
        description="Words or phrases that always escalate, e.g. 'lawyer', 'emergency' (normalised, word boundaries).",
    )
    transfer_number: str | None = Field(
        default=None,
        description="E.164 number to transfer the call to; without it only the notification is sent.",
    )
    handoff_line: str = Field(
        default="Let me connect you with a colleague who can help.",
        description="What the agent says before the transfer.",
    )
    notify_url: str | None = Field(default=None, description="Optional URL that receives a signed JSON POST per escalation.")
    notify_secret_env: str | None = Field(
        default="CALLRAY_ESCALATION_SECRET",
        description="Environment variable holding the HMAC secret for X-Callray-Signature; None sends unsigned.",
    )
    notify_timeout_s: float = Field(default=5.0, gt=0, description="Timeout of the notification POST.")
    caller_lines: int = Field(default=5, ge=0, description="How many recent caller lines the notification carries.")
    claim_ttl_s: int = Field(default=7 * 86_400, gt=0, description="Lifetime of the Redis marker that a call was escalated (written after the transfer).")


class EventsSettings(EnvSection):
    backend: Literal["memory", "redis_streams"] = Field(default="memory", description="memory: each host runs the consumers in-process, best effort. redis_streams: durable, at-least-once, consumed by background actors.")
    buffer: int = Field(default=10_000, ge=1, description="Events buffered per process before new ones are dropped (and counted).")
    stream: str = Field(default="callray:events", description="redis_streams: the stream name (its dead letters go to '<stream>:dead').")
    maxlen: int = Field(default=100_000, ge=1000, description="Events kept for replay (analytics rebuilds from them after a restart); older ones are trimmed once every consumer group has acknowledged them.")
    retention_hours: float | None = Field(default=None, gt=0, description="redis_streams: acknowledged events (and dead letters) older than this are trimmed, whatever maxlen allows, so an idle deployment does not keep its callers' words for months; null: maxlen alone bounds them. After a restart, analytics count what the stream still holds.")
    max_retained: int = Field(default=1_000_000, ge=1000, description="The memory bound: beyond this many events the oldest are dropped even if a consumer group has not acknowledged them, each counted (callray_events_trimmed_unconsumed) and logged. Dead letters are kept up to the same bound.")
    max_deliveries: int = Field(default=5, ge=1, description="redis_streams: after this many deliveries an event goes to the dead-letter stream.")
    claim_idle_ms: int = Field(default=30_000, ge=100, description="redis_streams: events pending this long on a dead consumer are taken over (XAUTOCLAIM).")
    escalation: EscalationRules | None = Field(default=None, description="Escalation rules evaluated on the event stream; null disables escalation.")

    _moved = moved(archive_dir="moved to the top-level archive section: write 'archive: {backend: files, dir: ...}' "
                               "(or 'backend: none' for no archive)")

    @model_validator(mode="after")
    def _retained_covers_maxlen(self) -> "EventsSettings":
        if self.max_retained < self.maxlen:
            raise ValueError(f"max_retained ({self.max_retained}) must be >= maxlen ({self.maxlen})")
        return self


class ArchiveSettings(EnvSection):
    """Where each call's record (turns, timings, Retell's call object) is kept after the call
    (GET /calls/{call_id}, the live page's ended calls)."""

    backend: Literal["files", "postgres", "none"] = Field(default="files", description="files: one JSON file per call in 'dir', on the node that runs the archive (one machine). postgres: a PostgreSQL database every node shares (a cluster). none: no archive.")
    dir: str = Field(default="var/calls", description="files: the directory.")
    database_url: str = Field(default="${DATABASE_URL:-}", description="postgres: postgresql://user@host:port/database. Put the password in DATABASE_URL, not in the file.")
    pool_size: int = Field(default=4, ge=1, le=100, description="postgres: connections per archive process.")
    timeout_s: float = Field(default=5.0, gt=0, le=60, description="postgres: a connect or query slower than this fails; the events stay pending in the stream and the write is retried.")
    retention_days: float | None = Field(default=None, gt=0, description="Records of calls that ended longer ago than this are deleted by a purge once an hour (counted); null keeps them.")

    @model_validator(mode="after")
    def _postgres_needs_a_url(self) -> "ArchiveSettings":
        if self.backend == "postgres" and not self.database_url:
            raise ValueError("archive.backend 'postgres' needs archive.database_url: set DATABASE_URL "
                             "(postgresql://user:password@host:5432/database)")
        return self


class WebhookSettings(EnvSection):
    enabled: bool = Field(default=True, description="Serve POST /webhook for Retell's webhooks (the agent's webhook URL).")
    api_key: str = Field(default="${RETELL_API_KEY:-}", description="Retell API key that signs webhooks; empty refuses every webhook with 401.")
    tolerance_s: float = Field(default=300.0, gt=0, description="Reject signatures whose timestamp is further than this from now.")
    max_body_bytes: int = Field(default=1 << 20, ge=1024, description="Larger webhook bodies are refused with 413.")


class InboundAnswer(EnvSection):
    """What callray answers Retell's inbound webhook for one call (every field optional)."""

    override_agent_id: str | None = Field(default=None, description="The Retell agent that takes the call instead of the number's own.")
    override_agent_version: int | None = Field(default=None, ge=0, description="The version of that agent.")
    dynamic_variables: dict[str, str] = Field(default_factory=dict, description="Variables for the call's prompts and greeting (the agent reads them as turn.variables).")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Kept with the call object.")


class InboundSettings(EnvSection):
    """Retell's inbound call webhook (POST /webhook/inbound): set it as the phone number's
    inbound webhook URL. Signed like the other webhooks (webhook.api_key)."""

    numbers: dict[str, InboundAnswer] = Field(default_factory=dict, description="Dialled number (E.164) -> the answer for calls to it.")
    hook: str | None = Field(default=None, description="Python hook 'module:function' (found in the working directory, then on sys.path) called with the webhook's call_inbound object; what it returns (a mapping of InboundAnswer's fields, or None) is laid over the table's answer.")
    timeout_s: float = Field(default=2.0, gt=0, le=8, description="A hook slower than this is ignored (logged): Retell drops a call whose webhook takes 10 s.")


class PrivacySettings(EnvSection):
    """What leaves a live call: the events, and from them the stream, the archive, the analytics,
    the live page and escalation notices; and the logs. The agent always hears the real words."""

    redact: bool = Field(default=True, description="Replace callers' identifiers (the kinds below) with typed placeholders ([PHONE], [EMAIL], [CARD], [SSN]) in everything that leaves a live call, and in log lines.")
    kinds: list[Literal["phone", "email", "card", "ssn"]] = Field(default_factory=lambda: ["phone", "email", "card", "ssn"], description="Which identifiers to redact: phone numbers (any format, see default_region), e-mail addresses, payment card numbers (Luhn-checked), US social security numbers.")
    default_region: str = Field(default="US", min_length=2, max_length=2, description="Country (ISO 3166 alpha-2) of phone numbers written without a country code.")
    caller_key: str | None = Field(default="${CALLRAY_PRIVACY_KEY:-}", description="Secret of the keyed hash that stands for the caller's number in redacted records, so that erasure by phone number (DELETE /callers/{number}, callray erase --phone) still finds a caller's calls. Unset: redacted records cannot be found by number.")

    @field_validator("caller_key")
    @classmethod
    def _empty_is_none(cls, v: str | None) -> str | None:
        return v or None

    @field_validator("default_region")
    @classmethod
    def _known_region(cls, v: str) -> str:
        import phonenumbers

        if v.upper() not in phonenumbers.SUPPORTED_REGIONS:
            raise ValueError(f"unknown region {v!r}: an ISO 3166 alpha-2 code such as US, GB, DE")
        return v.upper()

    def redactor(self) -> "Redactor | None":
        """The redactor these settings ask for (None with ``redact: false``)."""
        from callray.privacy import Redactor

        if not self.redact:
            return None
        return Redactor(kinds=self.kinds, default_region=self.default_region, caller_key=self.caller_key)

    def caller(self, number: str) -> list[str]:
        """What the archive may hold for a caller's number: the number in E.164 and, with a
        key, its keyed hash. Raises ValueError for what is not a phone number."""
        from callray.privacy import keyed_number, normalise_number

        e164 = normalise_number(number, self.default_region)
        return [e164] + ([keyed_number(e164, self.caller_key.encode())] if self.caller_key else [])


class LoggingSettings(EnvSection):
    level: str = Field(default="INFO", description="Level of the callray loggers.")
    json_lines: bool = Field(default=True, description="One JSON object per line (with call_id) instead of plain text.")
    mask_pii: bool = Field(default=True, description="Mask phone numbers and caller text in logs (secrets are always masked).")
    tracing: bool = Field(default=False, description="One OpenTelemetry span per turn, sent to the process's tracer provider (OTEL_* environment).")


class CallraySettings(EnvSection):
    """callray's application settings (the ``args`` of the Serve app)."""

    architecture: Literal["single", "distributed", "event_driven"] = Field(default="single", description="Which of the three architectures this config describes (documentation and metrics label).")
    agents: AgentsSettings = Field(default_factory=AgentsSettings)
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    hosts: HostsSettings = Field(default_factory=HostsSettings)
    turns: TurnSettings = Field(default_factory=TurnSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    state: StateSettings = Field(default_factory=StateSettings)
    cache: CacheSettings = Field(default_factory=CacheSettings)
    events: EventsSettings = Field(default_factory=EventsSettings)
    archive: ArchiveSettings = Field(default_factory=ArchiveSettings)
    webhook: WebhookSettings = Field(default_factory=WebhookSettings)
    inbound: InboundSettings = Field(default_factory=InboundSettings)
    privacy: PrivacySettings = Field(default_factory=PrivacySettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)

    @model_validator(mode="after")
    def _durable_events_need_durable_state(self) -> "CallraySettings":
        if self.events.backend == "redis_streams" and self.state.backend != "redis":
            raise ValueError("events.backend 'redis_streams' needs state.backend 'redis': an event's identity "
                             "rests on the call's owner epoch, which in-memory state forgets on a restart")
        return self

    @property
    def uses_redis(self) -> bool:
        """Whether any section's backend is Redis (then ``redis.url`` must answer at start)."""
        return (self.state.backend == "redis" or self.events.backend == "redis_streams"
                or (self.cache.enabled and self.cache.backend == "redis"))

    def configure_logging(self) -> None:
        """Apply the logging and tracing settings in this process (gateway replica or actor)."""
        redactor = self.privacy.redactor()
        configure_logging(self.logging.level, json=self.logging.json_lines, mask_pii=self.logging.mask_pii,
                          redact=redactor.text if redactor is not None else None)
        tracing.enable(self.logging.tracing)

    @classmethod
    def parse(cls, args: dict[str, Any] | None, *, source: str = "application args") -> "CallraySettings":
        """Validate raw args (env references expanded, once); errors name ``source`` and the field."""
        try:
            return cls.model_validate(args or {})
        except ValidationError as exc:
            lines = [f"{source}: {problem}" for problem in describe_validation(exc)]
            raise SettingsError("invalid callray settings:\n  " + "\n  ".join(lines)) from None


def load_serve_config(path: str | Path, app_index: int = 0) -> tuple[dict[str, Any], CallraySettings]:
    """Read a Serve config file and validate its callray application's args."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SettingsError(f"{path}: cannot read YAML: {exc}") from None
    try:
        app = doc["applications"][app_index]
    except (TypeError, KeyError, IndexError):
        raise SettingsError(f"{path}: applications.{app_index}: no such Serve application") from None
    return doc, CallraySettings.parse(app.get("args"), source=f"{path} (applications.{app_index}.args)")
