"""MediaFetcher: schemes, SSRF guard, redirects, timeouts and byte caps.

Every network test talks to servers on loopback only. Loopback is normally
refused, so the fetcher is built with `trusted_networks=["127.0.0.1/32"]` to
reach the local media server; everything else (127.0.0.2, ::1, 10/8, ...)
stays refused, which is what the tests check.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from utils.errors import OpenAIError
from utils.media.fetch import MAX_REDIRECTS, MediaFetcher
from utils.media.guard import is_blocked_address
from utils.settings import Settings

PAYLOAD = bytes(range(256)) * 4  # 1024 bytes
TRUST_LOOPBACK_1 = ["127.0.0.1/32"]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        self.server.hits.append(parts.path)  # type: ignore[attr-defined]
        if parts.path == "/img":
            self._send(PAYLOAD)
        elif parts.path == "/host":
            self._send(self.headers["Host"].encode())
        elif parts.path == "/redirect":
            self._send(b"", 302, {"Location": query["to"]})
        elif parts.path == "/chain":
            n = int(query["n"])
            target = "/img" if n <= 1 else f"/chain?n={n - 1}"  # n redirects
            self._send(b"", 307, {"Location": target})
        elif parts.path == "/declared-big":
            # Announces 10 MB, sends nothing: only a Content-Length pre-check
            # answers 413 here (reading would fail with a protocol error).
            self.send_response(200)
            self.send_header("Content-Length", str(10 * 1024 * 1024))
            self.end_headers()
        elif parts.path in ("/endless", "/drip"):
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            chunk, pause = (b"x" * 65536, 0.0) if parts.path == "/endless" else (b"x", 0.2)
            try:
                for _ in range(100_000):
                    self.wfile.write(chunk)
                    self.wfile.flush()
                    if pause:
                        time.sleep(pause)
            except OSError:
                pass
            self.close_connection = True
        elif parts.path == "/missing":
            self._send(b"not here", 404)
        else:
            self._send(b"", 500)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], tls: ssl.SSLContext | None = None) -> None:
        super().__init__(address, _Handler)
        self.hits: list[str] = []
        if tls is not None:
            self.socket = tls.wrap_socket(self.socket, server_side=True)


def _serve(server: _Server) -> Iterator[_Server]:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture(scope="module")
def fetch_server() -> Iterator[str]:
    server = _Server(("127.0.0.1", 0))
    for s in _serve(server):
        yield f"http://127.0.0.1:{s.server_address[1]}"


@pytest.fixture
def trap() -> Iterator[tuple[str, list[int]]]:
    """A listener on 127.0.0.2 that records every connection it gets."""
    sock = socket.socket()
    sock.bind(("127.0.0.2", 0))
    sock.listen(8)
    sock.settimeout(0.05)
    accepted: list[int] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            accepted.append(1)
            conn.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.2:{sock.getsockname()[1]}", accepted
    stop.set()
    thread.join(2)
    sock.close()


def _settings(**overrides: object) -> Settings:
    return Settings(_env_file=None, **overrides)


@contextlib.asynccontextmanager
async def _fetcher(settings: Settings | None = None, **kw: object) -> AsyncIterator[MediaFetcher]:
    f = MediaFetcher(settings or _settings(), **kw)  # type: ignore[arg-type]
    try:
        yield f
    finally:
        await f.aclose()


async def _refused(f: MediaFetcher, url: str, status: int = 400, **kw: object) -> OpenAIError:
    with pytest.raises(OpenAIError) as info:
        await f.fetch(url, kind="image", **kw)
    assert info.value.status == status, info.value.message
    return info.value


# --- address policy -----------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.0.0.2",
        "::1",
        "10.0.0.1",
        "172.16.5.4",
        "192.168.1.1",
        "169.254.169.254",
        "169.254.1.1",
        "100.64.0.1",
        "100.100.100.200",
        "0.0.0.0",
        "::",
        "224.0.0.1",
        "ff02::1",
        "240.0.0.1",
        "255.255.255.255",
        "fe80::1",
        "fc00::1",
        "fd00:ec2::254",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "::ffff:169.254.169.254",
        "::127.0.0.1",
        "64:ff9b::10.0.0.1",
        "64:ff9b::127.0.0.1",
        "64:ff9b:1::1",
        "2002:7f00:1::1",
        "2002:a00:1::",
        "2001:0:4136:e378:8000:63bf:3fff:fdd2",
        "2001:db8::1",
        "198.18.0.1",
        "192.0.2.1",
        "168.63.129.16",
    ],
)
def test_blocked_addresses(address: str) -> None:
    assert is_blocked_address(ipaddress.ip_address(address)) is not None


@pytest.mark.parametrize(
    "address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::8.8.8.8"]
)
def test_public_addresses_pass(address: str) -> None:
    assert is_blocked_address(ipaddress.ip_address(address)) is None


def test_allow_private_networks_keeps_metadata_refused() -> None:
    for address in ("10.0.0.1", "127.0.0.1", "::1", "::ffff:192.168.0.1"):
        assert is_blocked_address(ipaddress.ip_address(address), allow_private=True) is None
    for address in ("169.254.169.254", "::ffff:169.254.169.254", "fd00:ec2::254"):
        assert is_blocked_address(ipaddress.ip_address(address), allow_private=True)


# --- SSRF forms over the wire ---------------------------------------------------


async def _loopback_resolver(host: str, port: int) -> list[str]:
    return ["127.0.0.1"]


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:{port}/img",  # refused when loopback is not trusted
        "http://[::1]:{port}/img",
        "http://10.0.0.1/img",
        "http://10.255.1.2:8080/img",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::ffff:127.0.0.1]:{port}/img",
        "http://[::ffff:7f00:1]:{port}/img",
        "http://[64:ff9b::7f00:1]:{port}/img",
        "http://localhost:{port}/img",  # a hostname resolving to loopback
        "http://2130706433:{port}/img",  # decimal form of 127.0.0.1
        "http://0x7f.1:{port}/img",
        "http://0177.0.0.1:{port}/img",
        "http://127.1:{port}/img",
        "http://[::]:{port}/img",
        "http://0.0.0.0:{port}/img",
    ],
)
async def test_ssrf_forms_refused(fetch_server: str, url: str) -> None:
    port = urlsplit(fetch_server).port
    async with _fetcher() as f:  # nothing trusted
        error = await _refused(f, url.format(port=port))
    # httpx itself rejects some legacy forms (octal) as invalid URLs.
    assert error.code in ("media_url_refused", "invalid_media_url")


async def test_trusted_test_address_is_fetched(fetch_server: str) -> None:
    async with _fetcher(trusted_networks=TRUST_LOOPBACK_1) as f:
        assert await f.fetch(f"{fetch_server}/img", kind="image") == PAYLOAD
        assert await f.fetch(f"{fetch_server}/img", kind="video") == PAYLOAD


async def test_other_loopback_still_refused_with_trust(trap: tuple[str, list[int]]) -> None:
    url, accepted = trap
    async with _fetcher(trusted_networks=TRUST_LOOPBACK_1) as f:
        await _refused(f, f"{url}/img")
    assert accepted == []


async def test_hostname_resolving_to_loopback_refused() -> None:
    async with _fetcher(resolver=_loopback_resolver) as f:
        error = await _refused(f, "http://innocent.example/img")
    assert "loopback" in error.message


async def test_any_private_answer_refuses_the_host(fetch_server: str) -> None:
    port = urlsplit(fetch_server).port

    async def resolver(host: str, port: int) -> list[str]:
        return ["127.0.0.1", "10.0.0.1"]

    async with _fetcher(trusted_networks=TRUST_LOOPBACK_1, resolver=resolver) as f:
        await _refused(f, f"http://media.test:{port}/img")


async def test_connects_to_checked_address_and_keeps_host(
    fetch_server: str, trap: tuple[str, list[int]]
) -> None:
    """DNS rebinding: the resolver answers a trusted address once, then a
    forbidden one; the fetcher must resolve once and connect to what it checked."""
    port = urlsplit(fetch_server).port
    _, accepted = trap
    answers = iter([["127.0.0.1"], ["127.0.0.2"], ["127.0.0.2"]])
    calls: list[str] = []

    async def rebinding(host: str, port: int) -> list[str]:
        calls.append(host)
        return next(answers)

    async with _fetcher(trusted_networks=TRUST_LOOPBACK_1, resolver=rebinding) as f:
        body = await f.fetch(f"http://media.test:{port}/host", kind="image")
    assert body == f"media.test:{port}".encode()  # Host header is the URL's hostname
    assert calls == ["media.test"]
    assert accepted == []


async def test_redirect_to_private_address_refused(
    fetch_server: str, trap: tuple[str, list[int]]
) -> None:
    trap_url, accepted = trap
    async with _fetcher(trusted_networks=TRUST_LOOPBACK_1) as f:
        for target in (
            f"{trap_url}/img",
            "http://10.0.0.1/img",
            "http://169.254.169.254/latest/meta-data/",
            "http://[::ffff:127.0.0.2]/img",
            f"http://[::1]:{urlsplit(trap_url).port}/img",
        ):
            error = await _refused(f, f"{fetch_server}/redirect?to={target}")
            assert "redirected to" in error.message
            assert error.code == "media_url_refused"
    assert accepted == []


async def test_redirect_to_other_scheme_refused(fetch_server: str) -> None:
    async with _fetcher(trusted_networks=TRUST_LOOPBACK_1) as f:
        for target in ("file:///etc/passwd", "ftp://example.com/x", "data:image/png;base64,AAAA"):
            error = await _refused(f, f"{fetch_server}/redirect?to={target}")
            assert "unsupported scheme" in error.message or "invalid URL" in error.message


async def test_redirects_followed_up_to_the_limit(fetch_server: str) -> None:
    async with _fetcher(trusted_networks=TRUST_LOOPBACK_1) as f:
        assert await f.fetch(f"{fetch_server}/chain?n={MAX_REDIRECTS}") == PAYLOAD
        error = await _refused(f, f"{fetch_server}/chain?n={MAX_REDIRECTS + 1}")
    assert "redirected more than" in error.message


async def test_unsupported_schemes() -> None:
    async with _fetcher() as f:
        for url in ("ftp://example.com/a.png", "gopher://x/", "javascript:alert(1)", "/etc/passwd"):
            error = await _refused(f, url)
            assert "unsupported scheme" in error.message
        await _refused(f, "")


async def test_domain_allow_list(fetch_server: str) -> None:
    port = urlsplit(fetch_server).port
    settings = _settings(media_allowed_domains="media.test")
    async with _fetcher(
        settings, trusted_networks=TRUST_LOOPBACK_1, resolver=_loopback_resolver
    ) as f:
        assert await f.fetch(f"http://media.test:{port}/img") == PAYLOAD
        assert await f.fetch(f"http://cdn.media.test:{port}/img") == PAYLOAD
        for url in (
            f"http://evil.test:{port}/img",
            f"http://media.test.evil.test:{port}/img",
            f"http://notmedia.test:{port}/img",
            f"http://127.0.0.1:{port}/img",
        ):
            error = await _refused(f, url)
            assert "media_allowed_domains" in error.message
        # An allowed host redirecting to one outside the list is refused too.
        error = await _refused(
            f, f"http://media.test:{port}/redirect?to=http://evil.test:{port}/img"
        )
        assert "media_allowed_domains" in error.message


async def test_http_error_status_is_400(fetch_server: str) -> None:
    async with _fetcher(trusted_networks=TRUST_LOOPBACK_1) as f:
        error = await _refused(f, f"{fetch_server}/missing")
    assert "HTTP 404" in error.message and f"{fetch_server}/missing" in error.message


async def test_unresolvable_host_is_400() -> None:
    async with _fetcher() as f:
        error = await _refused(f, "http://no-such-host.invalid/a.png")
    assert "no-such-host.invalid" in error.message


async def test_url_credentials_are_not_echoed() -> None:
    async with _fetcher() as f:
        error = await _refused(f, "http://user:hunter2@10.0.0.1/a.png")
    assert "hunter2" not in error.message and "user:***@10.0.0.1" in error.message


# --- TLS: pinned address, SNI and certificate on the hostname -------------------


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=media.test",
         "-addext", "subjectAltName=DNS:media.test"],
        check=True, capture_output=True,
    )  # fmt: skip
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = _Server(("127.0.0.1", 0), tls=context)
    for s in _serve(server):
        yield s.server_address[1], cert


async def test_https_to_pinned_address_verifies_the_hostname(tls_server: tuple[int, Path]) -> None:
    port, cert = tls_server
    client_context = ssl.create_default_context(cafile=str(cert))
    async with _fetcher(
        trusted_networks=TRUST_LOOPBACK_1, resolver=_loopback_resolver, ssl_context=client_context
    ) as f:
        assert await f.fetch(f"https://media.test:{port}/img") == PAYLOAD
        assert await f.fetch(f"https://media.test:{port}/host") == f"media.test:{port}".encode()
        # Same address, another name: the certificate does not match it.
        error = await _refused(f, f"https://other.test:{port}/img")
    assert "certificate" in error.message


# --- timeouts and byte caps -------------------------------------------------------


async def test_slow_server_times_out(fetch_server: str) -> None:
    async with _fetcher(_settings(media_timeout_s=1.0), trusted_networks=TRUST_LOOPBACK_1) as f:
        error = await _refused(f, f"{fetch_server}/drip")
    assert error.code == "media_timeout"
    assert "media_timeout_s" in error.message


async def test_endless_server_is_cut_by_the_byte_cap(fetch_server: str) -> None:
    settings = _settings(max_media_bytes=300_000)
    async with _fetcher(settings, trusted_networks=TRUST_LOOPBACK_1) as f:
        error = await _refused(f, f"{fetch_server}/endless", status=413)
    assert "max_media_bytes" in error.message


async def test_endless_server_is_cut_by_the_timeout(fetch_server: str) -> None:
    settings = _settings(
        media_timeout_s=1.0, max_media_bytes=10**12, max_request_media_bytes=10**12
    )
    async with _fetcher(settings, trusted_networks=TRUST_LOOPBACK_1) as f:
        error = await _refused(f, f"{fetch_server}/endless")
    assert error.code == "media_timeout"


async def test_declared_size_over_cap_refused_before_download(fetch_server: str) -> None:
    settings = _settings(max_media_bytes=1024 * 1024)
    async with _fetcher(settings, trusted_networks=TRUST_LOOPBACK_1) as f:
        error = await _refused(f, f"{fetch_server}/declared-big", status=413)
    assert "max_media_bytes" in error.message


async def test_per_request_budget(fetch_server: str) -> None:
    settings = _settings(max_request_media_bytes=2500)
    async with _fetcher(settings, trusted_networks=TRUST_LOOPBACK_1) as f:
        budget = f.new_budget()
        assert budget.limit == 2500
        assert await f.fetch(f"{fetch_server}/img", budget=budget) == PAYLOAD
        assert await f.fetch(f"{fetch_server}/img", budget=budget) == PAYLOAD
        error = await _refused(f, f"{fetch_server}/img", status=413, budget=budget)
        assert "max_request_media_bytes" in error.message
        # Data URLs draw on the same budget; a fresh budget starts over.
        data_url = "data:image/png;base64," + base64.b64encode(PAYLOAD).decode()
        await _refused(f, data_url, status=413, budget=budget)
        assert await f.fetch(data_url, budget=f.new_budget()) == PAYLOAD


# --- data: URLs ---------------------------------------------------------------------


async def test_data_urls() -> None:
    encoded = base64.b64encode(PAYLOAD).decode()
    wrapped = "\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))
    async with _fetcher() as f:
        assert await f.fetch(f"data:image/png;base64,{encoded}") == PAYLOAD
        # Line breaks, missing padding and the URL-safe alphabet are tolerated.
        assert await f.fetch(f"data:image/png;base64,{wrapped}") == PAYLOAD
        assert await f.fetch("data:image/png;base64,aGVsbG8") == b"hello"
        assert await f.fetch("data:image/png;base64,-_-_") == base64.b64decode("+/+/")
        assert await f.fetch("data:text/plain,hi%20there") == b"hi there"


async def test_data_url_errors_never_echo_the_payload() -> None:
    async with _fetcher(_settings(max_media_bytes=1000)) as f:
        secret = "QUJD" * 50 + "!!!not-base64!!!"
        error = await _refused(f, f"data:image/png;base64,{secret}")
        assert "QUJDQUJD" not in error.message and "base64" in error.message
        big = base64.b64encode(b"\x00" * 5000).decode()
        error = await _refused(f, f"data:image/png;base64,{big}", status=413)
        assert "max_media_bytes" in error.message and big[:40] not in error.message
        # Just over the cap after decoding (the length estimate alone passes).
        over = base64.b64encode(b"\x01" * 1001).decode()
        await _refused(f, f"data:image/png;base64,{over}", status=413)
        exact = base64.b64encode(b"\x01" * 1000).decode()
        assert await f.fetch(f"data:image/png;base64,{exact}") == b"\x01" * 1000
        await _refused(f, "data:image/png;base64")  # no comma
        await _refused(f, "data:image/png;base64,")  # empty


# --- file:// ---------------------------------------------------------------------------


async def test_file_urls_only_under_the_media_dir(tmp_path: Path) -> None:
    media = tmp_path / "media"
    (media / "sub").mkdir(parents=True)
    (media / "sub" / "a b.png").write_bytes(PAYLOAD)
    (tmp_path / "secret.txt").write_bytes(b"secret")
    (media / "link.png").symlink_to(tmp_path / "secret.txt")
    (media / "big.bin").write_bytes(b"\x00" * 2048)

    async with _fetcher() as f:
        error = await _refused(f, f"file://{media}/sub/a%20b.png")
    assert "media_local_dir" in error.message

    async with _fetcher(_settings(media_local_dir=media, max_media_bytes=1500)) as f:
        assert await f.fetch(f"file://{media}/sub/a%20b.png") == PAYLOAD
        assert await f.fetch(f"file://localhost{media}/sub/a%20b.png") == PAYLOAD
        for url in (
            f"file://{media}/../secret.txt",
            f"file://{media}/sub/%2e%2e/%2e%2e/secret.txt",
            f"file://{media}/link.png",  # a symlink pointing outside
            "file:///etc/passwd",
            f"file://otherhost{media}/sub/a%20b.png",
            f"file://{media}/missing.png",
            f"file://{media}/sub",  # a directory
        ):
            await _refused(f, url)
        await _refused(f, f"file://{media}/big.bin", status=413)


async def test_malformed_urls_are_400() -> None:
    async with _fetcher() as f:
        for url in (
            "http://",
            "http:///x",
            "http://[::1",
            "http://xn--/",
            "http://user@:80/",
            "http://192.0.2.1:99999/",
            "http://x/\x00",
            "\x00http://x",
            "data:",
            "data:;base64,====",
            "data:image/png;base64,%",
        ):
            await _refused(f, url)
