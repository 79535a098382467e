"""One error type for the whole server, rendered as OpenAI's error body."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


class OpenAIError(Exception):
    """An error a client should see: status, message and OpenAI's fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(
            status, "server_error" if status >= 500 else "invalid_request_error"
        )
        self.headers = headers

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


_PART_TAGS = {"text", "image_url", "video_url", "video"}


def loc_to_param(loc: tuple[Any, ...]) -> str:
    """('body', 'messages', 0, 'content', 'list[...]', 1, 'image_url', 'image_url', 'url')
    -> 'messages[0].content[1].image_url.url': a pydantic error location as a client
    names the field (FastAPI's `body` prefix and pydantic's union branches dropped)."""
    out = ""
    previous: Any = None
    for item in loc:
        if item == "body" and not out:
            continue
        if isinstance(item, int):
            out += f"[{item}]"
        elif (
            "[" in item
            or item in ("str", "list", "int", "bool", "float", "function-before", "function-after")
            or item.startswith("function-")
            or (isinstance(previous, int) and item in _PART_TAGS)
        ):
            pass
        else:
            out += f".{item}" if out else item
        previous = item
    return out


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        param = loc_to_param(tuple(first.get("loc", ()))) or None
        msg = first.get("msg", "Invalid request")
        if first.get("type") == "json_invalid":
            message, param = "The request body is not valid JSON.", None
        elif param:
            message = f"Invalid value for '{param}': {msg}"
        else:
            message = f"Invalid request: {msg}"
        return OpenAIError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers) if exc.headers else None
        return OpenAIError(exc.status_code, str(exc.detail), headers=headers).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return OpenAIError(500, "The server had an error while processing your request.").response()
