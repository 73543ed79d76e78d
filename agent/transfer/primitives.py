"""Transfer primitives: the one definition of each rule that the daemon's transfers and the
in-process paths (``Chronicle().assets.download`` with no daemon, the SDK's own calls) share.

Standard library and :mod:`agent.errors` only, so the in-process paths stay light
(``tests/e2e/test_client.py`` checks the imports):

- :func:`backoff_s`: how long to wait before a retry (every retry loop uses it);
- :func:`classify_storage_answer`: a storage answer that is not 2xx, as the error tree
  (expired URL, retryable, refused), with S3's error code and message;
- :func:`check_component_name`: what a component name may be (a relative POSIX path);
- :func:`staging_path`: where a download is assembled beside its destination;
- :func:`is_disk_full`: which ``OSError`` means "no space" (``ENOSPC``, ``EDQUOT``).
"""

from __future__ import annotations

import errno
import os
import posixpath
import random
import re

from agent.errors import (
    RETRYABLE_S3_CODES,
    RETRYABLE_STATUSES,
    RetryableError,
    StorageRefused,
    TransferError,
    UrlExpired,
    UsageError,
)

_CODE = re.compile(rb"<Code>([^<]*)</Code>")
_MESSAGE = re.compile(rb"<Message>([^<]*)</Message>")
_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def backoff_s(retry: int, base_s: float, max_s: float, *, jitter: bool = True,
              rng: random.Random | None = None) -> float:
    """The wait before the ``retry``-th retry (from 1): truncated exponential,
    ``min(base_s * 2 ** (retry - 1), max_s)``, with full jitter (a uniform draw below it, as
    botocore's standard mode) unless ``jitter=False`` (a job put back in the queue, whose
    wait is shown to the user)."""
    cap = min(base_s * 2 ** max(0, retry - 1), max_s)
    return (rng or random).uniform(0, cap) if jitter else cap


def s3_code(body: bytes) -> str:
    """The ``<Code>`` of an S3-style XML error body, or ""."""
    m = _CODE.search(body or b"")
    return m.group(1).decode(errors="replace") if m else ""


def classify_storage_answer(status: int, body: bytes, what: str) -> TransferError:
    """Turn a non-2xx answer from storage into the error tree."""
    code, msg_m = s3_code(body), _MESSAGE.search(body or b"")
    message = msg_m.group(1).decode(errors="replace") if msg_m else ""
    detail = f"HTTP {status}" + (f" {code}" if code else "") + (f": {message}" if message else "")
    if status == 403 and ("expired" in message.lower() or b"expired" in (body or b"").lower()):
        return UrlExpired(f"{what}: presigned URL expired ({detail})")
    if status in RETRYABLE_STATUSES or code in RETRYABLE_S3_CODES:
        return RetryableError(f"{what}: {detail}", code=_snake(code) or f"http_{status}",
                              status=status)
    return StorageRefused(f"{what}: {detail}", status=status, code=_snake(code) or f"http_{status}")


def _snake(code: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", code).lower()


def check_component_name(name: str) -> str:
    """Component names are relative POSIX paths: no absolute path, no ``..``, no empty
    segment, no NUL."""
    if (
        not name
        or "\x00" in name
        or name.startswith("/")
        or any(seg in ("", ".", "..") for seg in name.split("/"))
        or posixpath.normpath(name) != name
    ):
        raise UsageError(
            f"invalid component name {name!r}: must be a relative POSIX path with no "
            "'..', '.', empty segment or NUL"
        )
    return name


def staging_path(dest: str, tag: str) -> str:
    """Where a download into ``dest`` is assembled: a hidden directory beside it, named
    after ``dest`` and ``tag`` (the job, or the asset and its selection), renamed onto
    ``dest`` once every file is verified."""
    parent, base = os.path.split(dest.rstrip("/"))
    return os.path.join(parent, f".{base}.chronicle-partial-{tag}")


def is_disk_full(e: OSError) -> bool:
    return e.errno in _SPACE_ERRNOS
