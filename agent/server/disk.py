"""The disk store: component bytes in a directory, presigned URLs served by this server.

Layout under the root (keys are hashed, so no client-chosen name ever touches a path)::

    objects/<h[:2]>/<h>         the object's bytes, h = sha256(key)
    objects/<h[:2]>/<h>.meta    {"key", "size", "sha256", "ino", "content_type"}
    multipart/<upload_id>/KEY   the object key of a multipart upload
    multipart/<upload_id>/<part:05d>.<etag>   one received part
    tmp/                        bodies being received

A PUT streams to ``tmp/`` in large batches written (and hashed) in a worker thread, then is
renamed into place: a truncated body leaves nothing behind. The meta file records the inode
it describes, so a meta file left over from a replaced object is never believed.

URLs look like S3's query-string authentication: ``/storage/<key>?Expires=…&Signature=…``
(plus ``uploadId`` and ``partNumber`` for a part), refused with S3's XML errors. A PUT
writes only while the server's upload gate says the key's asset is pending (409
``UploadClosed`` else; a part: 404 ``NoSuchUpload``), asked before the body is received and
again, holding the asset's lock, when it is put in place.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlencode
from xml.sax.saxutils import escape

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from .locks import KeyedLocks
from .signing import Grant, Signer
from .storage import MAX_PARTS, ObjectInfo, PartInfo, StorageError, UploadGate, etag_value

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_PUT_BYTES = 5 * 1024**3
"""S3's limit for one PUT (a whole object or one part)."""
BATCH_BYTES = 4 * 1024 * 1024
"""Received bytes handed to the writer thread at once."""
COPY_CHUNK = 4 * 1024 * 1024
_UPLOAD_ID = re.compile(r"[0-9a-f]{32}")
_PART_FILE = re.compile(r"(\d{5})\.([0-9a-f]+)")
STORAGE_PREFIX = "/storage/"
_EMPTY_SUFFIX = re.compile(r"\s*bytes\s*=\s*-0+\s*")
"""``Range: bytes=-0``: the last 0 bytes, which no byte satisfies (aiohttp would send all)."""


def s3_error(status: int, code: str, message: str) -> web.Response:
    """An S3-style XML error, the same body whichever backend a client talks to."""
    body = f"<Error><Code>{code}</Code><Message>{escape(message)}</Message></Error>"
    return web.Response(status=status, body=body.encode(), content_type="application/xml")


def _etag(sha256_hex: str) -> str:
    """A quoted ETag: the first 128 bits of the bytes' SHA-256 (shaped like S3's MD5 ETag)."""
    return f'"{sha256_hex[:32]}"'


def _unsatisfiable(size: int) -> web.Response:
    response = s3_error(416, "InvalidRange", "The requested range is not satisfiable")
    response.headers["Content-Range"] = f"bytes */{size}"
    return response


def _no_upload() -> web.Response:
    return s3_error(404, "NoSuchUpload", "The specified upload does not exist")


def _closed(grant: Grant) -> web.Response:
    """The asset is no longer pending: a part answers as S3 does once its upload is gone."""
    if grant.upload_id:
        return _no_upload()
    return s3_error(
        409,
        "UploadClosed",
        "The asset is no longer pending (finalized, abandoned or deleted): "
        "its upload URLs can no longer write",
    )


class _Truncated(Exception):
    pass


class DiskStorage:
    def __init__(
        self, root: Path, signer: Signer, io_pool: concurrent.futures.Executor
    ) -> None:
        self.root = root
        self.description = f"file://{root}"
        self._signer = signer
        self._pool = io_pool
        self._base = ""
        self._objects = root / "objects"
        self._multipart = root / "multipart"
        self._tmp = root / "tmp"
        self._locks = KeyedLocks()
        self._gate: UploadGate | None = None

    # ---- plumbing ---------------------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, partial(fn, *args))

    def _paths(self, key: str) -> tuple[Path, Path]:
        h = hashlib.sha256(key.encode()).hexdigest()
        d = self._objects / h[:2]
        return d / h, d / f"{h}.meta"

    def _upload_dir(self, upload_id: str) -> Path | None:
        if not _UPLOAD_ID.fullmatch(upload_id):
            return None
        return self._multipart / upload_id

    def _background(self, fn: Callable[[], None]) -> None:
        """Run a clean-up in the I/O pool without waiting (inline once the pool is shut)."""
        try:
            self._pool.submit(fn)
        except RuntimeError:  # the server is stopping
            fn()

    def _tmp_path(self) -> Path:
        return self._tmp / secrets.token_hex(12)

    def _url(self, grant: Grant, expires_s: int) -> str:
        query = urlencode(self._signer.query(grant, expires_s))
        return f"{self._base}{STORAGE_PREFIX}{quote(grant.key, safe='/')}?{query}"

    # ---- lifecycle ---------------------------------------------------------------------------

    async def start(self, base_url: str) -> None:
        self._base = base_url.rstrip("/")
        await self._run(self._prepare)

    def _prepare(self) -> None:
        for d in (self._objects, self._multipart, self._tmp):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        for leftover in self._tmp.iterdir():  # bodies cut short by a previous crash
            leftover.unlink(missing_ok=True)

    async def close(self) -> None:
        pass

    def add_routes(self, app: web.Application, gate: UploadGate) -> None:
        self._gate = gate
        app.router.add_put(STORAGE_PREFIX + "{key:.+}", self._handle_put)
        app.router.add_get(STORAGE_PREFIX + "{key:.+}", self._handle_get)

    # ---- URLs ----------------------------------------------------------------------------------

    async def presign_put(self, key: str, expires_s: int) -> str:
        return self._url(Grant("PUT", key), expires_s)

    async def presign_get(self, key: str, expires_s: int) -> str:
        return self._url(Grant("GET", key), expires_s)

    async def presign_parts(
        self, key: str, upload_id: str, part_numbers: Sequence[int], expires_s: int
    ) -> dict[int, str]:
        def sign() -> dict[int, str]:
            return {n: self._url(Grant("PUT", key, upload_id, n), expires_s) for n in part_numbers}

        return sign() if len(part_numbers) <= 64 else await self._run(sign)

    # ---- objects ---------------------------------------------------------------------------------

    def _install(self, tmp: Path, key: str, sha256: str, content_type: str | None) -> ObjectInfo:
        """Move a fully written temp file into place as ``key`` and describe it."""
        data, meta = self._paths(key)
        data.parent.mkdir(exist_ok=True)
        meta.unlink(missing_ok=True)
        os.replace(tmp, data)
        st = data.stat()
        record = {
            "key": key,
            "size": st.st_size,
            "sha256": sha256,
            "ino": st.st_ino,
            "content_type": content_type,
        }
        meta_tmp = self._tmp_path()
        meta_tmp.write_text(json.dumps(record))
        os.replace(meta_tmp, meta)
        return ObjectInfo(st.st_size, sha256)

    def _head(self, key: str) -> tuple[ObjectInfo, dict[str, Any]] | None:
        data, meta = self._paths(key)
        try:
            st = data.stat()
        except FileNotFoundError:
            return None
        try:
            record = json.loads(meta.read_text())
        except (FileNotFoundError, ValueError):
            record = {}
        if record.get("ino") != st.st_ino or record.get("size") != st.st_size:
            record = {}  # left over from an object since replaced: not about these bytes
        return ObjectInfo(st.st_size, record.get("sha256")), record

    async def head(self, key: str) -> ObjectInfo | None:
        found = await self._run(self._head, key)
        return found[0] if found else None

    def _rehash(self, key: str) -> str | None:
        data, _ = self._paths(key)
        h = hashlib.sha256()
        buf = bytearray(COPY_CHUNK)
        view = memoryview(buf)
        try:
            with open(data, "rb", buffering=0) as f:
                while n := f.readinto(buf):
                    h.update(view[:n])
        except FileNotFoundError:
            return None
        return h.hexdigest()

    async def sha256(self, key: str, size: int) -> str | None:
        found = await self._run(self._head, key)
        if found is None:
            return None
        if found[0].sha256:
            return found[0].sha256
        return await self._run(self._rehash, key)  # meta lost in a crash: read the bytes

    def _write_new(self, key: str, data: bytes, content_type: str) -> ObjectInfo:
        tmp = self._tmp_path()
        with open(tmp, "xb") as f:
            f.write(data)
        return self._install(tmp, key, hashlib.sha256(data).hexdigest(), content_type)

    async def put_object(self, key: str, data: bytes, content_type: str) -> ObjectInfo:
        async with self._locks.hold(key):
            return await self._run(self._write_new, key, data, content_type)

    def _copy(self, src: str, dst: str) -> ObjectInfo | None:
        """A hard link of ``src``'s file as ``dst``: PUTs never write a file in place (they
        rename a new one over the name), so ``dst`` keeps these bytes."""
        found = self._head(src)
        if found is None:
            return None
        info, record = found
        data, _ = self._paths(src)
        tmp = self._tmp_path()
        try:
            os.link(data, tmp)
        except FileNotFoundError:  # deleted meanwhile
            return None
        try:
            sha = info.sha256 or self._rehash(src) or ""
            return self._install(tmp, dst, sha, record.get("content_type"))
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    async def copy(self, src: str, dst: str) -> ObjectInfo | None:
        async with self._locks.hold(src), self._locks.hold(dst):
            return await self._run(self._copy, src, dst)

    def _delete(self, key: str) -> None:
        for p in self._paths(key):
            p.unlink(missing_ok=True)

    async def delete(self, key: str) -> None:
        async with self._locks.hold(key):
            await self._run(self._delete, key)

    # ---- multipart ------------------------------------------------------------------------------

    def _create_upload(self, key: str) -> str:
        upload_id = secrets.token_hex(16)
        d = self._multipart / upload_id
        d.mkdir(mode=0o700)
        (d / "KEY").write_text(key)
        return upload_id

    async def create_multipart(self, key: str) -> str:
        return await self._run(self._create_upload, key)

    def _upload_of(self, key: str, upload_id: str) -> Path | None:
        """The upload's directory if ``upload_id`` is an upload of ``key``."""
        d = self._upload_dir(upload_id)
        if d is None:
            return None
        try:
            return d if (d / "KEY").read_text() == key else None
        except (FileNotFoundError, NotADirectoryError):
            return None

    def _list_parts(self, key: str, upload_id: str) -> list[PartInfo] | None:
        d = self._upload_of(key, upload_id)
        if d is None:
            return None
        parts = []
        try:
            with os.scandir(d) as it:
                for entry in it:
                    m = _PART_FILE.fullmatch(entry.name)
                    if m:
                        size = entry.stat().st_size
                        parts.append(PartInfo(int(m[1]), f'"{m[2]}"', size))
        except FileNotFoundError:
            return None
        return sorted(parts, key=lambda p: p.part_number)

    async def list_parts(self, key: str, upload_id: str) -> list[PartInfo] | None:
        return await self._run(self._list_parts, key, upload_id)

    @staticmethod
    def _part_path(d: Path, p: PartInfo) -> Path:
        return d / f"{p.part_number:05d}.{etag_value(p.etag)}"

    def _concat(self, d: Path, parts: Sequence[PartInfo], tmp: Path) -> None:
        """Concatenate the parts into ``tmp`` inside the kernel (copy_file_range)."""
        with open(tmp, "xb") as out:
            for p in parts:
                with open(self._part_path(d, p), "rb") as f:
                    left = os.fstat(f.fileno()).st_size
                    try:
                        while left > 0:
                            n = os.copy_file_range(f.fileno(), out.fileno(), left)
                            if n == 0:
                                break
                            left -= n
                    except OSError:  # no copy_file_range here: copy in user space
                        f.seek(os.fstat(f.fileno()).st_size - left)
                        shutil.copyfileobj(f, out, COPY_CHUNK)

    def _hash_parts(self, d: Path, parts: Sequence[PartInfo]) -> str:
        h = hashlib.sha256()
        buf = bytearray(COPY_CHUNK)
        view = memoryview(buf)
        for p in parts:
            with open(self._part_path(d, p), "rb", buffering=0) as f:
                while n := f.readinto(buf):
                    h.update(view[:n])
        return h.hexdigest()

    async def complete_multipart(
        self, key: str, upload_id: str, parts: Sequence[PartInfo]
    ) -> ObjectInfo:
        async with self._locks.hold(f"upload:{upload_id}"):
            d = await self._run(self._upload_of, key, upload_id)
            if d is None:
                raise StorageError(f"multipart upload {upload_id} of {key!r} does not exist")
            tmp = self._tmp_path()
            # Copy and hash in two threads at once: each pass reads the parts on its own.
            copying = self._run(self._concat, d, parts, tmp)
            hashing = self._run(self._hash_parts, d, parts)
            done = await asyncio.gather(copying, hashing, return_exceptions=True)
            failed = [r for r in done if isinstance(r, BaseException)]
            if failed:
                await self._run(partial(tmp.unlink, missing_ok=True))
                if isinstance(failed[0], FileNotFoundError):
                    raise StorageError(f"part missing while assembling {key!r}: {failed[0]}")
                raise failed[0]
            digest = str(done[1])
            async with self._locks.hold(key):
                info = await self._run(self._install, tmp, key, digest, None)
            await self._run(shutil.rmtree, d, True)
            return info

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        async with self._locks.hold(f"upload:{upload_id}"):
            d = await self._run(self._upload_of, key, upload_id)
            if d is not None:
                await self._run(shutil.rmtree, d, True)

    # ---- the presigned URL handlers ----------------------------------------------------------

    def _authorize(self, request: web.Request, method: str) -> tuple[Grant, web.Response | None]:
        q = request.query
        upload_id = q.get("uploadId", "")
        part = q.get("partNumber", "")
        number = int(part) if part.isascii() and part.isdigit() and len(part) <= 5 else 0
        grant = Grant(method, request.match_info["key"], upload_id, number)
        if upload_id and not 1 <= number <= MAX_PARTS:
            return grant, s3_error(400, "InvalidArgument", "Part number must be 1-10000")
        if "Signature" not in q or "Expires" not in q:
            return grant, s3_error(403, "AccessDenied", "Query-string authentication required")
        refused = self._signer.check(grant, q["Expires"], q["Signature"])
        if refused == "AccessDenied":
            return grant, s3_error(403, "AccessDenied", "Request has expired")
        if refused:
            return grant, s3_error(
                403,
                "SignatureDoesNotMatch",
                "The request signature we calculated does not match the signature you provided",
            )
        return grant, None

    async def _handle_put(self, request: web.Request) -> web.StreamResponse:
        grant, refused = self._authorize(request, "PUT")
        if refused is not None:
            return refused
        if "chunked" in request.headers.get("Transfer-Encoding", "").lower():
            return s3_error(
                501,
                "NotImplemented",
                "A header you provided implies functionality that is not implemented "
                "(Transfer-Encoding: chunked); send Content-Length",
            )
        length = request.content_length
        if length is None:
            return s3_error(411, "MissingContentLength", "You must provide the Content-Length")
        if length > MAX_PUT_BYTES:
            return s3_error(400, "EntityTooLarge", "Your proposed upload exceeds 5 GiB")
        upload_dir: Path | None = None
        if grant.upload_id:
            upload_dir = await self._run(self._upload_of, grant.key, grant.upload_id)
            if upload_dir is None:
                return _no_upload()
        if not await self._open(grant.key):
            return _closed(grant)
        tmp = self._tmp_path()
        try:
            digest = await self._receive(request, length, tmp)
        except _Truncated as e:
            log.info("PUT %s cut short: %s", request.path, e)
            return s3_error(400, "IncompleteBody", str(e))
        except OSError as e:
            log.error("PUT %s: cannot store: %s", request.path, e)
            return s3_error(500, "InternalError", f"cannot store the object: {e.strerror}")
        try:
            refused = await self._install_received(request, grant, upload_dir, tmp, digest)
        except BaseException:
            self._background(partial(tmp.unlink, missing_ok=True))
            raise
        if refused is not None:
            self._background(partial(tmp.unlink, missing_ok=True))
            return refused
        return web.Response(status=200, headers={"ETag": _etag(digest)})

    async def _open(self, key: str) -> bool:
        """Whether an upload URL may still write ``key`` (a quick look before the body)."""
        if self._gate is None:
            return True
        async with self._gate(key) as open_:
            return open_

    async def _install_received(
        self, request: web.Request, grant: Grant, upload_dir: Path | None, tmp: Path, digest: str
    ) -> web.Response | None:
        """Put a received body in place, if the gate still lets this key be written (it is
        held meanwhile, so a finalize or delete cannot slip in between); else the refusal."""
        gate = self._gate(grant.key) if self._gate is not None else contextlib.nullcontext(True)
        async with gate as open_:
            if not open_:
                return _closed(grant)
            if upload_dir is not None:
                async with self._locks.hold(f"part:{grant.upload_id}:{grant.part_number}"):
                    stored = await self._run(
                        self._install_part, tmp, upload_dir, grant.part_number, digest
                    )
                if not stored:
                    return _no_upload()
            else:
                content_type = request.headers.get("Content-Type")
                async with self._locks.hold(grant.key):
                    await self._run(self._install, tmp, grant.key, digest, content_type)
        return None

    def _install_part(self, tmp: Path, d: Path, number: int, digest: str) -> bool:
        name = f"{number:05d}.{digest[:32]}"
        try:
            os.replace(tmp, d / name)
        except FileNotFoundError:  # the upload was aborted or completed meanwhile
            tmp.unlink(missing_ok=True)
            return False
        for old in d.glob(f"{number:05d}.*"):
            if old.name != name:
                old.unlink(missing_ok=True)
        return True

    async def _receive(self, request: web.Request, length: int, tmp: Path) -> str:
        """Stream the body into ``tmp``; its hex SHA-256. Raises _Truncated (and leaves no
        file) if fewer than ``length`` bytes arrive.

        Received chunks are handed to a worker thread in batches of about BATCH_BYTES, one
        thread hop per batch, while the event loop receives the next batch. The thread
        hashes each chunk and writes it at once, while it is still in the CPU's cache
        (hashlib and os.write release the GIL)."""
        loop = asyncio.get_running_loop()
        fd = await self._run(os.open, tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        h = hashlib.sha256()
        storing: asyncio.Future[None] | None = None
        batch: list[bytes] = []
        batch_bytes = received = 0
        content = request.content
        try:
            try:
                while received < length:
                    chunk = await content.readany()
                    if not chunk:
                        break
                    batch.append(chunk)
                    batch_bytes += len(chunk)
                    received += len(chunk)
                    if batch_bytes >= BATCH_BYTES:
                        if storing is not None:
                            await storing
                        storing = loop.run_in_executor(self._pool, _store, fd, h, batch)
                        batch, batch_bytes = [], 0
            except (ConnectionError, asyncio.IncompleteReadError, HttpProcessingError) as e:
                raise _Truncated(f"connection lost after {received} of {length} bytes") from e
            if received != length:
                raise _Truncated(f"got {received} of {length} bytes")
            if storing is not None:
                await storing
            storing = loop.run_in_executor(self._pool, _store, fd, h, batch)
            await storing
            storing = None
            await self._run(os.close, fd)
            return h.hexdigest()
        except BaseException:
            self._discard(fd, tmp, [storing] if storing is not None else [])
            raise

    def _discard(self, fd: int, tmp: Path, pending: list[asyncio.Future[None]]) -> None:
        """Close and remove a cut-short body once no thread uses it any more."""

        def cleanup() -> None:
            with contextlib.suppress(OSError):
                os.close(fd)
            tmp.unlink(missing_ok=True)

        def later(_: object = None) -> None:
            if all(p.done() for p in pending):
                self._background(cleanup)

        for p in pending:
            if not p.done():
                p.add_done_callback(later)
        later()

    async def _handle_get(self, request: web.Request) -> web.StreamResponse:
        grant, refused = self._authorize(request, "GET")
        if refused is not None:
            return refused
        found = await self._run(self._head, grant.key)
        if found is None:
            return s3_error(404, "NoSuchKey", "The specified key does not exist")
        info, record = found
        if _EMPTY_SUFFIX.fullmatch(request.headers.get("Range", "")):
            return _unsatisfiable(info.size)
        data, _ = self._paths(grant.key)
        headers = {"Content-Type": record.get("content_type") or "application/octet-stream"}
        if info.sha256:
            headers["ETag"] = _etag(info.sha256)
        return web.FileResponse(data, chunk_size=1024 * 1024, headers=headers)


def _store(fd: int, h: Any, chunks: list[bytes]) -> None:
    """Hash and write each chunk in turn: the write reads it while the hash left it in the
    CPU's cache."""
    for c in chunks:
        h.update(c)
        view = memoryview(c)
        while view:
            view = view[os.write(fd, view):]
