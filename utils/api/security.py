"""Access control and request hygiene, as pure ASGI middleware.

Pure ASGI (not `BaseHTTPMiddleware`) so streamed responses pass through
unbuffered. From the outside in, `install_security` stacks:

1. `RequestIdMiddleware`: takes a sane `X-Request-ID` from the client or makes
   one, returns it on every response and exposes it to log records
   (`%(request_id)s`) through a context variable and `RequestIdLogFilter`;
2. CORS (Starlette's `CORSMiddleware`), only when `cors_origins` is set;
3. `ApiKeyMiddleware`: when `api_keys` is set, every route but liveness
   (`/health`) needs `Authorization: Bearer <key>`, compared in constant time
   against every configured key;
4. `BodySizeMiddleware`: 413 when the body is larger than `max_body_bytes`,
   from Content-Length before reading anything, or while counting streamed bytes.

`RequestIdLogFilter` also scrubs base64 payloads and bearer tokens from log
messages, whatever logged them.
"""

from __future__ import annotations

import asyncio
import contextvars
import hmac
import json
import logging
import re
import uuid
from collections.abc import Iterable, Sequence

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from utils.errors import OpenAIError
from utils.settings import Settings

__all__ = [
    "PUBLIC_PATHS",
    "ApiKeyMiddleware",
    "BodySizeMiddleware",
    "RequestIdLogFilter",
    "RequestIdMiddleware",
    "current_request_id",
    "install_log_filter",
    "install_security",
]

logger = logging.getLogger(__name__)

PUBLIC_PATHS = frozenset({"/health"})  # liveness only: everything else needs a key
REQUEST_ID_HEADER = "x-request-id"
_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._:/+=@-]{1,128}$")

# An over-limit body up to this size is read and dropped before the 413 goes out.
_DRAIN_BYTES = 16 * 1024 * 1024
_DRAIN_TIMEOUT_S = 10.0

_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


def current_request_id() -> str:
    """The id of the request being served ("-" outside a request)."""
    return _request_id.get()


async def _send_error(
    send: Send, error: OpenAIError, extra: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    body = json.dumps(error.body()).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *[(k.lower().encode(), v.encode()) for k, v in (error.headers or {}).items()],
        *extra,
    ]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = _header(scope, b"x-request-id")
        request_id = given if given and _REQUEST_ID_OK.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        _request_id.set(request_id)
        raw_id = request_id.encode()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    (k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"
                ]
                headers.append((b"x-request-id", raw_id))
                message = {**message, "headers": headers}
            await send(message)

        # Not reset afterwards: each request runs in its own task (and context),
        # and the error handler that logs a 500 runs outside this middleware.
        await self.app(scope, receive, send_with_id)


class ApiKeyMiddleware:
    def __init__(
        self, app: ASGIApp, api_keys: Iterable[str], public_paths: Iterable[str] = PUBLIC_PATHS
    ) -> None:
        self.app = app
        self._keys = [k.encode() for k in api_keys if k]
        self._public = frozenset(public_paths)

    def _authorized(self, header: str | None) -> bool:
        if not header:
            return False
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        given = token.strip().encode()
        ok = False
        for key in self._keys:  # no early exit: the time spent does not say which key matched
            ok |= hmac.compare_digest(given, key)
        return ok

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._keys or scope["path"] in self._public:
            await self.app(scope, receive, send)
            return
        if not self._authorized(_header(scope, b"authorization")):
            message = (
                "Missing API key: pass it as 'Authorization: Bearer <key>'."
                if _header(scope, b"authorization") is None
                else "Incorrect API key provided."
            )
            await _send_error(
                send,
                OpenAIError(401, message, code="invalid_api_key", type="invalid_request_error"),
                [(b"www-authenticate", b"Bearer")],
            )
            return
        await self.app(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


class BodySizeMiddleware:
    """Refuses bodies over `max_bytes` without reading them into memory first."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _error(self) -> OpenAIError:
        return OpenAIError(
            413,
            f"The request body exceeds the limit of {self.max_bytes} bytes "
            "(setting max_body_bytes).",
            code="request_too_large",
        )

    async def _refuse(self, receive: Receive, send: Send, body_done: bool) -> None:
        # Read (and drop) a moderate remainder first: closing a socket with
        # unread data makes the kernel reset it, and the client may lose the
        # 413. A larger remainder is not read; the connection is closed.
        if not body_done:
            body_done = await _drain(receive, _DRAIN_BYTES, _DRAIN_TIMEOUT_S)
        extra = [] if body_done else [(b"connection", b"close")]
        await _send_error(send, self._error(), extra)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = _header(scope, b"content-length")
        if length is not None:
            if not length.strip().isdigit():
                await _send_error(
                    send,
                    OpenAIError(400, "Invalid Content-Length header."),
                    [(b"connection", b"close")],
                )
                return
            if int(length) > self.max_bytes:
                # Never read into memory; drained only when it is small.
                if int(length) <= _DRAIN_BYTES:
                    await self._refuse(receive, send, body_done=False)
                else:
                    await _send_error(send, self._error(), [(b"connection", b"close")])
                return

        received = 0
        exceeded = False
        body_done = False
        started = False

        async def counting_receive() -> Message:
            nonlocal received, exceeded, body_done
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > self.max_bytes:
                    exceeded = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded and not started:
                # The app turned the failed read into its own error: answer 413.
                started = True
                await self._refuse(receive, send, body_done)
                return
            if exceeded:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except _BodyTooLarge:
            if not started:
                await self._refuse(receive, send, body_done)


async def _drain(receive: Receive, limit: int, timeout_s: float) -> bool:
    """Read and drop up to `limit` bytes of body; True when the body ended."""

    async def read() -> bool:
        seen = 0
        while seen <= limit:
            message = await receive()
            if message["type"] != "http.request":
                return False
            seen += len(message.get("body", b""))
            if not message.get("more_body", False):
                return True
        return False

    try:
        return await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError:
        return False


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


# --- logging --------------------------------------------------------------------

_BASE64_DATA = re.compile(
    r"(data:[\w.+-]+/[\w.+-]+(?:;[\w.+-]+=[\w.+-]+)*;base64,)[A-Za-z0-9+/=_\-\s%]{16,}"
)
_BEARER = re.compile(r"(?i)(bearer\s+)[^\s'\",]+")


class RequestIdLogFilter(logging.Filter):
    """Adds `request_id` to every record and scrubs payloads and secrets from it."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = _request_id.get()
        try:
            text = record.getMessage()
        except Exception:
            return True
        if "base64," in text or "earer" in text:
            scrubbed = _BEARER.sub(r"\1***", _BASE64_DATA.sub(r"\1...", text))
            if scrubbed != text:
                record.msg, record.args = scrubbed, None
        return True


def install_log_filter(logger_: logging.Logger | None = None) -> RequestIdLogFilter:
    """Attach the filter to every handler of `logger_` (root by default), once."""
    target = logger_ or logging.getLogger()
    log_filter = next(
        (f for h in target.handlers for f in h.filters if isinstance(f, RequestIdLogFilter)),
        RequestIdLogFilter(),
    )
    for handler in target.handlers:
        if log_filter not in handler.filters:
            handler.addFilter(log_filter)
    return log_filter


def install_security(app: FastAPI, settings: Settings) -> None:
    """Add the middleware stack described in the module docstring.

    Starlette runs the middleware added last first, hence the reverse order.
    """
    app.add_middleware(BodySizeMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(ApiKeyMiddleware, api_keys=settings.api_keys)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID", "Retry-After"],
            allow_credentials=False,
            max_age=600,
        )
    app.add_middleware(RequestIdMiddleware)
