"""The disk store: component bytes in a directory, presigned URLs served by this server.

Layout under the root (keys are hashed, so no client-chosen name ever touches a path)::

    objects/<h[:2]>/<h>         the object's bytes, h = sha256(key)
    objects/<h[:2]>/<h>.meta    {"key", "size", "sha256", "ino", "content_type"}
    multipart/<upload_id>/KEY             the object key of a multipart upload
    multipart/<upload_id>/PART_SIZE       its planned part size P
    multipart/<upload_id>/object.partial  the object being assembled: part N at (N-1)*P
    multipart/<upload_id>/<part:05d>.<etag>.<size>   part N arrived whole (empty)
    tmp/                        bodies being received

A single PUT streams to ``tmp/`` in large batches written (and hashed) in a worker thread,
then is renamed into place: a truncated body leaves nothing behind. The meta file records
the inode it describes, so a meta file left over from a replaced object is never believed.

A part PUT writes its body straight at its place in ``object.partial`` (no hash: its ETag is
an opaque token naming this write). Before the first byte, the part's marker is removed;
the marker is created only once the whole body is written, so a part cut short (or by a
crash) is missing, never half there. One PUT of a part writes at a time: a newer one makes
the older stop at its next batch and waits for its last write. Completing the upload checks
the markers against the plan, hashes the object once (the SHA-256 finalize checks) and
renames it into place: no copy. An upload directory without ``PART_SIZE`` (made by an
older version) or without ``object.partial`` (completed, crash before clean-up) is no
upload: its URLs answer NoSuchUpload and finalize falls back to the object if present.

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
import select
import shutil
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlencode
from xml.sax.saxutils import escape

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from agent.chronicle.contract import CHECKSUM_HEADER, checksum_header, checksum_of
from agent.priority import hash_step

from .locks import KeyedLocks
from .signing import Grant, Signer
from .storage import (
    MAX_PARTS,
    OWNERS_PREFIX,
    SWEPT_PREFIXES,
    ObjectInfo,
    PartInfo,
    PartsRefused,
    StorageError,
    Stored,
    UploadGate,
    etag_value,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
Buffer = bytes | bytearray | memoryview
_Fut = concurrent.futures.Future[Any]
MAX_PUT_BYTES = 5 * 1024**3
"""S3's limit for one PUT (a whole object or one part)."""
BATCH_BYTES = 4 * 1024 * 1024
"""Received bytes handed to the writer thread at once."""
DIRECT_MIN_BYTES = 8 * 1024 * 1024
"""Bodies from this size on are read from the socket by the writer thread itself
(:func:`_take_over`); smaller ones keep the connection alive for the next request."""
DIRECT_BUFFER_BYTES = 1024 * 1024
DIRECT_STEP_BYTES = 32 * 1024 * 1024
POLL_S = 0.5
STALL_S = 120.0
"""A body that sends nothing for this long is cut short (its connection closed)."""
COPY_CHUNK = 4 * 1024 * 1024
_UPLOAD_ID = re.compile(r"[0-9a-f]{32}")
_NEW_UPLOAD = re.compile(r"\.new-[0-9a-f]{32}")
"""An upload directory being made (renamed to its id once whole), or left by a crash."""
_PART_FILE = re.compile(r"(\d{5})\.([0-9a-f]{32})\.(\d+)")
PARTIAL = "object.partial"
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


class _Superseded(Exception):
    """A newer PUT of the same part, or the upload's completion, took over."""


class _Part:
    """The PUTs of one part in flight in this process."""

    __slots__ = ("gen", "refs", "busy")

    def __init__(self) -> None:
        self.gen = 0
        """Bumped by each PUT of the part; only the newest may write or mark it."""
        self.refs = 0
        """PUTs of the part being handled."""
        self.busy = 0
        """Their file operations under way in worker threads."""


class _Upload:
    """The part PUTs of one multipart upload in flight in this process."""

    def __init__(self) -> None:
        self.parts: dict[int, _Part] = {}
        self.refs = 0
        self.busy = 0
        self.closing = False
        """Being completed: no part PUT may start or write more."""
        self.done = False
        """Completed (its file is the object now): no part PUT may write again."""
        self.changed = asyncio.Event()
        """Set (and replaced) whenever a file operation of a part PUT ends."""

    async def wait(self) -> None:
        await self.changed.wait()


class _PartWrite:
    """One PUT of a part: counted with its upload while it is handled, and each of its file
    operations while it runs in a worker thread (which a newer PUT of the part, and the
    upload's completion, wait for: a PUT that is no longer ``live`` starts none)."""

    def __init__(self, up: _Upload, number: int, forget: Callable[[], None]) -> None:
        self.up = up
        self.number = number
        self.part = up.parts.setdefault(number, _Part())
        self.part.gen += 1
        self.gen = self.part.gen
        self.part.refs += 1
        up.refs += 1
        self._forget = forget
        self._released = False
        self._loop = asyncio.get_running_loop()

    def live(self) -> bool:
        """Whether this PUT may still write: no newer PUT of the part, no completion."""
        return self.part.gen == self.gen and not (self.up.closing or self.up.done)

    def track(self, cf: concurrent.futures.Future[T]) -> concurrent.futures.Future[T]:
        """Count ``cf`` (a file operation in a worker thread) until it ends."""
        up, part = self.up, self.part
        part.busy += 1
        up.busy += 1

        def ended() -> None:
            part.busy -= 1
            up.busy -= 1
            changed, up.changed = up.changed, asyncio.Event()
            changed.set()

        def done(_: object) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: moot
                self._loop.call_soon_threadsafe(ended)

        cf.add_done_callback(done)
        return cf

    def release(self) -> None:
        """This PUT is handled (its file operations are counted on their own)."""
        if self._released:
            return
        self._released = True
        up, part = self.up, self.part
        part.refs -= 1
        up.refs -= 1
        if not part.refs and up.parts.get(self.number) is part:
            del up.parts[self.number]
        self._forget()


class DiskStorage:
    def __init__(
        self, root: Path, signer: Signer, io_pool: concurrent.futures.Executor
    ) -> None:
        self.root = root
        self.description = f"file://{root}"
        self.create_only_puts = False  # its gate refuses any PUT once an asset is not pending
        self._signer = signer
        self._pool = io_pool
        self._base = ""
        self._objects = root / "objects"
        self._multipart = root / "multipart"
        self._tmp = root / "tmp"
        self._locks = KeyedLocks()
        self._gate: UploadGate | None = None
        self._uploads: dict[str, _Upload] = {}
        self._direct: set[int] = set()
        """ids of the requests whose bodies were read from the socket (see _take_over)."""

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

    async def start(self, base_url: str, *, serving: bool = True) -> None:
        self._base = base_url.rstrip("/")
        if serving:
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

    def upload_headers(self, sha256: str) -> dict[str, str]:
        return checksum_header(sha256)

    async def presign_put(self, key: str, expires_s: int, sha256: str | None = None) -> str:
        return self._url(Grant("PUT", key, sha256=sha256 or ""), expires_s)

    async def presign_gets(self, keys: Sequence[str], expires_s: int) -> dict[str, str]:
        def sign() -> dict[str, str]:
            return {k: self._url(Grant("GET", k), expires_s) for k in keys}

        return sign() if len(keys) <= 64 else await self._run(sign)

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

    def _sizes(self, keys: Sequence[str]) -> dict[str, int]:
        found: dict[str, int] = {}
        for key in keys:
            with contextlib.suppress(FileNotFoundError):
                found[key] = self._paths(key)[0].stat().st_size
        return found

    async def sizes(self, prefix: str, keys: Sequence[str]) -> dict[str, int]:
        return await self._run(self._sizes, keys)  # local files: one thread hop, no listing

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

    def _read_small(self, key: str, max_bytes: int) -> bytes | None:
        try:
            with open(self._paths(key)[0], "rb") as f:
                data = f.read(max_bytes + 1)
        except FileNotFoundError:
            return None
        return None if len(data) > max_bytes else data

    async def read_small(self, key: str, max_bytes: int) -> bytes | None:
        return await self._run(self._read_small, key, max_bytes)

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

    async def copy(self, src: str, dst: str, size: int | None = None) -> ObjectInfo | None:
        async with self._locks.hold(src), self._locks.hold(dst):
            return await self._run(self._copy, src, dst)

    def _delete(self, key: str) -> None:
        for p in self._paths(key):
            p.unlink(missing_ok=True)

    async def delete(self, key: str) -> None:
        async with self._locks.hold(key):
            await self._run(self._delete, key)

    async def delete_many(self, keys: Sequence[str]) -> None:
        for key in keys:
            await self.delete(key)  # local unlinks: the per-key lock matters more than calls

    # ---- the storage sweep's view ------------------------------------------------------------

    async def inventory(self) -> AsyncIterator[list[Stored]]:
        def ours(items: list[Stored]) -> list[Stored]:
            return [i for i in items if i.key is None or i.key.startswith(SWEPT_PREFIXES)]

        for d in await self._run(_subdirs, self._objects):
            yield ours(await self._run(self._objects_in, d))
        yield await self._run(self._leftover_bodies)
        yield ours(await self._run(self._upload_dirs))

    @staticmethod
    def _objects_in(d: Path) -> list[Stored]:
        """The objects of one ``objects/<xx>`` directory, named by their records; a file
        whose record is missing or describes an older file (a crash between the two) has
        no key, a record without its file is listed with size 0."""
        found: dict[str, Stored] = {}
        inodes: dict[str, int] = {}
        records: dict[str, Path] = {}
        with contextlib.suppress(FileNotFoundError), os.scandir(d) as it:
            for entry in it:
                if entry.name.endswith(".meta"):
                    records[entry.name[:-5]] = Path(entry.path)
                    continue
                with contextlib.suppress(FileNotFoundError):
                    st = entry.stat(follow_symlinks=False)
                    found[entry.name] = Stored("object", None, entry.name, st.st_size,
                                               st.st_mtime)
                    inodes[entry.name] = st.st_ino
        for name, path in records.items():
            try:
                record = json.loads(path.read_text())
                key = record["key"]
                st = path.stat()
            except (OSError, ValueError, KeyError, TypeError):
                continue  # unreadable: the object stays nameless
            data = found.get(name)
            if data is None:
                found[name] = Stored("object", str(key), name, 0, st.st_mtime)
            elif record.get("ino") == inodes[name] and record.get("size") == data.size:
                found[name] = Stored("object", str(key), name, data.size, data.modified)
        return list(found.values())

    def _leftover_bodies(self) -> list[Stored]:
        """``tmp/``: bodies being received, or cut short by a crash (no key)."""
        found = []
        with contextlib.suppress(FileNotFoundError), os.scandir(self._tmp) as it:
            for entry in it:
                with contextlib.suppress(FileNotFoundError):
                    st = entry.stat(follow_symlinks=False)
                    found.append(Stored("object", None, f"tmp/{entry.name}", st.st_size,
                                        st.st_mtime))
        return found

    def _upload_dirs(self) -> list[Stored]:
        """Multipart uploads: ``multipart/<id>``, its key from ``KEY``; none for an upload
        whose creation was cut short (``.new-<id>``, or an older layout's directory without
        ``KEY``); modified = the latest part written."""
        found = []
        with contextlib.suppress(FileNotFoundError), os.scandir(self._multipart) as it:
            for entry in it:
                made = _UPLOAD_ID.fullmatch(entry.name)
                if not made and not _NEW_UPLOAD.fullmatch(entry.name):
                    continue
                d = Path(entry.path)
                try:
                    key: str | None = (d / "KEY").read_text() if made else None
                except OSError:
                    key = None
                times, size = [], 0
                for name in (".", PARTIAL):
                    with contextlib.suppress(OSError):
                        st = os.stat(d / name)
                        times.append(st.st_mtime)
                        size = st.st_size if name == PARTIAL else size
                if times:
                    found.append(Stored("upload", key, entry.name, size, max(times)))
        return found

    async def remove(self, items: Sequence[Stored]) -> None:
        files: list[Path] = []
        for item in items:
            if item.kind == "upload":
                async with self._locks.hold(f"upload:{item.ref}"):
                    d = self._upload_dir(item.ref) or (
                        self._multipart / item.ref if _NEW_UPLOAD.fullmatch(item.ref) else None)
                    if d is not None:
                        await self._run(shutil.rmtree, d, True)
            elif item.ref.startswith("tmp/"):
                files.append(self._tmp / item.ref[4:])
            elif re.fullmatch(r"[0-9a-f]{64}", item.ref):
                # no lock per key: the sweep holds the asset's lock, and only a PUT its
                # upload gate let through (same lock) writes a key
                data = self._objects / item.ref[:2] / item.ref
                files += [data, data.with_name(f"{item.ref}.meta")]
        await self._run(_unlink, *files)

    def ref_of(self, key: str) -> str:
        return hashlib.sha256(key.encode()).hexdigest()

    async def claim(self, owner: str) -> list[str]:
        def mark() -> list[str]:
            d = self.root / OWNERS_PREFIX.rstrip("/")
            d.mkdir(mode=0o700, exist_ok=True)
            (d / owner).touch()
            return sorted(p.name for p in d.iterdir() if p.name != owner)

        return await self._run(mark)

    # ---- multipart ------------------------------------------------------------------------------

    def _create_upload(self, key: str, part_size: int) -> str:
        if part_size <= 0:
            raise ValueError(f"part size {part_size}")
        upload_id = secrets.token_hex(16)
        # made under another name and renamed whole: the storage sweep never sees an upload
        # without its KEY (or with half of it)
        new = self._multipart / f".new-{upload_id}"
        new.mkdir(mode=0o700)
        os.close(os.open(new / PARTIAL, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        (new / "PART_SIZE").write_text(str(part_size))
        (new / "KEY").write_text(key)
        os.rename(new, self._multipart / upload_id)
        return upload_id

    async def create_multipart(self, key: str, part_size: int) -> str:
        return await self._run(self._create_upload, key, part_size)

    def _upload_of(self, key: str, upload_id: str) -> tuple[Path, int] | None:
        """The upload's directory and part size if ``upload_id`` is an open upload of
        ``key``."""
        d = self._dir_of(key, upload_id)
        if d is None:
            return None
        try:
            part_size = int((d / "PART_SIZE").read_text())
            os.stat(d / PARTIAL)
        except (OSError, ValueError):  # an older layout, or completed: no upload
            return None
        return d, part_size

    def _dir_of(self, key: str, upload_id: str) -> Path | None:
        """The directory of ``upload_id`` if it was made for ``key``, whatever its state."""
        d = self._upload_dir(upload_id)
        if d is None:
            return None
        try:
            return d if (d / "KEY").read_text() == key else None
        except (FileNotFoundError, NotADirectoryError):
            return None

    @staticmethod
    def _markers(d: Path) -> dict[int, tuple[str, int]]:
        """Part number -> (ETag value, size) of the parts stored whole."""
        found = {}
        with os.scandir(d) as it:
            for entry in it:
                m = _PART_FILE.fullmatch(entry.name)
                if m:
                    found[int(m[1])] = (m[2], int(m[3]))
        return found

    def _list_parts(self, key: str, upload_id: str) -> list[PartInfo] | None:
        found = self._upload_of(key, upload_id)
        if found is None:
            return None
        try:
            markers = self._markers(found[0])
        except FileNotFoundError:
            return None
        return [PartInfo(n, f'"{etag}"', size) for n, (etag, size) in sorted(markers.items())]

    async def list_parts(self, key: str, upload_id: str) -> list[PartInfo] | None:
        return await self._run(self._list_parts, key, upload_id)

    def _seal(self, d: Path, part_size: int, parts: Sequence[PartInfo]) -> str:
        """Check that ``parts`` are parts 1..N stored whole as planned, cut the object to
        their size; its path (hashed next: the one pass over the bytes)."""
        try:
            markers = self._markers(d)
        except FileNotFoundError:
            raise PartsRefused("its multipart upload is gone", missing=True) from None
        total = 0
        for i, p in enumerate(parts, 1):
            if p.part_number != i:
                raise PartsRefused(
                    f"parts must be numbered 1 to {len(parts)} without a gap "
                    f"(part {i} is not named)",
                    missing=False,
                )
            have = markers.get(i)
            if have is None or have[0] != etag_value(p.etag):
                raise PartsRefused(f"part {i} is not in storage (or was sent again)", missing=True)
            if i < len(parts) and have[1] != part_size:
                raise PartsRefused(
                    f"part {i} holds {have[1]} bytes, not the planned {part_size}",
                    missing=False,
                )
            total += have[1]
        partial_path = d / PARTIAL
        for n, (etag, size) in markers.items():  # parts past the end: cut off below
            if n > len(parts):
                (d / f"{n:05d}.{etag}.{size}").unlink(missing_ok=True)
        os.truncate(partial_path, total)
        return str(partial_path)

    async def _hash_file(self, path: str) -> str:
        """The hex SHA-256 of a file, in short executor calls (:func:`hash_step`): in the
        embedded server they are bulk work, which the daemon's progress floor can boost
        between two calls."""
        h = hashlib.sha256()
        view = memoryview(bytearray(COPY_CHUNK))
        f = await self._run(open, path, "rb", 0)
        try:
            while await self._run(hash_step, f, h, view):
                pass
        finally:
            await self._run(f.close)
        return h.hexdigest()

    async def complete_multipart(
        self, key: str, upload_id: str, parts: Sequence[PartInfo]
    ) -> ObjectInfo:
        async with self._locks.hold(f"upload:{upload_id}"):
            found = await self._run(self._upload_of, key, upload_id)
            if found is None:
                raise StorageError(f"multipart upload {upload_id} of {key!r} does not exist")
            d, part_size = found
            up = self._uploads.setdefault(upload_id, _Upload())
            up.closing = True  # part PUTs stop at their next batch, new ones are refused
            try:
                while up.busy:  # the last batches of part PUTs (they start no more)
                    await up.wait()
                digest = await self._hash_file(await self._run(self._seal, d, part_size, parts))
                up.done = True  # the file becomes the object: no part PUT may write it again
                async with self._locks.hold(key):
                    info = await self._run(self._install, d / PARTIAL, key, digest, None)
            except Exception:
                if up.done and await self._run(os.path.exists, d / PARTIAL):
                    up.done = False  # not moved: the upload goes on
                raise
            finally:
                up.closing = False
                self._forget(upload_id)
            await self._run(shutil.rmtree, d, True)
            return info

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        async with self._locks.hold(f"upload:{upload_id}"):
            d = await self._run(self._dir_of, key, upload_id)
            if d is not None:
                await self._run(shutil.rmtree, d, True)

    # ---- the presigned URL handlers ----------------------------------------------------------

    def _authorize(self, request: web.Request, method: str) -> tuple[Grant, web.Response | None]:
        q = request.query
        upload_id = q.get("uploadId", "")
        part = q.get("partNumber", "")
        number = int(part) if part.isascii() and part.isdigit() and len(part) <= 5 else 0
        sha256 = ""
        declared = request.headers.get(CHECKSUM_HEADER)
        if declared is not None and method == "PUT" and not upload_id:
            sha256 = checksum_of(declared) or ""
            if not sha256:
                grant = Grant(method, request.match_info["key"])
                return grant, s3_error(400, "InvalidRequest", f"Value for {CHECKSUM_HEADER} "
                                       "header is invalid.")
        grant = Grant(method, request.match_info["key"], upload_id, number, sha256)
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
        try:
            response = await self._put(request)
        finally:
            direct = id(request) in self._direct
            self._direct.discard(id(request))
        if direct:  # the connection's parser was left behind: it cannot carry another request
            response.force_close()
        return response

    async def _put(self, request: web.Request) -> web.StreamResponse:
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
        if grant.upload_id:
            return await self._put_part(request, grant, length)
        if not await self._open(grant.key):
            return _closed(grant)
        tmp = self._tmp_path()
        h = hashlib.sha256()
        try:
            fd = await self._run(os.open, tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as e:
            log.error("PUT %s: cannot store: %s", request.path, e)
            return s3_error(500, "InternalError", f"cannot store the object: {e.strerror}")

        def idle(ok: bool) -> None:
            def cleanup() -> None:
                with contextlib.suppress(OSError):
                    os.close(fd)
                if not ok:
                    tmp.unlink(missing_ok=True)

            self._background(cleanup)

        try:
            await self._receive(request, length, partial(_store, fd, h), idle)
        except _Truncated as e:
            log.info("PUT %s cut short: %s", request.path, e)
            return s3_error(400, "IncompleteBody", str(e))
        except OSError as e:
            log.error("PUT %s: cannot store: %s", request.path, e)
            return s3_error(500, "InternalError", f"cannot store the object: {e.strerror}")
        digest = h.hexdigest()
        try:
            refused = await self._install_received(request, grant, tmp, digest)
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

    def _gated(self, key: str) -> contextlib.AbstractAsyncContextManager[bool]:
        """Held while a received body is put in place: the gate says whether the key may
        still be written, and a finalize or delete cannot slip in meanwhile."""
        return self._gate(key) if self._gate is not None else contextlib.nullcontext(True)

    async def _install_received(
        self, request: web.Request, grant: Grant, tmp: Path, digest: str
    ) -> web.Response | None:
        """Put a received single body in place, if the gate still lets this key be
        written; else the refusal."""
        if grant.sha256 and digest != grant.sha256:  # a checksum-bound URL: other bytes
            return s3_error(400, "BadDigest", f"The {CHECKSUM_HEADER} you specified did not "
                            "match the calculated checksum.")
        async with self._gated(grant.key) as open_:
            if not open_:
                return _closed(grant)
            content_type = request.headers.get("Content-Type")
            async with self._locks.hold(grant.key):
                await self._run(self._install, tmp, grant.key, digest, content_type)
        return None

    # ---- part PUTs -------------------------------------------------------------------------------

    def _forget(self, upload_id: str) -> None:
        up = self._uploads.get(upload_id)
        if up is not None and not up.refs and not up.closing:
            del self._uploads[upload_id]

    async def _put_part(
        self, request: web.Request, grant: Grant, length: int
    ) -> web.StreamResponse:
        """Write a part's body at its place in the object being assembled, then mark it."""
        found = await self._run(self._upload_of, grant.key, grant.upload_id)
        if found is None:
            return _no_upload()
        d, part_size = found
        number = grant.part_number
        if length > part_size:
            return s3_error(
                400,
                "EntityTooLarge",
                f"Part {number} is {length} bytes, over this upload's part size of {part_size}",
            )
        if not await self._open(grant.key):
            return _closed(grant)
        up = self._uploads.setdefault(grant.upload_id, _Upload())
        if up.closing or up.done:
            return _no_upload()
        w = _PartWrite(up, number, partial(self._forget, grant.upload_id))
        try:
            while w.part.busy and w.live():  # an older PUT of this part: its last batch
                await up.wait()
            if not w.live():
                return self._superseded(grant, up)
            opening = w.track(self._pool.submit(self._open_part, d, number))
            try:
                fd = await asyncio.wrap_future(opening)
            except FileNotFoundError:
                return _no_upload()
            except OSError as e:
                log.error("PUT %s: cannot store: %s", request.path, e)
                return s3_error(500, "InternalError", f"cannot store the part: {e.strerror}")
            except asyncio.CancelledError:
                opening.add_done_callback(_close_opened)
                raise
            return await self._write_part(request, grant, d, fd, part_size, length, w)
        finally:
            w.release()

    async def _write_part(
        self,
        request: web.Request,
        grant: Grant,
        d: Path,
        fd: int,
        part_size: int,
        length: int,
        w: _PartWrite,
    ) -> web.StreamResponse:
        number = grant.part_number
        placer = _Placer(fd, (number - 1) * part_size)

        def idle(ok: bool) -> None:
            self._background(partial(_close_quietly, fd))

        try:
            await self._receive(request, length, placer, idle, w.track, w.live)
        except _Truncated as e:
            log.info("PUT %s cut short: %s", request.path, e)
            return s3_error(400, "IncompleteBody", str(e))
        except _Superseded:
            return self._superseded(grant, w.up)
        except OSError as e:
            log.error("PUT %s: cannot store: %s", request.path, e)
            return s3_error(500, "InternalError", f"cannot store the part: {e.strerror}")
        async with self._gated(grant.key) as open_:
            if not open_:
                return _closed(grant)
            if not w.live():
                return self._superseded(grant, w.up)
            etag = secrets.token_hex(16)
            marking = w.track(self._pool.submit(self._mark_part, d, number, etag, length))
            if not await asyncio.wrap_future(marking):
                return _no_upload()
        return web.Response(status=200, headers={"ETag": f'"{etag}"'})

    @staticmethod
    def _superseded(grant: Grant, up: _Upload) -> web.Response:
        if up.closing or up.done:
            return _no_upload()
        return s3_error(
            409,
            "OperationAborted",
            f"Part {grant.part_number} is being sent again by a newer request; "
            "this one was stopped",
        )

    @staticmethod
    def _open_part(d: Path, number: int) -> int:
        """Unmark part ``number`` (its range is about to change), then open the object
        being assembled for writing (FileNotFoundError: the upload is gone)."""
        for old in d.glob(f"{number:05d}.*"):
            old.unlink(missing_ok=True)
        return os.open(d / PARTIAL, os.O_WRONLY)

    @staticmethod
    def _mark_part(d: Path, number: int, etag: str, size: int) -> bool:
        try:
            os.close(os.open(d / f"{number:05d}.{etag}.{size}", os.O_WRONLY | os.O_CREAT, 0o600))
        except FileNotFoundError:  # aborted meanwhile
            return False
        return True

    # ---- receiving a body --------------------------------------------------------------------

    async def _receive(
        self,
        request: web.Request,
        length: int,
        sink: Callable[[Sequence[Buffer]], None],
        idle: Callable[[bool], None],
        track: Callable[[_Fut], _Fut] = lambda f: f,
        live: Callable[[], bool] | None = None,
    ) -> None:
        """Stream the body into ``sink`` (run in a worker thread, its writes in order).
        Raises _Truncated if fewer than ``length`` bytes arrive, _Superseded once ``live()``
        says no more writes. ``track`` sees each worker call (a newer PUT of the same part
        waits for the last one).

        ``idle(ok)`` is called on the event loop once no worker writes any more: before
        returning, else (the body refused, or this task cancelled while a thread still
        writes) once that thread is done."""
        loop = asyncio.get_running_loop()
        w = _Writes(self._pool, sink, track, live)
        try:
            direct = _take_over(request) if length >= DIRECT_MIN_BYTES else None
            if direct is None:
                await self._receive_parsed(request, length, w)
            else:
                self._direct.add(id(request))
                await self._receive_direct(*direct, length, w)
        except BaseException:
            if w.last is None or w.last.done():
                idle(False)
            else:

                def later(_: object) -> None:
                    with contextlib.suppress(RuntimeError):  # the loop is closed: moot
                        loop.call_soon_threadsafe(idle, False)

                w.last.add_done_callback(later)
            raise
        idle(True)

    @staticmethod
    async def _receive_parsed(request: web.Request, length: int, w: _Writes) -> None:
        """The body as aiohttp parses it: received chunks go to ``sink`` in batches of about
        BATCH_BYTES, one thread hop per batch, while the event loop receives the next."""
        batch: list[Buffer] = []
        batch_bytes = received = 0
        content = request.content
        try:
            while received < length:
                chunk = await content.readany()
                if not chunk:
                    break
                batch.append(chunk)
                batch_bytes += len(chunk)
                received += len(chunk)
                if batch_bytes >= BATCH_BYTES:
                    if w.last is not None:
                        await asyncio.wrap_future(w.last)
                    w.submit(w.sink, batch)
                    batch, batch_bytes = [], 0
        except (ConnectionError, asyncio.IncompleteReadError, HttpProcessingError) as e:
            raise _Truncated(f"connection lost after {received} of {length} bytes") from e
        if received != length:
            raise _Truncated(f"got {received} of {length} bytes")
        if w.last is not None:
            await asyncio.wrap_future(w.last)
        await asyncio.wrap_future(w.submit(w.sink, batch))

    @staticmethod
    async def _receive_direct(fd: int, head: list[Buffer], length: int, w: _Writes) -> None:
        """The rest of a large body read straight from the connection's socket by the worker
        thread that writes it (see :func:`_take_over`): one reused buffer, no chunk objects,
        no thread hop per batch. Steps of at most DIRECT_STEP_BYTES, so a lower priority or
        a boost for the process's bulk threads reaches them, and a stalled client holds a
        worker thread at most POLL_S at a time."""
        loop = asyncio.get_running_loop()
        received = sum(len(c) for c in head)
        if head:
            await asyncio.wrap_future(w.submit(w.sink, head))
        buf = memoryview(bytearray(DIRECT_BUFFER_BYTES))
        heard = loop.time()
        while received < length:
            want = min(DIRECT_STEP_BYTES, length - received)
            n = await asyncio.wrap_future(w.submit(_pull, fd, buf, want, w.sink))
            if n < 0:
                raise _Truncated(f"connection lost after {received} of {length} bytes")
            if n:
                received += n
                heard = loop.time()
            elif loop.time() - heard > STALL_S:
                raise _Truncated(
                    f"no bytes for {STALL_S:g} s after {received} of {length} bytes"
                )

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


def _subdirs(root: Path) -> list[Path]:
    with contextlib.suppress(FileNotFoundError), os.scandir(root) as it:
        return sorted(Path(e.path) for e in it if e.is_dir(follow_symlinks=False))
    return []


def _unlink(*paths: Path) -> None:
    for p in paths:
        p.unlink(missing_ok=True)


def _close_opened(cf: concurrent.futures.Future[int]) -> None:
    """A descriptor opened for a PUT that was cancelled meanwhile: close it."""
    if not cf.cancelled() and cf.exception() is None:
        _close_quietly(cf.result())


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


class _Placer:
    """Writes a part's batches one after another from its offset in the object."""

    def __init__(self, fd: int, offset: int) -> None:
        self.fd = fd
        self.offset = offset

    def __call__(self, chunks: Sequence[Buffer]) -> None:
        for c in chunks:
            view = memoryview(c)
            while view:
                n = os.pwrite(self.fd, view, self.offset)
                self.offset += n
                view = view[n:]


class _Writes:
    """Where a body's bytes go: ``sink`` calls in worker threads, one at a time, each seen
    by ``track``; none once ``live()`` says no (_Superseded)."""

    def __init__(
        self,
        pool: concurrent.futures.Executor,
        sink: Callable[[Sequence[Buffer]], None],
        track: Callable[[_Fut], _Fut],
        live: Callable[[], bool] | None,
    ) -> None:
        self.pool, self.sink, self.track, self.live = pool, sink, track, live
        self.last: _Fut | None = None
        """The latest call, in flight or done."""

    def submit(self, fn: Callable[..., Any], *args: Any) -> _Fut:
        if self.live is not None and not self.live():
            raise _Superseded()
        self.last = self.track(self.pool.submit(fn, *args))
        return self.last


def _take_over(request: web.Request) -> tuple[int, list[Buffer]] | None:
    """Take a plain-HTTP request's body away from aiohttp's parser: the bytes it has
    already buffered, and the socket's descriptor with the transport paused, so a worker
    thread reads the rest straight into a reused buffer (aiohttp's path costs a fresh
    256 KiB object and a copy per read: most of the server's CPU per byte beside the hash).
    The payload is marked ended, and the answer closes the connection, whose parser is
    left behind. None: not a connection this can take (TLS, no socket, a body already
    being read)."""
    transport = request.transport
    if transport is None or transport.is_closing():
        return None
    if transport.get_extra_info("sslcontext") is not None:
        return None
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX):
        return None
    if request.headers.get("Content-Encoding", "identity").lower() != "identity":
        return None  # aiohttp decodes such a body as it parses it
    content, protocol = request.content, request.protocol
    if content.exception() is not None or content.is_eof():
        return None
    # All synchronous, on the event loop, so no bytes arrive meanwhile. aiohttp may hold
    # body bytes in three places: the payload's buffer (drained here); the parser's own
    # buffer, when flow control paused it (aiohttp 3.14 and later: resuming parses those
    # into the payload, perhaps pausing again, so drain and resume until it stays
    # resumed); and the socket. Marking the payload ended may resume the transport:
    # pausing it comes last.
    head: list[Buffer] = []
    while True:
        buffered = content.read_nowait()
        if buffered:
            head.append(buffered)
        elif getattr(protocol, "_reading_paused", False):
            protocol.resume_reading()
        else:
            break
    content.feed_eof()
    transport.pause_reading()
    return sock.fileno(), head


def _pull(fd: int, buf: memoryview, want: int, sink: Callable[[Sequence[Buffer]], None]) -> int:
    """Up to ``want`` more bytes of a body from the socket ``fd`` (non-blocking) into
    ``sink``, through ``buf``: how many (0: none came within POLL_S; -1: the connection
    ended or failed before any came)."""
    got = 0
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while got < want:
        try:
            n = os.readv(fd, [buf[: min(len(buf), want - got)]])
        except BlockingIOError:
            if got or not poller.poll(POLL_S * 1000):
                return got
            continue
        except OSError:  # reset by the peer
            return got or -1
        if not n:
            return got or -1
        sink([buf[:n]])
        got += n
    return got


def _store(fd: int, h: Any, chunks: Sequence[Buffer]) -> None:
    """Hash and write each chunk in turn: the write reads it while the hash left it in the
    CPU's cache."""
    for c in chunks:
        h.update(c)
        view = memoryview(c)
        while view:
            view = view[os.write(fd, view):]
