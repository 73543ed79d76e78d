"""A download in the caller's own process, for ``Chronicle().assets.download`` when no daemon
is running: standard library only, one component after another, with the daemon's
guarantees — each component streamed to a staging directory beside the destination and
resumed with ``Range`` from what is there, verified by size and SHA-256 (a mismatch is
fetched again, never accepted), then the directory renamed onto the destination at once.
Nothing partial is ever at the destination. No queue and no cache: if this process dies,
calling again with the same destination resumes from the staging directory.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from agent.chronicle import models as m
from agent.errors import DiskFull, RetryableError, UrlExpired, VerificationError
from agent.transfer.primitives import (
    backoff_s,
    check_component_name,
    classify_storage_answer,
    is_disk_full,
    staging_path,
)

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20


def staging_dir(dest: str, asset: m.Asset) -> str:
    """Beside ``dest``, named after the asset and the components fetched (a download of
    some of them, ``include``/``exclude``, never resumes into another selection's files)."""
    names = "\0".join(sorted(c.name for c in asset.components))
    return staging_path(dest, hashlib.sha256(f"{asset.asset_id}\0\0{names}".encode())
                        .hexdigest()[:16])


def download_direct(
    asset: m.Asset,
    dest: str,
    refresh: Callable[[], m.Asset],
    *,
    attempts: int = 6,
    timeout_s: float = 60.0,
) -> list[dict[str, Any]]:
    """Download ``asset`` (with its ``download_urls``) into the empty or new directory
    ``dest``; the files. ``refresh`` gets fresh URLs (they expire)."""
    from agent.access import check_dest

    check_dest(dest)
    staging = staging_dir(dest, asset)
    os.makedirs(staging, mode=0o700, exist_ok=True)
    urls = dict(asset.download_urls or {})
    files = []
    try:
        for comp in asset.components:
            name = check_component_name(comp.name)
            target = os.path.join(staging, *name.split("/"))
            n = 0
            while True:
                n += 1
                try:
                    if name not in urls:
                        raise VerificationError(f"Chronicle gave no download URL for {name!r}")
                    sha = _fetch_one(urls[name], target, comp, timeout_s)
                    break
                except UrlExpired:
                    urls = dict(refresh().download_urls or {})
                except RetryableError as e:
                    if n >= attempts:
                        if e.code == "checksum_mismatch":
                            raise VerificationError(
                                f"GET {name}: SHA-256 does not match after {n} attempts",
                                code="checksum_mismatch") from None
                        raise
                    log.info("GET %s: %s; retry %d/%d", name, e.message, n, attempts - 1)
                    time.sleep(backoff_s(n, 0.5, 5.0))
            files.append({"name": name, "size": comp.size or 0, "sha256": sha})
    except (RetryableError, DiskFull):
        raise  # keep the partial files: calling again resumes them
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if os.path.isdir(dest):
        os.rmdir(dest)
    os.rename(staging, dest)
    return sorted(files, key=lambda f: f["name"])


def _fetch_one(url: str, target: str, comp: m.Component, timeout_s: float) -> str:
    size = comp.size or 0
    what = f"GET {comp.name}"
    os.makedirs(os.path.dirname(target), exist_ok=True)
    h = hashlib.sha256()
    have = 0
    if os.path.exists(target):
        have = os.path.getsize(target)
        if have > size:
            os.truncate(target, 0)
            have = 0
        with open(target, "rb") as f:
            while chunk := f.read(4 * CHUNK_BYTES):
                h.update(chunk)
    try:
        with open(target, "ab") as out:
            if have < size:
                req = urllib.request.Request(url)
                if have:
                    req.add_header("Range", f"bytes={have}-{size - 1}")
                _stream(req, out, h, have, size, timeout_s, what)
    except OSError as e:
        if is_disk_full(e):
            raise DiskFull(f"{what}: no space left on device writing {target}") from None
        raise
    sha = h.hexdigest()
    if comp.sha256 and sha != comp.sha256:
        os.unlink(target)
        raise RetryableError(f"{what}: SHA-256 mismatch, fetching again",
                             code="checksum_mismatch")
    return sha


def _stream(req: urllib.request.Request, out: Any, h: Any, have: int, size: int,
            timeout_s: float, what: str) -> None:
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            if have and resp.status != 206:
                raise RetryableError(f"{what}: storage ignored Range", code="range_ignored")
            pos = have
            while pos < size:
                chunk = resp.read(min(CHUNK_BYTES, size - pos))
                if not chunk:
                    break
                out.write(chunk)
                h.update(chunk)
                pos += len(chunk)
            out.flush()
            if pos != size:
                raise RetryableError(f"{what}: got {pos} of {size} bytes", code="truncated")
    except urllib.error.HTTPError as e:
        raise classify_storage_answer(e.code, e.read(), what) from None
    except (urllib.error.URLError, http.client.HTTPException, ConnectionError,
            TimeoutError) as e:
        raise RetryableError(f"{what}: {type(e).__name__}: {getattr(e, 'reason', e)}",
                             code="connection_reset") from None

