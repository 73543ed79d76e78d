"""The one place that maps outside errors into the tree: every mapped type, checked."""

from __future__ import annotations

import random

import aiohttp
import pytest

from agent import errors as E
from agent.transfer.http import redact
from agent.transfer.primitives import classify_storage_answer
from agent.transfer.retry import RetryPolicy


@pytest.mark.parametrize(("status", "code", "cls"), [
    (404, "not_found", E.NotFound),
    (403, "forbidden", E.Forbidden),
    (400, "invalid_request", E.InvalidRequest),
    (409, "conflict", E.Conflict),
    (409, "asset_linked", E.AssetLinked),
    (409, "asset_invalid", E.AssetInvalid),
    (409, "asset_not_pending", E.AssetNotPending),
    (409, "components_missing", E.ComponentsMissing),
    (422, "checksum_mismatch", E.ChecksumMismatch),
    (413, "payload_too_large", E.PayloadTooLarge),
    (418, "teapot", E.ChronicleError),
])
def test_chronicle_error_bodies(status: int, code: str, cls: type[E.ChronicleError]) -> None:
    err = E.chronicle_error(status, {"error": {"code": code, "message": "why"}})
    assert type(err) is cls and err.status == status and err.code == code
    assert str(err) == f"{code}: why"


def test_chronicle_error_without_a_body_uses_the_status() -> None:
    err = E.chronicle_error(404, None)
    assert isinstance(err, E.NotFound) and err.code == "http_404"


class _Key:
    def __init__(self) -> None:
        self.host, self.port, self.ssl, self.is_ssl = "h", 1, None, False


@pytest.mark.parametrize(("exc", "cls", "code"), [
    (aiohttp.ServerDisconnectedError(), E.PeerClosed, "connection_reset"),
    (aiohttp.ClientPayloadError("cut"), E.PeerClosed, "connection_reset"),
    (aiohttp.ClientOSError(104, "reset"), E.PeerClosed, "connection_reset"),
    (ConnectionResetError(104, "reset"), E.PeerClosed, "connection_reset"),
    (aiohttp.ClientConnectorError(_Key(), OSError(111, "refused")),  # type: ignore[arg-type]
     E.RetryableError, "connect_failed"),
    (TimeoutError(), E.RetryableError, "timeout"),
    (aiohttp.ServerTimeoutError(), E.RetryableError, "timeout"),
])
def test_transport_errors(exc: BaseException, cls: type[E.TransferError], code: str) -> None:
    got = E.map_transport_error(exc, "PUT x")
    assert type(got) is cls and got.code == code and got.message.startswith("PUT x")


def test_bugs_are_not_mapped() -> None:
    assert E.map_transport_error(KeyError("x"), "PUT x") is None


@pytest.mark.parametrize(("status", "body", "cls", "code"), [
    (403, b"<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>",
     E.UrlExpired, "url_expired"),
    (503, b"<Error><Code>SlowDown</Code><Message>Please reduce</Message></Error>",
     E.RetryableError, "slow_down"),
    (400, b"<Error><Code>RequestTimeout</Code></Error>", E.RetryableError, "request_timeout"),
    (500, b"", E.RetryableError, "http_500"),
    (429, b"", E.RetryableError, "http_429"),
    (403, b"<Error><Code>SignatureDoesNotMatch</Code></Error>", E.StorageRefused,
     "signature_does_not_match"),
    (404, b"", E.StorageRefused, "http_404"),
    (400, b"", E.StorageRefused, "http_400"),
])
def test_storage_answers(status: int, body: bytes, cls: type[E.TransferError], code: str) -> None:
    err = classify_storage_answer(status, body, "PUT x")
    assert type(err) is cls and err.code == code


def test_redact_never_shows_a_signature() -> None:
    url = "http://127.0.0.1:9/storage/a/b?Expires=1&Signature=deadbeef"
    assert redact(url) == "http://127.0.0.1:9/storage/a/b?…"


def test_full_jitter_backoff_is_bounded() -> None:
    p = RetryPolicy(max_attempts=10, base_s=1.0, max_s=20.0, rng=random.Random(1))
    for n in range(1, 12):
        cap = min(2 ** (n - 1), 20.0)
        assert all(0 <= p.delay_s(n) <= cap for _ in range(200))


async def test_retry_runs_until_success_and_stops_on_final_errors() -> None:
    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)

    p = RetryPolicy(max_attempts=5, base_s=0.1, max_s=1.0, sleep=sleep)
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise aiohttp.ServerDisconnectedError()
        return "ok"

    assert await p.run(flaky, "x") == "ok" and calls == 3 and len(slept) == 2

    async def refused() -> str:
        raise E.StorageRefused("no", status=400)

    slept.clear()
    with pytest.raises(E.StorageRefused):
        await p.run(refused, "x")
    assert slept == []

    async def always() -> str:
        raise E.RetryableError("busy", status=503)

    with pytest.raises(E.RetryableError):
        await p.run(always, "x")
    assert len(slept) == 4  # 5 attempts, 4 sleeps
