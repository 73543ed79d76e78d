"""Where component bytes live: the storage interface and the choice of backend.

Clients move bytes with presigned URLs, never through the JSON API, so a backend offers:
presigned single PUT, multipart (create, presigned part PUTs, list parts, complete, abort),
presigned GET honouring ``Range``, and what finalize needs (size and, where the backend can
tell, SHA-256), plus a direct write for inline assets and delete.

Backends: :class:`agent.server.disk.DiskStorage` (``file:///DIR``; its URLs are served by this
server) and :class:`agent.server.s3.S3Storage` (``s3://BUCKET?endpoint=URL``; real SigV4
URLs). The S3 module imports botocore, so it is imported only when an s3:// storage is
configured.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

from aiohttp import web

from agent.errors import ConfigError

from .signing import Signer

MiB = 1024 * 1024
MIN_PART_BYTES = 5 * MiB
"""S3's minimum size of every part but the last."""
MAX_PARTS = 10_000
MAX_OBJECT_BYTES = 5 * 1024**4
"""S3's limit for one object (5 TiB); also keeps a declared size within SQLite's INTEGER."""


@dataclass(frozen=True)
class ObjectInfo:
    size: int
    sha256: str | None = None
    """Hex SHA-256 of the whole object when the backend knows it without extra work."""


@dataclass(frozen=True)
class PartInfo:
    part_number: int
    etag: str
    size: int = 0

    def to_json(self) -> dict[str, object]:
        return {"part_number": self.part_number, "etag": self.etag, "size": self.size}


@dataclass(frozen=True)
class Stored:
    """One thing the store holds, as the storage sweep sees it (:mod:`agent.server.gc`)."""

    kind: Literal["object", "upload"]
    """An object, or a multipart upload not completed or aborted."""
    key: str | None
    """Its object key; None when the store cannot tell (the disk store: a file whose record
    a crash cut short, a body still being received)."""
    ref: str
    """What :meth:`Storage.remove` removes it by (S3: the key, or the upload id)."""
    size: int
    modified: float
    """Seconds since the epoch: last written (an object), started or last written (an
    upload)."""

    def to_json(self) -> dict[str, object]:
        return {"kind": self.kind, "key": self.key, "ref": self.ref, "size": self.size}


SWEPT_PREFIXES = ("assets/", "ready/", "probe/")
OWNERS_PREFIX = "servers/"
"""``servers/<id>``: one empty object per local server using the store (see
:meth:`Storage.claim`)."""
"""The keys the server writes (component bytes, inline contents, the start-up probe): the
sweep looks at these only, so a bucket shared with other data keeps that data."""


def etag_value(etag: str) -> str:
    """An ETag without its quotes, for comparing ETags however a client kept them."""
    return etag.strip().strip('"')


UploadGate = Callable[[str], AbstractAsyncContextManager[bool]]
"""For a store that serves its own upload URLs: ``async with gate(key) as open_:`` tells
whether a presigned PUT may still write ``key`` (its asset is pending and names that key),
and holds the asset's lock while the PUT installs the bytes."""


class StorageError(Exception):
    """A backend call failed in a way the caller cannot fix (I/O error, store unreachable)."""


class PartsRefused(StorageError):
    """The parts named cannot be assembled: one is not (or no longer) stored whole
    (``missing``), or they are not laid out as the upload's plan says."""

    def __init__(self, message: str, *, missing: bool) -> None:
        super().__init__(message)
        self.missing = missing


class Storage(Protocol):
    description: str
    """For logs and health: ``file:///…`` or ``s3://bucket`` (never credentials)."""
    create_only_puts: bool
    """A checksum-bound PUT URL also carries ``If-None-Match: *`` and the store honours it:
    such a URL can create its key, never replace it. A bound component then stays at its
    upload key when ready (no copy): a late PUT finds the key taken (412), and a deleted
    one is replaced by an empty tombstone that keeps it taken."""

    def upload_headers(self, sha256: str) -> dict[str, str]:
        """The headers a PUT URL bound to ``sha256`` is signed with and must be sent with."""
        ...

    async def start(self, base_url: str, *, serving: bool = True) -> None:
        """Prepare (create directories, the bucket); ``base_url`` is where this server is
        reached (the disk store's URLs point there). ``serving=False``: only to sweep, maybe
        beside a running server (nothing is created, probed or cleaned up)."""

    async def close(self) -> None: ...

    def add_routes(self, app: web.Application, gate: UploadGate) -> None:
        """Mount the handlers that serve presigned URLs, if the backend needs any; a PUT
        writes only while ``gate`` says the key is open."""

    async def presign_put(self, key: str, expires_s: int, sha256: str | None = None) -> str:
        """A single-PUT URL; with ``sha256`` (hex) a checksum-bound one: the client must
        send :meth:`upload_headers` with it, and the store refuses other bytes
        (``BadDigest``)."""
        ...

    async def presign_gets(self, keys: Sequence[str], expires_s: int) -> dict[str, str]:
        """GET URLs for many keys at once (an asset's components), by key."""
        ...

    async def create_multipart(self, key: str, part_size: int) -> str:
        """Start a multipart upload of ``key`` whose parts are ``part_size`` bytes (all but
        the last); returns its upload id."""
        ...

    async def presign_parts(
        self, key: str, upload_id: str, part_numbers: Sequence[int], expires_s: int
    ) -> dict[int, str]: ...

    async def list_parts(self, key: str, upload_id: str) -> list[PartInfo] | None:
        """Parts received so far, by part number; None if the upload does not exist (aborted
        or completed)."""
        ...

    async def complete_multipart(
        self, key: str, upload_id: str, parts: Sequence[PartInfo]
    ) -> ObjectInfo:
        """Assemble ``parts`` (ascending, checked by the caller) into ``key``. Raises
        PartsRefused if the store cannot assemble these parts."""
        ...

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        """Drop the upload and its parts; an unknown upload is not an error."""

    async def head(self, key: str) -> ObjectInfo | None: ...

    async def sizes(self, prefix: str, keys: Sequence[str]) -> dict[str, int]:
        """The sizes of those of ``keys`` (all under ``prefix``) that exist: one listing
        of ``prefix`` where the store is remote, rather than a HEAD per key."""
        ...

    async def sha256(self, key: str, size: int) -> str | None:
        """The object's SHA-256 if this backend can establish it (perhaps by reading the
        object), else None: the caller then records the client's declared digest."""
        ...

    async def put_object(self, key: str, data: bytes, content_type: str) -> ObjectInfo: ...

    async def read_small(self, key: str, max_bytes: int) -> bytes | None:
        """The object's bytes if it holds at most ``max_bytes`` (an inline asset's content),
        else None; None too when it is not there."""
        ...

    async def copy(self, src: str, dst: str, size: int | None = None) -> ObjectInfo | None:
        """Copy ``src`` to ``dst`` inside the store (replacing ``dst``); None if ``src`` does
        not exist. ``dst`` then no longer changes when ``src`` is written again. ``size``:
        ``src``'s size when the caller knows it already (no HEAD after the copy)."""
        ...

    async def delete(self, key: str) -> None:
        """Remove the object; a missing object is not an error."""

    async def delete_many(self, keys: Sequence[str]) -> None:
        """Remove many objects (S3: one DeleteObjects per 1,000 keys, not one call each);
        missing objects are not an error."""

    def inventory(self) -> AsyncIterator[list[Stored]]:
        """Everything stored under :data:`SWEPT_PREFIXES`, objects then multipart uploads, in
        pages (S3: one listing request each)."""
        ...

    async def remove(self, items: Sequence[Stored]) -> None:
        """Remove what :meth:`inventory` listed (abort the uploads); already gone is not an
        error."""

    async def claim(self, owner: str) -> list[str]:
        """Mark the store as used by the server ``owner`` (``servers/<owner>``); the other
        servers marked there. The storage sweep removes what no row of its own database
        accounts for, so it refuses to run on a store another server uses."""
        ...

    def ref_of(self, key: str) -> str:
        """The ``ref`` an object stored at ``key`` is listed with (to name a ``key=None``
        entry from the keys the database knows)."""
        ...


def open_storage(
    url: str, state_dir: Path, signer: Signer, io_pool: concurrent.futures.Executor
) -> Storage:
    """The backend named by ``server.storage`` (empty = ``<state_dir>/objects`` on disk)."""
    if not url:
        from .disk import DiskStorage

        return DiskStorage(state_dir / "objects", signer, io_pool)
    parts = urlsplit(url)
    if parts.scheme == "file":
        path = unquote(parts.path)
        if parts.netloc not in ("", "localhost") or not path.startswith("/"):
            raise ConfigError(f"server.storage = {url!r}: expected file:///ABSOLUTE/DIR")
        from .disk import DiskStorage

        return DiskStorage(Path(path), signer, io_pool)
    if parts.scheme == "s3":
        if not parts.netloc:
            raise ConfigError(f"server.storage = {url!r}: expected s3://BUCKET?endpoint=URL")
        options = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        from .s3 import S3Storage  # imports botocore: only when asked for

        return S3Storage.from_options(parts.netloc, options, io_pool)
    raise ConfigError(f"server.storage = {url!r}: expected file:///DIR or s3://BUCKET?endpoint=URL")


def plan_part_size(size: int, part_size_bytes: int) -> int:
    """The contract's part size: ``max(part_size_bytes, ceil(size / 10000))`` rounded up to a
    whole MiB, never under 5 MiB."""
    wanted = max(part_size_bytes, -(-size // MAX_PARTS))
    return max(MIN_PART_BYTES, -(-wanted // MiB) * MiB)


def part_count(size: int, part_size: int) -> int:
    return max(1, -(-size // part_size))
