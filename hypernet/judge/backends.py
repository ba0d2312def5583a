"""Judge backends: one method, `ask(prompt, images) -> answer text`.

* "openai": OpenAI-compatible POST /v1/chat/completions with base64 `image_url` parts — vLLM,
  llama.cpp's server, LM Studio, Ollama's /v1, OpenRouter, OpenAI.
* "ollama": Ollama's native POST /api/chat with `images`.
* "transformers": a local vision-language model folder (optional extra `local-judge`; imported
  only when this backend is used).

Secrets: the API key is read from an environment variable (its *name* is configured) or from a
key file (its *path* is configured). The key lives only inside the backend object, goes only
into the Authorization header — and only to the configured origin: transport.py refuses
redirects elsewhere — and every error message and every answer passes through `scrub` first,
so a key the server echoes back reaches no report, cache, log line or exception. A
`BackendConfig` never holds the key, so it is safe to pass through ComfyUI or into reports.

Hostile servers (docs/judge.md, "Security and limits"): each attempt has one wall-clock
deadline (`timeout`), bodies are capped (transport.MAX_RESPONSE_BYTES), and everything a server
can send — broken HTTP, deep or huge JSON, wrong types, bad UTF-8 — ends as JudgeBackendError.
"""

from __future__ import annotations

import email.utils
import importlib.util
import inspect
import json
import logging
import os
import re
import threading
import time
import urllib.parse
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

from ..errors import JudgeBackendError, JudgeInputError
from . import transport
from .images import PreparedImage

log = logging.getLogger(__name__)

PROTOCOLS = ("openai", "ollama", "transformers")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_RETRY_STATUS = {429, 500, 502, 503, 504}


@dataclass(frozen=True)
class BackendConfig:
    """Everything needed to reach a judge model — except the key itself (see module doc)."""

    protocol: str = "openai"
    url: str = ""
    model: str = ""
    api_key_env: str = ""  # NAME of the environment variable holding the key
    api_key_file: str = ""  # path of a file holding the key (plain text or {"api_key": …})
    timeout: float = 120.0  # wall-clock seconds per attempt: the whole exchange, redirects included
    max_retries: int = 4  # extra attempts after the first, on 429/5xx/timeouts/refused
    backoff: float = 1.0  # first retry delay in seconds; doubles each retry
    max_backoff: float = 60.0  # ceiling for one delay, Retry-After included
    temperature: float = 0.0  # 0 = greedy, as in the paper
    max_tokens: int = 128
    concurrency: int = 4  # requests in flight at once

    def describe(self) -> dict:
        """JSON-safe description for reports: names where the key comes from, never the key."""
        return asdict(self)


class Backend(Protocol):
    config: BackendConfig
    max_concurrency: int

    def ask(self, prompt: str, images: Sequence[PreparedImage]) -> str: ...


def check_config(config: BackendConfig) -> BackendConfig:
    if config.protocol not in PROTOCOLS:
        raise JudgeInputError(
            f"judge backend protocol: expected one of {', '.join(PROTOCOLS)}, found {config.protocol!r}"
        )
    if not config.model.strip():
        raise JudgeInputError("judge backend model: expected a model name (or folder), found none")
    if config.protocol != "transformers":
        if not re.match(r"^https?://", config.url.strip(), re.IGNORECASE):
            raise JudgeInputError(
                f"judge backend url: expected http(s)://host:port[/v1], found {config.url!r}"
            )
        try:
            transport.parse_url(config.url.strip())
        except ValueError as exc:
            raise JudgeInputError(f"judge backend url: {exc}") from None
    if config.api_key_env and not _ENV_NAME.match(config.api_key_env):
        # Never echo the value: someone may have pasted the key itself into this field.
        raise JudgeInputError(
            "judge backend api_key_env: expected the NAME of an environment variable (letters, "
            "digits, _), not the key itself; remove the key from the field and set the variable"
        )
    if config.timeout <= 0 or config.max_retries < 0 or config.concurrency < 1:
        raise JudgeInputError(
            "judge backend: expected timeout > 0, max_retries ≥ 0 and concurrency ≥ 1, found "
            f"{config.timeout}, {config.max_retries}, {config.concurrency}"
        )
    return config


def resolve_api_key(config: BackendConfig, environ: dict | None = None) -> str | None:
    """The key from the named environment variable, else from the key file, else None."""
    environ = os.environ if environ is None else environ
    if config.api_key_env:
        value = environ.get(config.api_key_env, "").strip()
        if value:
            return _check_key(value, f"environment variable {config.api_key_env}")
        if not config.api_key_file:
            raise JudgeInputError(
                f"judge API key: environment variable {config.api_key_env} is not set or empty"
            )
    if config.api_key_file:
        return _check_key(_read_key_file(Path(config.api_key_file).expanduser()), config.api_key_file)
    return None


def _check_key(key: str, source: str) -> str:
    # A header value with a newline or non-ASCII text would be refused by http.client (or,
    # worse, split into two headers); say so here, naming where the key came from, not the key.
    if not re.fullmatch(r"[\x21-\x7e]+", key):
        raise JudgeInputError(
            f"judge API key from {source}: expected printable ASCII without spaces, found other "
            "characters (a second word, a non-ASCII letter or a control character)"
        )
    return key


def _read_key_file(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise JudgeInputError(f"judge API key file {path}: cannot be read ({exc.strerror})") from exc
    if text.lstrip().startswith("{"):
        try:
            key = json.loads(text).get("api_key", "")
        except (json.JSONDecodeError, AttributeError):
            key = ""
    else:
        lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
        key = lines[0] if lines else ""
    if not isinstance(key, str) or not key.strip():
        raise JudgeInputError(
            f"judge API key file {path}: expected the key on its first line or "
            '{"api_key": "…"}, found no key'
        )
    return key.strip()


def make_backend(config: BackendConfig, sleep: Callable[[float], None] = time.sleep) -> Backend:
    check_config(config)
    if config.protocol == "transformers":
        return TransformersBackend(config)
    api_key = resolve_api_key(config)
    cls = OpenAIBackend if config.protocol == "openai" else OllamaBackend
    return cls(config, api_key, sleep)


class HttpBackend:
    """Shared HTTP machinery: JSON POST (transport.py), bounded retries with backoff, strict
    reading of the answer, key scrubbing.

    Worst case for one question: (max_retries + 1) attempts of at most `timeout` seconds each
    (one wall-clock deadline per attempt), plus the backoff sleeps (each ≤ max_backoff), and at
    most MAX_RESPONSE_BYTES of body in memory at a time. Answers that cannot get better by
    asking again — malformed or oversized bodies, refused redirects, 4xx — are not retried.
    """

    path_suffix = ""

    def __init__(self, config: BackendConfig, api_key: str | None, sleep=time.sleep):
        self.config = config
        self.max_concurrency = config.concurrency
        self._api_key = api_key
        # The key as a server might echo it: verbatim, JSON-escaped, percent-encoded.
        self._key_forms = sorted(
            {api_key, json.dumps(api_key)[1:-1], urllib.parse.quote(api_key, safe="")} if api_key else (),
            key=len, reverse=True)
        self._sleep = sleep
        self.endpoint = self._endpoint(config.url.strip().rstrip("/"))

    def __repr__(self) -> str:  # never show the key, even in a debugger or traceback
        return f"{type(self).__name__}({self.endpoint!r}, model={self.config.model!r})"

    def scrub(self, text: str) -> str:
        """`text` with every form of the key replaced by ***. Scrub first, truncate after."""
        for form in self._key_forms:
            text = text.replace(form, "***")
        return text

    def ask(self, prompt: str, images: Sequence[PreparedImage]) -> str:
        body = self._post(json.dumps(self.payload(prompt, images)).encode("utf-8"))
        payload = _parse_json(body)
        if payload is _NOT_JSON:
            raise JudgeBackendError(f"{self.endpoint}: expected a JSON response, got {self._snippet(body, 200)!r}")
        if isinstance(payload, dict) and payload.get("error"):
            raise JudgeBackendError(f"{self.endpoint}: server error {_error_text(payload, body, self.scrub)}")
        answer = self.extract(payload)
        if not isinstance(answer, str):  # `answer` is a description of what was wrong
            raise JudgeBackendError(
                f"{self.endpoint}: unexpected response shape ({answer.problem}); got {self._snippet(body, 300)}")
        # Lone surrogates ("\ud800" is valid JSON) cannot be written as UTF-8 to the cache or a
        # report; an echoed key must not reach either.
        return self.scrub(answer.encode("utf-8", "replace").decode("utf-8"))

    def _snippet(self, body: bytes, length: int) -> str:
        return self.scrub(body.decode("utf-8", "replace"))[:length]

    def _post(self, data: bytes) -> bytes:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        attempts = self.config.max_retries + 1
        for attempt in range(attempts):
            retry_after = None
            try:
                response = transport.post(self.endpoint, data, headers, self.config.timeout, self.scrub)
            except transport.TransportError as exc:
                # Only the (scrubbed) text survives: the exception itself is not chained into
                # the error raised below, so nothing the server sent rides along unscrubbed.
                problem, retryable, response = str(exc), exc.retryable, None
            if response is not None:
                if 200 <= response.status < 300:
                    return response.body
                problem = f"HTTP {response.status} {_error_text(None, response.body, self.scrub)!r}"
                retryable = response.status in _RETRY_STATUS
                if not retryable:
                    hint = " (check the API key and its variable/file)" if response.status in (401, 403) else ""
                    raise JudgeBackendError(f"{self.endpoint}: {problem}{hint}")
                retry_after = _retry_after_seconds(response.headers.get("Retry-After"))
            if not retryable:
                raise JudgeBackendError(f"{self.endpoint}: {problem}")
            if attempt + 1 == attempts:
                raise JudgeBackendError(
                    f"{self.endpoint}: gave up after {attempts} attempt(s); last problem: {problem}"
                )
            delay = self.config.backoff * (2**attempt) if retry_after is None else retry_after
            delay = min(delay, self.config.max_backoff)
            log.debug("%s: %s; retry %d in %.2fs", self.endpoint, problem, attempt + 1, delay)
            self._sleep(delay)
        raise AssertionError("unreachable")


_NOT_JSON = object()


def _parse_json(body: bytes):
    """The decoded JSON, or _NOT_JSON. ValueError covers bad syntax, bad UTF-8 and integers past
    Python's 4300-digit limit; RecursionError is what deeply nested arrays/objects raise."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return _NOT_JSON


def _error_text(payload, body: bytes, scrub: Callable[[str], str]) -> str:
    """A short message from an error body: {"error": "…"} or {"error": {"message": "…"}} or
    {"message": "…"} when the server sent one, else the start of the body."""
    if payload is None and len(body) < transport.MAX_ERROR_BYTES:
        payload = _parse_json(body)
    if isinstance(payload, dict):
        error = payload.get("error", payload)
        if isinstance(error, dict):
            error = error.get("message")
        if isinstance(error, str):
            return scrub(error)[:300]
    return scrub(body.decode("utf-8", "replace"))[:300]


@dataclass(frozen=True)
class _Shape:
    problem: str


def _content_text(content, where: str) -> str | _Shape:
    """The answer text from a message's content: a string, null (→ ""), or a list of parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # some servers return content parts
        texts = [p.get("text", "") for p in content if isinstance(p, dict)]
        if all(isinstance(t, str) for t in texts):
            return "".join(texts)
        return _Shape(f"{where}: expected text parts, found a part whose text is not a string")
    return _Shape(f"{where}: expected a string, found {type(content).__name__}")


def _field(value, name: str, expected: type):
    """value[name] when value is a dict and the entry has the expected type, else a _Shape."""
    found = value.get(name) if isinstance(value, dict) else None
    if isinstance(found, expected) and found:
        return found
    what = "nothing" if found is None else type(found).__name__
    if isinstance(found, expected):
        what = "an empty one"
    return _Shape(f"{name}: expected a non-empty {expected.__name__}, found {what}")


def _retry_after_seconds(value: str | None) -> float | None:
    """Retry-After as seconds: either a number or an HTTP date (RFC 9110 §10.2.3). Anything
    else (garbage, NaN, dates no calendar holds) is ignored: the usual backoff applies."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = None
    if seconds is None:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, OverflowError, IndexError):
            return None
    return max(0.0, seconds) if seconds == seconds else None  # NaN ≠ NaN


class OpenAIBackend(HttpBackend):
    def _endpoint(self, url: str) -> str:
        if url.endswith("/chat/completions"):
            return url
        return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")

    def payload(self, prompt: str, images: Sequence[PreparedImage]) -> dict:
        parts = [{"type": "image_url", "image_url": {"url": image.data_uri()}} for image in images]
        parts.append({"type": "text", "text": prompt})
        return {
            "model": self.config.model,
            "messages": [{"role": "user", "content": parts}],
            "temperature": self.config.temperature,
            "max_tokens": self.config.max_tokens,
            "stream": False,
        }

    @staticmethod
    def extract(payload) -> str | _Shape:
        choices = _field(payload, "choices", list)
        if isinstance(choices, _Shape):
            return choices
        message = _field(choices[0], "message", dict)
        if isinstance(message, _Shape):
            return _Shape(f"choices[0].{message.problem}")
        return _content_text(message.get("content"), "choices[0].message.content")


class OllamaBackend(HttpBackend):
    def _endpoint(self, url: str) -> str:
        return url if url.endswith("/api/chat") else url + "/api/chat"

    def payload(self, prompt: str, images: Sequence[PreparedImage]) -> dict:
        return {
            "model": self.config.model,
            "messages": [
                {"role": "user", "content": prompt, "images": [i.png_base64 for i in images]}
            ],
            "stream": False,
            "options": {"temperature": self.config.temperature, "num_predict": self.config.max_tokens},
        }

    @staticmethod
    def extract(payload) -> str | _Shape:
        message = _field(payload, "message", dict)
        if isinstance(message, _Shape):
            return message
        return _content_text(message.get("content"), "message.content")


class TransformersBackend:
    """A local vision-language model (e.g. an HF-format LLaVA-OneVision/LLaVA-Critic folder).

    Generation runs one request at a time (one model, one device), so max_concurrency is 1.
    """

    max_concurrency = 1

    def __init__(self, config: BackendConfig):
        self.config = config
        self.folder = Path(config.model).expanduser()
        if not (self.folder / "config.json").is_file():
            raise JudgeInputError(
                f"local judge model: expected a transformers model folder with config.json at "
                f"{self.folder}, found {'a folder without it' if self.folder.is_dir() else 'nothing'}"
            )
        if importlib.util.find_spec("transformers") is None:
            raise JudgeBackendError(
                "local judge model: the 'transformers' package is not installed; install the "
                "optional extra with: pip install 'lorarar[local-judge]' "
                "(transformers>=4.45 and accelerate)"
            )
        self._lock = threading.Lock()
        self._model = None
        self._processor = None

    def __repr__(self) -> str:
        return f"TransformersBackend({str(self.folder)!r})"

    def _load(self) -> None:
        import torch
        import transformers

        auto_model = getattr(transformers, "AutoModelForImageTextToText", None) or transformers.AutoModelForVision2Seq
        self._processor = transformers.AutoProcessor.from_pretrained(self.folder, local_files_only=True)
        # transformers 4.56 renamed torch_dtype to dtype; older releases only know the old name
        version = tuple(int(p) for p in re.findall(r"\d+", transformers.__version__)[:2])
        kwargs = {"local_files_only": True, ("dtype" if version >= (4, 56) else "torch_dtype"): "auto"}
        if importlib.util.find_spec("accelerate") is not None:
            kwargs["device_map"] = "auto"
        model = auto_model.from_pretrained(self.folder, **kwargs)
        if "device_map" not in kwargs:
            model = model.to("cuda" if torch.cuda.is_available() else "cpu")
        self._model = model.eval()
        self._forward_args = set(inspect.signature(model.forward).parameters)
        log.info("loaded local judge model from %s on %s", self.folder, model.device)

    def ask(self, prompt: str, images: Sequence[PreparedImage]) -> str:
        import torch

        with self._lock:
            if self._model is None:
                self._load()
            content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
            text = self._processor.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=True
            )
            inputs = self._processor(
                images=[i.image for i in images], text=text, return_tensors="pt"
            ).to(self._model.device, self._model.dtype)
            # Some tokenizers add token_type_ids that generate() rejects unless the model
            # (e.g. Gemma 3) actually takes them.
            if "token_type_ids" in inputs and "token_type_ids" not in self._forward_args:
                del inputs["token_type_ids"]
            greedy = self.config.temperature <= 0
            sampling = {} if greedy else {"temperature": self.config.temperature}
            with torch.inference_mode():
                output = self._model.generate(
                    **inputs, do_sample=not greedy, max_new_tokens=self.config.max_tokens, **sampling
                )
            new_tokens = output[:, inputs["input_ids"].shape[1]:]
            return self._processor.batch_decode(new_tokens, skip_special_tokens=True)[0].strip()
