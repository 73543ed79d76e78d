"""The S3 store: any S3-compatible service, its URLs real SigV4 presigned URLs.

``server.storage = "s3://BUCKET?endpoint=URL"``; more query options: ``region`` (default
us-east-1), ``addressing_style`` (``path``, the default, or ``virtual``) and
``verify_sha256_max_bytes`` (below). Credentials come from the standard AWS sources
(``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, the shared files). The
bucket is created if it does not exist.

Multipart: CreateMultipartUpload when a component is planned, presigned UploadPart URLs,
ListParts (paged by 1,000) for the uploads listing, CompleteMultipartUpload at finalize,
AbortMultipartUpload on abandon and re-plan.

What finalize can check here: the size, always (ListParts sizes, a listing of the asset's
upload keys, HeadObject). The SHA-256: a component whose URL binds its digest (API 1.1
``checksum_urls``: the client sends ``x-amz-checksum-sha256``, signed into the URL) was
checked by S3 itself when it took the PUT; otherwise the server reads the object back and
hashes it when it is at most ``verify_sha256_max_bytes`` (default 64 MiB, the default
multipart threshold, i.e. every single-PUT component). Larger components keep the client's
declared digest, recorded as unverified; their parts' ETags and sizes are checked.

A presigned PUT URL cannot be revoked, so a ready component never lives at a key one can
write: a checksum-bound URL is also signed with ``If-None-Match: *`` when the store honours
it (probed at start), so it can only create its key and the component stays there (a
delete leaves an empty tombstone); any other single-PUT object is copied (CopyObject) to its
final key at finalize; a multipart upload is created at the final key (see
:mod:`agent.server.assets`). Per-object calls of finalize go
as presigned requests over one aiohttp session (CopyObject: a few hundredths of a
millisecond of CPU to sign, where a botocore call costs about a millisecond); the upload keys
are then deleted with DeleteObjects, 1,000 to a call.

PUT URLs sign no Content-Type: clients must not send one (SeaweedFS, for one, refuses a PUT
carrying a header the URL was not signed with).

botocore is imported here only; this module is imported only when an s3:// storage is
configured.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import logging
import random
import secrets
import ssl
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime
from functools import partial
from typing import Any, TypeVar
from urllib.parse import quote
from xml.etree import ElementTree

import aiohttp
import botocore.config
import botocore.exceptions
import botocore.session
from aiohttp import web

from agent.chronicle.contract import checksum_header
from agent.errors import ConfigError

from .sigv4 import Presigner
from .storage import (
    OWNERS_PREFIX,
    SWEPT_PREFIXES,
    ObjectInfo,
    PartInfo,
    StorageError,
    Stored,
    UploadGate,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
MiB = 1024 * 1024
MAX_PRESIGN_S = 7 * 24 * 3600
"""SigV4 presigned URLs live at most 7 days."""
_OPTIONS = ("endpoint", "region", "addressing_style", "verify_sha256_max_bytes")
_MISSING = ("404", "NoSuchKey", "NotFound", "NoSuchUpload", "NoSuchBucket")


SIGNED_ATTEMPTS = 5
"""Attempts of one presigned request of the server's own (as botocore's standard mode)."""


def _epoch(iso: str | None) -> float:
    """A listing's LastModified (``2026-12-02T06:00:00.000Z``) in seconds since the epoch;
    now when absent or unreadable (so the sweep's grace period keeps it)."""
    try:
        return datetime.fromisoformat(iso or "").timestamp()
    except ValueError:
        return datetime.now().timestamp()


def _code(e: botocore.exceptions.ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


class S3Storage:
    def __init__(
        self,
        bucket: str,
        io_pool: concurrent.futures.Executor,
        *,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        addressing_style: str = "path",
        verify_sha256_max_bytes: int = 64 * MiB,
    ) -> None:
        self.bucket = bucket
        self.endpoint_url = endpoint_url
        self.region = region
        self.addressing_style = addressing_style
        self.verify_sha256_max_bytes = verify_sha256_max_bytes
        self.description = f"s3://{bucket}" + (f" at {endpoint_url}" if endpoint_url else "")
        self._pool = io_pool
        self._client: Any = None
        self._signer: Presigner
        self._http: aiohttp.ClientSession | None = None
        self.create_only_puts = False

    @classmethod
    def from_options(
        cls, bucket: str, options: dict[str, str], io_pool: concurrent.futures.Executor
    ) -> S3Storage:
        unknown = sorted(set(options) - set(_OPTIONS))
        if unknown:
            raise ConfigError(
                f"server.storage: unknown s3 option {unknown[0]!r} (known: {', '.join(_OPTIONS)})"
            )
        style = options.get("addressing_style", "path")
        if style not in ("path", "virtual"):
            raise ConfigError(f"server.storage: addressing_style={style!r}: path or virtual")
        try:
            verify = int(options.get("verify_sha256_max_bytes", 64 * MiB))
        except ValueError:
            raise ConfigError(
                "server.storage: verify_sha256_max_bytes must be an integer (bytes)"
            ) from None
        return cls(
            bucket,
            io_pool,
            endpoint_url=options.get("endpoint") or None,
            region=options.get("region") or "us-east-1",
            addressing_style=style,
            verify_sha256_max_bytes=verify,
        )

    # ---- plumbing -------------------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking botocore call in the I/O pool; transport failures → StorageError."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, partial(fn, *args, **kwargs))
        except botocore.exceptions.ClientError:
            raise  # the caller decides what an S3 error code means
        except botocore.exceptions.BotoCoreError as e:
            raise StorageError(f"{self.description}: {e}") from e

    async def _s3(self, op: str, **params: Any) -> Any:
        try:
            return await self._run(getattr(self._client, op), Bucket=self.bucket, **params)
        except botocore.exceptions.ClientError as e:
            if _code(e) in _MISSING:
                raise
            raise StorageError(f"{self.description}: {op} failed: {_code(e)}: {e}") from e

    def _make_client(self) -> Any:
        # botocore logs request headers (the SigV4 Authorization signature) and presigned
        # URLs at DEBUG: never let them through, whatever the daemon's own log level.
        for name in ("botocore", "boto3", "urllib3", "s3transfer"):
            logging.getLogger(name).setLevel(logging.WARNING)
        session = botocore.session.get_session()
        if session.get_credentials() is None:
            raise ConfigError(
                f"server.storage = s3://{self.bucket}: no AWS credentials (set "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"
            )
        config = botocore.config.Config(
            signature_version="s3v4",
            s3={"addressing_style": self.addressing_style},
            retries={"max_attempts": 5, "mode": "standard"},
            max_pool_connections=32,
            connect_timeout=10,
            read_timeout=120,
        )
        return session.create_client(
            "s3", region_name=self.region, endpoint_url=self.endpoint_url, config=config
        )

    # ---- lifecycle --------------------------------------------------------------------------

    async def start(self, base_url: str, *, serving: bool = True) -> None:
        self._client = await self._run(self._make_client)
        self._signer = await self._run(Presigner, self._client, self.bucket)
        self._http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=64, ssl=ssl.create_default_context()),
            timeout=aiohttp.ClientTimeout(total=300, sock_connect=10))
        if not serving:
            return
        try:
            await self._s3("head_bucket")
        except botocore.exceptions.ClientError as e:
            if _code(e) not in _MISSING:
                raise
            params: dict[str, Any] = {}
            if self.region != "us-east-1":
                params["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
            try:
                await self._s3("create_bucket", **params)
            except StorageError as created:
                if "BucketAlreadyOwnedByYou" not in str(created):
                    raise
            log.info("created bucket %s", self.description)
        self.create_only_puts = await self._probe_create_only()

    async def close(self) -> None:
        if self._http is not None:
            http, self._http = self._http, None
            await http.close()
        if self._client is not None:
            client, self._client = self._client, None
            await self._run(client.close)

    def add_routes(self, app: web.Application, gate: UploadGate) -> None:
        pass  # the store serves its own URLs (a SigV4 URL cannot be revoked: see copy)

    # ---- URLs --------------------------------------------------------------------------------

    def _presign(self, method: str, key: str, expires_s: int,
                 params: dict[str, str] | None = None,
                 headers: dict[str, str] | None = None) -> str:
        return self._signer.url(method, key, min(expires_s, MAX_PRESIGN_S), params,
                                headers=headers)

    def upload_headers(self, sha256: str) -> dict[str, str]:
        headers = checksum_header(sha256)
        if self.create_only_puts:
            headers["if-none-match"] = "*"
        return headers

    async def presign_put(self, key: str, expires_s: int, sha256: str | None = None) -> str:
        # microseconds (agent.server.sigv4); the digest signed in: S3 then checks the body
        return self._presign("PUT", key, expires_s,
                             headers=self.upload_headers(sha256) if sha256 else None)

    async def _probe_create_only(self) -> bool:
        """Whether the store refuses a second PUT signed with ``If-None-Match: *`` (S3 since
        2024, SeaweedFS 4.x); a store that ignores the header keeps the copy at finalize."""
        key = f"probe/create-only-{secrets.token_hex(8)}"
        codes = []
        try:
            for _ in range(2):
                status, _ = await self._signed("PUT", key, {"if-none-match": "*"},
                                               "probing conditional PUTs", b"probe")
                codes.append(status)
        except StorageError as e:
            log.warning("%s; small components are copied to their final keys at finalize", e)
            return False
        finally:
            with contextlib.suppress(Exception):
                await self.delete(key)
        if codes != [200, 412]:
            log.info("%s does not refuse a second If-None-Match PUT (%s): small components "
                     "are copied to their final keys at finalize", self.description, codes)
        return codes == [200, 412]

    async def presign_gets(self, keys: Sequence[str], expires_s: int) -> dict[str, str]:
        def sign() -> dict[str, str]:
            return {k: self._presign("GET", k, expires_s) for k in keys}

        return sign() if len(keys) <= 64 else await self._run(sign)

    async def presign_parts(
        self, key: str, upload_id: str, part_numbers: Sequence[int], expires_s: int
    ) -> dict[int, str]:
        def sign() -> dict[int, str]:
            return {
                n: self._presign("PUT", key, expires_s,
                                 {"partNumber": str(n), "uploadId": upload_id})
                for n in part_numbers
            }

        return sign() if len(part_numbers) <= 64 else await self._run(sign)

    # ---- objects -------------------------------------------------------------------------------

    async def head(self, key: str) -> ObjectInfo | None:
        try:
            r = await self._s3("head_object", Key=key)
        except botocore.exceptions.ClientError:
            return None
        return ObjectInfo(int(r["ContentLength"]))

    def _hash_object(self, key: str) -> str:
        body = self._client.get_object(Bucket=self.bucket, Key=key)["Body"]
        h = hashlib.sha256()
        try:
            for chunk in body.iter_chunks(MiB):
                h.update(chunk)
        finally:
            body.close()
        return h.hexdigest()

    def _read_small(self, key: str, max_bytes: int) -> bytes | None:
        try:
            body = self._client.get_object(Bucket=self.bucket, Key=key)["Body"]
        except botocore.exceptions.ClientError as e:
            if _code(e) in _MISSING:
                return None
            raise StorageError(f"{self.description}: reading {key!r}: {_code(e)}") from e
        try:
            data = body.read(max_bytes + 1)
        finally:
            body.close()
        return None if len(data) > max_bytes else bytes(data)

    async def read_small(self, key: str, max_bytes: int) -> bytes | None:
        return await self._run(self._read_small, key, max_bytes)

    async def sha256(self, key: str, size: int) -> str | None:
        if size > self.verify_sha256_max_bytes:
            return None  # the client's declared digest is recorded, unverified
        try:
            return await self._run(self._hash_object, key)
        except botocore.exceptions.ClientError as e:
            if _code(e) in _MISSING:
                return None
            raise StorageError(f"{self.description}: reading {key!r}: {_code(e)}") from e

    async def put_object(self, key: str, data: bytes, content_type: str) -> ObjectInfo:
        await self._s3("put_object", Key=key, Body=data, ContentType=content_type)
        digest = await self._run(lambda: hashlib.sha256(data).hexdigest())
        return ObjectInfo(len(data), digest)

    async def sizes(self, prefix: str, keys: Sequence[str]) -> dict[str, int]:
        wanted, found = set(keys), dict[str, int]()
        async for page in self._listing(prefix):
            found.update((key, size) for key, size, _ in page if key in wanted)
        return found

    async def _listing(self, prefix: str) -> AsyncIterator[list[tuple[str, int, float]]]:
        """(key, size, last modified) under ``prefix``: ListObjectsV2, a page of 1000 keys
        per request, read with ElementTree (botocore's parser spent about 0.1 CPU-s per
        1000 keys on their timestamps alone)."""
        token: str | None = None
        while True:
            params = {"list-type": "2", "prefix": prefix, "max-keys": "1000"}
            if token:
                params["continuation-token"] = token
            status, body = await self._signed("GET", "", {}, f"listing {prefix!r}",
                                              params=params)
            try:
                root = ElementTree.fromstring(body)
            except ElementTree.ParseError:
                root = None
            if status != 200 or root is None or not root.tag.endswith("ListBucketResult"):
                raise StorageError(f"{self.description}: listing {prefix!r}: HTTP {status} "
                                   f"{body[:300].decode(errors='replace')}")
            ns = root.tag[:-len("ListBucketResult")]  # "{http://s3...}" or ""
            yield [(o.findtext(f"{ns}Key") or "", int(o.findtext(f"{ns}Size") or 0),
                    _epoch(o.findtext(f"{ns}LastModified")))
                   for o in root.iter(f"{ns}Contents")]
            token = root.findtext(f"{ns}NextContinuationToken")
            if root.findtext(f"{ns}IsTruncated") != "true" or not token:
                return

    async def inventory(self) -> AsyncIterator[list[Stored]]:
        for prefix in SWEPT_PREFIXES:
            async for page in self._listing(prefix):
                yield [Stored("object", key, key, size, at) for key, size, at in page]
        for prefix in SWEPT_PREFIXES:
            markers: dict[str, str] = {}
            while True:
                r = await self._s3("list_multipart_uploads", Prefix=prefix, MaxUploads=1000,
                                   **markers)
                yield [Stored("upload", str(u["Key"]), str(u["UploadId"]), 0,
                              u["Initiated"].timestamp()) for u in r.get("Uploads", [])]
                if not r.get("IsTruncated"):
                    break
                markers = {"KeyMarker": r.get("NextKeyMarker") or "",
                           "UploadIdMarker": r.get("NextUploadIdMarker") or ""}
                if not markers["KeyMarker"]:
                    break

    async def remove(self, items: Sequence[Stored]) -> None:
        await self.delete_many([i.ref for i in items if i.kind == "object"])
        for i in items:
            if i.kind == "upload" and i.key is not None:
                await self.abort_multipart(i.key, i.ref)

    def ref_of(self, key: str) -> str:
        return key

    async def claim(self, owner: str) -> list[str]:
        marks = [key async for page in self._listing(OWNERS_PREFIX) for key, _, _ in page]
        mine = OWNERS_PREFIX + owner
        if mine not in marks:
            await self.put_object(mine, b"", "application/octet-stream")
        return sorted(k[len(OWNERS_PREFIX):] for k in marks if k != mine)

    async def copy(self, src: str, dst: str, size: int | None = None) -> ObjectInfo | None:
        """Server-side CopyObject (single-PUT components: at most 5 GiB, S3's copy limit).
        The upload URL names ``src`` only, so once finalized the bytes at ``dst`` are out of
        its reach."""
        headers = {"x-amz-copy-source": f"{self.bucket}/{quote(src, safe='/~')}"}
        status, body = await self._signed("PUT", dst, headers, f"copying {src!r}")
        if status == 404 or b"<Code>NoSuchKey</Code>" in body:
            return None  # src is not there
        if status != 200 or b"<Error>" in body:  # S3 may answer 200 with an error body
            raise StorageError(f"{self.description}: copying {src!r}: HTTP {status} "
                               f"{body[:300].decode(errors='replace')}")
        return ObjectInfo(size) if size is not None else await self.head(dst)

    async def _signed(self, method: str, key: str, headers: dict[str, str], what: str,
                      data: bytes = b"", params: dict[str, str] | None = None
                      ) -> tuple[int, bytes]:
        """One request of the server's own, presigned and sent over aiohttp, retried as
        botocore's standard mode would: up to 5 attempts with jittered backoff after a
        connection error, a 5xx, SlowDown or RequestTimeout (signed afresh each time)."""
        assert self._http is not None
        delay = 0.1
        for attempt in range(1, SIGNED_ATTEMPTS + 1):
            url = self._presign(method, key, 600, params, headers=headers)
            try:
                async with self._http.request(method, url, data=data, headers=headers,
                                              skip_auto_headers=("Content-Type",)) as r:
                    status, body = r.status, await r.read()
            except (aiohttp.ClientError, TimeoutError) as e:
                why = str(e) or type(e).__name__
            else:
                transient = status >= 500 or any(
                    f"<Code>{c}</Code>".encode() in body
                    for c in ("SlowDown", "RequestTimeout", "InternalError"))
                if not transient:
                    return status, body
                why = f"HTTP {status}"
            if attempt == SIGNED_ATTEMPTS:
                raise StorageError(f"{self.description}: {what}: {why} "
                                   f"({SIGNED_ATTEMPTS} attempts)")
            await asyncio.sleep(random.uniform(0, delay))
            delay = min(2 * delay, 2.0)
        raise AssertionError("unreachable")

    async def delete_many(self, keys: Sequence[str]) -> None:
        for at in range(0, len(keys), 1000):
            batch = keys[at:at + 1000]
            r = await self._s3("delete_objects", Delete={
                "Objects": [{"Key": k} for k in batch], "Quiet": True})
            failed = r.get("Errors") or []
            if failed:
                raise StorageError(f"{self.description}: {len(failed)} of {len(batch)} deletes "
                                   f"failed, e.g. {failed[0].get('Key')!r}: "
                                   f"{failed[0].get('Code')}")

    async def delete(self, key: str) -> None:
        try:
            await self._s3("delete_object", Key=key)
        except botocore.exceptions.ClientError:
            pass  # already gone

    # ---- multipart -------------------------------------------------------------------------------

    async def create_multipart(self, key: str, part_size: int = 0) -> str:
        r = await self._s3("create_multipart_upload", Key=key)
        return str(r["UploadId"])

    async def list_parts(self, key: str, upload_id: str) -> list[PartInfo] | None:
        parts: list[PartInfo] = []
        marker = 0
        while True:
            try:
                r = await self._s3(
                    "list_parts",
                    Key=key,
                    UploadId=upload_id,
                    MaxParts=1000,
                    PartNumberMarker=marker,
                )
            except botocore.exceptions.ClientError:
                return None  # NoSuchUpload: aborted or completed
            for p in r.get("Parts", []):
                parts.append(PartInfo(int(p["PartNumber"]), str(p["ETag"]), int(p["Size"])))
            if not r.get("IsTruncated"):
                break
            next_marker = int(r.get("NextPartNumberMarker") or 0)
            if next_marker <= marker:
                break
            marker = next_marker
        return sorted(parts, key=lambda p: p.part_number)

    async def complete_multipart(
        self, key: str, upload_id: str, parts: Sequence[PartInfo]
    ) -> ObjectInfo:
        try:
            await self._s3(
                "complete_multipart_upload",
                Key=key,
                UploadId=upload_id,
                MultipartUpload={
                    "Parts": [{"PartNumber": p.part_number, "ETag": p.etag} for p in parts]
                },
            )
        except botocore.exceptions.ClientError as e:
            raise StorageError(f"{self.description}: completing {key!r}: {_code(e)}") from e
        info = await self.head(key)
        if info is None:
            raise StorageError(f"{self.description}: {key!r} missing after completion")
        return info

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        try:
            await self._s3("abort_multipart_upload", Key=key, UploadId=upload_id)
        except botocore.exceptions.ClientError:
            pass  # no such upload
