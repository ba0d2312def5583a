"""Judge backends: one method, `ask(prompt, images) -> answer text`.

* "openai": OpenAI-compatible POST /v1/chat/completions with base64 `image_url` parts — vLLM,
  llama.cpp's server, LM Studio, Ollama's /v1, OpenRouter, OpenAI.
* "ollama": Ollama's native POST /api/chat with `images`.
* "transformers": a local vision-language model folder (optional extra `local-judge`; imported
  only when this backend is used).

Secrets: the API key is read from an environment variable (its *name* is configured) or from a
key file (its *path* is configured). The key lives only inside the backend object, goes only
into the Authorization header, and every error message passes through `scrub` first. A
`BackendConfig` never holds the key, so it is safe to pass through ComfyUI or into reports.
"""

from __future__ import annotations

import email.utils
import http.client
import importlib.util
import inspect
import json
import logging
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

from ..errors import JudgeBackendError, JudgeInputError
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
    timeout: float = 120.0  # seconds per request attempt
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
    if config.protocol != "transformers" and not re.match(r"^https?://", config.url.strip()):
        raise JudgeInputError(
            f"judge backend url: expected http(s)://host:port[/v1], found {config.url!r}"
        )
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
            return value
        if not config.api_key_file:
            raise JudgeInputError(
                f"judge API key: environment variable {config.api_key_env} is not set or empty"
            )
    if config.api_key_file:
        return _read_key_file(Path(config.api_key_file).expanduser())
    return None


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
    """Shared HTTP machinery: JSON POST, bounded retries with backoff, key scrubbing."""

    path_suffix = ""

    def __init__(self, config: BackendConfig, api_key: str | None, sleep=time.sleep):
        self.config = config
        self.max_concurrency = config.concurrency
        self._api_key = api_key
        self._sleep = sleep
        self.endpoint = self._endpoint(config.url.strip().rstrip("/"))

    def __repr__(self) -> str:  # never show the key, even in a debugger or traceback
        return f"{type(self).__name__}({self.endpoint!r}, model={self.config.model!r})"

    def scrub(self, text: str) -> str:
        if self._api_key:
            text = text.replace(self._api_key, "***")
        return text

    def ask(self, prompt: str, images: Sequence[PreparedImage]) -> str:
        payload = self._post(json.dumps(self.payload(prompt, images)).encode("utf-8"))
        try:
            return self.extract(payload)
        except (KeyError, IndexError, TypeError) as exc:
            snippet = self.scrub(json.dumps(payload)[:300])
            raise JudgeBackendError(
                f"{self.endpoint}: unexpected response shape ({exc!r}); got {snippet}"
            ) from None

    def _post(self, data: bytes) -> dict:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        attempts = self.config.max_retries + 1
        for attempt in range(attempts):
            request = urllib.request.Request(self.endpoint, data=data, headers=headers, method="POST")
            retry_after = None
            try:
                with urllib.request.urlopen(request, timeout=self.config.timeout) as response:
                    body = response.read()
                return self._decode(body)
            except urllib.error.HTTPError as exc:
                detail = exc.read()[:300].decode("utf-8", "replace")
                problem = f"HTTP {exc.code} {self.scrub(detail)!r}"
                if exc.code not in _RETRY_STATUS:
                    hint = " (check the API key and its variable/file)" if exc.code in (401, 403) else ""
                    raise JudgeBackendError(f"{self.endpoint}: {problem}{hint}") from None
                retry_after = _retry_after_seconds(exc.headers.get("Retry-After"))
            except (urllib.error.URLError, TimeoutError, socket.timeout, ConnectionError,
                    http.client.HTTPException) as exc:
                reason = getattr(exc, "reason", exc)
                problem = f"{type(reason).__name__}: {self.scrub(str(reason))}"
            if attempt + 1 == attempts:
                raise JudgeBackendError(
                    f"{self.endpoint}: gave up after {attempts} attempt(s); last problem: {problem}"
                )
            delay = self.config.backoff * (2**attempt) if retry_after is None else retry_after
            delay = min(delay, self.config.max_backoff)
            log.debug("%s: %s; retry %d in %.2fs", self.endpoint, problem, attempt + 1, delay)
            self._sleep(delay)
        raise AssertionError("unreachable")

    def _decode(self, body: bytes) -> dict:
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            snippet = self.scrub(body[:200].decode("utf-8", "replace"))
            raise JudgeBackendError(f"{self.endpoint}: expected a JSON response, got {snippet!r}") from None
        if isinstance(payload, dict) and payload.get("error"):
            raise JudgeBackendError(f"{self.endpoint}: server error {self.scrub(str(payload['error']))[:300]}")
        return payload


def _retry_after_seconds(value: str | None) -> float | None:
    """Retry-After as seconds: either a number or an HTTP date (RFC 9110 §10.2.3)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


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
    def extract(payload: dict) -> str:
        content = payload["choices"][0]["message"]["content"]
        if isinstance(content, list):  # some servers return content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return content or ""


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
    def extract(payload: dict) -> str:
        return payload["message"]["content"] or ""


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
