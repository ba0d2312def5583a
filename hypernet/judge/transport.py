"""One JSON POST to a judge server, hardened against broken or hostile servers.

Why not `urllib.request`: it follows redirects by itself, copying every request header —
Authorization included — to whatever host the Location names, and turns a POST into a GET on
301/302/303; its timeout applies to each socket operation, so a server sending one byte every
half second keeps a request alive for ever; and `read()` takes the whole body, whatever size the
server claims. This module uses `http.client` directly and adds what is missing:

* Deadline. Each attempt — connect, TLS handshake, sending, status line, headers, body and any
  redirect hops — has ONE wall-clock deadline (`timeout` seconds). Before every socket
  operation the socket timeout is set to the time left, and an operation that starts after
  the deadline fails at once. (Name resolution is the one step that cannot be bounded.)
* Size. A 2xx body is read in 64 KiB pieces and refused as soon as it passes
  `MAX_RESPONSE_BYTES` (4 MiB; a chat answer is a few kB), or before reading when its
  Content-Length already claims more. Error bodies (4xx/5xx) are read to `MAX_ERROR_BYTES`
  (64 KiB) only, for the message. Header lines and their number are bounded by http.client
  (64 KiB a line, 100 lines). Only `Accept-Encoding: identity` is asked for, so nothing is
  inflated.
* Redirects. 307/308 (which keep the method and body) are followed only within the same
  origin — scheme, host and port — at most `MAX_REDIRECTS` times, with the same headers.
  301/302/303 (which clients turn into a GET) and any redirect to another origin are refused
  with an error naming both URLs: the API key and the images are sent only where the user
  pointed the judge.
* Proxies: http_proxy / https_proxy / no_proxy are honoured as urllib honours them (plain HTTP
  through the proxy, HTTPS through a CONNECT tunnel); the proxy itself is trusted configuration.

Every failure is a `TransportError` (its text does not repeat the URL given to `post`; the
caller names it) whose text went through the caller's `scrub` before any truncation (a key cut in half by a 300-character snippet would still leak its first half).
"""

from __future__ import annotations

import base64
import http.client
import io
import socket
import ssl
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Callable

MAX_RESPONSE_BYTES = 4 << 20
MAX_ERROR_BYTES = 64 << 10
MAX_REDIRECTS = 3
_PIECE = 64 << 10
_DEFAULT_PORTS = {"http": 80, "https": 443}
_REDIRECTS = {301, 302, 303, 307, 308}
USER_AGENT = "lorarar-judge"

Scrub = Callable[[str], str]


class TransportError(Exception):
    """One attempt failed. `retryable`: worth another attempt (timeouts, refused, resets)."""

    def __init__(self, message: str, retryable: bool):
        super().__init__(message)
        self.retryable = retryable


@dataclass
class Response:
    status: int
    headers: http.client.HTTPMessage
    body: bytes  # complete for 2xx (≤ MAX_RESPONSE_BYTES); the first MAX_ERROR_BYTES otherwise
    url: str  # after any same-origin redirects


class Deadline:
    def __init__(self, seconds: float):
        self.seconds = seconds
        self._end = time.monotonic() + seconds

    def left(self) -> float:
        """Seconds left; raises TimeoutError once the deadline has passed."""
        remaining = self._end - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no complete answer within the {self.seconds:g} s deadline")
        return remaining


class _DeadlineReader(io.RawIOBase):
    """The socket's raw reader, with the socket timeout reset to the time left before each read,
    so http.client's header and body parsing can never outlive the deadline."""

    def __init__(self, sock, deadline: Deadline):
        self._sock = sock
        self._raw = sock.makefile("rb", buffering=0)
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int | None:
        self._sock.settimeout(self._deadline.left())
        return self._raw.readinto(buffer)

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


class _DeadlineSocket:
    """What http.client sees as its socket once connected: sendall and makefile honour the
    deadline; everything else goes to the real (plain or TLS) socket."""

    def __init__(self, sock, deadline: Deadline):
        self._sock = sock
        self._deadline = deadline

    def sendall(self, data) -> None:
        view = memoryview(data).cast("B")
        # In pieces: a TLS socket's sendall waits up to the timeout per internal send, so one
        # big sendall could outlast the deadline against a server that reads very slowly.
        for start in range(0, len(view), _PIECE):
            self._sock.settimeout(self._deadline.left())
            self._sock.sendall(view[start:start + _PIECE])

    def makefile(self, mode="rb", *args, **kwargs):
        return io.BufferedReader(_DeadlineReader(self._sock, self._deadline))

    def close(self) -> None:
        self._sock.close()

    def __getattr__(self, name):
        return getattr(self._sock, name)


class _DeadlineMixin:
    def __init__(self, host: str, port: int, *, deadline: Deadline, **kwargs):
        super().__init__(host, port, timeout=deadline.left(), **kwargs)
        self._deadline = deadline

    def connect(self) -> None:
        # The TCP connect and the TLS handshake (each bounded as a whole by the socket
        # timeout) get what is left; then every read and write is bounded by the wrapper.
        self.timeout = self._deadline.left()
        super().connect()
        self.sock = _DeadlineSocket(self.sock, self._deadline)


class _HTTPConnection(_DeadlineMixin, http.client.HTTPConnection):
    pass


class _HTTPSConnection(_DeadlineMixin, http.client.HTTPSConnection):
    pass


@dataclass(frozen=True)
class _Target:
    scheme: str
    host: str
    port: int
    path: str  # path and query, as sent in the request line

    @property
    def origin(self) -> tuple[str, str, int]:
        return self.scheme, self.host, self.port

    @property
    def netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == _DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.netloc}{self.path}"


def parse_url(url: str) -> _Target:
    """Split an http(s) URL; ValueError (with the reason) for anything this client won't send to."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise ValueError(f"expected an http:// or https:// URL, found {url!r}")
    if not parts.hostname:
        raise ValueError(f"expected a host name in {url!r}")
    if parts.username is not None or parts.password is not None:
        raise ValueError("user:password@ in the URL is not supported; give the key by its "
                         "environment variable or key file")
    port = parts.port  # ValueError for a port that is not a number in 0..65535
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    if any(ord(c) <= 0x20 or ord(c) >= 0x7F for c in path + parts.hostname):
        raise ValueError(f"expected an ASCII URL without spaces or control characters, found {url!r}")
    return _Target(scheme, parts.hostname.lower(), port or _DEFAULT_PORTS[scheme], path)


def _proxy_for(target: _Target) -> urllib.parse.SplitResult | None:
    """The proxy urllib would use for this target (environment, no_proxy honoured), if any."""
    proxy = urllib.request.getproxies().get(target.scheme)
    if not proxy or urllib.request.proxy_bypass(f"{target.host}:{target.port}"):
        return None
    return urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)


def _connection(target: _Target, deadline: Deadline, headers: dict) -> tuple[http.client.HTTPConnection, str]:
    """(connection, request target); proxy headers are added to `headers` where needed."""
    proxy = _proxy_for(target)
    if proxy is None:
        cls = _HTTPSConnection if target.scheme == "https" else _HTTPConnection
        return cls(target.host, target.port, deadline=deadline), target.path
    proxy_headers = {}
    if proxy.username is not None:
        user = urllib.parse.unquote(proxy.username)
        password = urllib.parse.unquote(proxy.password or "")
        token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        proxy_headers["Proxy-Authorization"] = f"Basic {token}"
    proxy_port = proxy.port or 8080
    if target.scheme == "http":  # absolute-form request through a forward proxy
        headers.update(proxy_headers)
        return _HTTPConnection(proxy.hostname, proxy_port, deadline=deadline), target.url
    connection = _HTTPSConnection(proxy.hostname, proxy_port, deadline=deadline)
    connection.set_tunnel(target.host, target.port, headers=proxy_headers)
    return connection, target.path


def _read_body(response: http.client.HTTPResponse, limit: int, deadline: Deadline) -> bytes | None:
    """Up to `limit` bytes of body; None if the body is (or claims to be) larger."""
    if response.length is not None and response.length > limit:
        return None
    body = bytearray()
    while True:
        deadline.left()  # also between pieces: http.client may parse chunk framing in between
        piece = response.read(min(_PIECE, limit + 1 - len(body)))
        if not piece:
            return bytes(body)
        body += piece
        if len(body) > limit:
            return None


def _exchange(target: _Target, data: bytes, headers: dict, deadline: Deadline) -> tuple[int, http.client.HTTPMessage, bytes | None]:
    headers = dict(headers)
    connection, request_target = _connection(target, deadline, headers)
    try:
        connection.request("POST", request_target, body=data, headers=headers)
        response = connection.getresponse()
        try:
            if response.status in _REDIRECTS:
                body = b""  # never read: the Location header is all that matters
            elif 200 <= response.status < 300:
                body = _read_body(response, MAX_RESPONSE_BYTES, deadline)
            else:
                body = response.read(MAX_ERROR_BYTES)  # the message only; the rest is dropped
            return response.status, response.headers, body
        finally:
            response.close()
    finally:
        connection.close()


def _redirect_target(current: _Target, first: _Target, status: int, location: str | None,
                     scrub: Scrub) -> _Target:
    """The next hop for a 307/308 within the origin; TransportError for every other redirect.
    Messages name the redirect's target (and the hop, when it is not the configured URL); the
    caller puts the configured URL in front."""
    where = "" if current == first else f" (from {scrub(current.url)[:300]})"
    if not location:
        raise TransportError(f"HTTP {status} redirect without a Location header{where}", False)
    absolute = urllib.parse.urljoin(current.url, location.strip()).split("#", 1)[0]
    shown = scrub(absolute)[:300]
    try:
        target = parse_url(absolute)
    except ValueError:
        raise TransportError(f"HTTP {status} redirect to {shown!r}{where} refused: not a "
                             "usable http(s) URL", False) from None
    if target.origin != first.origin:
        raise TransportError(
            f"HTTP {status} redirect to {shown}{where} refused: it leads to another origin "
            "(scheme, host or port), and the API key and images go only to the judge URL you "
            "configured; if you trust that server, set the judge URL to it", False)
    if status not in (307, 308):
        raise TransportError(
            f"HTTP {status} redirect to {shown}{where} refused: following it would turn this "
            "POST into a GET and drop the question; set the judge URL to the redirect's target",
            False)
    return target


def post(url: str, data: bytes, headers: dict, timeout: float, scrub: Scrub) -> Response:
    """POST `data` to `url` within `timeout` seconds in all (see the module docstring)."""
    deadline = Deadline(timeout)
    target = first = parse_url(url)
    headers = {**headers, "User-Agent": USER_AGENT, "Connection": "close"}
    for _ in range(MAX_REDIRECTS + 1):
        problem = None
        try:
            status, response_headers, body = _exchange(target, data, headers, deadline)
        except ssl.SSLCertVerificationError as exc:
            problem = (f"TLS certificate not accepted: {exc.verify_message or exc}", False)
        except (TimeoutError, socket.timeout):
            # The deadline's own check or a socket timeout set to the time left: the same thing.
            problem = (f"timed out: no complete answer within the {timeout:g} s deadline", True)
        except (OSError, http.client.HTTPException) as exc:
            # refused, reset, TLS errors, broken status lines, over-long header lines, …
            problem = (f"{type(exc).__name__}: {exc}", True)
        except ValueError as exc:
            # http.client refusing to send something, e.g. a redirect path it cannot encode
            problem = (f"{type(exc).__name__}: {exc}", False)
        where = "" if target == first else f" (at {scrub(target.url)[:300]})"
        if problem is not None:
            raise TransportError(scrub(problem[0])[:600] + where, problem[1])
        if status in _REDIRECTS:
            target = _redirect_target(target, first, status, response_headers.get("Location"), scrub)
            continue
        if body is None:
            raise TransportError(
                f"response body larger than the {MAX_RESPONSE_BYTES >> 20} MiB limit (a judge's "
                f"answer is a few kB){where}; refused", False)
        return Response(status, response_headers, body, target.url)
    raise TransportError(f"more than {MAX_REDIRECTS} redirects; refused", False)
