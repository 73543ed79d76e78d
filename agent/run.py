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

import logging
import os
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from agent.client import TERMINAL_STATES, SocketClient, caller_token, path_segment
from agent.errors import JobFailed, UsageError

log = logging.getLogger(__name__)

RUN_ID_ENV = "METHODIC_RUN_ID"
DEFAULT_HEARTBEAT_S = 20.0


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
        self.client = SocketClient(socket_path, timeout_s=timeout_s,
                                   token=token if token is not None else caller_token())
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


def _existing(path: str | Path) -> Path:
    p = Path(os.path.abspath(Path(path).expanduser()))
    if not p.exists():
        raise UsageError(f"no such file or directory: {path}")
    return p


def _put_opt(body: dict[str, Any], **values: Any) -> None:
    for key, value in values.items():
        if value is not None:
            body[key] = value
