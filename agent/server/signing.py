"""HMAC-SHA256 signatures for the disk store's presigned URLs.

A URL is bound to its method, object key, multipart upload id and part number, expiry
(unix seconds) and, for a checksum-bound upload URL, the body's SHA-256. The secret is per
server, kept in its state dir (mode 0600) so that URLs survive a restart. Query parameters
mirror S3's query-string authentication: ``Expires``, ``Signature`` and, for a part,
``uploadId`` and ``partNumber``.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Grant:
    """What a presigned URL allows."""

    method: str  # "PUT" or "GET"
    key: str
    upload_id: str = ""
    part_number: int = 0
    sha256: str = ""
    """Hex SHA-256 the body must have (checksum-bound URL), sent by the client as the
    ``x-amz-checksum-sha256`` header (base64), as S3 takes it."""


class Signer:
    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("signing secret too short")
        self._secret = secret

    @classmethod
    def load_or_create(cls, path: Path) -> Signer:
        """Read the secret at ``path``, creating it (0600) on first use. Blocking."""
        try:
            return cls(bytes.fromhex(path.read_text().strip()))
        except FileNotFoundError:
            pass
        path.parent.mkdir(parents=True, exist_ok=True)
        secret = secrets.token_bytes(32)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process won the race: use its secret
            return cls(bytes.fromhex(path.read_text().strip()))
        with os.fdopen(fd, "w") as f:
            f.write(secret.hex() + "\n")
        return cls(secret)

    @property
    def identity(self) -> str:
        """A name for this server that its secret derives and never reveals (it marks the
        store the server uses: agent.server.gc)."""
        return hmac.new(self._secret, b"chronicle server identity", "sha256").hexdigest()[:16]

    def _mac(self, grant: Grant, expires: int) -> str:
        fields = [grant.method, grant.key, grant.upload_id, str(grant.part_number), str(expires)]
        if grant.sha256:
            fields.append(grant.sha256)
        msg = "\n".join(fields)
        return hmac.new(self._secret, msg.encode(), hashlib.sha256).hexdigest()

    def query(self, grant: Grant, expires_s: int, *, now: float | None = None) -> dict[str, str]:
        """The query parameters of a URL allowing ``grant`` for ``expires_s`` seconds."""
        # Whole seconds, rounded up: a URL is never valid for less than ``expires_s``.
        expires = math.ceil(now if now is not None else time.time()) + expires_s
        params: dict[str, str] = {}
        if grant.upload_id:
            params["uploadId"] = grant.upload_id
            params["partNumber"] = str(grant.part_number)
        params["Expires"] = str(expires)
        params["Signature"] = self._mac(grant, expires)
        return params

    def check(self, grant: Grant, expires: str, signature: str) -> str | None:
        """None if the signature is good and unexpired, else the S3 error code:
        ``SignatureDoesNotMatch`` or ``AccessDenied`` (expired)."""
        try:
            when = int(expires)
        except ValueError:
            return "SignatureDoesNotMatch"
        if not signature.isascii() or not hmac.compare_digest(self._mac(grant, when), signature):
            return "SignatureDoesNotMatch"
        if time.time() > when:
            return "AccessDenied"
        return None
