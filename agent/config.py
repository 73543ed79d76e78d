"""The one settings model and its sources.

Sources, strongest first: command-line flags (passed to :func:`load_settings` as ``overrides``),
environment (``CHRONICLE_AGENT_`` prefix, ``__`` for nesting), the TOML file, defaults.

The TOML file is ``--config PATH``, else ``$CHRONICLE_AGENT_CONFIG``, else
``/etc/chronicle-agent/config.toml`` for root or
``$XDG_CONFIG_HOME/chronicle-agent/config.toml``. A missing default file is fine; a missing
file that was asked for by name is an error.

Any unknown key or bad value raises :class:`agent.errors.ConfigError` with one line naming the
key, the value and what was expected.
"""

from __future__ import annotations

import contextvars
import getpass
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from agent.errors import ConfigError
from agent.paths import SOCKET_ENV, fallback_socket_path

MiB = 1024 * 1024
ENV_PREFIX = "CHRONICLE_AGENT_"
Visibility = Literal["private", "organization", "team", "public"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ChronicleSection(_Section):
    url: str = ""
    """Chronicle's base URL; empty means the embedded local server."""
    token_file: Path | None = None
    token: SecretStr | None = None
    """Only from the environment (CHRONICLE_AGENT_CHRONICLE__TOKEN); refused in the TOML file."""
    request_timeout_s: float = 60.0


class AgentSection(_Section):
    state_dir: Path | None = None
    socket_path: Path | None = None
    socket_mode: int = 0o660
    socket_group: str = ""
    roots: list[Path] = Field(default_factory=list)
    """Directories the daemon may read from and write into for callers; empty = no limit
    beyond the caller's own permissions."""
    workers: int = Field(default=4, ge=1, le=256)
    """Jobs worked on at once (transfers within them share upload.concurrency)."""
    nice: int = Field(default=10, ge=0, le=19)
    """CPU niceness the daemon gives itself at start (never lowered); 0 = leave it."""
    io_class: Literal["idle", "best-effort", "unchanged"] = "idle"
    """I/O scheduling class the daemon gives itself at start, so training's reads and
    checkpoint writes come first."""
    api_body_budget_bytes: int = Field(default=32 * MiB, ge=1 * MiB)
    """Bytes of request bodies the socket API reads at once, across callers; a request past
    it is answered 503 busy (Retry-After: 1; the Python client and the CLI wait and retry).
    Never less than one largest body (server.inline_max_bytes + 1 MiB)."""
    bulk_policy: Literal["idle", "batch", "normal"] = "idle"
    """Scheduling policy of the threads that read, hash, copy and write transferred bytes
    (and the embedded server's ingest): "idle" (SCHED_IDLE: a core only when nothing else
    wants it), "batch" (SCHED_BATCH at the daemon's niceness), "normal"."""
    cpus: list[int] = Field(default_factory=list)
    """CPUs the daemon runs on (set at start), for nodes that keep cores for services;
    empty = every CPU it was given."""
    busy_cpu_fraction: float = Field(default=0.4, ge=0, le=1)
    """Hold back when other processes use this fraction of the daemon's CPUs (training is
    busy on them): transfers together are capped at busy_bytes_per_s. 0 = never."""
    busy_bytes_per_s: int = Field(default=16 * MiB, ge=64 * 1024)
    """The transfer rate while holding back; also the progress floor: transfers that move
    less than half of it for 5 looks stop yielding until they catch up."""
    busy_check_s: float = Field(default=1.0, gt=0, le=60)
    """How often the daemon looks at the CPU use of other processes."""
    metrics_listen: str = ""
    """HOST:PORT on loopback to serve /metrics over TCP too (for Prometheus); empty = only
    on the socket."""


class UploadSection(_Section):
    concurrency: int = Field(default=8, ge=1, le=1024)
    """Transfers (PUTs, part PUTs and GETs) in flight at once, across every job."""
    max_attempts: int = Field(default=8, ge=1, le=1000)
    """Attempts per request on retryable errors before the job gives up this round."""
    job_max_attempts: int = Field(default=5, ge=1, le=1000)
    """Rounds per job: a job whose requests ran out of retries is queued again (after 30 s,
    doubling up to 10 min) until it has been tried this many times, then it fails."""
    backoff_base_s: float = Field(default=0.5, gt=0)
    backoff_max_s: float = Field(default=20.0, gt=0)
    stall_timeout_s: float = Field(default=30.0, gt=0)
    """A transfer that moves no byte for this long is cut and retried."""
    connect_timeout_s: float = Field(default=10.0, gt=0)
    bandwidth_limit_bytes_per_s: int = Field(default=0, ge=0)
    """0 = unlimited."""
    chunk_bytes: int = Field(default=1 * MiB, ge=4096, le=64 * MiB)
    """Read size when streaming from disk."""
    visibility: Visibility = "private"


class DownloadSection(_Section):
    range_bytes: int = Field(default=32 * MiB, ge=1 * MiB, le=5 * 1024 * MiB)
    """A component larger than this is fetched as ranged GETs of this size, several at
    once (within upload.concurrency), written in place; each finished range is recorded,
    so a restart fetches only the ranges still missing."""
    range_streams: int = Field(default=0, ge=0, le=64)
    """Ranges of one component fetched at once (all within upload.concurrency). 0: one per
    two CPUs the daemon may run on, at most 4. Streams into one file contend for its lock
    and cost CPU per byte: on 2 CPUs one stream per component was fastest."""
    cache_dir: Path | None = None
    """Node-local cache of ready assets (default <state_dir>/cache)."""
    cache_max_bytes: int = Field(default=50 * 1024 * MiB, ge=0)
    """Cache size cap; least recently used entries are evicted past it. 0 = no cache.
    An asset larger than the cap bypasses the cache."""
    cache_uploads: bool = True
    """A watched checkpoint's snapshot, once its upload is finalized, is moved into the
    cache (no copy) instead of being deleted, so a restore on this node reads it from
    disk. A snapshot file hardlinked to the checkpoint's own keeps that file's space in use
    until the cache evicts the entry (least recently used, within cache_max_bytes)."""
    disk_full_retry_s: float = Field(default=30.0, gt=0)
    """A download that ran out of disk space goes back to the queue, its partial files
    kept, and tries again after this long (doubling each time, at most 10 min), until
    upload.job_max_attempts; then it fails with disk_full and `retry` resumes it."""
    restore_dir: Path | None = None
    """Where ``Run.restore()`` without a ``dest`` puts what it restores, as
    ``<restore_dir>/<run id>/<asset id>`` (read by the training process, not the daemon;
    default ``$XDG_CACHE_HOME/chronicle-agent/restore``, i.e. ``~/.cache/…``)."""


SealKind = Literal["marker", "dcp_metadata", "rename_dir", "rename_file", "format", "quiescence"]
DEFAULT_SEALS: tuple[SealKind, ...] = ("marker", "dcp_metadata", "rename_dir", "rename_file",
                                       "format", "quiescence")
DEFAULT_MARKERS = ("_SUCCESS", "commit_success.txt", "trainer_state.json")
"""Spark/Hadoop, Orbax on object stores, and the Hugging Face Trainer (which writes
``checkpoint-N`` in place and its ``trainer_state.json`` last)."""
DEFAULT_TMP_PATTERNS = ("tmp-{name}", "{name}.orbax-checkpoint-tmp",
                        "{name}.orbax-checkpoint-tmp-*", "{name}.tmp", "{name}.tmp.*",
                        ".{name}.tmp*")


class WatchRule(_Section):
    path: str
    """Glob of checkpoint paths (directories or files), e.g. /scratch/runs/*/ckpt/step-*."""
    asset_type: str = "checkpoint"
    seal: list[SealKind] = Field(default_factory=lambda: list(DEFAULT_SEALS))
    markers: list[str] = Field(default_factory=lambda: list(DEFAULT_MARKERS))
    quiescence_s: float = Field(default=30.0, gt=0)
    run_id: str = ""
    """Where the run id comes from: a literal id, or "{N}" for the N-th path segment of the
    match, or empty for the run that registered the rule."""
    copy_files: list[str] = Field(default_factory=list)
    """Globs (relative to the checkpoint) of files copied at seal rather than hardlinked,
    for writers that rewrite a file in place."""
    poll: bool | None = None
    """Force polling (True) or events (False); None = decide by filesystem type."""
    tmp_patterns: list[str] = Field(default_factory=lambda: list(DEFAULT_TMP_PATTERNS))
    """Names a writer gives a checkpoint before renaming it into place ("{name}" is the
    final name, "*" any text): ignored until renamed; the rename seals (rename_dir,
    rename_file)."""
    nodes: int = Field(default=1, ge=1, le=65536)
    """How many nodes write each checkpoint (docs/multinode.md). Above 1, every node's
    agent joins one asset per checkpoint (API 1.1 asset_keys) with the files it holds, and
    the node holding the checkpoint's index (DCP .metadata, a safetensors index) finalizes
    it once every file the index names is uploaded and every node has joined; with no
    index, node 0 does once every node has joined."""
    node_rank: int | None = Field(default=None, ge=0)
    """This node's rank among them (0 ends the run on Chronicle; None: unknown)."""
    shared: bool = False
    """Every node sees each checkpoint whole (a shared filesystem): the agents split its
    files between them (agent.transfer.shares). Found by itself on a network filesystem
    (NFS, Lustre, GPFS…) where the checkpoint's index names only files that are here; set
    it for writers without an index, or a shared filesystem not known as one."""

    @field_validator("path")
    @classmethod
    def _absolute(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("must be an absolute path glob")
        return v

    @field_validator("tmp_patterns")
    @classmethod
    def _has_name(cls, v: list[str]) -> list[str]:
        for pattern in v:
            if pattern.count("{name}") != 1:
                raise ValueError(f"{pattern!r} must contain {{name}} once")
        return v


class WatcherSection(_Section):
    """How the daemon watches (the rules themselves are the [[watch]] tables)."""

    rescan_s: float = Field(default=30.0, gt=0)
    """Full rescan of every rule's directories: events are only hints."""
    check_s: float = Field(default=1.0, gt=0)
    """How often checkpoints not yet sealed are looked at again (quiescence, staging)."""
    debounce_ms: int = Field(default=400, ge=1)
    """Longest time file events are grouped before they are handled (a writer busy for
    seconds still gets its finished checkpoints looked at this often)."""
    step_ms: int = Field(default=50, ge=1)
    """Events are handled once none arrived for this long."""
    poll_delay_ms: int = Field(default=1000, ge=10)
    """Polling interval on network filesystems (NFS, Lustre, GPFS, CIFS, ...)."""
    staging_max_bytes: int = Field(default=64 * 1024 * MiB, ge=0)
    """Bytes the staging area may hold on its own (copies, and snapshots whose original
    the writer already deleted); above it, new seals wait. 0 = no cap."""


class QueueSection(_Section):
    """What the queue keeps, and how much of it each caller may fill."""

    finished_retention_s: float = Field(default=7 * 24 * 3600.0, gt=0)
    """Finished jobs (done, failed, cancelled, abandoned) are deleted this long after they
    ended (checked every minute). An inline job's content is dropped as soon as it is sent."""
    quota_jobs: int = Field(default=10_000, ge=1)
    """Queued and running jobs one uid may have at once; past it the socket API answers 429
    quota_exceeded."""
    quota_payload_bytes: int = Field(default=1024 * MiB, ge=1)
    """Bytes of job payloads (inline contents, mostly) one uid's jobs may hold in queue.db:
    queued and running jobs, and failed or cancelled ones (they can be retried) until they
    are pruned; past it the socket API answers 429 quota_exceeded."""
    quota_exempt_root: bool = True
    """Root's calls (uid 0: the operator, system services) are not counted against quotas."""


class RunsSection(_Section):
    lease_s: float = Field(default=60.0, gt=0)
    on_exit: Literal["drain", "abandon"] = "drain"
    join_wait_s: float = Field(default=600.0, ge=0)
    """A checkpoint several nodes write (docs/multinode.md): how long the node that
    finalizes it still waits for the other nodes' files once its own run has ended; then
    the asset is abandoned (never finalized partial) and the job fails ``nodes_missing``."""
    takeover_s: float = Field(default=120.0, gt=0)
    """A checkpoint on a filesystem several nodes share, its files split between their
    agents: how long an agent's share waits with no sign of life from that agent (its
    heartbeat file on the shared filesystem) before another agent takes it over."""


class ServerSection(_Section):
    listen: str = ""
    """HOST:PORT; empty = 127.0.0.1:8470 standalone, an ephemeral loopback port embedded."""
    public_url: str = ""
    state_dir: Path | None = None
    storage: str = ""
    """file:///DIR (default: <state_dir>/objects) or s3://BUCKET?endpoint=URL."""
    multipart_threshold_bytes: int = Field(default=64 * MiB, ge=5 * MiB)
    part_size_bytes: int = Field(default=32 * MiB, ge=5 * MiB)
    tokens_file: Path | None = None
    url_expiry_s: int = Field(default=3600, ge=1)
    pending_ttl_s: int = Field(default=7 * 86400, ge=1)
    """A pending asset with no upload activity (URLs asked for, components added, its
    uploads listed, a PUT to the disk store) for this long is abandoned with reason
    ``expired`` and its storage released (API 1.1)."""
    sweep_interval_s: float = Field(default=300.0, gt=0)
    """How often the server looks for pending assets past ``pending_ttl_s``."""
    gc_interval_s: float = Field(default=3600.0, ge=0)
    """How often the storage sweep looks for what failures left in storage (bytes of
    abandoned and deleted assets, objects with no asset row, multipart uploads no pending
    component names) and removes it; the first sweep runs this long after start. 0 = never
    (``chronicle-agent server gc`` still works)."""
    gc_grace_s: float = Field(default=3600.0, ge=0)
    """The storage sweep removes nothing written less than this long ago (a registration in
    flight writes before its row exists); an empty object that may be a deleted component's
    tombstone stays ``url_expiry_s`` longer."""
    checksum_urls: bool = True
    """Offer checksum-bound upload URLs (API 1.1 ``checksum_urls``): a single-PUT component
    registered with its SHA-256 gets a URL with the digest signed in, so the store refuses
    other bytes and finalize reads nothing back. Off: the version-1 behaviour."""
    asset_keys: bool = True
    """Offer assets built by several uploaders (API 1.1 ``asset_keys``): a register with a
    ``key`` joins the pending asset that has it, and ``POST /v1/assets/{id}/components`` adds
    components (the daemon uses it to declare a directory's small files while the first
    ones upload). Off: neither is offered."""
    search: bool = True
    """Offer ``GET /v1/assets/search`` (API 1.1 ``search``): full-text search (SQLite FTS5)
    over asset types, component names, validity reasons and inline assets' text, limited to
    what the caller may read."""
    inline_max_bytes: int = Field(default=8 * MiB, ge=1)
    max_connections: int = Field(default=256, ge=1)
    """Concurrent connections to the server's TCP port; more are closed at once (at most
    half the process's descriptor limit, which the embedding daemon shares)."""
    header_timeout_s: float = Field(default=10.0, gt=0)
    """A new connection must send its first request's headers within this time."""
    keepalive_timeout_s: float = Field(default=30.0, gt=0)
    """An idle connection (between requests, or the headers of a later request) is closed."""
    json_body_budget_bytes: int = Field(default=128 * MiB, ge=MiB)
    """Bytes of JSON request bodies being read at once, all requests together; a request
    that does not fit is answered 503 with Retry-After."""
    log_interval_s: float = Field(default=60.0, gt=0)
    """Refused connections, timeouts and malformed requests: one WARNING line with counts
    per this many seconds at most."""


class LogSection(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"


class DebugSection(_Section):
    crash_point: str = ""
    """Makes the daemon SIGKILL itself at a named step, for crash-recovery tests:
    before_register, after_register_sent, after_register, after_part:N, after_component:N,
    after_declare:N, before_finalize,
    after_finalize_sent, after_finalize; in the local server: after_asset_deleted (the row
    gone, its bytes not yet), before_release (an asset abandoned, its storage not yet
    released), gc_removed:N (the N-th batch of the storage sweep removed). Empty = never."""
    block_loop: str = Field(default="", pattern=r"^$|^[a-z_]+(:[0-9]+)?:[0-9]+(\.[0-9]+)?$")
    """Debug only, never in production: "<point>:<seconds>" blocks the daemon's event loop
    (time.sleep on its thread) for that long, once, at a crash point's step, to test what a
    stuck loop does (the systemd watchdog pings stop). Empty = never."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    chronicle: ChronicleSection = Field(default_factory=ChronicleSection)
    agent: AgentSection = Field(default_factory=AgentSection)
    upload: UploadSection = Field(default_factory=UploadSection)
    download: DownloadSection = Field(default_factory=DownloadSection)
    watch: list[WatchRule] = Field(default_factory=list)
    watcher: WatcherSection = Field(default_factory=WatcherSection)
    queue: QueueSection = Field(default_factory=QueueSection)
    runs: RunsSection = Field(default_factory=RunsSection)
    server: ServerSection = Field(default_factory=ServerSection)
    log: LogSection = Field(default_factory=LogSection)
    debug: DebugSection = Field(default_factory=DebugSection)

    @field_validator("watch", mode="before")
    @classmethod
    def _watch_list(cls, v: Any) -> Any:
        return v if v is not None else []

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _TomlSource(settings_cls))

    # ---- resolved paths -------------------------------------------------------------

    def state_dir(self) -> Path:
        if self.agent.state_dir is not None:
            return self.agent.state_dir
        if os.geteuid() == 0:
            return Path("/var/lib/chronicle-agent")
        base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        return Path(base) / "chronicle-agent"

    def socket_path(self) -> Path:
        return resolve_socket_path(self.agent.socket_path)

    def server_state_dir(self) -> Path:
        return self.server.state_dir or (self.state_dir() / "server")

    def cache_dir(self) -> Path:
        return self.download.cache_dir or (self.state_dir() / "cache")

    def token(self) -> str | None:
        """The daemon's own Chronicle token: env, else token_file, else systemd credential."""
        if self.chronicle.token is not None:
            return self.chronicle.token.get_secret_value()
        if self.chronicle.token_file is not None:
            try:
                return self.chronicle.token_file.read_text().strip()
            except OSError as e:
                raise ConfigError(
                    f"chronicle.token_file = {str(self.chronicle.token_file)!r}: cannot read "
                    f"({e.strerror})"
                ) from None
        cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
        if cred_dir:
            p = Path(cred_dir) / "chronicle-token"
            if p.exists():
                return p.read_text().strip()
        return None


def resolve_socket_path(configured: Path | None = None) -> Path:
    env = os.environ.get(SOCKET_ENV)
    if env:
        return Path(env)
    if configured is not None:
        return configured
    return fallback_socket_path()


def default_config_path() -> tuple[Path, bool]:
    """The TOML file to read and whether it was asked for explicitly."""
    env = os.environ.get(ENV_PREFIX + "CONFIG")
    if env:
        return Path(env), True
    if os.geteuid() == 0:
        return Path("/etc/chronicle-agent/config.toml"), False
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "chronicle-agent" / "config.toml", False


_CONFIG_FILE: contextvars.ContextVar[tuple[Path, bool] | None] = contextvars.ContextVar(
    "chronicle_agent_config_file", default=None)
"""The TOML file :func:`load_settings` is reading and whether it was asked for, for the
duration of that call only: a ``Settings()`` built anywhere else reads no file."""


class _TomlSource(PydanticBaseSettingsSource):
    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        chosen = _CONFIG_FILE.get()
        if chosen is None:
            return {}
        path, required = chosen
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            if required:
                raise ConfigError(f"config file {str(path)!r} does not exist") from None
            return {}
        except OSError as e:
            raise ConfigError(f"config file {str(path)!r}: cannot read ({e.strerror})") from None
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {str(path)!r}: not valid TOML ({e})") from None
        chron = data.get("chronicle")
        if isinstance(chron, dict) and "token" in chron:
            raise ConfigError(
                f"config file {str(path)!r}: chronicle.token is not allowed in the file; "
                "use chronicle.token_file or CHRONICLE_AGENT_CHRONICLE__TOKEN"
            )
        return data


def _format_error(e: ValidationError) -> str:
    err = e.errors(include_url=False)[0]
    key = ".".join(str(p) for p in err["loc"]) or "(top level)"
    value = err.get("input")
    if err["type"] == "extra_forbidden":
        return f"unknown config key {key!r}"
    shown = "****" if "token" in key else repr(value)
    more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
    return f"config key {key!r} = {shown}: {err['msg']}{more}"


def load_settings(
    config_path: Path | str | None = None, overrides: dict[str, Any] | None = None
) -> Settings:
    """Build the settings from every source. ``overrides`` are command-line flags, nested
    as in the TOML file (``{"server": {"listen": "127.0.0.1:0"}}``)."""
    token = _CONFIG_FILE.set((Path(config_path), True) if config_path is not None
                             else default_config_path())
    try:
        return Settings(**(overrides or {}))
    except ValidationError as e:
        raise ConfigError(_format_error(e)) from None
    except ValueError as e:  # pydantic-settings' own parse errors (bad JSON in env, ...)
        raise ConfigError(str(e).splitlines()[0]) from None
    finally:
        _CONFIG_FILE.reset(token)


def local_login() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid{os.getuid()}"
