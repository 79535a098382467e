"""Safe media fetching: http(s), data: and (opt-in) file:// URLs.

`MediaFetcher` is a guarded service shared by every request:

- schemes: `http`, `https`, `data` (base64 or percent-encoded) and `file` only
  under `settings.media_local_dir`;
- server-side request forgery guard (utils/media/guard.py): every host is
  resolved and each of its addresses checked before connecting, and the
  connection goes to the checked address; private networks are refused unless
  `media_allow_private_networks` is set (cloud metadata addresses always are);
- redirects are followed by hand (at most `MAX_REDIRECTS`), each hop checked
  again (scheme, domain allow-list, addresses);
- connect timeout and a total timeout for the whole fetch, redirects included;
- byte caps: `max_media_bytes` per item (Content-Length checked first, then
  counted while streaming) and `max_request_media_bytes` per request through a
  `MediaBudget` the caller passes to every fetch of one request;
- an optional allow-list of domains (each domain also admits its subdomains).

Errors are `OpenAIError`: 400 naming the URL (data: URLs are shortened so a
payload is never echoed or logged), 413 naming the setting whose cap was hit.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import os
import ssl
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, unquote_to_bytes, urlsplit

import httpx

from utils.errors import OpenAIError
from utils.media.guard import GuardedTransport, Refused, Resolver
from utils.settings import Settings

__all__ = [
    "MAX_REDIRECTS",
    "MediaBudget",
    "MediaFetcher",
    "MediaKind",
    "redact_url",
]

logger = logging.getLogger(__name__)

MAX_REDIRECTS = 5
MediaKind = Literal["image", "video"]

_REDIRECT_CODES = {301, 302, 303, 307, 308}
_CHUNK = 64 * 1024
_URL_SHOWN = 120  # characters of a URL echoed in messages


class MediaBudget:
    """Bytes of media one request may still download (`max_request_media_bytes`).

    Create one per request (`MediaFetcher.new_budget()`) and pass it to every
    `fetch` of that request; fetches running concurrently share it safely
    (they all run on the event loop).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.used)

    def check(self, size: int) -> None:
        """Refuse `size` more bytes without taking them."""
        if self.used + size > self.limit:
            raise _too_large("the media of this request", self.limit, "max_request_media_bytes")

    def consume(self, size: int) -> None:
        self.check(size)
        self.used += size


def _too_large(what: str, limit: int, setting: str) -> OpenAIError:
    return OpenAIError(
        413,
        f"{what} exceeds the limit of {limit} bytes (setting {setting}).",
        code="media_too_large",
    )


def redact_url(url: str) -> str:
    """A URL safe to show: data: payloads dropped, passwords hidden, long URLs cut."""
    if url[:5].lower() == "data:":
        head, sep, payload = url.partition(",")
        head = head[:60]
        return f"{head},...({len(payload)} chars)" if sep else head
    try:
        parts = urlsplit(url)
        if parts.password is not None:
            netloc = f"{parts.username}:***@{parts.hostname}"
            if parts.port is not None:
                netloc += f":{parts.port}"
            url = parts._replace(netloc=netloc).geturl()
    except ValueError:
        pass
    return url if len(url) <= _URL_SHOWN else url[:_URL_SHOWN] + "..."


class MediaFetcher:
    """Fetches media bytes for requests; one instance (and HTTP client) per app.

    `trusted_networks`, `resolver` and `ssl_context` exist for tests and special
    deployments: addresses in `trusted_networks` pass the private-network check,
    `resolver(host, port) -> [ip, ...]` replaces DNS, `ssl_context` replaces the
    default certificate store.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        trusted_networks: Iterable[str] = (),
        resolver: Resolver | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.settings = settings
        self._domains = tuple(
            d.strip().lower().rstrip(".").lstrip(".")
            for d in settings.media_allowed_domains
            if d.strip()
        )
        self._local_dir = (
            Path(settings.media_local_dir).resolve() if settings.media_local_dir else None
        )
        transport = GuardedTransport(
            allow_private=settings.media_allow_private_networks,
            trusted_networks=trusted_networks,
            resolver=resolver,
            ssl_context=ssl_context,
        )
        self._client = httpx.AsyncClient(
            transport=transport,
            follow_redirects=False,
            trust_env=False,  # no proxies from the environment: they would bypass the guard
            timeout=httpx.Timeout(
                settings.media_timeout_s, connect=settings.media_connect_timeout_s
            ),
            headers={"User-Agent": "ov-vlm-server", "Accept-Encoding": "identity"},
        )

    def new_budget(self) -> MediaBudget:
        return MediaBudget(self.settings.max_request_media_bytes)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def fetch(
        self, url: str, *, kind: MediaKind = "image", budget: MediaBudget | None = None
    ) -> bytes:
        """The bytes behind `url` (an image or a video, as `kind` says).

        `budget`, when given, is charged with the bytes fetched so the media of
        one request stay under `max_request_media_bytes`.
        """
        if not isinstance(url, str) or not url.strip():
            raise OpenAIError(400, f"The {kind} URL is empty.", code="invalid_media_url")
        url = url.strip()
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            return await self._fetch_data(url, kind, budget)
        if scheme == "file":
            return await self._fetch_file(url, kind, budget)
        if scheme in ("http", "https"):
            try:
                return await asyncio.wait_for(
                    self._fetch_http(url, kind, budget), self.settings.media_timeout_s
                )
            except asyncio.TimeoutError:
                raise _bad_url(
                    url,
                    kind,
                    f"timed out after {self.settings.media_timeout_s:g} s "
                    "(setting media_timeout_s)",
                    code="media_timeout",
                ) from None
        raise _bad_url(
            url,
            kind,
            "uses an unsupported scheme (allowed: http, https, data"
            + (", file" if self._local_dir else "")
            + ")",
        )

    # --- data: ------------------------------------------------------------

    async def _fetch_data(self, url: str, kind: MediaKind, budget: MediaBudget | None) -> bytes:
        head, sep, payload = url.partition(",")
        if not sep:
            raise _bad_url(url, kind, "is not a valid data URL (no comma)")
        limit = self.settings.max_media_bytes
        is_base64 = head.lower().endswith(";base64")
        # Cap before decoding: base64 decodes to 3/4 of its length, percent
        # encoding to at most its length.
        estimate = len(payload) * 3 // 4 if is_base64 else len(payload)
        if estimate > limit + 3:
            raise _too_large(f"The {kind} data URL", limit, "max_media_bytes")
        if budget is not None:
            budget.check(min(estimate, limit))
        if len(payload) > 1 << 20:
            data = await asyncio.to_thread(_decode_data, payload, is_base64)
        else:
            data = _decode_data(payload, is_base64)
        if data is None:
            raise _bad_url(url, kind, "has an invalid base64 payload")
        if len(data) > limit:
            raise _too_large(f"The {kind} data URL", limit, "max_media_bytes")
        if not data:
            raise _bad_url(url, kind, "is empty")
        if budget is not None:
            budget.consume(len(data))
        return data

    # --- file:// ----------------------------------------------------------

    async def _fetch_file(self, url: str, kind: MediaKind, budget: MediaBudget | None) -> bytes:
        if self._local_dir is None:
            raise _bad_url(
                url, kind, "is a file URL, and local files are disabled (setting media_local_dir)"
            )
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise _bad_url(url, kind, "names a remote host in a file URL")
        raw = unquote(parts.path)
        if "\x00" in raw:
            raise _bad_url(url, kind, "is not a valid file URL")
        return await asyncio.to_thread(self._read_file, url, kind, Path(raw), budget)

    def _read_file(
        self, url: str, kind: MediaKind, path: Path, budget: MediaBudget | None
    ) -> bytes:
        assert self._local_dir is not None
        try:
            resolved = path.resolve(strict=True)
        except (OSError, RuntimeError):
            raise _bad_url(url, kind, "does not name a readable file") from None
        if not resolved.is_relative_to(self._local_dir):
            raise _bad_url(url, kind, "is outside the media directory (setting media_local_dir)")
        limit = self.settings.max_media_bytes
        try:
            fd = os.open(resolved, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            raise _bad_url(url, kind, "does not name a readable file") from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise _bad_url(url, kind, "does not name a regular file")
        with os.fdopen(fd, "rb") as f:
            if info.st_size > limit:
                raise _too_large(f"The {kind} file", limit, "max_media_bytes")
            if budget is not None:
                budget.check(info.st_size)
            data = f.read(limit + 1)
        if len(data) > limit:
            raise _too_large(f"The {kind} file", limit, "max_media_bytes")
        if budget is not None:
            budget.consume(len(data))
        return data

    # --- http(s) ----------------------------------------------------------

    def _check_http_url(self, url: str, kind: MediaKind) -> httpx.URL:
        try:
            parsed = httpx.URL(url)
            host = parsed.host.lower().rstrip(".")
        except (httpx.InvalidURL, ValueError):  # UnicodeError (IDNA) is a ValueError
            raise _bad_url(url, kind, "is not a valid URL") from None
        if parsed.scheme not in ("http", "https"):
            raise _bad_url(url, kind, "redirects to an unsupported scheme")
        if not host:
            raise _bad_url(url, kind, "has no host")
        if self._domains and not any(host == d or host.endswith("." + d) for d in self._domains):
            raise _bad_url(
                url,
                kind,
                f"is on host '{host}', which is not in the allowed "
                "domains (setting media_allowed_domains)",
            )
        return parsed

    async def _fetch_http(self, url: str, kind: MediaKind, budget: MediaBudget | None) -> bytes:
        limit = self.settings.max_media_bytes
        current = url
        for _hop in range(MAX_REDIRECTS + 1):
            target = self._check_http_url(current, kind)
            try:
                async with self._client.stream("GET", target) as response:
                    if response.status_code in _REDIRECT_CODES:
                        location = response.headers.get("location")
                        if not location:
                            raise _bad_url(url, kind, "redirected without a Location")
                        try:
                            current = str(target.join(location))
                        except (httpx.InvalidURL, ValueError):
                            raise _bad_url(url, kind, "redirected to an invalid URL") from None
                        continue
                    if response.status_code != 200:
                        raise _bad_url(
                            url,
                            kind,
                            f"answered HTTP {response.status_code}",
                            code="media_unreachable",
                        )
                    length = response.headers.get("content-length")
                    if length is not None and length.isdigit():
                        if int(length) > limit:
                            raise _too_large(
                                f"The {kind} at {redact_url(url)}", limit, "max_media_bytes"
                            )
                        if budget is not None:
                            budget.check(int(length))
                    chunks: list[bytes] = []
                    size = 0
                    async for chunk in response.aiter_bytes(_CHUNK):
                        size += len(chunk)
                        if size > limit:
                            raise _too_large(
                                f"The {kind} at {redact_url(url)}", limit, "max_media_bytes"
                            )
                        if budget is not None:
                            budget.consume(len(chunk))
                        chunks.append(chunk)
                    if not size:
                        raise _bad_url(url, kind, "returned no data")
                    return b"".join(chunks)
            except Refused as exc:
                hop = "" if current == url else f" (redirected to {redact_url(current)})"
                if exc.blocked:
                    why, code = f"is not allowed{hop}: {exc}", "media_url_refused"
                else:
                    why, code = f"could not be fetched{hop}: {exc}", "media_unreachable"
                raise _bad_url(url, kind, why, code=code) from None
            except httpx.InvalidURL:  # httpx parses a redirect's Location itself
                raise _bad_url(url, kind, "redirected to an invalid URL") from None
            except httpx.TimeoutException:
                raise _bad_url(url, kind, "timed out", code="media_timeout") from None
            except httpx.HTTPError as exc:
                logger.info(
                    "media fetch from %s failed: %s", redact_url(current), type(exc).__name__
                )
                raise _bad_url(
                    url, kind, f"could not be fetched ({_describe(exc)})", code="media_unreachable"
                ) from None
            except OpenAIError:
                raise
            except Exception as exc:  # whatever a client's URL provokes is never a 500
                logger.warning(
                    "media fetch from %s failed unexpectedly: %r", redact_url(current), exc
                )
                raise _bad_url(
                    url, kind, "could not be fetched", code="media_unreachable"
                ) from None
        raise _bad_url(url, kind, f"redirected more than {MAX_REDIRECTS} times")


def _decode_data(payload: str, is_base64: bool) -> bytes | None:
    if not is_base64:
        return unquote_to_bytes(payload)
    text = "".join(unquote(payload).split())
    text = text.replace("-", "+").replace("_", "/")
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def _describe(exc: httpx.HTTPError) -> str:
    if isinstance(exc, httpx.ConnectError):
        cause = str(exc)
        if "CERTIFICATE_VERIFY_FAILED" in cause or "certificate" in cause.lower():
            return "TLS certificate verification failed"
        return "connection failed"
    if isinstance(exc, httpx.RemoteProtocolError):
        return "invalid HTTP response"
    return type(exc).__name__


def _bad_url(
    url: str, kind: MediaKind, why: str, *, code: str = "invalid_media_url"
) -> OpenAIError:
    return OpenAIError(400, f"The {kind} URL {redact_url(url)} {why}.", code=code)
