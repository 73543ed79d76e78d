"""The exception tree of chronicle-agent.

::

    AgentError
    ├── ConfigError              bad configuration (CLI exit 2)
    ├── UsageError               bad input from a caller: a missing path, a bad name (exit 2)
    │   └── NothingSelected      --include/--exclude select no component of the asset
    ├── NoReadyAsset             "the latest ready asset" of a run and type: there is none
    ├── DaemonUnreachable        no daemon on the socket (exit 3)
    ├── StateDiskFull            the daemon's state disk is full: intake stops
    ├── QuotaExceeded            a uid's live jobs or payload bytes are at [queue]'s quota
    ├── ApiError                 the daemon's socket API refused a call (exit 1)
    │   └── RunEnded             409 run_ended: the run id names a run that has ended
    ├── JobFailed                a job a caller waited for ended failed/cancelled/abandoned
    ├── ChronicleError           Chronicle answered with an error body (status, code, message)
    │   ├── NotFound             404 not_found
    │   ├── Forbidden            403 forbidden
    │   ├── InvalidRequest       400 invalid_request
    │   ├── Conflict             409 conflict (and the other 409 codes below)
    │   │   ├── AssetLinked          asset_linked
    │   │   ├── AssetInvalid         asset_invalid
    │   │   ├── AssetNotPending      asset_not_pending
    │   │   └── ComponentsMissing    components_missing
    │   ├── ChecksumMismatch     422 checksum_mismatch
    │   └── PayloadTooLarge      413
    └── TransferError            talking to storage or Chronicle went wrong
        ├── RetryableError       worth another attempt: reset, timeout, 408/429/5xx, SlowDown
        │   ├── PeerClosed       the peer broke the connection (reset, disconnect, truncation)
        │   └── Stalled          no byte moved for stall_timeout_s (we closed it)
        ├── UrlExpired           storage said "Request has expired": ask for fresh URLs
        ├── StorageRefused       storage answered a non-retryable 4xx
        ├── SourceChanged        a local file changed after it was registered
        ├── VerificationError    downloaded bytes do not match size or SHA-256
        └── DiskFull             no space left writing a download (ENOSPC): the job waits
                                 in the queue and resumes from its partial files

Every error carries ``code`` (snake_case, as shown in job errors) and a message that says
what was wrong. :func:`map_transport_error` is the one place that maps aiohttp and OS
errors into this tree. This module imports nothing heavy: training code imports it.
"""

from __future__ import annotations

from typing import Any


class AgentError(Exception):
    code = "agent_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class ConfigError(AgentError):
    code = "config_error"


class UsageError(AgentError):
    code = "invalid_request"


class NothingSelected(UsageError):
    """A download's include/exclude patterns select none of the asset's components."""

    code = "nothing_selected"


class NoReadyAsset(AgentError):
    """A run has no ready asset of the type asked for (yet): what ``download --latest``
    fails with, and what ``Run.restore()`` answers with ``None``."""

    code = "no_ready_asset"


class DaemonUnreachable(AgentError):
    code = "daemon_unreachable"


class StateDiskFull(AgentError):
    """The disk holding the daemon's state (its queue) is full: new work is refused; what
    is queued stays queued."""

    code = "state_disk_full"


class QuotaExceeded(AgentError):
    """A caller has as many live jobs, or as many payload bytes in the queue, as
    ``[queue]`` allows one uid (the socket API answers 429)."""

    code = "quota_exceeded"


class ApiError(AgentError):
    """The daemon refused a socket call; ``status`` is the HTTP status it answered."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message, code=code)
        self.status = status


class RunEnded(ApiError):
    """A run id that names a run that has already ended (finished, failed or crashed):
    ``Run(run_id)`` raises it at once rather than queue work that nothing will take."""

    code = "run_ended"


class JobFailed(AgentError):
    code = "job_failed"

    def __init__(self, job: dict[str, Any]) -> None:
        err = job.get("error") or {}
        msg = f"job {job.get('job_id')} ended {job.get('state')}"
        if err:
            msg += f": {err.get('code')}: {err.get('message')}"
        super().__init__(msg, code=err.get("code") or "job_failed")
        self.job = job


class ChronicleError(AgentError):
    code = "chronicle_error"

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message, code=code)
        self.status = status

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class NotFound(ChronicleError):
    pass


class Forbidden(ChronicleError):
    pass


class InvalidRequest(ChronicleError):
    pass


class Conflict(ChronicleError):
    pass


class AssetLinked(Conflict):
    pass


class AssetInvalid(Conflict):
    pass


class AssetNotPending(Conflict):
    pass


class ComponentsMissing(Conflict):
    pass


class ChecksumMismatch(ChronicleError):
    pass


class PayloadTooLarge(ChronicleError):
    pass


_BY_CODE: dict[str, type[ChronicleError]] = {
    "not_found": NotFound,
    "forbidden": Forbidden,
    "invalid_request": InvalidRequest,
    "conflict": Conflict,
    "asset_linked": AssetLinked,
    "asset_invalid": AssetInvalid,
    "asset_not_pending": AssetNotPending,
    "components_missing": ComponentsMissing,
    "checksum_mismatch": ChecksumMismatch,
    "payload_too_large": PayloadTooLarge,
}
_BY_STATUS: dict[int, type[ChronicleError]] = {
    400: InvalidRequest,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    422: ChecksumMismatch,
}


def chronicle_error(status: int, body: Any) -> ChronicleError:
    """Build the right ChronicleError from a status and a decoded JSON body (or None)."""
    code, message = f"http_{status}", f"Chronicle answered HTTP {status}"
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        code = str(body["error"].get("code") or code)
        message = str(body["error"].get("message") or message)
    cls = _BY_CODE.get(code) or _BY_STATUS.get(status) or ChronicleError
    return cls(status, code, message)


class TransferError(AgentError):
    code = "transfer_error"


class RetryableError(TransferError):
    code = "retryable"

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None):
        super().__init__(message, code=code)
        self.status = status


class PeerClosed(RetryableError):
    code = "connection_reset"


class Stalled(RetryableError):
    code = "stalled"


class UrlExpired(TransferError):
    code = "url_expired"


class StorageRefused(TransferError):
    code = "storage_refused"

    def __init__(self, message: str, *, status: int, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.status = status


class SourceChanged(TransferError):
    code = "source_changed"


class VerificationError(TransferError):
    code = "verification_failed"


class DiskFull(TransferError):
    """ENOSPC (or EDQUOT) while writing downloaded bytes. Not retried request by request:
    the job goes back to the queue with a delay, its partial files kept."""

    code = "disk_full"


RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
RETRYABLE_S3_CODES = frozenset(
    {"SlowDown", "RequestTimeout", "InternalError", "RequestTimeTooSkewed", "ServiceUnavailable",
     "BadDigest"}
)
"""``BadDigest``: the store refused bytes that a checksum-bound URL did not allow. The
uploader re-reads and re-hashes the source before each attempt (a changed file ends the job
as ``source_changed``), so a retry only follows bytes corrupted in flight, within the
retry budget."""


def map_transport_error(exc: BaseException, what: str) -> TransferError | None:
    """Map a transport-level exception (aiohttp, OS, timeout) into the tree; None if it is
    not a transport error (a bug, which must propagate)."""

    import aiohttp

    if isinstance(exc, TransferError):
        return exc
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError):
        return PeerClosed(f"{what}: connection closed by peer ({type(exc).__name__})")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return RetryableError(f"{what}: cannot connect ({exc.os_error})", code="connect_failed")
    if isinstance(exc, aiohttp.ClientOSError | ConnectionError):
        return PeerClosed(f"{what}: connection error ({exc})")
    if isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError):
        return RetryableError(f"{what}: timed out", code="timeout")
    if isinstance(exc, aiohttp.ClientResponseError):
        if exc.status in RETRYABLE_STATUSES:
            return RetryableError(f"{what}: HTTP {exc.status}", status=exc.status)
        return StorageRefused(f"{what}: HTTP {exc.status}", status=exc.status)
    if isinstance(exc, aiohttp.ClientError):
        return PeerClosed(f"{what}: {type(exc).__name__}: {exc}")
    return None
