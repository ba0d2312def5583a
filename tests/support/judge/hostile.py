"""A raw-socket loopback HTTP server that misbehaves on purpose, for the judge's hostile tests
and `benchmarks/bench_judge_hostile.py`.

`JudgeServer` (server.py) is a well-behaved stdlib server; this one writes whatever bytes a
behaviour function chooses, at whatever pace: headers or bodies dripped one byte at a time, a
Content-Length of 1 GiB streamed for real, endless chunked bodies, broken status lines, deep
JSON. Each connection reads one request (headers + Content-Length body), records it, then runs
`behaviour(conn, request, stop)`; the client hanging up ends the behaviour quietly.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
from dataclasses import dataclass
from typing import Callable

GIB = 1 << 30


@dataclass
class RawRequest:
    method: str
    path: str
    headers: dict  # lower-cased names
    body: bytes


Behaviour = Callable[[socket.socket, RawRequest, threading.Event], None]


def http_response(status: int = 200, body: bytes = b"", headers: dict | None = None,
                  reason: str = "X", content_length: int | None = None) -> bytes:
    """Status line + headers (+ Content-Length unless told otherwise) + body, as bytes."""
    lines = [f"HTTP/1.1 {status} {reason}"]
    length = len(body) if content_length is None else content_length
    if length >= 0:
        lines.append(f"Content-Length: {length}")
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def chat_body(answer: str = "Yes") -> bytes:
    return json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode()


def respond(data: bytes) -> Behaviour:
    def behaviour(conn, request, stop):
        conn.sendall(data)
    return behaviour


def drip(data: bytes, interval: float, start: int = 0) -> Behaviour:
    """Send data[:start] at once, then the rest one byte every `interval` seconds."""
    def behaviour(conn, request, stop):
        conn.sendall(data[:start])
        for index in range(start, len(data)):
            if stop.wait(interval):
                return
            conn.sendall(data[index:index + 1])
    return behaviour


def drip_forever(prefix: bytes, filler: bytes, interval: float) -> Behaviour:
    """Send `prefix`, then one byte of `filler` (cycled) every `interval` seconds, forever."""
    def behaviour(conn, request, stop):
        conn.sendall(prefix)
        index = 0
        while not stop.wait(interval):
            conn.sendall(filler[index % len(filler):index % len(filler) + 1])
            index += 1
    return behaviour


def huge_body(total: int = GIB, chunked: bool = False, claim: bool = True) -> Behaviour:
    """A valid chat answer followed by `total` bytes of JSON whitespace, sent as fast as the
    client reads: Content-Length (if `claim`), or chunked transfer encoding (if `chunked`)."""
    answer = chat_body("Yes")
    block = b" " * (1 << 16)

    def behaviour(conn, request, stop):
        if chunked:
            conn.sendall(http_response(headers={"Transfer-Encoding": "chunked"}, content_length=-1))
            conn.sendall(b"%x\r\n%s\r\n" % (len(answer), answer))
        else:
            length = len(answer) + total if claim else -1
            conn.sendall(http_response(content_length=length) + answer)
        sent = 0
        while sent < total and not stop.is_set():
            piece = block[:min(len(block), total - sent)]
            conn.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            sent += len(piece)
        if chunked:
            conn.sendall(b"0\r\n\r\n")
    return behaviour


class HostileServer:
    """`tls`: a server-side context to speak HTTPS: the TLS handshake first, then the behaviour.
    `read_request=False`: run the behaviour at once on the raw connection (to misbehave during
    the TLS handshake, say); it then gets None for the request."""

    def __init__(self, behaviour: Behaviour, tls: ssl.SSLContext | None = None,
                 read_request: bool = True):
        self.behaviour = behaviour
        self.tls = tls
        self.read_request = read_request
        self.requests: list[RawRequest] = []
        self.bytes_sent = 0  # over all connections: shows how much of a huge body was taken
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        self._listener.settimeout(0.05)
        self._threads: list[threading.Thread] = []
        self._accept_thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def port(self) -> int:
        return self._listener.getsockname()[1]

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def __enter__(self) -> "HostileServer":
        self._accept_thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self._accept_thread.join(5)
        self._listener.close()
        for thread in self._threads:
            thread.join(5)

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        try:
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
            if not self.read_request:
                self.behaviour(_Counting(conn, self), None, self.stop)
                return
            request = _read_request(conn)
            if request is not None:
                self.requests.append(request)
                self.behaviour(_Counting(conn, self), request, self.stop)
        except (OSError, ValueError):
            pass  # the client gave up and hung up (or refused our certificate): as intended
        finally:
            conn.close()


class _Counting:
    def __init__(self, conn: socket.socket, server: HostileServer):
        self._conn, self._server = conn, server

    def sendall(self, data: bytes) -> None:
        self._conn.sendall(data)
        with self._server._lock:
            self._server.bytes_sent += len(data)

    def __getattr__(self, name):
        return getattr(self._conn, name)


def _read_request(conn: socket.socket) -> RawRequest | None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    request_line, *header_lines = head.decode("latin-1").split("\r\n")
    method, path, _ = request_line.split(" ", 2)
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", 0))
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return RawRequest(method, path, headers, body)
