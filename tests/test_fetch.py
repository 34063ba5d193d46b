"""The hardened input fetcher against real loopback servers: schemes, SSRF guard, DNS pinning, limits, TLS.

The servers listen on 127.0.0.2 (Linux routes all of 127/8 to lo) and the guard allows exactly that address,
so 127.0.0.1 stays a forbidden address the tests can still run a server on, to prove it is never contacted.
"""

from __future__ import annotations

import base64
import datetime
import http.server
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Callable

import pytest

from guarded_fetch import (
    AddressGuard,
    BlockedAddressError,
    FetchError,
    FetchLimits,
    FetchTimeoutError,
    InputTooLargeError,
    UnsupportedURLError,
    check_webhook_url,
    fetch_input,
    pinned_connection,
)
from guarded_fetch import http as fetch_module
from testing.media import EXAMPLE_IMAGE

ALLOWED_IP = "127.0.0.2"
Route = Callable[[http.server.BaseHTTPRequestHandler], None]


# -- a tiny scriptable HTTP server ----------------------------------------------------------------------------


class FileServer:
    """A threaded HTTP/1.0 server on ``host`` whose paths run the given handlers; records what it saw."""

    def __init__(self, routes: dict[str, Route], host: str = ALLOWED_IP,
                 tls: ssl.SSLContext | None = None) -> None:
        self.routes, self.seen = routes, []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server naming
                outer.seen.append((self.path, dict(self.headers)))
                route = outer.routes.get(self.path.split("?", 1)[0])
                try:
                    if route is None:
                        send(self, b"<html><body>not found</body></html>", "text/html", status=404)
                    else:
                        route(self)
                except (BrokenPipeError, ConnectionResetError, ssl.SSLError, OSError):
                    pass  # the client hung up on purpose (limit reached, deadline)

            do_POST = do_GET  # noqa: N815 - routes read the body themselves

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer((host, 0), Handler)
        self.httpd.daemon_threads = True
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.scheme = "https" if tls else "http"
        self.host, self.port = host, self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"{self.scheme}://{self.host}:{self.port}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def send(handler, body: bytes, content_type: str = "application/octet-stream", status: int = 200,
         length: int | None | bool = True) -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    if length is True:
        handler.send_header("Content-Length", str(len(body)))
    elif length is not None and length is not False:
        handler.send_header("Content-Length", str(length))
    handler.end_headers()
    handler.wfile.write(body)


def static(body: bytes, content_type: str = "application/octet-stream") -> Route:
    return lambda h: send(h, body, content_type)


def redirect(location: str, status: int = 302) -> Route:
    def route(h) -> None:
        h.send_response(status)
        h.send_header("Location", location)
        h.send_header("Content-Length", "0")
        h.end_headers()
    return route


def stream(total: int, declared: int | None, sent: list[int] | None = None) -> Route:
    """Send ``total`` bytes in 64 KiB writes, declaring ``declared`` (None: no Content-Length); ``sent`` gets
    how many bytes went out before the client hung up (or all of them)."""
    def route(h) -> None:
        h.send_response(200)
        if declared is not None:
            h.send_header("Content-Length", str(declared))
        h.end_headers()
        block, written = b"x" * 65536, 0
        try:
            for _ in range(total // len(block)):
                h.wfile.write(block)
                written += len(block)
        finally:
            if sent is not None:
                sent.append(written)
    return route


def drip(interval_s: float, headers_too: bool = False, count: int = 200) -> Route:
    def route(h) -> None:
        if headers_too:
            for byte in b"HTTP/1.0 200 OK\r\nContent-Type: image/png\r\n\r\n":
                h.wfile.write(bytes([byte]))
                h.wfile.flush()
                time.sleep(interval_s)
        else:
            h.send_response(200)
            h.end_headers()
            h.wfile.flush()
        for _ in range(count):
            h.wfile.write(b"x")
            h.wfile.flush()
            time.sleep(interval_s)
    return route


def stall(seconds: float) -> Route:
    def route(h) -> None:
        h.send_response(200)
        h.send_header("Content-Length", "100")
        h.end_headers()
        h.wfile.flush()
        time.sleep(seconds)
    return route


# -- fixtures -------------------------------------------------------------------------------------------------

IMAGE = EXAMPLE_IMAGE.read_bytes()
LIMITS = FetchLimits(max_image_bytes=1024 * 1024, max_audio_bytes=2 * 1024 * 1024, connect_timeout_s=1.0,
                     read_timeout_s=1.0, total_timeout_s=2.0, max_redirects=3)
GUARD = AddressGuard([ALLOWED_IP])
NO_LENGTH_SENT: list[int] = []  # what the /no-length route sent, per request


@pytest.fixture(scope="module")
def forbidden():
    """A server on 127.0.0.1 (not allowed): it must never receive a request."""
    server = FileServer({"/portrait.png": static(IMAGE, "image/png")}, host="127.0.0.1")
    yield server
    server.close()


@pytest.fixture(scope="module")
def server(forbidden):
    routes: dict[str, Route] = {
        "/portrait.png": static(IMAGE, "image/png"),
        "/redirect": redirect("/portrait.png"),
        "/redirect-abs": redirect("PLACEHOLDER"),
        "/redirect-private": redirect(forbidden.url("/portrait.png")),
        "/redirect-file": redirect("file:///etc/passwd"),
        "/loop": redirect("/loop", 307),
        "/drip": drip(0.3),
        "/drip-headers": drip(0.2, headers_too=True),
        "/stall": stall(3.0),
        "/lie-short": stream(50 * 1024 * 1024, declared=10),
        "/no-length": stream(50 * 1024 * 1024, declared=None, sent=NO_LENGTH_SENT),
        "/declared-huge": stream(0, declared=50 * 1024 * 1024),
        "/truncated": lambda h: send(h, b"y" * 50, length=100),
        "/error": lambda h: send(h, b"<html>oops</html>", "text/html", status=500),
        "/empty": static(b""),
    }
    srv = FileServer(routes)
    srv.routes["/redirect-abs"] = redirect(srv.url("/portrait.png"))
    yield srv
    srv.close()


def fetch(url: str, field="image_url", limits=LIMITS, guard=GUARD, **kw) -> bytes:
    return fetch_input(url, field, limits, guard, **kw)


# -- happy paths ----------------------------------------------------------------------------------------------


def test_plain_download_sends_original_host_and_no_compression(server):
    assert fetch(server.url("/portrait.png")) == IMAGE
    path, headers = server.seen[-1]
    assert path == "/portrait.png"
    assert headers["Host"] == f"{ALLOWED_IP}:{server.port}"
    assert headers["Accept-Encoding"] == "identity" and headers["Connection"] == "close"


def test_redirects_to_allowed_paths_are_followed(server):
    assert fetch(server.url("/redirect")) == IMAGE
    assert fetch(server.url("/redirect-abs")) == IMAGE


def test_data_uris():
    assert fetch("data:image/png;base64," + base64.b64encode(IMAGE).decode()) == IMAGE
    assert fetch("data:text/plain,hello%20world%00") == b"hello world\x00"
    wrapped = base64.encodebytes(IMAGE).decode()  # MIME line breaks are tolerated
    assert fetch("data:image/png;base64," + wrapped) == IMAGE
    unpadded = base64.b64encode(b"abcd").decode().rstrip("=")
    assert fetch("data:;base64," + unpadded) == b"abcd"


# -- schemes --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["file:///etc/passwd", "gopher://127.0.0.2:70/_x", "ftp://example.com/a.png",
                                 "/etc/passwd", "portrait.png", "javascript:alert(1)", "dict://x:11211/stat"])
def test_other_schemes_and_paths_are_refused(url):
    with pytest.raises(UnsupportedURLError) as err:
        fetch(url)
    assert err.value.field == "image_url" and err.value.status_code == 422
    assert "is not allowed" in str(err.value)


def test_s3_only_for_listed_buckets():
    calls = []

    def read_s3(bucket: str, key: str) -> bytes:
        calls.append((bucket, key))
        if key == "missing.png":
            raise KeyError(key)
        if key == "huge.wav":
            return b"z" * (LIMITS.max_audio_bytes + 1)
        return b"IMG"

    assert fetch("s3://inputs/a/b.png", read_s3=read_s3, s3_buckets=["inputs"]) == b"IMG"
    assert calls == [("inputs", "a/b.png")]
    with pytest.raises(UnsupportedURLError, match="bucket 'secrets' is not one"):
        fetch("s3://secrets/key.png", read_s3=read_s3, s3_buckets=["inputs"])
    with pytest.raises(UnsupportedURLError):
        fetch("s3://inputs/a.png")  # no reader configured
    with pytest.raises(FetchError, match="does not exist"):
        fetch("s3://inputs/missing.png", read_s3=read_s3, s3_buckets=["inputs"])
    with pytest.raises(InputTooLargeError):
        fetch("s3://inputs/huge.wav", "audio_url", read_s3=read_s3, s3_buckets=["inputs"])
    assert len(calls) == 3


# -- the address guard ----------------------------------------------------------------------------------------

BLOCKED = ["http://127.0.0.1/", "http://169.254.169.254/latest/meta-data/", "http://[::1]/",
           "http://[::ffff:127.0.0.1]/", "http://[::ffff:7f00:1]/", "http://2130706433/", "http://0x7f.1/",
           "http://127.1/", "http://10.0.0.1/", "http://192.168.1.1/", "http://172.16.0.1/", "http://[fd00::1]/",
           "http://[fe80::1]/", "http://100.64.0.1/", "http://0.0.0.0/", "http://[::]/", "http://224.0.0.1/",
           "http://localhost:8000/", "https://127.0.0.1:443/", "http://[64:ff9b::a00:1]/",
           "http://[2002:c0a8:101::1]/", "http://[::127.0.0.1]/"]


@pytest.fixture
def no_connect(monkeypatch):
    def refuse(*_args, **_kw):
        raise AssertionError("a connection was attempted")
    monkeypatch.setattr(fetch_module.HttpFetcher, "connect", refuse)


@pytest.mark.parametrize("url", BLOCKED)
def test_private_addresses_are_refused_without_connecting(url, no_connect):
    started = time.monotonic()
    with pytest.raises(BlockedAddressError) as err:
        fetch(url, "audio_url")
    assert time.monotonic() - started < 0.5
    assert err.value.field == "audio_url" and err.value.status_code == 422
    assert "which is not allowed" in str(err.value) and str(err.value).startswith("audio_url ")


def test_blocked_message_names_the_address():
    with pytest.raises(BlockedAddressError) as err:
        fetch("http://[::ffff:127.0.0.1]:8080/x.png")
    assert "a loopback address (::ffff:127.0.0.1)" in str(err.value)
    with pytest.raises(BlockedAddressError, match=r"link-local address \(169\.254\.169\.254\)"):
        fetch("http://169.254.169.254/")


def test_redirect_to_a_private_address_is_refused(server, forbidden):
    before = len(forbidden.seen)
    with pytest.raises(BlockedAddressError) as err:
        fetch(server.url("/redirect-private"))
    assert "redirected to http://127.0.0.1:" in str(err.value) and "loopback address (127.0.0.1)" in str(err.value)
    assert len(forbidden.seen) == before  # the forbidden server was never contacted


def test_redirect_to_another_scheme_and_loops_are_refused(server):
    with pytest.raises(UnsupportedURLError, match="redirected to file:///etc/passwd"):
        fetch(server.url("/redirect-file"))
    count = len(server.seen)
    with pytest.raises(FetchError, match="redirected more than 3 times"):
        fetch(server.url("/loop"))
    assert len(server.seen) - count == 4  # the first request plus three redirects, no more


def test_any_private_record_refuses_the_name(monkeypatch, no_connect):
    def two_records(host, port, *args, **kw):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port)),
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.1.2.3", port))]
    monkeypatch.setattr(fetch_module.socket, "getaddrinfo", two_records)
    with pytest.raises(BlockedAddressError, match=r"host mixed\.example resolves to a private address \(10\.1\.2\.3\)"):
        fetch("http://mixed.example/a.png")


def test_dns_is_resolved_once_and_the_checked_address_is_used(server, forbidden, monkeypatch):
    """DNS rebinding: the second answer (127.0.0.1) is never asked for; the request goes to the checked IP."""
    answers = iter([ALLOWED_IP, "127.0.0.1", "127.0.0.1"])
    calls = []

    def rebinding(host, port, *args, **kw):
        calls.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers), port))]
    monkeypatch.setattr(fetch_module.socket, "getaddrinfo", rebinding)
    guard = AddressGuard([ALLOWED_IP])
    before = len(forbidden.seen)
    assert fetch(f"http://avatar.test:{server.port}/portrait.png", guard=guard) == IMAGE
    assert calls == ["avatar.test"]
    assert server.seen[-1][1]["Host"] == f"avatar.test:{server.port}"
    assert len(forbidden.seen) == before


def test_allow_list_entries():
    guard = AddressGuard(["minio.internal", "10.1.0.0/16", "[fd00::5]", "127.0.0.2"])
    ip = ipaddress.ip_address
    assert guard.is_allowed("minio.internal", ip("10.9.9.9"))
    assert guard.is_allowed("other", ip("10.1.200.3")) and not guard.is_allowed("other", ip("10.2.0.1"))
    assert guard.is_allowed("x", ip("fd00::5")) and not guard.is_allowed("x", ip("fd00::6"))
    assert guard.is_allowed("x", ip("::ffff:127.0.0.2")) and not guard.is_allowed("x", ip("127.0.0.1"))
    assert guard.is_allowed("example.com", ip("93.184.216.34"))
    for bad in ("", "not a host!", "http://x/"):
        with pytest.raises(ValueError):
            AddressGuard([bad])


def test_webhook_check():
    check_webhook_url("https://93.184.216.34/hook", GUARD)
    check_webhook_url("http://127.0.0.2:9999/hook", GUARD)
    for url, reason in [("http://127.0.0.1:8000/hook", "loopback"), ("http://169.254.169.254/", "link-local"),
                        ("ftp://example.com/", "scheme"), ("http://[::1]/", "loopback"), ("not a url", "scheme")]:
        with pytest.raises(ValueError, match=reason):
            check_webhook_url(url, GUARD)


def test_pinned_connection_for_webhooks(server, monkeypatch):
    received = []

    def hook(h) -> None:
        received.append((h.headers["Host"], h.rfile.read(int(h.headers["Content-Length"]))))
        send(h, b"ok")
    server.routes["/hook"] = hook
    answers = iter([ALLOWED_IP, "127.0.0.1"])
    monkeypatch.setattr(fetch_module.socket, "getaddrinfo", lambda host, port, *a, **k: [
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers), port))])
    conn, path = pinned_connection(f"http://hooks.test:{server.port}/hook?x=1", GUARD, timeout_s=2)
    try:
        conn.request("POST", path, body=b'{"status": "OK"}', headers={"content-type": "application/json"})
        assert conn.getresponse().status == 200
    finally:
        conn.close()
    assert received == [(f"hooks.test:{server.port}", b'{"status": "OK"}')]
    with pytest.raises(ValueError, match="loopback"):
        pinned_connection("http://hooks.test/hook", GUARD)  # the second answer (127.0.0.1) is refused


# -- limits ---------------------------------------------------------------------------------------------------


def test_slow_drip_hits_the_total_deadline(server):
    # Each byte comes before the 1 s read timeout, for a minute: only the 2 s total deadline ends the fetch.
    # The upper bound leaves a loaded machine room and is still far below the drip's length.
    for path in ("/drip", "/drip-headers"):
        started = time.monotonic()
        with pytest.raises(FetchTimeoutError, match="within 2 s"):
            fetch(server.url(path))
        assert 1.9 < time.monotonic() - started < 6.0


def test_idle_server_hits_the_read_timeout(server):
    started = time.monotonic()
    with pytest.raises(FetchTimeoutError, match="sent nothing for 1 s"):
        fetch(server.url("/stall"))
    assert time.monotonic() - started < 2.9  # before the server's 3 s stall ends with a short body


def test_size_limit_is_enforced_while_reading(server):
    NO_LENGTH_SENT.clear()
    with pytest.raises(InputTooLargeError) as err:
        fetch(server.url("/no-length"))  # 50 MB without Content-Length: stops at 1 MiB + 1
    assert err.value.status_code == 413 and "more than the limit of 1 MiB" in str(err.value)
    deadline = time.monotonic() + 30
    while not NO_LENGTH_SENT:  # the server's thread ends once its writes meet the closed connection
        assert time.monotonic() < deadline, "the server still sends"
        time.sleep(0.05)
    # The client hung up while reading: the server got out the limit plus what socket buffers hold, not 50 MB.
    assert NO_LENGTH_SENT[0] < 16 * 1024 * 1024, NO_LENGTH_SENT
    with pytest.raises(InputTooLargeError, match="declares 52428800 bytes"):
        fetch(server.url("/declared-huge"))  # refused from the header, nothing read
    # Content-Length is the framing: a server claiming 10 bytes yields those 10 bytes, never the 50 MB behind.
    assert fetch(server.url("/lie-short")) == b"x" * 10


def test_short_body_empty_body_and_http_errors(server):
    with pytest.raises(FetchError, match="closed after 50 of 100 bytes"):
        fetch(server.url("/truncated"))
    with pytest.raises(FetchError, match="is empty"):
        fetch(server.url("/empty"))
    with pytest.raises(FetchError, match="answered HTTP 500"):
        fetch(server.url("/error"))
    with pytest.raises(FetchError, match="answered HTTP 404") as err:
        fetch(server.url("/nope?X-Amz-Signature=topsecret"))
    assert "topsecret" not in str(err.value)


def test_connection_refused_is_a_clean_error():
    with socket.socket() as sock:
        sock.bind((ALLOWED_IP, 0))
        port = sock.getsockname()[1]  # bound but not listening: connections are refused
        with pytest.raises(FetchError, match="was refused"):
            fetch(f"http://{ALLOWED_IP}:{port}/x.png")


def test_data_uri_errors_do_not_echo_the_payload():
    for uri, kind, text in [("data:image/png;base64,@@@@not-base64@@@@", FetchError, "invalid base64"),
                            ("data:image/png;base64", FetchError, "no comma"),
                            ("data:image/png;base64,QUJDRA=X", FetchError, "invalid base64"),
                            ("data:image/png;base64,QUJDR", FetchError, "invalid base64 length"),
                            ("data:image/png;base64," + "QUJD" * 400_000, InputTooLargeError, "limit of 1 MiB"),
                            ("data:image/png," + "a" * 1_100_000, InputTooLargeError, "limit of 1 MiB"),
                            ("data:image/png;base64,", FetchError, "is empty")]:
        with pytest.raises(kind, match=text) as err:
            fetch(uri)
        assert len(str(err.value)) < 200 and "QUJD" not in str(err.value) and "@@@" not in str(err.value)


def test_long_urls_are_truncated_in_messages(server):
    url = server.url("/redirect-file") + "?" + "a" * 5000
    with pytest.raises(UnsupportedURLError) as err:
        fetch(url)
    assert len(str(err.value)) < 300
    with pytest.raises(FetchError) as err:
        fetch("http://user:hunter2@example.com/a.png")
    assert "hunter2" not in str(err.value)


# -- TLS ------------------------------------------------------------------------------------------------------


def _self_signed(tmp_path) -> tuple[ssl.SSLContext, bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "avatar.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("avatar.test")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    return context, cert_pem


def test_https_verifies_the_certificate_for_the_hostname(tmp_path, monkeypatch):
    server_context, cert_pem = _self_signed(tmp_path)
    server_names = []
    server_context.sni_callback = lambda _sock, name, _ctx: server_names.append(name)
    tls_server = FileServer({"/portrait.png": static(IMAGE, "image/png")}, tls=server_context)
    try:
        # An untrusted (self-signed) certificate: a clean error naming the host, not a traceback.
        with pytest.raises(FetchError, match=r"TLS certificate of 127\.0\.0\.2:\d+ is not valid"):
            fetch(tls_server.url("/portrait.png"))

        # Trusted CA, name resolved by (fake) DNS to the checked IP: SNI and verification use the hostname.
        trusting = ssl.create_default_context(cadata=cert_pem.decode())
        monkeypatch.setattr(fetch_module.ssl, "create_default_context", lambda: trusting)
        monkeypatch.setattr(fetch_module.socket, "getaddrinfo", lambda host, port, *a, **k: [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", (ALLOWED_IP, port))])
        assert fetch(f"https://avatar.test:{tls_server.port}/portrait.png") == IMAGE
        assert "avatar.test" in server_names
        assert tls_server.seen[-1][1]["Host"] == f"avatar.test:{tls_server.port}"
        # The same trusted certificate does not cover another name.
        with pytest.raises(FetchError, match="TLS certificate of other.test"):
            fetch(f"https://other.test:{tls_server.port}/portrait.png")
    finally:
        tls_server.close()
