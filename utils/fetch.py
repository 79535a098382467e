"""Safe media fetching: http(s), data: and (opt-in) file:// URLs.

`MediaFetcher` is a guarded service shared by every request:

- schemes: `http`, `https`, `data` (base64 or percent-encoded) and `file` only
  under `settings.media_local_dir`;
- server-side request forgery guard: every host is resolved off the event loop
  and refused when any of its addresses is loopback, private, link-local,
  CGNAT, unique-local, unspecified, multicast, reserved, a cloud metadata
  address, or an IPv6 form embedding one of those (IPv4-mapped, IPv4-compatible,
  NAT64, 6to4, Teredo), unless `media_allow_private_networks` is set (metadata
  addresses stay refused even then);
- the connection goes to the address that was checked (no DNS rebinding): the
  check lives in the network backend that opens the socket, while the Host
  header and TLS SNI/certificate verification use the URL's hostname;
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
import ipaddress
import logging
import os
import socket
import ssl
import stat
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, unquote_to_bytes, urlsplit

import httpcore
import httpx

from utils.errors import OpenAIError
from utils.settings import Settings

__all__ = [
    "MAX_REDIRECTS",
    "MediaBudget",
    "MediaFetcher",
    "is_blocked_address",
    "redact_url",
]

logger = logging.getLogger(__name__)

MAX_REDIRECTS = 5
MediaKind = Literal["image", "video"]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[str]]]

_REDIRECT_CODES = {301, 302, 303, 307, 308}
_CHUNK = 64 * 1024
_URL_SHOWN = 120  # characters of a URL echoed in messages

# Cloud metadata endpoints: refused even when private networks are allowed.
_METADATA = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, ...
        "169.254.170.2",  # AWS ECS task metadata
        "fd00:ec2::254",  # AWS IPv6
        "100.100.100.200",  # Alibaba Cloud
        "168.63.129.16",  # Azure wire server
        "192.0.0.192",  # Oracle Cloud
    )
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
_V4_COMPAT = ipaddress.ip_network("::/96")


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


class _Refused(Exception):
    """Raised inside the network backend; becomes a 400 naming the URL."""

    def __init__(self, message: str, *, blocked: bool = True) -> None:
        super().__init__(message)
        self.blocked = blocked


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


def _embedded_v4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64 or (ip in _V4_COMPAT and int(ip) > 1):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def is_blocked_address(ip: IPAddress, *, allow_private: bool = False) -> str | None:
    """Why `ip` may not be fetched from, or None when it may."""
    if ip in _METADATA:
        return "a cloud metadata address"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            ip = ipaddress.IPv6Address(ip.compressed.split("%")[0])
        inner = _embedded_v4(ip)
        if inner is not None:
            reason = is_blocked_address(inner, allow_private=allow_private)
            return f"an IPv6 form of {inner} ({reason})" if reason else None
        if ip in _NAT64_LOCAL or ip.teredo is not None:
            return None if allow_private else "a tunnelled IPv6 address"
    if allow_private:
        return None
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_unspecified:
        return "an unspecified address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_multicast:
        return "a multicast address"
    if ip.is_private:
        return "a private address"
    if isinstance(ip, ipaddress.IPv4Address) and ip in ipaddress.IPv4Network("100.64.0.0/10"):
        return "a shared (CGNAT) address"
    if ip.is_reserved or not ip.is_global:
        return "a reserved address"
    return None


async def _system_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    return [str(info[4][0]) for info in infos]


class _GuardedBackend(httpcore.AsyncNetworkBackend):
    """Resolves, checks every address, then connects to a checked address.

    httpcore performs TLS afterwards with the URL's hostname as SNI and for
    certificate verification, so pinning the IP here keeps both intact.
    """

    def __init__(
        self,
        *,
        allow_private: bool,
        trusted: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...],
        resolver: Resolver,
    ) -> None:
        self._inner = httpcore.AnyIOBackend()
        self._allow_private = allow_private
        self._trusted = trusted
        self._resolver = resolver

    def _why_blocked(self, ip: IPAddress) -> str | None:
        if any(ip.version == net.version and ip in net for net in self._trusted):
            return None
        return is_blocked_address(ip, allow_private=self._allow_private)

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            addresses = await asyncio.wait_for(self._resolver(host, port), timeout)
        except asyncio.TimeoutError as exc:  # before OSError: TimeoutError is one
            raise _Refused(f"resolving its host '{host}' timed out", blocked=False) from exc
        except (OSError, UnicodeError) as exc:
            raise _Refused(f"its host '{host}' could not be resolved", blocked=False) from exc
        if not 0 < port < 65536:
            raise _Refused(f"its port {port} is not valid", blocked=False)
        ips: list[IPAddress] = []
        for address in dict.fromkeys(addresses):
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                raise _Refused(f"its host '{host}' resolves to an invalid address") from None
            reason = self._why_blocked(ip)
            if reason:
                # One bad address refuses the host: a resolver answering both a
                # public and a private address must not get a second chance.
                raise _Refused(f"its host '{host}' resolves to {reason}")
            ips.append(ip)
        if not ips:
            raise _Refused(f"its host '{host}' has no address")
        last: Exception | None = None
        for ip in ips:
            try:
                return await self._inner.connect_tcp(
                    str(ip), port, timeout, local_address, socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
            except Exception as exc:  # e.g. anyio's exception groups, OverflowError
                last = httpcore.ConnectError(str(exc))
        assert last is not None
        raise last

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise _Refused("unix sockets are not allowed")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


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
        transport = httpx.AsyncHTTPTransport(
            verify=ssl_context if ssl_context is not None else True,
            trust_env=False,
            retries=0,
        )
        # Swap the transport's connection pool for one whose network backend
        # performs the address checks (same settings, guarded backend).
        transport._pool = httpcore.AsyncConnectionPool(
            ssl_context=transport._pool._ssl_context,
            max_connections=32,
            max_keepalive_connections=8,
            keepalive_expiry=30.0,
            network_backend=_GuardedBackend(
                allow_private=settings.media_allow_private_networks,
                trusted=tuple(ipaddress.ip_network(n, strict=False) for n in trusted_networks),
                resolver=resolver or _system_resolver,
            ),
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
            except _Refused as exc:
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
