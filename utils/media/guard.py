"""Server-side request forgery guard for media fetching.

- every host is resolved off the event loop and refused when any of its
  addresses is loopback, private, link-local, CGNAT, unique-local, unspecified,
  multicast, reserved, a cloud metadata address, or an IPv6 form embedding one
  of those (IPv4-mapped, IPv4-compatible, NAT64, 6to4, Teredo), unless private
  networks are allowed (metadata addresses stay refused even then);
- the connection goes to the address that was checked (no DNS rebinding): the
  check lives in the network backend that opens the socket, while the Host
  header and TLS SNI/certificate verification use the URL's hostname.

`GuardedTransport` is an httpx transport built on httpcore's public connection
pool with that backend; `utils.media.fetch.MediaFetcher` sends through it.
A refused connection raises `Refused`, which httpx lets through unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import ssl
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Iterator

import certifi
import httpcore
import httpx

__all__ = [
    "GuardedTransport",
    "IPAddress",
    "Refused",
    "Resolver",
    "is_blocked_address",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Awaitable[list[str]]]

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
_CGNAT = ipaddress.IPv4Network("100.64.0.0/10")

# Connection pool limits of the media client.
_MAX_CONNECTIONS = 32
_MAX_KEEPALIVE_CONNECTIONS = 8
_KEEPALIVE_EXPIRY = 30.0


class Refused(Exception):
    """Raised inside the network backend; the fetcher turns it into a 400.

    `blocked` is True when the address policy refused the host, False when the
    host could not be reached at all (unresolvable, invalid port, ...).
    """

    def __init__(self, message: str, *, blocked: bool = True) -> None:
        super().__init__(message)
        self.blocked = blocked


# --- address policy -----------------------------------------------------------


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
    if isinstance(ip, ipaddress.IPv4Address) and ip in _CGNAT:
        return "a shared (CGNAT) address"
    if ip.is_reserved or not ip.is_global:
        return "a reserved address"
    return None


# --- network backend ------------------------------------------------------------


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
        self, *, allow_private: bool, trusted: tuple[IPNetwork, ...], resolver: Resolver
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
            raise Refused(f"resolving its host '{host}' timed out", blocked=False) from exc
        except (OSError, UnicodeError) as exc:
            raise Refused(f"its host '{host}' could not be resolved", blocked=False) from exc
        if not 0 < port < 65536:
            raise Refused(f"its port {port} is not valid", blocked=False)
        ips: list[IPAddress] = []
        for address in dict.fromkeys(addresses):
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                raise Refused(f"its host '{host}' resolves to an invalid address") from None
            reason = self._why_blocked(ip)
            if reason:
                # One bad address refuses the host: a resolver answering both a
                # public and a private address must not get a second chance.
                raise Refused(f"its host '{host}' resolves to {reason}")
            ips.append(ip)
        if not ips:
            raise Refused(f"its host '{host}' has no address")
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
        raise Refused("unix sockets are not allowed")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


# --- httpx transport --------------------------------------------------------------

# httpcore's exceptions and the public httpx classes they become, most specific
# first: the first entry the exception is an instance of wins.
_EXCEPTIONS: tuple[tuple[type[Exception], type[httpx.TransportError]], ...] = (
    (httpcore.ConnectTimeout, httpx.ConnectTimeout),
    (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout),
    (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.TimeoutException, httpx.TimeoutException),
    (httpcore.ConnectError, httpx.ConnectError),
    (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError),
    (httpcore.NetworkError, httpx.NetworkError),
    (httpcore.ProxyError, httpx.ProxyError),
    (httpcore.UnsupportedProtocol, httpx.UnsupportedProtocol),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError),
    (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
    (httpcore.ProtocolError, httpx.ProtocolError),
)


@contextlib.contextmanager
def _mapped_exceptions() -> Iterator[None]:
    """Re-raises httpcore's exceptions as httpx's; anything else (`Refused`
    included) passes through unchanged."""
    try:
        yield
    except Exception as exc:
        for source, target in _EXCEPTIONS:
            if isinstance(exc, source):
                raise target(str(exc)) from exc
        raise


class _ResponseStream(httpx.AsyncByteStream):
    """The body of an httpcore response, read as it arrives."""

    def __init__(self, stream: AsyncIterable[bytes]) -> None:
        self._stream = stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _mapped_exceptions():
            async for part in self._stream:
                yield part

    async def aclose(self) -> None:
        close = getattr(self._stream, "aclose", None)
        if close is not None:
            await close()


class GuardedTransport(httpx.AsyncBaseTransport):
    """An httpx transport whose every connection goes through the address guard.

    It owns an `httpcore.AsyncConnectionPool` (HTTP/1.1, no proxy, no retries)
    whose network backend resolves and checks each host before connecting.
    Addresses in `trusted_networks` pass the check, `resolver(host, port) ->
    [ip, ...]` replaces DNS, and `ssl_context` replaces the default context
    (certificates verified against certifi's bundle, as httpx does by default).
    """

    def __init__(
        self,
        *,
        allow_private: bool = False,
        trusted_networks: Iterable[str] = (),
        resolver: Resolver | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if ssl_context is None:
            ssl_context = ssl.create_default_context(cafile=certifi.where())
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context,
            max_connections=_MAX_CONNECTIONS,
            max_keepalive_connections=_MAX_KEEPALIVE_CONNECTIONS,
            keepalive_expiry=_KEEPALIVE_EXPIRY,
            retries=0,
            network_backend=_GuardedBackend(
                allow_private=allow_private,
                trusted=tuple(ipaddress.ip_network(n, strict=False) for n in trusted_networks),
                resolver=resolver or _system_resolver,
            ),
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.AsyncByteStream)
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=request.url.raw_scheme,
                host=request.url.raw_host,
                port=request.url.port,
                target=request.url.raw_path,
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        with _mapped_exceptions():
            response = await self._pool.handle_async_request(core_request)
        assert isinstance(response.stream, AsyncIterable)
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_ResponseStream(response.stream),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        await self._pool.aclose()
