"""Downloading an asset to a directory: one ``GET …?include_presigned=true``, components
streamed to a staging directory beside the destination (resumed with ``Range`` when a
partial file is already there), each verified by size and SHA-256, then moved into place
at once. On failure the destination holds no partial file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.to_thread

from agent.chronicle import contract
from agent.chronicle import models as m
from agent.errors import AssetInvalid, RetryableError, UrlExpired, UsageError, VerificationError
from agent.transfer.groups import one_error
from agent.transfer.http import Watchdog, classify_storage_answer, redact
from agent.transfer.upload import Engine, Progress, check_component_name

log = logging.getLogger(__name__)


def staging_dir_for(dest: str, job_id: str) -> str:
    parent, base = os.path.split(dest.rstrip("/"))
    return os.path.join(parent, f".{base}.chronicle-partial-{job_id}")


def check_dest(dest: str) -> None:
    if not os.path.isabs(dest):
        raise UsageError(f"destination must be an absolute path: {dest!r}")
    if os.path.exists(dest) and (not os.path.isdir(dest) or os.listdir(dest)):
        raise UsageError(f"destination exists and is not an empty directory: {dest}")
    parent = os.path.dirname(dest.rstrip("/")) or "/"
    if not os.path.isdir(parent):
        raise UsageError(f"destination's parent directory does not exist: {parent}")


@dataclass
class DownloadResult:
    asset: m.Asset
    files: list[dict[str, Any]]
    warnings: list[str]


async def download_asset(
    engine: Engine,
    job_id: str,
    asset_id: str,
    dest: str,
    allow_invalid: bool,
    progress: Progress,
    token: str | None = None,
) -> DownloadResult:
    await anyio.to_thread.run_sync(check_dest, dest)
    asset = await engine.chronicle.send(contract.get_asset(asset_id, include_presigned=True),
                                        token=token)
    warnings: list[str] = []
    if asset.invalidated is not None and not allow_invalid:
        raise AssetInvalid(409, "asset_invalid",
                           f"asset {asset_id} is invalidated ({asset.invalidated.reason}); "
                           "pass allow_invalid to download it anyway")
    if asset.deprecated is not None:
        warnings.append(f"asset {asset_id} is deprecated: {asset.deprecated.reason}")
    if asset.state != "ready":
        raise UsageError(f"asset {asset_id} is {asset.state}, not ready", code="asset_not_ready")
    staging = staging_dir_for(dest, job_id)
    await anyio.to_thread.run_sync(lambda: os.makedirs(staging, mode=0o700, exist_ok=True))
    urls = dict(asset.download_urls or {})
    total = sum(c.size or 0 for c in asset.components)
    await engine.queue.do(engine.queue.s.set_progress, job_id, bytes_total=total)
    files: list[dict[str, Any]] = []

    async def fresh_urls() -> None:
        nonlocal urls
        a = await engine.chronicle.send(contract.get_asset(asset_id, include_presigned=True),
                                        token=token)
        urls = dict(a.download_urls or {})

    async def one(comp: m.Component) -> None:
        name = check_component_name(comp.name)
        target = os.path.join(staging, *name.split("/"))
        sha = await _fetch(engine, name, lambda: urls[name], fresh_urls, target, comp, progress)
        files.append({"name": name, "size": comp.size, "sha256": sha})

    with one_error():
        async with anyio.create_task_group() as tg:
            for comp in asset.components:
                tg.start_soon(one, comp)
    await anyio.to_thread.run_sync(_move_into_place, staging, dest)
    files.sort(key=lambda f: f["name"])
    return DownloadResult(asset, files, warnings)


def _move_into_place(staging: str, dest: str) -> None:
    if os.path.isdir(dest):
        os.rmdir(dest)  # empty, checked before; fails loudly if someone wrote into it
    os.rename(staging, dest)


def discard_staging(dest: str, job_id: str) -> None:
    shutil.rmtree(staging_dir_for(dest, job_id), ignore_errors=True)


async def _fetch(
    engine: Engine,
    name: str,
    url_of: Any,
    refresh: Any,
    target: str,
    comp: m.Component,
    progress: Progress,
) -> str:
    """Fetch one component into ``target``, resuming from what is there; verify it."""
    size = comp.size or 0
    up = engine.settings.upload
    what = f"GET {name}"

    def prepare() -> tuple[int, Any]:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        h = hashlib.sha256()
        have = 0
        if not os.path.exists(target):
            open(target, "wb").close()  # an empty component is an empty file
        else:
            have = os.path.getsize(target)
            if have > size:
                os.truncate(target, 0)
                have = 0
            with open(target, "rb") as f:
                while chunk := f.read(4 << 20):
                    h.update(chunk)
        return have, h

    async def attempt() -> str:
        have, h = await anyio.to_thread.run_sync(prepare)
        progress.add(have)
        got = 0
        try:
            if have < size:
                async with engine.limits.slots:
                    got = await _get_into(engine, url_of(), target, have, size, h, progress,
                                          up.stall_timeout_s, what)
        except UrlExpired:
            await refresh()
            raise RetryableError(f"{what}: URL expired", code="url_expired") from None
        finally:
            progress.add(-(have + got))
        sha: str = h.hexdigest()
        if comp.sha256 and sha != comp.sha256:
            await anyio.to_thread.run_sync(os.unlink, target)
            raise RetryableError(f"{what}: SHA-256 mismatch, fetching again",
                                 code="checksum_mismatch")
        progress.add(size)
        return sha

    try:
        sha: str = await engine.retry.run(attempt, what,
                                          lambda e: engine.metrics.retry(e.code))
    except RetryableError as e:
        if e.code == "checksum_mismatch":
            raise VerificationError(f"{what}: SHA-256 does not match after retries") from e
        raise
    return sha


async def _get_into(
    engine: Engine, url: str, target: str, have: int, size: int, h: Any, progress: Progress,
    stall_s: float, what: str,
) -> int:
    headers = {"Range": f"bytes={have}-{size - 1}"} if have else {}
    watchdog = Watchdog(stall_s)
    got = 0
    log.debug("%s <- %s from byte %d", what, redact(url), have)
    fd = await anyio.to_thread.run_sync(
        lambda: os.open(target, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    )
    try:
        import asyncio

        async with asyncio.timeout(stall_s) as t:
            watchdog.arm(t)
            async with engine.session.get(url, headers=headers) as resp:
                if resp.status not in (200, 206):
                    raise classify_storage_answer(resp.status, await resp.read(), what)
                if have and resp.status == 200:
                    raise RetryableError(f"{what}: storage ignored Range", code="range_ignored")
                pos = have

                def write(data: bytes, at: int) -> None:
                    os.pwrite(fd, data, at)
                    h.update(data)

                async for chunk in resp.content.iter_chunked(1 << 20):
                    await anyio.to_thread.run_sync(write, chunk, pos)
                    pos += len(chunk)
                    got += len(chunk)
                    progress.add(len(chunk))
                    engine.metrics.received(len(chunk))
                    engine.crash.progress("mid_download", have + got)
                    await engine.limits.throttle(len(chunk))
                    watchdog.kick()
                if pos != size:
                    raise RetryableError(f"{what}: got {pos} of {size} bytes",
                                         code="truncated")
    except TimeoutError:
        raise RetryableError(f"{what}: no progress for {stall_s:g}s", code="stalled") from None
    except OSError as e:
        if e.errno == 28:
            raise VerificationError(f"{what}: no space left on device writing {target}",
                                    code="disk_full") from None
        raise
    finally:
        os.close(fd)
    return got
