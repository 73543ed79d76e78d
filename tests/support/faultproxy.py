"""A fault-injecting HTTP/1.1 reverse proxy for tests, run as its own process.

    python tests/support/faultproxy.py --upstream http://127.0.0.1:PORT \\
        --listen 127.0.0.1:0 --control 127.0.0.1:0 [--rules JSON|@FILE] [--seed N]

On start it prints one JSON line, ``{"listen": "http://H:P", "control": "http://H:C"}``,
and flushes stdout. SIGTERM/SIGINT stop it.

Forwarding is byte-for-byte: the request line and every header (``Host`` included, so a
SigV4 presigned URL that points at the proxy still verifies upstream) are sent unchanged,
and bodies are streamed in 1 MiB pieces with their original framing (Content-Length
stays Content-Length). Each client request gets its own upstream connection; the client
side is kept alive when both ends allow it.

Rules (a JSON list, evaluated in order; the first rule that *fires* handles the request
and later rules do not see it)::

    {"action": "...",            # see below
     "method": "PUT",            # optional, or a list of methods
     "path_regex": "^/b/k",      # optional, re.search on path+query
     "after": 0,                 # skip the first N matching requests
     "times": 1,                 # then fire N times (-1 = always; default -1 with probability)
     "probability": 0.5}         # optional, fire with this chance (seeded by --seed)

Actions and their parameters:

- ``reset_request``: ``after_bytes`` N (0), ``forward`` (true). Read N request-body bytes
  (forwarding them upstream or not), then abort both connections with a TCP RST.
- ``status``: ``code`` (int or preset name), ``preset``, ``body``, ``content_type``,
  ``headers`` (dict), ``early`` (false). Answer without contacting upstream; the body is
  drained first, unless ``early`` (or the client sent ``Expect: 100-continue``): then the
  answer goes out at once, the proxy half-closes, discards the body for up to 2 s and
  closes. Presets: ``s3_slowdown`` (503 SlowDown), ``expired`` (403 AccessDenied "Request
  has expired"), ``internal_error`` (500), ``request_timeout`` (400 RequestTimeout),
  ``signature_mismatch`` (403), ``no_such_upload`` (404).
- ``stall_request``: ``after_bytes``, ``seconds``, ``then_close`` (false). Stop reading the
  client's body after N bytes for S seconds, then go on (or close both sides).
- ``stall_response``: ``after_bytes``, ``seconds``, ``then_close``. Same for the response body.
- ``truncate_response``: ``after_bytes``, ``reset`` (false), ``drop_head`` (false). Send the
  upstream's head (original Content-Length) and N body bytes, then close (FIN, or RST with
  ``reset``). With ``drop_head`` the client gets nothing of the answer, only a RST: the
  upstream did the work, the client cannot know (a lost answer).
- ``corrupt_response``: ``offset`` K. XOR 0x01 into byte K of this response's body.
- ``corrupt_request``: ``offset`` K. XOR 0x01 into byte K of the request's body on its way
  upstream (bytes damaged in flight: a checksum-bound PUT is then refused with BadDigest).
- ``chunk_response``: send the answer's body chunked (``Transfer-Encoding: chunked``)
  instead of with its Content-Length.
- ``delay``: ``seconds``. Wait, then forward normally.

Byte offsets count body bytes as they travel on the wire (for a chunked body that includes
the chunk framing).

Control API (plain HTTP, JSON): ``GET/PUT/POST/DELETE /rules`` (read, replace, append,
clear), ``GET /stats``, ``POST /reset-stats`` (counters and log; rules keep their own
after/times state), ``GET /health``. ``bytes_up``/``bytes_down`` count body bytes sent
upstream / to clients; ``max_inflight`` the most requests handled at once. The log
keeps the last 200 requests as ``{method, path, status, fault}`` with the query string
removed: query strings (URL signatures) are never logged.

``FaultProxy`` below starts the process from tests and drives the control API.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import http
import json
import logging
import os
import random
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger("faultproxy")

CHUNK_BYTES = 1 << 20
WRITE_HIGH_WATER_BYTES = 4 << 20
LOG_ENTRIES = 200
EARLY_LINGER_S = 2.0
PUMP_GRACE_S = 1.0
CONTROL_BODY_MAX_BYTES = 1 << 20


def _s3_error(code: str, message: str) -> str:
    return f"<Error><Code>{code}</Code><Message>{message}</Message></Error>"


PRESETS: dict[str, tuple[int, str]] = {
    "s3_slowdown": (503, _s3_error("SlowDown", "Please reduce your request rate.")),
    "expired": (403, _s3_error("AccessDenied", "Request has expired")),
    "internal_error": (
        500,
        _s3_error("InternalError", "We encountered an internal error. Please try again."),
    ),
    "request_timeout": (
        400,
        _s3_error(
            "RequestTimeout",
            "Your socket connection to the server was not read from or written to within "
            "the timeout period.",
        ),
    ),
    "signature_mismatch": (
        403,
        _s3_error(
            "SignatureDoesNotMatch",
            "The request signature we calculated does not match the signature you provided.",
        ),
    ),
    "no_such_upload": (404, _s3_error("NoSuchUpload", "The specified upload does not exist.")),
}

# --------------------------------------------------------------------------- rules

_COMMON_KEYS = {"action", "method", "path_regex", "after", "times", "probability", "name"}
_ACTION_KEYS: dict[str, set[str]] = {
    "reset_request": {"after_bytes", "forward"},
    "status": {"code", "preset", "body", "content_type", "headers", "early"},
    "stall_request": {"after_bytes", "seconds", "then_close"},
    "stall_response": {"after_bytes", "seconds", "then_close"},
    "truncate_response": {"after_bytes", "reset", "drop_head"},
    "corrupt_response": {"offset"},
    "corrupt_request": {"offset"},
    "chunk_response": set(),
    "delay": {"seconds"},
}
_PARAM_TYPES: dict[str, type | tuple[type, ...]] = {
    "after_bytes": int,
    "offset": int,
    "seconds": (int, float),
    "forward": bool,
    "then_close": bool,
    "reset": bool,
    "early": bool,
    "drop_head": bool,
    "preset": str,
    "body": str,
    "content_type": str,
    "headers": dict,
    "code": (int, str),
}


@dataclass
class Rule:
    """One parsed fault rule plus its own match/fire counters."""

    action: str
    spec: dict[str, Any]
    methods: frozenset[str] | None = None
    path_re: re.Pattern[str] | None = None
    after: int = 0
    times: int = 1
    probability: float | None = None
    after_bytes: int = 0
    offset: int = 0
    seconds: float = 0.0
    forward: bool = True
    then_close: bool = False
    reset: bool = False
    early: bool = False
    drop_head: bool = False
    code: int = 500
    body: bytes = b""
    content_type: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    matched: int = 0
    fired: int = 0

    def matches(self, method: str, target: str) -> bool:
        if self.methods is not None and method.upper() not in self.methods:
            return False
        return self.path_re is None or self.path_re.search(target) is not None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_params(action: str, spec: dict[str, Any]) -> None:
    unknown = set(spec) - _COMMON_KEYS - _ACTION_KEYS[action]
    if unknown:
        raise ValueError(f"{action}: unknown keys {sorted(unknown)}")
    for key in _ACTION_KEYS[action] & set(spec):
        value: Any = spec[key]
        expected = _PARAM_TYPES[key]
        if isinstance(value, bool) and expected is not bool:
            raise ValueError(f"{action}: {key} must not be a boolean")
        if not isinstance(value, expected):
            raise ValueError(f"{action}: {key} has the wrong type")
        if key in ("after_bytes", "offset", "seconds") and spec[key] < 0:
            raise ValueError(f"{action}: {key} must be >= 0")


def _parse_match(rule: Rule, spec: dict[str, Any]) -> None:
    method = spec.get("method")
    if method is not None:
        methods = [method] if isinstance(method, str) else method
        if not isinstance(methods, list) or not all(isinstance(m, str) for m in methods):
            raise ValueError("method must be a string or a list of strings")
        rule.methods = frozenset(m.upper() for m in methods)
    if spec.get("path_regex") is not None:
        if not isinstance(spec["path_regex"], str):
            raise ValueError("path_regex must be a string")
        try:
            rule.path_re = re.compile(spec["path_regex"])
        except re.error as exc:
            raise ValueError(f"bad path_regex: {exc}") from exc
    probability = spec.get("probability")
    if probability is not None:
        if isinstance(probability, bool) or not isinstance(probability, (int, float)):
            raise ValueError("probability must be a number")
        if not 0 <= probability <= 1:
            raise ValueError("probability must be within [0, 1]")
        rule.probability = float(probability)
    rule.after = spec.get("after", 0)
    rule.times = spec.get("times", 1 if probability is None else -1)
    if not _is_int(rule.after) or rule.after < 0:
        raise ValueError("after must be an integer >= 0")
    if not _is_int(rule.times) or rule.times < -1:
        raise ValueError("times must be an integer >= -1")


def _parse_status(rule: Rule, spec: dict[str, Any]) -> None:
    preset = spec.get("preset")
    code = spec.get("code")
    if isinstance(code, str):
        preset, code = code, None
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
        rule.code, body = PRESETS[preset]
        rule.body = body.encode()
        rule.content_type = "application/xml"
    if code is not None:
        if not 100 <= code <= 599:
            raise ValueError("code must be within 100..599")
        rule.code = code
    elif preset is None:
        raise ValueError("status needs a code or a preset")
    if "body" in spec:
        rule.body = spec["body"].encode()
        rule.content_type = "application/xml" if spec["body"].startswith("<") else "text/plain"
    if "content_type" in spec:
        rule.content_type = spec["content_type"]
    headers = spec.get("headers", {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
        raise ValueError("headers must map strings to strings")
    rule.headers = dict(headers)


def parse_rule(spec: object) -> Rule:
    """Validate one rule given as JSON data; raise ValueError with a readable message."""
    if not isinstance(spec, dict):
        raise ValueError("a rule must be a JSON object")
    action = spec.get("action")
    if action not in _ACTION_KEYS:
        raise ValueError(f"unknown action {action!r}; known: {sorted(_ACTION_KEYS)}")
    _check_params(action, spec)
    rule = Rule(action=action, spec=dict(spec))
    _parse_match(rule, spec)
    for key in ("after_bytes", "offset", "forward", "then_close", "reset", "early",
                "drop_head"):
        if key in spec:
            setattr(rule, key, spec[key])
    if "seconds" in spec:
        rule.seconds = float(spec["seconds"])
    if action == "status":
        _parse_status(rule, spec)
    return rule


def parse_rules(data: object) -> list[Rule]:
    """Accept a list of rules, one rule, or ``{"rules": [...]}``."""
    if isinstance(data, dict) and "rules" in data and "action" not in data:
        data = data["rules"]
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise ValueError("rules must be a JSON list of objects")
    return [parse_rule(item) for item in data]


class RuleSet:
    def __init__(self, seed: int | None) -> None:
        self.rules: list[Rule] = []
        self._rng = random.Random(seed)

    def select(self, method: str, target: str) -> Rule | None:
        for rule in self.rules:
            if not rule.matches(method, target):
                continue
            rule.matched += 1
            if rule.matched <= rule.after:
                continue
            if rule.times != -1 and rule.fired >= rule.times:
                continue
            if rule.probability is not None and self._rng.random() >= rule.probability:
                continue
            rule.fired += 1
            return rule
        return None


class Stats:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.faults: collections.Counter[str] = collections.Counter()
        self.bytes_up = 0
        self.bytes_down = 0
        self.max_inflight = getattr(self, "inflight", 0)
        self.inflight = self.max_inflight
        self.log: collections.deque[dict[str, Any]] = collections.deque(maxlen=LOG_ENTRIES)

    def start(self, method: str, target: str, rule: Rule | None) -> dict[str, Any]:
        self.requests += 1
        action = rule.action if rule else None
        if action:
            self.faults[action] += 1
        path = urllib.parse.urlsplit(target).path if "://" in target else target
        entry: dict[str, Any] = {
            "method": method, "path": path.split("?", 1)[0], "status": None, "fault": action}
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(target).query)
        if "partNumber" in query:  # not a secret, and what resume tests count
            entry["part"] = int(query["partNumber"][0])
        self.log.append(entry)
        return entry

    def snapshot(self, rules: list[Rule]) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "faults": dict(self.faults),
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "max_inflight": self.max_inflight,
            "by_rule": [
                {
                    "index": i,
                    "action": r.action,
                    "matched": r.matched,
                    "fired": r.fired,
                    "rule": r.spec,
                }
                for i, r in enumerate(rules)
            ],
            "log": list(self.log),
        }


# --------------------------------------------------------------------------- HTTP/1.1


class _BadRequest(Exception):
    """The client sent something that is not HTTP/1.x."""


class _Closed(Exception):
    """The connections were deliberately closed or reset; nothing more to do."""


class _WriteFailed(ConnectionError):
    """Writing to the destination side failed (the peer went away)."""


@dataclass
class _Head:
    raw: bytes
    start: list[str]
    headers: list[tuple[str, str]]

    @classmethod
    def parse(cls, raw: bytes) -> _Head:
        lines = raw.decode("latin-1").split("\r\n")[:-2]
        if not lines:
            raise ValueError("empty message head")
        start = lines[0].split(" ", 2)
        if len(start) == 2:
            start.append("")
        if len(start) != 3:
            raise ValueError("bad start line")
        headers = []
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                raise ValueError("bad header line")
            headers.append((name.lower(), value.strip()))
        return cls(raw, start, headers)

    @property
    def method(self) -> str:
        return self.start[0]

    @property
    def target(self) -> str:
        return self.start[1]

    @property
    def status(self) -> int:
        return int(self.start[1])

    def tokens(self, name: str) -> list[str]:
        values = (v for n, v in self.headers if n == name)
        return [t.strip().lower() for v in values for t in v.split(",") if t.strip()]

    def keep_alive(self) -> bool:
        version = self.start[0] if self.start[0].startswith("HTTP/") else self.start[2]
        conn = self.tokens("connection")
        if version == "HTTP/1.0":
            return "keep-alive" in conn
        return "close" not in conn

    def content_length(self) -> int | None:
        values = set(self.tokens("content-length"))
        if not values:
            return None
        if len(values) != 1 or not next(iter(values)).isdigit():
            raise ValueError("bad Content-Length")
        return int(values.pop())

    def request_framing(self) -> tuple[str, int]:
        te = self.tokens("transfer-encoding")
        if te:
            if te[-1] != "chunked":
                raise ValueError("unsupported Transfer-Encoding")
            return "chunked", 0
        return "length", self.content_length() or 0

    def response_framing(self, request_method: str) -> tuple[str, int]:
        if request_method == "HEAD" or self.status < 200 or self.status in (204, 304):
            return "length", 0
        te = self.tokens("transfer-encoding")
        if te:
            return ("chunked", 0) if te[-1] == "chunked" else ("close", 0)
        length = self.content_length()
        return ("close", 0) if length is None else ("length", length)


async def _read_head(reader: asyncio.StreamReader) -> bytes | None:
    """Read a message head; None on a clean EOF before any byte of it."""
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial.strip():
            return None
        raise ConnectionError("connection closed inside a message head") from exc
    return raw.lstrip(b"\r\n")


class _Body:
    """Reads one message body off a stream, keeping its framing, as raw wire bytes."""

    def __init__(self, reader: asyncio.StreamReader, kind: str, length: int) -> None:
        self.reader = reader
        self.kind = kind  # "length", "chunked" or "close"
        self.remaining = length
        self.offset = 0
        self._state = "size"
        self._chunk_left = 0

    @property
    def done(self) -> bool:
        if self.kind == "length":
            return self.remaining == 0
        if self.kind == "chunked":
            return self._state == "done"
        return self.reader.at_eof()

    async def read(self, limit: int) -> bytes:
        if self.kind == "length":
            data = await self._read_length(limit)
        elif self.kind == "chunked":
            data = await self._read_chunked(limit)
        else:
            data = await self.reader.read(limit)
        self.offset += len(data)
        return data

    async def _read_length(self, limit: int) -> bytes:
        if self.remaining == 0:
            return b""
        data = await self.reader.read(min(limit, self.remaining))
        if not data:
            raise ConnectionError("peer closed inside a body")
        self.remaining -= len(data)
        return data

    async def _read_chunked(self, limit: int) -> bytes:
        if self._state == "data":
            data = await self.reader.read(min(limit, self._chunk_left))
            if not data:
                raise ConnectionError("peer closed inside a chunk")
            self._chunk_left -= len(data)
            if self._chunk_left == 0:
                self._state = "size"
            return data
        if self._state == "done":
            return b""
        line = await self.reader.readuntil(b"\r\n")
        if self._state == "trailer":
            if line == b"\r\n":
                self._state = "done"
            return line
        size = int(line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            self._state = "trailer"
        else:
            self._chunk_left = size + 2  # the data and its CRLF
            self._state = "data"
        return line


def _tune(writer: asyncio.StreamWriter) -> None:
    writer.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER_BYTES)


def _rst(writer: asyncio.StreamWriter) -> None:
    """Abort a connection so that the peer sees a TCP RST."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _flush(writer: asyncio.StreamWriter) -> None:
    """Wait until everything written so far has been handed to the kernel."""
    writer.transport.set_write_buffer_limits(high=0)
    try:
        await writer.drain()
    finally:
        _tune(writer)


def _response_bytes(
    code: int,
    body: bytes,
    content_type: str | None,
    headers: dict[str, str],
    *,
    close: bool,
    send_body: bool = True,
) -> bytes:
    try:
        reason = http.HTTPStatus(code).phrase
    except ValueError:
        reason = "Status"
    lines = [f"HTTP/1.1 {code} {reason}", f"Content-Length: {len(body)}"]
    if content_type:
        lines.append(f"Content-Type: {content_type}")
    lines.extend(f"{k}: {v}" for k, v in headers.items())
    if close:
        lines.append("Connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head + body if send_body else head


# --------------------------------------------------------------------------- proxy


class Proxy:
    def __init__(self, upstream_host: str, upstream_port: int, rules: RuleSet) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.rules = rules
        self.stats = Stats()

    # ---- data path

    async def handle_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        _tune(writer)
        try:
            while await self._serve_one(reader, writer):
                pass
        except _Closed:
            pass
        except _BadRequest:
            with contextlib.suppress(ConnectionError):
                writer.write(_response_bytes(400, b"bad request\n", "text/plain", {}, close=True))
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            _rst(writer)
        except Exception:
            logger.exception("unexpected error on a client connection")
            _rst(writer)
        finally:
            if not writer.is_closing():
                writer.close()

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        raw = await _read_head(reader)
        if raw is None:
            return False
        try:
            head = _Head.parse(raw)
            if not head.start[2].startswith("HTTP/1."):
                raise ValueError("not HTTP/1.x")
            body = _Body(reader, *head.request_framing())
        except ValueError as exc:
            raise _BadRequest(str(exc)) from exc
        rule = self.rules.select(head.method, head.target)
        entry = self.stats.start(head.method, head.target, rule)
        self.stats.inflight += 1
        self.stats.max_inflight = max(self.stats.max_inflight, self.stats.inflight)
        try:
            return await self._handle(rule, head, body, writer, entry)
        finally:
            self.stats.inflight -= 1

    async def _handle(self, rule: Rule | None, head: _Head, body: _Body,
                      writer: asyncio.StreamWriter, entry: dict[str, Any]) -> bool:
        action = rule.action if rule else None
        if rule is not None and action == "delay":
            await asyncio.sleep(rule.seconds)
        if rule is not None and action == "status":
            return await self._answer(rule, head, body, writer, entry)
        if rule is not None and action == "reset_request" and not rule.forward:
            await self._continue_if_expected(head, writer)
            await self._copy(body, None, rule.after_bytes)
            _rst(writer)
            raise _Closed
        return await self._forward(rule, head, body, writer, entry)

    async def _continue_if_expected(self, head: _Head, writer: asyncio.StreamWriter) -> None:
        if "100-continue" in head.tokens("expect"):
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()

    async def _answer(
        self,
        rule: Rule,
        head: _Head,
        body: _Body,
        writer: asyncio.StreamWriter,
        entry: dict[str, Any],
    ) -> bool:
        entry["status"] = rule.code
        send_body = head.method != "HEAD"
        early = rule.early or "100-continue" in head.tokens("expect")
        if early and not body.done:
            writer.write(
                _response_bytes(
                    rule.code,
                    rule.body,
                    rule.content_type,
                    rule.headers,
                    close=True,
                    send_body=send_body,
                )
            )
            await _flush(writer)
            with contextlib.suppress(OSError, asyncio.TimeoutError, ConnectionError):
                writer.write_eof()
                async with asyncio.timeout(EARLY_LINGER_S):
                    while await body.read(CHUNK_BYTES):
                        pass
            writer.close()
            raise _Closed
        await self._copy(body, None, None)
        keep = head.keep_alive()
        writer.write(
            _response_bytes(
                rule.code,
                rule.body,
                rule.content_type,
                rule.headers,
                close=not keep,
                send_body=send_body,
            )
        )
        await writer.drain()
        return keep

    async def _forward(
        self,
        rule: Rule | None,
        head: _Head,
        body: _Body,
        writer: asyncio.StreamWriter,
        entry: dict[str, Any],
    ) -> bool:
        try:
            ureader, uwriter = await asyncio.open_connection(
                self.upstream_host, self.upstream_port, limit=CHUNK_BYTES
            )
        except OSError:
            entry["status"] = 502
            writer.write(
                _response_bytes(502, b"upstream unreachable\n", "text/plain", {}, close=True)
            )
            await writer.drain()
            return False
        _tune(uwriter)
        try:
            keep = await self._exchange(rule, head, body, writer, ureader, uwriter, entry)
        except _Closed:
            uwriter.close()
            raise
        except BaseException:
            _rst(uwriter)
            raise
        uwriter.close()
        return keep

    async def _exchange(
        self,
        rule: Rule | None,
        head: _Head,
        body: _Body,
        cwriter: asyncio.StreamWriter,
        ureader: asyncio.StreamReader,
        uwriter: asyncio.StreamWriter,
        entry: dict[str, Any],
    ) -> bool:
        uwriter.write(head.raw)
        if rule is not None and rule.action == "reset_request":
            await self._copy(body, uwriter, rule.after_bytes, direction="up")
            await _flush(uwriter)
            _rst(uwriter)
            _rst(cwriter)
            raise _Closed
        pump = asyncio.create_task(self._pump_request(rule, body, uwriter, cwriter))
        reply = asyncio.create_task(self._pump_response(rule, head, ureader, cwriter, entry))
        try:
            await asyncio.wait({pump, reply}, return_when=asyncio.FIRST_EXCEPTION)
            if pump.done():
                pump.result()
            keep = await reply
            if not pump.done():
                # The upstream answered before taking the whole body: give the pump a
                # moment, then give up on this client connection.
                await asyncio.wait({pump}, timeout=PUMP_GRACE_S)
            if not pump.done():
                return False
            pump.result()
            return keep and body.done
        finally:
            for task in (pump, reply):
                task.cancel()
            await asyncio.gather(pump, reply, return_exceptions=True)

    async def _pump_request(
        self,
        rule: Rule | None,
        body: _Body,
        uwriter: asyncio.StreamWriter,
        cwriter: asyncio.StreamWriter,
    ) -> None:
        try:
            if rule is not None and rule.action == "stall_request":
                await self._copy(body, uwriter, rule.after_bytes, direction="up")
                await asyncio.sleep(rule.seconds)
                if rule.then_close:
                    cwriter.close()
                    uwriter.close()
                    raise _Closed
            flip_at = rule.offset if rule is not None and rule.action == "corrupt_request" \
                else None
            await self._copy(body, uwriter, None, direction="up", flip_at=flip_at)
        except _WriteFailed:
            return  # the upstream stopped reading; let its answer through

    async def _pump_response(
        self,
        rule: Rule | None,
        head: _Head,
        ureader: asyncio.StreamReader,
        cwriter: asyncio.StreamWriter,
        entry: dict[str, Any],
    ) -> bool:
        while True:
            raw = await _read_head(ureader)
            if raw is None:
                raise ConnectionError("upstream closed before answering")
            resp = _Head.parse(raw)
            if 100 <= resp.status < 200 and resp.status != 101:
                cwriter.write(raw)
                await cwriter.drain()
                continue
            break
        entry["status"] = resp.status
        body = _Body(ureader, *resp.response_framing(head.method))
        action = rule.action if rule else None
        if rule is not None and action == "chunk_response":
            await self._rechunk(raw, body, cwriter)
            return head.keep_alive() and resp.keep_alive() and body.kind != "close"
        if rule is not None and action == "truncate_response" and rule.drop_head:
            await self._copy(body, None, None)  # the upstream's whole answer, discarded
            _rst(cwriter)  # the client never hears it: as if the answer were lost
            raise _Closed
        cwriter.write(raw)
        if rule is not None and action == "truncate_response":
            await self._copy(body, cwriter, rule.after_bytes, direction="down")
            await _flush(cwriter)
            if rule.reset:
                _rst(cwriter)
            else:
                cwriter.close()
            raise _Closed
        if rule is not None and action == "stall_response":
            await self._copy(body, cwriter, rule.after_bytes, direction="down")
            await _flush(cwriter)
            await asyncio.sleep(rule.seconds)
            if rule.then_close:
                cwriter.close()
                raise _Closed
        flip_at = rule.offset if rule is not None and action == "corrupt_response" else None
        await self._copy(body, cwriter, None, direction="down", flip_at=flip_at)
        await cwriter.drain()
        return head.keep_alive() and resp.keep_alive() and body.kind != "close"

    async def _rechunk(self, raw: bytes, body: _Body, cwriter: asyncio.StreamWriter) -> None:
        """Send the answer with its body framed as chunks instead of its Content-Length."""
        lines = [line for line in raw.decode("latin-1").split("\r\n") if line and not
                 line.lower().startswith(("content-length:", "transfer-encoding:"))]
        cwriter.write(("\r\n".join(lines) + "\r\nTransfer-Encoding: chunked\r\n\r\n")
                      .encode("latin-1"))
        while data := await body.read(CHUNK_BYTES // 4):
            cwriter.write(b"%x\r\n%s\r\n" % (len(data), data))
            await cwriter.drain()
            self.stats.bytes_down += len(data)
        cwriter.write(b"0\r\n\r\n")
        await cwriter.drain()

    async def _copy(
        self,
        body: _Body,
        dst: asyncio.StreamWriter | None,
        limit: int | None,
        *,
        direction: str | None = None,
        flip_at: int | None = None,
    ) -> int:
        """Move body bytes to dst (or discard them) until the end or `limit` bytes."""
        copied = 0
        while limit is None or copied < limit:
            want = CHUNK_BYTES if limit is None else min(CHUNK_BYTES, limit - copied)
            data = await body.read(want)
            if not data:
                break
            start = body.offset - len(data)
            if flip_at is not None and start <= flip_at < body.offset:
                buf = bytearray(data)
                buf[flip_at - start] ^= 0x01
                data = bytes(buf)
            copied += len(data)
            if dst is None:
                continue
            try:
                dst.write(data)
                await dst.drain()
            except ConnectionError as exc:
                raise _WriteFailed(str(exc)) from exc
            if direction == "up":
                self.stats.bytes_up += len(data)
            elif direction == "down":
                self.stats.bytes_down += len(data)
        return copied

    # ---- control API

    async def handle_control(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            raw = await _read_head(reader)
            if raw is None:
                return
            try:
                head = _Head.parse(raw)
                length = head.content_length() or 0
                if length > CONTROL_BODY_MAX_BYTES:
                    raise ValueError("body too large")
                payload = await reader.readexactly(length) if length else b""
                code, obj = self._control(head.method, head.target.split("?", 1)[0], payload)
            except ValueError as exc:
                code, obj = 400, {"error": str(exc)}
            data = json.dumps(obj).encode()
            writer.write(_response_bytes(code, data, "application/json", {}, close=True))
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    def _control(self, method: str, path: str, payload: bytes) -> tuple[int, Any]:
        rules = self.rules.rules
        if path == "/rules":
            if method == "GET":
                return 200, {"rules": [r.spec for r in rules]}
            if method == "DELETE":
                self.rules.rules = []
                return 200, {"rules": 0}
            if method in ("PUT", "POST"):
                parsed = parse_rules(json.loads(payload or b"[]"))
                self.rules.rules = parsed if method == "PUT" else rules + parsed
                return 200, {"rules": len(self.rules.rules)}
            return 405, {"error": "method not allowed"}
        if path == "/stats" and method == "GET":
            return 200, self.stats.snapshot(rules)
        if path == "/reset-stats" and method == "POST":
            self.stats.reset()
            return 200, {"ok": True}
        if path == "/health" and method == "GET":
            return 200, {"ok": True}
        return 404, {"error": "not found"}


# --------------------------------------------------------------------------- CLI


def _parse_hostport(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _parse_upstream(value: str) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(value)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError("--upstream must be an http:// URL")
    if parts.path not in ("", "/") or parts.query:
        raise ValueError("--upstream must not have a path or query")
    return parts.hostname, parts.port or 80


def _load_rules(value: str | None) -> list[Rule]:
    if not value:
        return []
    text = Path(value[1:]).read_text() if value.startswith("@") else value
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--rules is not JSON: {exc}") from exc
    return parse_rules(data)


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _watch_stdin(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    with contextlib.suppress(OSError):
        while os.read(0, 4096):  # the raw fd: a buffered reader would hang the exit
            pass
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(stop.set)


async def _serve(args: argparse.Namespace, proxy: Proxy) -> None:
    listen_host, listen_port = _parse_hostport(args.listen)
    control_host, control_port = _parse_hostport(args.control)
    server = await asyncio.start_server(
        proxy.handle_client, listen_host, listen_port, limit=CHUNK_BYTES, backlog=512
    )
    control = await asyncio.start_server(proxy.handle_control, control_host, control_port)
    print(
        json.dumps({"listen": _url(server.sockets[0]), "control": _url(control.sockets[0])}),
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if args.exit_on_stdin_eof:
        threading.Thread(target=_watch_stdin, args=(loop, stop), daemon=True).start()
    try:
        await stop.wait()
    finally:
        server.close()
        control.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="faultproxy", description=__doc__.split("\n")[0])
    parser.add_argument("--upstream", required=True, help="http://HOST:PORT to forward to")
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT for clients")
    parser.add_argument("--control", default="127.0.0.1:0", help="HOST:PORT for the API")
    parser.add_argument("--rules", help="initial rules: a JSON list, or @FILE")
    parser.add_argument("--seed", type=int, default=None, help="seed for probability rules")
    parser.add_argument(
        "--exit-on-stdin-eof",
        action="store_true",
        help="exit when stdin reaches EOF (the parent went away)",
    )
    args = parser.parse_args(argv)
    try:
        upstream_host, upstream_port = _parse_upstream(args.upstream)
        _parse_hostport(args.listen)
        _parse_hostport(args.control)
        rules = RuleSet(args.seed)
        rules.rules = _load_rules(args.rules)
    except (ValueError, OSError) as exc:
        print(f"faultproxy: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="faultproxy: %(levelname)s %(message)s")
    try:
        asyncio.run(_serve(args, Proxy(upstream_host, upstream_port, rules)))
    except OSError as exc:
        print(f"faultproxy: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


# --------------------------------------------------------------------------- test helper


class FaultProxy:
    """Runs tests/support/faultproxy.py in a subprocess and drives its control API.

    Use as ``with FaultProxy(upstream_url) as fp:`` (or ``async with`` — start and stop then
    run in a worker thread). ``fp.url`` is where clients connect. The control calls use
    urllib and take about a millisecond on loopback; from async code wrap them in
    ``asyncio.to_thread`` if the event loop must never block.
    """

    def __init__(
        self,
        upstream: str,
        *,
        rules: list[dict[str, Any]] | None = None,
        seed: int | None = None,
        host: str = "127.0.0.1",
        start_timeout_s: float = 10.0,
    ) -> None:
        self.upstream = upstream
        self._rules = rules
        self._seed = seed
        self._host = host
        self._start_timeout_s = start_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._url: str | None = None
        self._control_url: str | None = None

    @property
    def url(self) -> str:
        """Base URL of the proxy (``http://127.0.0.1:PORT``)."""
        if self._url is None:
            raise RuntimeError("FaultProxy is not running")
        return self._url

    @property
    def netloc(self) -> str:
        """``HOST:PORT`` of the proxy, as clients send it in ``Host``."""
        return urllib.parse.urlsplit(self.url).netloc

    @property
    def control_url(self) -> str:
        if self._control_url is None:
            raise RuntimeError("FaultProxy is not running")
        return self._control_url

    def proxied(self, url: str) -> str:
        """The same URL (path and query kept) pointed at the proxy."""
        parts = urllib.parse.urlsplit(url)
        return urllib.parse.urlunsplit(parts._replace(scheme="http", netloc=self.netloc))

    def start(self) -> FaultProxy:
        if self._proc is not None:
            raise RuntimeError("FaultProxy already started")
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--upstream",
            self.upstream,
            "--listen",
            f"{self._host}:0",
            "--control",
            f"{self._host}:0",
            "--exit-on-stdin-eof",
        ]
        if self._rules is not None:
            cmd += ["--rules", json.dumps(self._rules)]
        if self._seed is not None:
            cmd += ["--seed", str(self._seed)]
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            info = json.loads(self._read_line())
        except BaseException:
            self.stop()
            raise
        self._url, self._control_url = info["listen"], info["control"]
        return self

    def _read_line(self) -> bytes:
        assert self._proc is not None and self._proc.stdout is not None
        deadline = time.monotonic() + self._start_timeout_s
        out = self._proc.stdout
        line = b""
        while not line.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([out], [], [], max(remaining, 0))
            if not ready:
                raise RuntimeError("faultproxy did not start in time")
            chunk = os.read(out.fileno(), 4096)
            if not chunk:
                code = self._proc.wait()
                raise RuntimeError(f"faultproxy exited with code {code} before starting")
            line += chunk
        return line

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        self._url = self._control_url = None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    async def __aenter__(self) -> FaultProxy:
        return await asyncio.to_thread(self.start)

    async def __aexit__(self, *exc_info: object) -> None:
        await asyncio.to_thread(self.stop)

    # ---- control API

    def _call(self, method: str, path: str, payload: object = None) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.control_url + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            with exc:
                detail = exc.read().decode(errors="replace")
            raise ValueError(f"faultproxy {method} {path}: {exc.code} {detail}") from None

    def set_rules(self, rules: list[dict[str, Any]]) -> None:
        """Replace all rules (their after/times counters start again)."""
        self._call("PUT", "/rules", rules)

    def add_rule(self, rule: dict[str, Any]) -> None:
        self._call("POST", "/rules", [rule])

    def clear(self) -> None:
        self._call("DELETE", "/rules")

    def rules(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", "/rules")["rules"]
        return result

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/stats")
        return result

    def reset_stats(self) -> None:
        self._call("POST", "/reset-stats")


if __name__ == "__main__":
    sys.exit(main())
