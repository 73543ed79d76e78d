"""HTTP plumbing shared by the local server's handlers: error replies in the contract's shape,
reading a request body as a JSON object (its fields are checked by the models of
:mod:`.bodies`), the access logger (paths only, never query strings)
and the middleware that turns every failure into ``{"error": {"code", "message"}}``.

Errors are the agent's own :class:`agent.errors.ChronicleError` tree, raised server-side with
the status and code the contract names; the middleware renders them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from agent.errors import ChronicleError, chronicle_error
from agent.validation import json_type

from .storage import StorageError

log = logging.getLogger(__name__)
RETRY_AFTER_S = 1
"""Retry-After on a 503 (the server is busy, or its storage failed)."""


def fail(status: int, code: str, message: str) -> ChronicleError:
    """The exception for an error reply (raise it): the right ChronicleError subclass."""
    return chronicle_error(status, {"error": {"code": code, "message": message}})


def invalid(message: str) -> ChronicleError:
    return fail(400, "invalid_request", message)


def not_found(message: str) -> ChronicleError:
    return fail(404, "not_found", message)


def forbidden(message: str) -> ChronicleError:
    return fail(403, "forbidden", message)


def conflict(message: str, code: str = "conflict") -> ChronicleError:
    return fail(409, code, message)


def error_response(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


@dataclass(frozen=True)
class Reply:
    """A handler's answer: status and JSON body (None for an empty body, e.g. 204)."""

    status: int
    body: Any

    def response(self) -> web.Response:
        if self.body is None:
            return web.Response(status=self.status)
        return web.json_response(self.body, status=self.status)


# ---- request bodies and fields -----------------------------------------------------------


async def read_json_object(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object; an empty body is ``{}``."""
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise invalid("request body is not UTF-8 JSON") from None
    except json.JSONDecodeError as e:
        raise invalid(f"request body is not valid JSON: {e.msg} at position {e.pos}") from None
    except (ValueError, RecursionError) as e:  # a 5000-digit number, "[[[[…" nested deep
        raise invalid(f"request body is not acceptable JSON: {e}"[:300]) from None
    if not isinstance(body, dict):
        raise invalid(f"request body must be a JSON object, not {json_type(body)}")
    try:  # a "\ud800" escape decodes to a lone surrogate, which no UTF-8 store takes
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise invalid("request body is not valid JSON: a \\u escape is a lone surrogate") from None
    return body


def _no_constant(name: str) -> Any:
    raise invalid(f"request body is not valid JSON: {name} is not a JSON number")


def req_str(fields: Mapping[str, Any], field: str, *, where: str = "") -> str:
    """A required, non-empty string (a query parameter; bodies have their models)."""
    value = fields.get(field)
    if value is not None and not isinstance(value, str):
        raise invalid(f"{where}{field} must be a string, not {json_type(value)}")
    if not value:
        raise invalid(f"{where}{field} is required (a non-empty string)")
    return value


def one_of(value: str | None, allowed: tuple[str, ...], field: str) -> str | None:
    if value is not None and value not in allowed:
        raise invalid(f"{field} must be one of {', '.join(allowed)}, not {value!r}")
    return value


def query_flag(request: web.Request, name: str) -> bool:
    return request.query.get(name, "").lower() in ("1", "true", "yes")


# ---- middleware and logging ------------------------------------------------------------------

_HTTP_CODES = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    411: "invalid_request",
    413: "payload_too_large",
}


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Render ChronicleError and aiohttp's own HTTP errors in the contract's error shape."""
    try:
        return await handler(request)
    except ChronicleError as e:
        response = error_response(e.status, e.code, e.message)
        if e.status == 503:
            response.headers["Retry-After"] = str(RETRY_AFTER_S)
        return response
    except StorageError as e:
        log.error("%s %s: storage failed: %s", request.method, request.path, e)
        # the detail (a file path, the store's address) stays in the server's log
        response = error_response(
            503, "storage_unavailable", "storage failed, retry later (see the server log)"
        )
        response.headers["Retry-After"] = str(RETRY_AFTER_S)
        return response
    except web.HTTPException as e:
        if e.status < 400:
            raise
        if e.status == 413:
            message = "request body too large"
        elif e.status == 404:
            message = f"no such endpoint: {request.method} {request.path}"
        elif e.status == 405:
            message = f"method {request.method} is not allowed on {request.path}"
        else:
            message = e.reason
        return error_response(e.status, _HTTP_CODES.get(e.status, f"http_{e.status}"), message)
    except (ConnectionError, TimeoutError):
        raise
    except Exception:
        log.exception("internal error in %s %s", request.method, request.path)
        return error_response(500, "internal", "internal server error (see the server log)")


class AccessLogger(AbstractAccessLogger):
    """One line per request: method, path (no query string: it may hold a URL signature),
    status, bytes, seconds. Never the Authorization header. Requests aiohttp could not parse
    get no line of their own (see :mod:`.guard`)."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        if request.method == "UNKNOWN":  # unparsable: counted by the guard's rate-limited line
            return
        self.logger.info(
            "%s %s %d %s %.3fs",
            request.method,
            request.path,
            response.status,
            response.body_length,
            time,
        )
