"""A real loopback HTTP judge server for the tests and the benchmark.

It speaks both OpenAI's POST /v1/chat/completions and Ollama's POST /api/chat, records every
request (path, headers, JSON body) and answers from a script: a function that receives the
decoded request and returns a `Reply` (status, answer text, delay, headers, raw body).

`colour_judge` is a deterministic "vision model": generated test images have the subject's
colour on the left half and the style's colour on the right half; references are plain
colours. A content question is answered Yes when the reference colour matches the left half,
a style question when the style colour matches the right half — so verdicts depend on the
pixels that actually travelled over HTTP.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from PIL import Image


@dataclass
class Reply:
    text: str | None = "Yes"
    status: int = 200
    delay: float = 0.0
    headers: dict = field(default_factory=dict)
    raw: bytes | None = None  # send these bytes as the body instead of a JSON answer


@dataclass
class Seen:
    path: str
    headers: dict
    body: dict
    method: str = "POST"

    @property
    def protocol(self) -> str:
        return "ollama" if self.path == "/api/chat" else "openai"

    @property
    def prompt(self) -> str:
        message = self.body["messages"][0]
        if self.protocol == "ollama":
            return message["content"]
        return next(p["text"] for p in message["content"] if p["type"] == "text")

    @property
    def images(self) -> list[Image.Image]:
        message = self.body["messages"][0]
        if self.protocol == "ollama":
            encoded = message["images"]
        else:
            prefix = "data:image/png;base64,"
            encoded = [p["image_url"]["url"][len(prefix):] for p in message["content"]
                       if p["type"] == "image_url"]
        return [Image.open(io.BytesIO(base64.b64decode(e))).convert("RGB") for e in encoded]


Script = Callable[[Seen], Reply]


def _close(a, b, tolerance=24) -> bool:
    return all(abs(x - y) <= tolerance for x, y in zip(a, b))


def colour_judge(seen: Seen) -> Reply:
    reference, generated = seen.images
    ref_colour = reference.getpixel((reference.width // 2, reference.height // 2))
    x = generated.width // 4 if "same subject" in seen.prompt else 3 * generated.width // 4
    same = _close(ref_colour, generated.getpixel((x, generated.height // 2)))
    return Reply("Yes, it matches." if same else "**No**")


class _Server(ThreadingHTTPServer):
    # The stdlib default listen backlog is 5: with more simultaneous connects the kernel drops
    # SYNs and clients stall for a 1 s retransmit. Real model servers use ~2048.
    request_queue_size = 256


class JudgeServer:
    def __init__(self, script: Script = colour_judge):
        self.script = script
        self.requests: list[Seen] = []
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output quiet
                pass

            def do_GET(self):
                # Recorded and answered like a POST, so a client that wrongly turns a redirected
                # POST into a GET gets an answer — and the test sees the GET it should not send.
                self.do_POST()

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length)) if length else {}
                seen = Seen(self.path, dict(self.headers), body, self.command)
                with server.lock:
                    server.requests.append(seen)
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    reply = server.script(seen)
                    if reply.delay:
                        time.sleep(reply.delay)
                finally:
                    # Counted down before answering: once the client has the answer it may send
                    # its next request before this thread would reach a later decrement.
                    with server.lock:
                        server.in_flight -= 1
                try:
                    self._send(seen, reply)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and hung up

            def _send(self, seen: Seen, reply: Reply):
                if reply.raw is not None:
                    payload = reply.raw
                elif reply.status != 200:
                    payload = json.dumps({"error": {"message": f"scripted {reply.status}"}}).encode()
                elif seen.protocol == "ollama":
                    payload = json.dumps({"model": seen.body.get("model"), "done": True,
                                          "message": {"role": "assistant", "content": reply.text}}).encode()
                else:
                    payload = json.dumps({"object": "chat.completion", "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": reply.text},
                         "finish_reason": "stop"}]}).encode()
                self.send_response(reply.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = _Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> "JudgeServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def refused_url() -> str:
    """A loopback URL on which nothing listens (connection refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"
