"""A loopback OpenAI-compatible vision "model" backed by the testbed's classifiers.

It answers POST /v1/chat/completions the way a multimodal LLM would answer the judge's
questions (hypernet/judge/protocol.py): the request carries the reference image first and the
generated image second; a content question ("… the same subject …") is answered Yes when the
judges name the same world subject in both images, a style question when they name the same world
style (an image they cannot recognise, or that shows no world subject / style, is never "the
same"). So
`python -m hypernet judge --url <this server>/v1` exercises the whole judge code (layout, HTTP,
parsing, voting, reports) against a real, if small, vision model, and must reproduce the
accuracies of classifying the generated images directly. It binds 127.0.0.1 only.
"""

from __future__ import annotations

import base64
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image

from . import world as W
from .judges import Judges


def _images(body: dict) -> list[np.ndarray]:
    out = []
    for part in body["messages"][0]["content"]:
        if isinstance(part, dict) and part.get("type") == "image_url":
            url = part["image_url"]["url"]
            data = base64.b64decode(url.split(",", 1)[1])
            with Image.open(io.BytesIO(data)) as im:
                im = im.convert("RGB")
                if im.size != (32, 32):
                    im = im.resize((32, 32), Image.Resampling.BOX)
                out.append(np.asarray(im))
    return out


def _prompt(body: dict) -> str:
    content = body["messages"][0]["content"]
    if isinstance(content, str):
        return content
    return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")


class ClassifierJudgeServer:
    """Context manager; `.url` is the base URL to give the judge (`…/v1`)."""

    def __init__(self, judges: Judges, world: W.World, port: int = 0):
        self.judges = judges
        self.world = world
        self.subjects = {x.name for x in world.subjects}
        self.styles = {x.name for x in world.styles}
        self.requests = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                try:
                    body = json.loads(self.rfile.read(length))
                    answer = server.answer(body)
                    payload = json.dumps({"object": "chat.completion", "model": body.get("model", "testbed"),
                                          "choices": [{"index": 0, "finish_reason": "stop",
                                                       "message": {"role": "assistant", "content": answer}}]})
                    status = 200
                except (KeyError, IndexError, ValueError, OSError) as exc:
                    payload, status = json.dumps({"error": {"message": f"bad request: {exc}"}}), 400
                data = payload.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def answer(self, body: dict) -> str:
        prompt = _prompt(body).lower()
        images = _images(body)
        if len(images) != 2:
            raise ValueError(f"expected 2 images (reference, generated), got {len(images)}")
        with self.lock:  # one judge at a time: torch's threads are shared by the whole process
            self.requests += 1
            subjects, styles = self.judges.classify(np.stack(images), self.world)
        labels, known = (subjects, self.subjects) if "same subject" in prompt else (styles, self.styles)
        return "Yes" if labels[0] == labels[1] and labels[0] in known else "No"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> "ClassifierJudgeServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
