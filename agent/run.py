"""``Run``: what training code uses to hand outputs to the daemon.

Every call that starts a transfer returns at once with a :class:`JobHandle`; the daemon owns
the bytes from there (retry, resume, crash recovery). Training code never has to wait, but
may: ``handle.wait()``.

Standard library only (see :mod:`agent.client`): importing this must not slow a training
process down or drag an event loop into it.

The run id comes from ``Run(run_id=…)``, else ``$METHODIC_RUN_ID`` (set by
``chronicle-agent exec`` and by methodic), else a fresh ``run_<hex>`` is generated for this
object (readable as ``run.run_id``; nothing is exported to the environment, so child
processes do not inherit it by accident).

Credentials: ``Run(token=…)``, else the caller's own Chronicle token as the CLI finds it
(``$CHRONICLE_AGENT_CHRONICLE__TOKEN``, ``chronicle.token_file``), is sent with every call,
and the daemon uploads as that researcher (``created_by`` is theirs); with none, the daemon
uploads with its own token.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote, urlencode

from agent.client import TERMINAL_STATES, SocketClient, _from_toml, caller_token, path_segment
from agent.errors import ApiError, DaemonUnreachable, JobFailed, UsageError

log = logging.getLogger(__name__)

RUN_ID_ENV = "METHODIC_RUN_ID"
DEFAULT_HEARTBEAT_S = 20.0
RESTORE_DIR_ENV = "CHRONICLE_AGENT_DOWNLOAD__RESTORE_DIR"


class JobHandle:
    """A job in the daemon's queue. Cheap: holds the id and the last job object seen."""

    def __init__(self, client: SocketClient, job: dict[str, Any]) -> None:
        self._client = client
        self._job = dict(job)
        self.job_id: str = str(job["job_id"])

    def __repr__(self) -> str:
        return f"<JobHandle {self.job_id} {self._job.get('kind')} {self._job.get('state')}>"

    @property
    def last(self) -> dict[str, Any]:
        """The job object as last seen, without asking the daemon."""
        return dict(self._job)

    @property
    def state(self) -> str:
        return str(self._job.get("state"))

    def job(self) -> dict[str, Any]:
        """The job as the daemon sees it now."""
        self._job = self._client.get_job(self.job_id)
        return dict(self._job)

    @property
    def asset_id(self) -> str | None:
        """The asset this job works on (an upload job learns it once registered)."""
        if self._job.get("asset_id") is None and self._job.get("state") not in TERMINAL_STATES:
            self.job()
        value = self._job.get("asset_id")
        return None if value is None else str(value)

    def wait(self, timeout_s: float | None = None, raise_on_failure: bool = True) -> dict[str, Any]:
        """Block until the job is terminal and return it. Raises :class:`JobFailed` if it
        ended failed, cancelled or abandoned (unless ``raise_on_failure=False``), and
        ``TimeoutError`` if it is still going after ``timeout_s``."""
        self._job = self._client.wait_job(self.job_id, timeout_s)
        if raise_on_failure and self._job.get("state") != "done":
            raise JobFailed(self._job)
        return dict(self._job)

    def cancel(self) -> dict[str, Any]:
        self._job = self._client.cancel_job(self.job_id)
        return dict(self._job)


@dataclass(frozen=True)
class PresignedUpload:
    """What :meth:`Run.create_asset_presigned` returns: the asset and a URL per component."""

    asset_id: str
    upload_urls: dict[str, str]
    multipart: dict[str, Any] = field(default_factory=dict)
    expires_at: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


class Run:
    """A training run, as the daemon knows it. Registers itself on construction.

    ``with Run() as run:`` finishes the run on exit: ``finished``, or ``failed`` when the
    block raised. Without ``with``, call :meth:`finish` (or don't: the daemon notices the
    process is gone and applies its ``runs.on_exit`` policy).

    A ``run_id`` that names a run which has already ended (finished, failed or crashed)
    raises :class:`~agent.errors.RunEnded` at once: a run id names one run. ``register=False``
    makes no registration (read-only use: ``jobs()``, ``job()``, handles on existing jobs).

    While registered, a background thread sends a heartbeat every ``heartbeat_interval_s``
    (None = never) so that a run whose process the daemon cannot see (another pid namespace)
    keeps its lease.
    """

    def __init__(
        self,
        run_id: str | None = None,
        *,
        socket_path: Path | str | None = None,
        register: bool = True,
        heartbeat_interval_s: float | None = DEFAULT_HEARTBEAT_S,
        timeout_s: float = 30,
        token: str | None = None,
    ) -> None:
        rid = run_id or os.environ.get(RUN_ID_ENV)
        if not rid:
            rid = f"run_{secrets.token_hex(8)}"
            log.info("no run id given and %s is unset: using %s", RUN_ID_ENV, rid)
        self.run_id: str = rid
        self._token = token if token is not None else caller_token()
        self.client = SocketClient(socket_path, timeout_s=timeout_s, token=self._token)
        self.info: dict[str, Any] = {}
        self._url_assets: dict[str, str] = {}
        self._name_assets: dict[str, set[str]] = {}
        self._finished = False
        self._stop = threading.Event()
        self._heartbeat_thread: threading.Thread | None = None
        if register:
            self.info = self.client.request(
                "POST", "/v1/runs", {"run_id": self.run_id, "pid": os.getpid()}
            )
            self._start_heartbeat(heartbeat_interval_s)

    def __repr__(self) -> str:
        return f"Run({self.run_id!r})"

    # ---- transfers --------------------------------------------------------------------

    def upload_asset(
        self,
        asset_type: str,
        content: Any,
        content_type: str | None = None,
        visibility: str | None = None,
    ) -> JobHandle:
        """An inline asset (a JSON-able object, or text with ``content_type``)."""
        body = {"asset_type": asset_type, "content": content, "run_id": self.run_id}
        _put_opt(body, content_type=content_type, visibility=visibility)
        return self._job("POST", "/v1/assets/inline", body)

    def create_asset_presigned(
        self,
        asset_type: str,
        components: list[str] | list[dict[str, Any]] | list[str | dict[str, Any]],
        visibility: str | None = None,
    ) -> PresignedUpload:
        """Step 1 of the three-step flow: register the asset, get a URL per component."""
        body: dict[str, Any] = {
            "asset_type": asset_type,
            "components": list(components),
            "run_id": self.run_id,
        }
        _put_opt(body, visibility=visibility)
        data = self.client.request("POST", "/v1/assets/presigned", body)
        asset_id = str(data["asset_id"])
        urls = {str(k): str(v) for k, v in (data.get("upload_urls") or {}).items()}
        multipart = dict(data.get("multipart") or {})
        for name, url in urls.items():
            self._url_assets[url] = asset_id
            self._name_assets.setdefault(name, set()).add(asset_id)
        for name, plan in multipart.items():
            self._name_assets.setdefault(str(name), set()).add(asset_id)
            parts = plan.get("parts") if isinstance(plan, dict) else None
            for part in parts if isinstance(parts, list) else []:
                if isinstance(part, dict) and isinstance(part.get("url"), str):
                    self._url_assets[part["url"]] = asset_id
        return PresignedUpload(
            asset_id=asset_id,
            upload_urls=urls,
            multipart=multipart,
            expires_at=data.get("expires_at"),
            raw=data,
        )

    def upload_component(
        self,
        url: str | None = None,
        local_path: str | Path | None = None,
        content_type: str | None = None,
        *,
        name: str | None = None,
        asset_id: str | None = None,
    ) -> JobHandle:
        """Step 2: have the daemon upload ``local_path`` as the component behind ``url``
        (a URL from :meth:`create_asset_presigned`), or the one called ``name`` of
        ``asset_id``."""
        if local_path is None:
            raise UsageError("upload_component needs local_path")
        path = _existing(local_path)
        body: dict[str, Any] = {"path": str(path)}
        if url is not None:
            body["url"] = url
            target = asset_id or self._url_assets.get(url, "-")
        elif name is not None:
            body["name"] = name
            target = asset_id or self._asset_for_name(name)
        else:
            raise UsageError("upload_component needs the component's url, or name= and asset_id=")
        _put_opt(body, content_type=content_type)
        return self._job("POST", f"/v1/assets/{path_segment(target)}/components", body)

    def finalize_asset(self, asset_id: str) -> JobHandle:
        """Step 3: finalize once every component is uploaded (the daemon waits for them)."""
        return self._job("POST", f"/v1/assets/{path_segment(asset_id)}/finalize", {})

    def upload_directory_async(
        self,
        path: str | Path,
        asset_type: str = "checkpoint",
        content_type: str | None = None,
        visibility: str | None = None,
    ) -> JobHandle:
        """All three steps for a directory (each file a component named by its relative
        path) or a single file, in the daemon's background."""
        body: dict[str, Any] = {
            "path": str(_existing(path)),
            "asset_type": asset_type,
            "run_id": self.run_id,
        }
        _put_opt(body, content_type=content_type, visibility=visibility)
        return self._job("POST", "/v1/uploads", body)

    upload_file = upload_directory_async
    upload_path = upload_directory_async

    def restore(
        self,
        asset_type: str = "checkpoint",
        dest: str | Path | None = None,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        *,
        allow_invalid: bool = False,
        timeout_s: float | None = None,
    ) -> Path | None:
        """The local path of this run's latest ``ready`` asset of ``asset_type``
        (downloaded, or from the daemon's node-local cache), or ``None`` when the run has
        none yet: what a restarted job calls first. Blocks until the files are there.

        "Latest" is the newest by ``created_at`` of the run's ready assets of that type;
        an invalidated one is skipped unless ``allow_invalid``; a deprecated one is taken
        and its reason logged as a warning (docs/downloads.md).

        ``dest``: a new or empty directory (missing parents are created). ``None`` (the
        default): ``<restore dir>/<run id>/<asset id>``, the restore dir being
        ``download.restore_dir`` (``CHRONICLE_AGENT_DOWNLOAD__RESTORE_DIR``), else
        ``$XDG_CACHE_HOME/chronicle-agent/restore`` (``~/.cache/chronicle-agent/restore``):
        private to you, never a watched checkpoint directory (which would upload it again).
        If that directory already holds the asset it is returned as it is, without a
        download: a job restarted again on this node, or its other ranks, cost nothing.
        Callers on one node that restore the same asset at once take turns (a lock file
        beside it); the first downloads. Set the restore dir (or pass ``dest``) where a
        checkpoint fits: home directories are often small.

        ``include`` / ``exclude``: only the components these globs select (fnmatch on the
        whole name, ``*`` matching ``/`` too, exclude after include; e.g. one rank's
        shards and ``.metadata``); with ``dest=None`` such a restore gets its own
        directory, ``<asset id>-<12 hex digits of the patterns>``.

        Through the daemon when one answers on this Run's socket (the asset chosen with
        ``GET /v1/assets/latest``, then downloaded by id); else in this process, straight
        against Chronicle as ``Chronicle()`` finds it (configured URL and token, or the
        local daemon's embedded server), as ``Chronicle().assets.download`` does. A failed
        download raises :class:`~agent.errors.JobFailed` (through the daemon) or the
        error itself."""
        try:
            asset_id = self._latest_through_daemon(asset_type, allow_invalid)
            chronicle = None
        except DaemonUnreachable as e:
            log.info("no daemon (%s): restoring run %s in this process", e.message,
                     self.run_id)
            from agent.chronicle.sdk import Chronicle

            chronicle = Chronicle(token=self._token)
            asset = chronicle.assets.latest(self.run_id, asset_type, allow_invalid)
            asset_id = None if asset is None else asset.asset_id
        if asset_id is None:
            return None
        if dest is not None:
            target = Path(os.path.abspath(Path(dest).expanduser()))
            self._restore_into(chronicle, asset_id, target, include, exclude, allow_invalid,
                               timeout_s)
            return target
        target = restore_path(self.run_id, asset_id, include, exclude)
        with _restore_lock(target):
            if target.is_dir() and any(target.iterdir()):
                log.info("run %s: %s is already restored in %s", self.run_id, asset_id, target)
                return target
            self._restore_into(chronicle, asset_id, target, include, exclude, allow_invalid,
                               timeout_s)
        return target

    def _latest_through_daemon(self, asset_type: str, allow_invalid: bool) -> str | None:
        query = urlencode({"run_id": self.run_id, "asset_type": asset_type,
                           "allow_invalid": str(allow_invalid).lower()})
        try:
            found = self.client.request("GET", f"/v1/assets/latest?{query}")
        except ApiError as e:
            if e.code == "no_ready_asset":
                log.info("run %s: %s", self.run_id, e.message)
                return None
            raise
        log.info("run %s: restoring %s %s (created %s)", self.run_id, asset_type,
                 found["selected"]["asset_id"], found["selected"].get("created_at"))
        return str(found["selected"]["asset_id"])

    def _restore_into(self, chronicle: Any, asset_id: str, target: Path,
                      include: list[str] | None, exclude: list[str] | None,
                      allow_invalid: bool, timeout_s: float | None) -> None:
        if chronicle is not None:  # no daemon: in this process
            chronicle.assets.download(asset_id, target, allow_invalid=allow_invalid,
                                      timeout_s=timeout_s, include=include, exclude=exclude)
            return
        body: dict[str, Any] = {"asset_id": asset_id, "dest": str(target),
                                "allow_invalid": allow_invalid}
        _put_opt(body, include=include or None, exclude=exclude or None)
        final = self._job("POST", "/v1/downloads", body).wait(timeout_s)
        for warning in final.get("warnings") or []:
            log.warning("%s", warning)

    def job(self, job_id: str) -> JobHandle:
        """A handle on an existing job."""
        return JobHandle(self.client, self.client.get_job(job_id))

    def jobs(self, state: str | None = None) -> list[dict[str, Any]]:
        """This run's jobs."""
        return self.client.list_jobs(run_id=self.run_id, state=state)

    # ---- lifecycle --------------------------------------------------------------------

    def heartbeat(self) -> dict[str, Any]:
        return self.client.request("POST", f"/v1/runs/{path_segment(self.run_id)}/heartbeat", {})

    def finish(self, status: str = "finished") -> dict[str, Any]:
        """End the run. The daemon keeps uploading what it was given; this returns at once."""
        self._stop.set()
        result = self.client.request(
            "POST", f"/v1/runs/{path_segment(self.run_id)}/finish", {"status": status}
        )
        self._finished = True
        return result

    def __enter__(self) -> Run:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._finished:
            return
        if exc_type is None:
            self.finish("finished")
            return
        try:
            self.finish("failed")
        except Exception as e:  # the block's own exception matters more
            log.warning("could not mark run %s failed: %s", self.run_id, e)

    # ---- internals --------------------------------------------------------------------

    def _job(self, method: str, path: str, body: dict[str, Any]) -> JobHandle:
        return JobHandle(self.client, self.client.request(method, path, body))

    def _asset_for_name(self, name: str) -> str:
        ids = self._name_assets.get(name, set())
        if len(ids) == 1:
            return next(iter(ids))
        raise UsageError(
            f"upload_component(name={name!r}) needs asset_id=: "
            + ("no presigned asset of this Run has that component" if not ids
               else "several presigned assets of this Run have that component")
        )

    def _start_heartbeat(self, interval_s: float | None) -> None:
        if interval_s is None or interval_s <= 0:
            return
        lease = self.info.get("lease_s")
        if isinstance(lease, int | float) and lease > 0:
            interval_s = min(interval_s, lease / 3)
        self._heartbeat_thread = threading.Thread(
            target=self._heartbeat_loop,
            args=(interval_s,),
            name=f"chronicle-heartbeat-{self.run_id}",
            daemon=True,
        )
        self._heartbeat_thread.start()

    def _heartbeat_loop(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                self.heartbeat()
            except Exception as e:  # never disturb training over a missed heartbeat
                log.debug("heartbeat for run %s failed: %s", self.run_id, e)


def default_restore_dir() -> Path:
    """Where :meth:`Run.restore` puts what it restores without a ``dest``:
    ``$CHRONICLE_AGENT_DOWNLOAD__RESTORE_DIR`` > ``download.restore_dir`` (the TOML file) >
    ``$XDG_CACHE_HOME/chronicle-agent/restore`` > ``~/.cache/chronicle-agent/restore``."""
    configured = os.environ.get(RESTORE_DIR_ENV) or _from_toml("download", "restore_dir")
    if configured:
        return Path(os.path.abspath(Path(configured).expanduser()))
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(os.path.abspath(base)) / "chronicle-agent" / "restore"


def restore_path(run_id: str, asset_id: str, include: list[str] | None = None,
                 exclude: list[str] | None = None) -> Path:
    """``<restore dir>/<run id>/<asset id>``, the asset id tagged with the patterns of a
    filtered restore (each name quoted into one safe path segment)."""
    name = _segment(asset_id)
    if include or exclude:
        patterns = json.dumps([sorted(set(include or ())), sorted(set(exclude or ()))])
        name += "-" + hashlib.sha256(patterns.encode()).hexdigest()[:12]
    return default_restore_dir() / _segment(run_id) / name


def _segment(value: str) -> str:
    quoted = quote(value, safe="")
    return "%2E" + quoted[1:] if quoted.startswith(".") else quoted


@contextmanager
def _restore_lock(target: Path) -> Iterator[None]:
    """One restore of ``target`` at a time on this node (the ranks of one job)."""
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(target.parent / f".{target.name}.lock",
                 os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _existing(path: str | Path) -> Path:
    p = Path(os.path.abspath(Path(path).expanduser()))
    if not p.exists():
        raise UsageError(f"no such file or directory: {path}")
    return p


def _put_opt(body: dict[str, Any], **values: Any) -> None:
    for key, value in values.items():
        if value is not None:
            body[key] = value
