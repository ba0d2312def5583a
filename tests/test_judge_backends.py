"""MLLM judge backends against real HTTP servers on 127.0.0.1: request shape, retries,
timeouts, errors, API-key handling, and the local transformers backend's error paths."""

from __future__ import annotations

import base64
import io
import json
import logging
import time

import pytest
from PIL import Image

from hypernet.errors import JudgeBackendError, JudgeInputError
from hypernet.judge import BackendConfig, make_backend, prepare, resolve_api_key
from tests.support.judge.server import JudgeServer, Reply, refused_url

KEY = "sk-test-" + "k3y" * 8  # shaped like a real key, so any leak is easy to spot
FAST = dict(backoff=0.01, max_backoff=0.05, timeout=5.0)


def _images():
    reference = prepare(Image.new("RGB", (1024, 768), (200, 10, 10)), "reference")
    generated = prepare(Image.new("RGB", (300, 200), (10, 200, 10)), "generated")
    return reference, generated


def _decode_png(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


@pytest.mark.parametrize("url_tail", ["", "/v1", "/v1/chat/completions"])
def test_openai_request_shape(url_tail, monkeypatch):
    monkeypatch.setenv("JUDGE_TEST_KEY", KEY)
    with JudgeServer(lambda seen: Reply("Yes.")) as server:
        config = BackendConfig("openai", server.url + url_tail, "llava-critic-7b",
                               api_key_env="JUDGE_TEST_KEY", max_tokens=33, **FAST)
        answer = make_backend(config).ask("Same subject?", _images())
    assert answer == "Yes."
    (seen,) = server.requests
    assert seen.path == "/v1/chat/completions"
    assert seen.headers["Authorization"] == f"Bearer {KEY}"
    body = seen.body
    assert body["model"] == "llava-critic-7b" and body["temperature"] == 0.0
    assert body["max_tokens"] == 33 and body["stream"] is False
    (message,) = body["messages"]
    assert message["role"] == "user"
    kinds = [part["type"] for part in message["content"]]
    assert kinds == ["image_url", "image_url", "text"]
    assert message["content"][2]["text"] == "Same subject?"
    urls = [part["image_url"]["url"] for part in message["content"][:2]]
    assert all(u.startswith("data:image/png;base64,") for u in urls)
    first = _decode_png(urls[0].split(",", 1)[1])
    second = _decode_png(urls[1].split(",", 1)[1])
    assert first.size == (512, 384)  # downscaled to ≤512 on the long side
    assert second.size == (300, 200)  # never enlarged
    assert first.convert("RGB").getpixel((5, 5)) == (200, 10, 10)  # reference goes first


def test_ollama_native_request_shape():
    with JudgeServer(lambda seen: Reply("No")) as server:
        config = BackendConfig("ollama", server.url, "llava:13b", max_tokens=20, **FAST)
        answer = make_backend(config).ask("Same style?", _images())
    assert answer == "No"
    (seen,) = server.requests
    assert seen.path == "/api/chat"
    assert "Authorization" not in seen.headers  # no key configured, none sent
    body = seen.body
    assert body["model"] == "llava:13b" and body["stream"] is False
    assert body["options"] == {"temperature": 0.0, "num_predict": 20}
    (message,) = body["messages"]
    assert message["content"] == "Same style?" and len(message["images"]) == 2
    assert _decode_png(message["images"][0]).size == (512, 384)


def test_429_then_ok_honours_retry_after():
    replies = iter([Reply(status=429, headers={"Retry-After": "1"}), Reply("Yes")])
    with JudgeServer(lambda seen: next(replies)) as server:
        config = BackendConfig("openai", server.url, "m", backoff=0.001, max_backoff=5.0)
        started = time.monotonic()
        answer = make_backend(config).ask("q", _images())
        elapsed = time.monotonic() - started
    assert answer == "Yes" and len(server.requests) == 2
    assert elapsed >= 0.95  # waited for Retry-After, not the 1 ms backoff


def test_500_forever_gives_up_after_bounded_retries():
    sleeps = []
    with JudgeServer(lambda seen: Reply(status=500)) as server:
        config = BackendConfig("ollama", server.url, "m", max_retries=3, backoff=0.5, max_backoff=1.5)
        backend = make_backend(config, sleep=sleeps.append)
        with pytest.raises(JudgeBackendError, match=r"gave up after 4 attempt\(s\).*HTTP 500"):
            backend.ask("q", _images())
    assert len(server.requests) == 4
    assert sleeps == [0.5, 1.0, 1.5]  # exponential backoff, capped at max_backoff


def test_4xx_is_not_retried_and_hints_at_the_key(monkeypatch):
    monkeypatch.setenv("JUDGE_TEST_KEY", KEY)
    with JudgeServer(lambda seen: Reply(raw=f'{{"error": "bad key {KEY}"}}'.encode(), status=401)) as server:
        backend = make_backend(BackendConfig("openai", server.url, "m", api_key_env="JUDGE_TEST_KEY", **FAST))
        with pytest.raises(JudgeBackendError, match="HTTP 401.*check the API key") as info:
            backend.ask("q", _images())
    assert len(server.requests) == 1
    assert KEY not in str(info.value) and "***" in str(info.value)  # the echoed key is scrubbed


def test_slow_server_times_out_then_gives_up():
    with JudgeServer(lambda seen: Reply("Yes", delay=1.0)) as server:
        config = BackendConfig("openai", server.url, "m", timeout=0.2, max_retries=1, backoff=0.01)
        started = time.monotonic()
        with pytest.raises(JudgeBackendError, match="gave up after 2 attempt.*timed out"):
            make_backend(config).ask("q", _images())
        assert time.monotonic() - started < 0.9
    assert len(server.requests) == 2


def test_slow_but_within_timeout_is_fine():
    with JudgeServer(lambda seen: Reply("Yes", delay=0.2)) as server:
        answer = make_backend(BackendConfig("ollama", server.url, "m", timeout=2.0)).ask("q", _images())
    assert answer == "Yes"


def test_connection_refused_is_retried_then_reported():
    config = BackendConfig("openai", refused_url(), "m", max_retries=2, **FAST)
    with pytest.raises(JudgeBackendError, match=r"gave up after 3 attempt\(s\).*(refused|Errno)"):
        make_backend(config).ask("q", _images())


@pytest.mark.parametrize("raw, match", [
    (b"<html>oops</html>", "expected a JSON response"),
    (b'{"choices": []}', "unexpected response shape"),
    (b'{"error": {"message": "model not loaded"}}', "model not loaded"),
])
def test_malformed_responses_are_clear_errors(raw, match):
    with JudgeServer(lambda seen: Reply(raw=raw)) as server:
        with pytest.raises(JudgeBackendError, match=match):
            make_backend(BackendConfig("openai", server.url, "m", **FAST)).ask("q", _images())


def test_content_parts_and_null_content_are_read():
    replies = iter([
        Reply(raw=json.dumps({"choices": [{"message": {"content": [{"type": "text", "text": "Yes"}]}}]}).encode()),
        Reply(raw=json.dumps({"choices": [{"message": {"content": None}}]}).encode()),
    ])
    with JudgeServer(lambda seen: next(replies)) as server:
        backend = make_backend(BackendConfig("openai", server.url, "m", **FAST))
        assert backend.ask("q", _images()) == "Yes"
        assert backend.ask("q", _images()) == ""  # → unparseable later, not an exception


def test_key_from_file_plain_and_json(tmp_path):
    plain = tmp_path / "key.txt"
    plain.write_text(f"# judge key\n{KEY}\n")
    as_json = tmp_path / "key.json"
    as_json.write_text(json.dumps({"api_key": KEY}))
    assert resolve_api_key(BackendConfig(api_key_file=str(plain)), environ={}) == KEY
    assert resolve_api_key(BackendConfig(api_key_file=str(as_json)), environ={}) == KEY
    # the variable wins when set; the file is the fallback when it is not
    config = BackendConfig(api_key_env="K", api_key_file=str(plain))
    assert resolve_api_key(config, environ={"K": "from-env"}) == "from-env"
    assert resolve_api_key(config, environ={}) == KEY
    assert resolve_api_key(BackendConfig(), environ={"OPENAI_API_KEY": "x"}) is None


def test_key_errors_name_the_source_and_never_the_key(tmp_path):
    with pytest.raises(JudgeInputError, match="environment variable MISSING_JUDGE_KEY is not set"):
        resolve_api_key(BackendConfig(api_key_env="MISSING_JUDGE_KEY"), environ={})
    with pytest.raises(JudgeInputError, match="nope.txt: cannot be read"):
        resolve_api_key(BackendConfig(api_key_file=str(tmp_path / "nope.txt")), environ={})
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# nothing\n")
    with pytest.raises(JudgeInputError, match="found no key"):
        resolve_api_key(BackendConfig(api_key_file=str(empty)), environ={})
    # someone pasted the key itself into the "name of the variable" field
    with pytest.raises(JudgeInputError, match="NAME of an environment variable") as info:
        make_backend(BackendConfig("openai", "http://127.0.0.1:1", "m", api_key_env="sk-abc/def+ghi"))
    assert "sk-abc" not in str(info.value)


@pytest.mark.parametrize("config, match", [
    (BackendConfig("grpc", "http://x", "m"), "protocol: expected one of"),
    (BackendConfig("openai", "http://x", " "), "model: expected"),
    (BackendConfig("openai", "localhost:8000", "m"), "url: expected http"),
    (BackendConfig("openai", "http://x", "m", concurrency=0), "concurrency ≥ 1"),
])
def test_bad_backend_config(config, match):
    with pytest.raises(JudgeInputError, match=match):
        make_backend(config)


def test_backend_repr_and_describe_hide_the_key(monkeypatch, caplog):
    monkeypatch.setenv("JUDGE_TEST_KEY", KEY)
    caplog.set_level(logging.DEBUG, logger="hypernet")
    replies = iter([Reply(status=503), Reply("Yes")])
    with JudgeServer(lambda seen: next(replies)) as server:
        config = BackendConfig("openai", server.url, "m", api_key_env="JUDGE_TEST_KEY", **FAST)
        backend = make_backend(config)
        backend.ask("q", _images())
    assert KEY not in repr(backend) and KEY not in json.dumps(config.describe())
    assert "retry 1" in caplog.text and KEY not in caplog.text


def test_transformers_backend_missing_folder(tmp_path):
    with pytest.raises(JudgeInputError, match=r"config\.json at .*no-model.*found nothing"):
        make_backend(BackendConfig("transformers", model=str(tmp_path / "no-model")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(JudgeInputError, match="found a folder without it"):
        make_backend(BackendConfig("transformers", model=str(tmp_path / "empty")))


def test_transformers_backend_missing_package(tmp_path):
    import importlib.util

    if importlib.util.find_spec("transformers") is not None:
        pytest.skip("transformers is installed here; the missing-package path cannot be shown")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(JudgeBackendError, match=r"'transformers' package is not installed.*local-judge"):
        make_backend(BackendConfig("transformers", model=str(tmp_path)))


def test_retry_after_http_date_and_garbage():
    import email.utils

    from hypernet.judge.backends import _retry_after_seconds

    soon = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 28 <= _retry_after_seconds(soon) <= 30
    assert _retry_after_seconds("2") == 2.0
    assert _retry_after_seconds("soon-ish") is None and _retry_after_seconds(None) is None


def test_ollama_sends_key_from_file(tmp_path):
    key_file = tmp_path / "key.txt"
    key_file.write_text(KEY + "\n")
    with JudgeServer(lambda seen: Reply("Yes")) as server:
        make_backend(BackendConfig("ollama", server.url, "m", api_key_file=str(key_file), **FAST)).ask("q", _images())
    assert server.requests[0].headers["Authorization"] == f"Bearer {KEY}"


def test_concurrency_limit_is_reached_and_respected():
    from hypernet.judge.protocol import Question
    from hypernet.judge.runner import ask_all

    reference, generated = _images()
    questions = [Question(0, "content", f"question {i}", (reference, generated)) for i in range(12)]
    with JudgeServer(lambda seen: Reply(seen.prompt.upper(), delay=0.1)) as server:
        backend = make_backend(BackendConfig("openai", server.url, "m", concurrency=4, **FAST))
        started = time.monotonic()
        answers, asked = ask_all(questions, backend)
        elapsed = time.monotonic() - started
    assert answers == [f"QUESTION {i}" for i in range(12)] and asked == 12  # order kept
    assert server.max_in_flight == 4
    assert elapsed < 0.1 * 12 / 2  # ran in parallel (ideal: 3 rounds of 0.1 s)


def test_transformers_backend_runs_a_tiny_local_model(tmp_path):
    pytest.importorskip("transformers", reason="optional extra 'local-judge' not installed")
    from hypernet.judge import judge
    from hypernet.judge.protocol import ImageJob
    from tests.support.judge.tiny_vlm import build_tiny_llava

    folder = build_tiny_llava(tmp_path / "tiny-llava")
    backend = make_backend(BackendConfig("transformers", model=str(folder), max_tokens=4, concurrency=8))
    assert backend.max_concurrency == 1  # one model, one device: questions run one at a time
    reference, generated = _images()
    answer = backend.ask("same subject yes no", (reference, generated))
    assert isinstance(answer, str) and answer  # random words from the tiny vocabulary
    result = judge([ImageJob("m", "dog", "ink", generated, [reference], reference)], backend)
    (record,) = result.records
    vote = record["checks"]["content"]["votes"][0]
    assert vote["answer"] == backend.ask(vote["question"], (reference, generated))  # greedy: repeatable
    assert result.questions == 2 and result.asked == 2
