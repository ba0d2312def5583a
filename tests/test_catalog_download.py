"""The opt-in checkpoint download against misbehaving servers on loopback: every failure is one
HypernetError naming the URL, a dripping server is cut at the deadline, nothing is left behind."""

from __future__ import annotations

import http.server
import socket
import threading
import time

import pytest

from hypernet import catalog
from hypernet.errors import HypernetError

ENTRY = catalog.CatalogEntry(
    name="tiny", title="a tiny test file", file="tiny.bin", url="http://127.0.0.1:9/tiny.bin",
    sha256="0" * 64, bytes=1000, license="test", license_url="", base_family="sdxl", widths=(640,))


class _Handler(http.server.BaseHTTPRequestHandler):
    mode = "404"

    def do_GET(self):  # noqa: N802 (http.server's naming)
        if self.mode == "404":
            self.send_error(404, "Not Found")
        elif self.mode == "drip":
            self.send_response(200)
            self.send_header("Content-Length", str(ENTRY.bytes))
            self.end_headers()
            try:
                for _ in range(ENTRY.bytes):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.05)
            except OSError:
                pass  # the client gave up, as it should

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_refused_connection_and_http_errors_are_hypernet_errors(server, tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}/tiny.bin"
    with pytest.raises(HypernetError, match=r"127\.0\.0\.1.*download of tiny\.bin failed") as offline:
        catalog.download(ENTRY, tmp_path, accept_license=True, url=url, timeout=2)
    # an offline machine is told how to install the file by hand, and where
    assert f"To install it by hand, download {ENTRY.url}" in str(offline.value)
    assert str(tmp_path / ENTRY.file) in str(offline.value) and ENTRY.sha256 in str(offline.value)
    _Handler.mode = "404"
    url = f"http://127.0.0.1:{server.server_port}/tiny.bin"
    with pytest.raises(HypernetError, match="answered 404"):
        catalog.download(ENTRY, tmp_path, accept_license=True, url=url, timeout=2)
    assert not list(tmp_path.iterdir())


def test_a_dripping_server_is_cut_at_the_deadline(server, tmp_path):
    _Handler.mode = "drip"
    url = f"http://127.0.0.1:{server.server_port}/tiny.bin"
    start = time.monotonic()
    with pytest.raises(HypernetError, match=r"only .* of 1,000 bytes after 1 s"):
        catalog.download(ENTRY, tmp_path, accept_license=True, url=url, timeout=2, deadline=1.0)
    assert time.monotonic() - start < 5  # each byte arrives within the socket timeout: only the deadline stops it
    assert not list(tmp_path.iterdir())
