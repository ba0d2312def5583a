"""The judge's HTTP client against hostile servers, all real sockets on 127.0.0.1 (issue 9,
items 4 and 5): redirects never carry the key to another origin nor turn the POST into a GET;
each attempt has a wall-clock deadline; bodies are capped; broken HTTP, deep or huge JSON and
wrong types end as JudgeBackendError; a key the server echoes back is scrubbed everywhere."""

from __future__ import annotations

import logging
import random
import time

import pytest
from PIL import Image

from hypernet.errors import JudgeBackendError, JudgeInputError
from hypernet.judge import AnswerCache, BackendConfig, judge, make_backend, prepare, write_outputs
from hypernet.judge.protocol import ImageJob, Question
from hypernet.judge.runner import ask_all
from hypernet.judge.transport import MAX_ERROR_BYTES, MAX_RESPONSE_BYTES
from tests.support.judge.hostile import (
    GIB,
    HostileServer,
    chat_body,
    drip,
    http_response,
    huge_body,
    respond,
)
from tests.support.judge.server import JudgeServer, Reply
from tests.support.judge.tls import make_certificate, server_context

KEY = "sk-hostile-" + "Zq9" * 8
FAST = dict(backoff=0.01, max_backoff=0.02)


@pytest.fixture()
def key_env(monkeypatch):
    monkeypatch.setenv("JUDGE_HOSTILE_KEY", KEY)
    return "JUDGE_HOSTILE_KEY"


def _images():
    return (prepare(Image.new("RGB", (16, 16), (200, 10, 10)), "reference"),
            prepare(Image.new("RGB", (16, 16), (10, 200, 10)), "generated"))


def _backend(url, key_env="", protocol="openai", timeout=5.0, max_retries=0, **kwargs):
    config = BackendConfig(protocol, url, "m", api_key_env=key_env, timeout=timeout,
                           max_retries=max_retries, **{**FAST, **kwargs})
    return make_backend(config)


def _ask(backend):
    return backend.ask("same subject?", _images())


def _no_key_anywhere(error: BaseException) -> None:
    # The message, and nothing chained to it that a logger might print.
    assert KEY not in str(error) and KEY[:10] not in str(error)
    assert error.__cause__ is None and error.__context__ is None


# --- redirects ------------------------------------------------------------------------------

def test_cross_origin_302_is_refused_and_the_other_port_gets_nothing(key_env):
    with JudgeServer(lambda seen: Reply("Yes")) as other:
        target = other.url + "/v1/chat/completions"
        with JudgeServer(lambda seen: Reply(status=302, headers={"Location": target})) as first:
            backend = _backend(first.url, key_env, max_retries=3)
            with pytest.raises(JudgeBackendError, match="redirect to .* refused") as info:
                _ask(backend)
    message = str(info.value)
    assert backend.endpoint in message and target in message  # names the URL and the Location
    assert other.requests == []  # no key, no GET, nothing at all went to the other port
    assert len(first.requests) == 1  # a refused redirect is not retried
    _no_key_anywhere(info.value)


@pytest.mark.parametrize("status", [301, 302, 303])
def test_same_origin_301_302_303_on_a_post_are_errors_not_a_get(status, key_env):
    def script(seen):
        if seen.path == "/v1/chat/completions":
            return Reply(status=status, headers={"Location": "/moved/chat"})
        return Reply("Yes")  # what a GET to the new place would have been answered

    with JudgeServer(script) as server:
        with pytest.raises(JudgeBackendError, match=rf"HTTP {status} redirect to .*/moved/chat.*into a GET"):
            _ask(_backend(server.url, key_env))
    assert [(seen.method, seen.path) for seen in server.requests] == [("POST", "/v1/chat/completions")]


@pytest.mark.parametrize("status", [307, 308])
def test_same_origin_307_308_are_followed_with_the_same_method_body_and_key(status, key_env):
    def script(seen):
        if seen.path == "/v1/chat/completions":
            return Reply(status=status, headers={"Location": "/v2/chat/completions"})
        return Reply("Yes, same.")

    with JudgeServer(script) as server:
        assert _ask(_backend(server.url, key_env)) == "Yes, same."
    first, second = server.requests
    assert (first.method, second.method) == ("POST", "POST")
    assert second.path == "/v2/chat/completions" and second.body == first.body
    assert second.headers["Authorization"] == f"Bearer {KEY}"


@pytest.mark.parametrize("where", ["other port", "other scheme", "other host name"])
def test_307_to_another_origin_is_refused(where, key_env):
    with JudgeServer(lambda seen: Reply("Yes")) as other:
        with JudgeServer(lambda seen: Reply("never")) as server:
            port = server.httpd.server_address[1]
            location = {"other port": other.url + "/v1/chat/completions",
                        "other scheme": f"https://127.0.0.1:{port}/v1/chat/completions",
                        "other host name": f"http://localhost:{port}/v1/chat/completions"}[where]
            server.script = lambda seen: Reply(status=307, headers={"Location": location})
            with pytest.raises(JudgeBackendError, match="another origin") as info:
                _ask(_backend(server.url, key_env))
    assert location in str(info.value)
    assert other.requests == [] and len(server.requests) == 1


def test_redirect_loop_stops_after_a_bounded_number_of_hops():
    with JudgeServer(lambda seen: Reply(status=308, headers={"Location": seen.path})) as server:
        with pytest.raises(JudgeBackendError, match="more than 3 redirects"):
            _ask(_backend(server.url, max_retries=2))
    assert len(server.requests) == 4  # the request and 3 hops; not multiplied by retries


def test_redirect_without_location_or_to_ftp_is_an_error():
    with JudgeServer(lambda seen: Reply(status=307)) as server:
        with pytest.raises(JudgeBackendError, match="without a Location"):
            _ask(_backend(server.url))
    with JudgeServer(lambda seen: Reply(status=307, headers={"Location": "ftp://127.0.0.1/x"})) as server:
        with pytest.raises(JudgeBackendError, match="not a usable http"):
            _ask(_backend(server.url))


# --- deadline -------------------------------------------------------------------------------

def test_headers_dripped_byte_by_byte_are_cut_at_the_deadline():
    # 1 byte every 0.1 s: far under any socket timeout, and 6+ s for the whole answer.
    answer = http_response(body=chat_body("Yes"))
    with HostileServer(drip(answer, 0.1)) as server:
        started = time.monotonic()
        with pytest.raises(JudgeBackendError, match="timed out.*0.3 s deadline"):
            _ask(_backend(server.url, timeout=0.3))
        elapsed = time.monotonic() - started
    assert elapsed < 1.2


def test_body_dripped_byte_by_byte_is_cut_at_the_deadline():
    answer = http_response(body=chat_body("Yes" + " " * 100))
    headers_end = answer.index(b"\r\n\r\n") + 4
    with HostileServer(drip(answer, 0.1, start=headers_end)) as server:
        started = time.monotonic()
        with pytest.raises(JudgeBackendError, match="deadline"):
            _ask(_backend(server.url, timeout=0.3))
        assert time.monotonic() - started < 1.2


def test_retries_of_a_dripping_server_are_bounded_in_total():
    answer = http_response(body=chat_body("Yes"))
    with HostileServer(drip(answer, 0.1)) as server:
        started = time.monotonic()
        with pytest.raises(JudgeBackendError, match="gave up after 3 attempt"):
            _ask(_backend(server.url, timeout=0.25, max_retries=2))
        elapsed = time.monotonic() - started
    assert len(server.requests) == 3
    assert elapsed < 3 * 0.25 + 2 * 0.02 + 0.8  # attempts × deadline + backoffs + slack


def test_endless_100_continue_is_cut_at_the_deadline():
    # http.client skips interim 1xx responses in a loop; only the deadline ends an endless one.
    def behaviour(conn, request, stop):
        while not stop.wait(0.01):
            conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")

    with HostileServer(behaviour) as server:
        started = time.monotonic()
        with pytest.raises(JudgeBackendError, match="0.3 s deadline"):
            _ask(_backend(server.url, timeout=0.3))
        assert time.monotonic() - started < 1.2


def test_a_server_that_never_reads_the_request_is_cut_at_the_deadline():
    # 32 MiB of question cannot fit in the loopback socket buffers: sending blocks.
    server = HostileServer(lambda conn, request, stop: stop.wait(10), read_request=False)
    with server:
        started = time.monotonic()
        with pytest.raises(JudgeBackendError, match="0.3 s deadline"):
            _backend(server.url, timeout=0.3).ask("x" * (32 << 20), _images())
        assert time.monotonic() - started < 2.0  # the deadline + building a 32 MiB request


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    made = make_certificate(tmp_path_factory.mktemp("tls"))
    if made is None:
        pytest.skip("the openssl command line tool is needed to make a test certificate")
    return made


@pytest.fixture()
def trusted(certificate, monkeypatch):
    """A server context for 127.0.0.1 whose certificate the client trusts (via SSL_CERT_FILE,
    which OpenSSL reads whenever a default context loads its CA list)."""
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate[0]))
    return server_context(*certificate)


def test_https_answers_and_the_key_arrive_through_the_deadline_wrapper(trusted, key_env):
    with HostileServer(respond(http_response(body=chat_body("Yes over TLS"))), tls=trusted) as server:
        assert _ask(_backend(server.url, key_env)) == "Yes over TLS"
    assert server.requests[0].headers["authorization"] == f"Bearer {KEY}"


def test_https_body_dripped_is_cut_at_the_deadline(trusted):
    answer = http_response(body=chat_body("Yes" + " " * 100))
    behaviour = drip(answer, 0.1, start=answer.index(b"\r\n\r\n") + 4)
    with HostileServer(behaviour, tls=trusted) as server:
        started = time.monotonic()
        with pytest.raises(JudgeBackendError, match="deadline"):
            _ask(_backend(server.url, timeout=0.3))
        assert time.monotonic() - started < 1.2


def test_tls_handshake_dripped_is_cut_at_the_deadline():
    # A TLS record header claiming a 16 KiB handshake message, then its bytes one at a time:
    # every read returns within any per-read timeout, the handshake never completes.
    record = b"\x16\x03\x03\x40\x00" + bytes(16384)
    server = HostileServer(drip(record, 0.05), read_request=False)
    with server:
        started = time.monotonic()
        with pytest.raises(JudgeBackendError, match="0.3 s deadline"):
            _ask(_backend(server.url.replace("http://", "https://"), timeout=0.3))
        assert time.monotonic() - started < 1.2


def test_untrusted_certificate_is_a_clean_error_and_not_retried(certificate, monkeypatch):
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    with HostileServer(respond(http_response(body=chat_body())), tls=server_context(*certificate)) as server:
        with pytest.raises(JudgeBackendError, match="TLS certificate not accepted.*self.signed"):
            _ask(_backend(server.url, max_retries=2))
    assert server.requests == []


# --- size -----------------------------------------------------------------------------------

def test_content_length_of_a_gibibyte_is_refused_before_reading():
    with HostileServer(huge_body(GIB)) as server:
        with pytest.raises(JudgeBackendError, match="larger than the 4 MiB limit"):
            _ask(_backend(server.url, max_retries=3))
    assert len(server.requests) == 1  # not retried: the next answer would be as big
    assert server.bytes_sent < 64 << 20  # what the socket buffers took, not the gibibyte


@pytest.mark.parametrize("framing", ["chunked", "until close"])
def test_bodies_without_a_length_are_cut_at_the_cap(framing):
    behaviour = huge_body(GIB, chunked=framing == "chunked", claim=False)
    with HostileServer(behaviour) as server:
        with pytest.raises(JudgeBackendError, match="larger than the 4 MiB limit"):
            _ask(_backend(server.url))
    assert MAX_RESPONSE_BYTES < server.bytes_sent < 64 << 20


def test_a_body_just_under_the_cap_is_still_read():
    answer = chat_body("Yes")
    padding = MAX_RESPONSE_BYTES - len(answer)
    with HostileServer(respond(http_response(body=answer + b" " * padding))) as server:
        assert _ask(_backend(server.url)) == "Yes"


def test_huge_error_bodies_are_read_only_for_the_message():
    def behaviour(conn, request, stop):
        conn.sendall(http_response(status=500, content_length=GIB) + b"E" * (1 << 20))
        while not stop.is_set():  # keep offering more until the client hangs up
            conn.sendall(b"E" * (1 << 16))

    with HostileServer(behaviour) as server:
        with pytest.raises(JudgeBackendError, match="gave up after 2 attempt.*HTTP 500") as info:
            _ask(_backend(server.url, max_retries=1))
    assert len(str(info.value)) < 600
    assert server.bytes_sent < 2 * 64 << 20
    assert MAX_ERROR_BYTES < 1 << 20


# --- malformed answers: one error type ------------------------------------------------------

MALFORMED = {
    "deep array": b"[" * 200_000,
    "deep object": b'{"a":' * 100_000,
    "deep but closed": b"[" * 5000 + b"]" * 5000,
    "huge integer": b'{"choices": [{"message": {"content": ' + b"9" * 5000 + b"}}]}",
    "not UTF-8": b'{"choices": [{"message": {"content": "\xff\xfe"}}]}',
    "UTF-16 garbage": b"\xff\xfe{\x00\x00\xd8",
    "empty": b"",
    "null": b"null",
    "a list": b"[1, 2]",
    "a number": b"1e999",
    "choices is a dict": b'{"choices": {"0": {"message": {"content": "Yes"}}}}',
    "choices is a string": b'{"choices": "Yes"}',
    "choice is a list": b'{"choices": [["Yes"]]}',
    "message is a string": b'{"choices": [{"message": "Yes"}]}',
    "content is a number": b'{"choices": [{"message": {"content": 1}}]}',
    "content is a dict": b'{"choices": [{"message": {"content": {"text": "Yes"}}}]}',
    "content part text is a number": b'{"choices": [{"message": {"content": [{"text": 5}]}}]}',
    "error is nested deep": b'{"error": ' + b'{"e": ' * 900 + b"1" + b"}" * 900 + b"}",
    "error is a number": b'{"error": 12345}',
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_bodies_are_one_clean_error_and_not_retried(name):
    with HostileServer(respond(http_response(body=MALFORMED[name]))) as server:
        with pytest.raises(JudgeBackendError) as info:
            _ask(_backend(server.url, max_retries=2))
    assert len(server.requests) == 1
    assert len(str(info.value)) < 800


BROKEN_HTTP = {
    "no status line": b"\r\n\r\n",
    "status line of garbage": b"SPAM 200 OK\r\n\r\n",
    "status code 9999": b"HTTP/1.1 9999 X\r\nContent-Length: 0\r\n\r\n",
    "header line over 64 KiB": b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70_000 + b"\r\n\r\n",
    "over 100 headers": b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 150 + b"\r\n",
    "bad chunk size": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    "body cut short": b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n{\"choices\"",
    "closed at once": b"",
    "negative length": b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n" + chat_body(),
}


@pytest.mark.parametrize("name", sorted(BROKEN_HTTP))
def test_broken_http_is_a_clean_error(name):
    with HostileServer(respond(BROKEN_HTTP[name])) as server:
        try:
            answer = _ask(_backend(server.url, max_retries=1))
        except JudgeBackendError:
            return
    # http.client reads some of these leniently (a negative length as "until close"); then
    # the body must still have been read and checked as usual.
    assert answer == "Yes", name


def test_mutated_responses_raise_only_judge_errors():
    """Fixed-seed fuzz: 300 byte-level mutations of a valid answer (flips, cuts, insertions,
    duplicated spans); each must give an answer string or JudgeBackendError, nothing else."""
    rng = random.Random(9)
    seed = http_response(body=chat_body("Yes, it is the same subject."), headers={"X-Pad": "p" * 40})
    cases = []
    for _ in range(300):
        data = bytearray(seed)
        for _ in range(rng.randint(1, 4)):
            kind = rng.randrange(4)
            at = rng.randrange(len(data))
            if kind == 0:
                data[at] = rng.randrange(256)
            elif kind == 1:
                del data[at:]
            elif kind == 2:
                data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
            else:
                data[at:at] = data[at:at + rng.randint(1, 40)] * rng.randint(2, 50)
        cases.append(bytes(data))
    answers = iter(cases)

    def behaviour(conn, request, stop):
        conn.sendall(next(answers))

    outcomes = {"answer": 0, "error": 0}
    with HostileServer(behaviour) as server:
        backend = _backend(server.url, timeout=2.0)
        for _ in cases:
            try:
                assert isinstance(_ask(backend), str)
                outcomes["answer"] += 1
            except JudgeBackendError:
                outcomes["error"] += 1
    assert outcomes["answer"] + outcomes["error"] == 300 and outcomes["error"] > 50


@pytest.mark.parametrize("value", ["nan", "1e999", "-inf", "Mon, 01 Jan 99999 00:00:00 GMT",
                                   "Tue, 31 Feb 2024 25:61:61 GMT", "\u00ff\u00fe"])
def test_hostile_retry_after_falls_back_to_backoff(value):
    replies = iter([Reply(status=503, headers={"Retry-After": value}), Reply("Yes")])
    sleeps = []
    with JudgeServer(lambda seen: next(replies)) as server:
        config = BackendConfig("openai", server.url, "m", max_retries=1, backoff=0.25, max_backoff=0.5)
        assert make_backend(config, sleep=sleeps.append).ask("q", _images()) == "Yes"
    assert len(sleeps) == 1 and 0.0 <= sleeps[0] <= 0.5


# --- echoed keys ----------------------------------------------------------------------------

def test_echoed_key_never_reaches_answers_cache_reports_or_logs(key_env, tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="hypernet")
    replies = iter([Reply(status=503, raw=f'{{"error": "busy, {KEY}"}}'.encode()),
                    Reply(f"Yes. (Authorization: Bearer {KEY})")])
    reference, generated = _images()
    job = ImageJob("m", "dog", "ink", generated, [reference], reference)
    with JudgeServer(lambda seen: next(replies, Reply(f"No, {KEY}"))) as server:
        backend = _backend(server.url, key_env, max_retries=1, concurrency=1)  # answer order fixed
        cache = AnswerCache(tmp_path / "cache.jsonl")
        result = judge([job], backend, cache=cache)
        files = write_outputs(result, [job], tmp_path / "out")
    assert result.records[0]["checks"]["content"]["votes"][0]["answer"] == "Yes. (Authorization: Bearer ***)"
    for path in [cache.path, *files.values()]:
        assert KEY not in path.read_text(encoding="utf-8"), path
    assert "retry 1" in caplog.text and KEY not in caplog.text


def test_echoed_key_is_scrubbed_before_the_message_is_cut(key_env):
    # The key starts at character 290 of the body, astride the 300-character snippet: cutting
    # first and scrubbing after would leave its first 10 characters in the message.
    body = ("x" * 290 + KEY).encode()
    with JudgeServer(lambda seen: Reply(status=400, raw=body)) as server:
        with pytest.raises(JudgeBackendError, match="HTTP 400") as info:
            _ask(_backend(server.url, key_env))
    _no_key_anywhere(info.value)


@pytest.fixture()
def odd_key(monkeypatch):
    key = "sk-odd/key+" + "Zq9" * 8
    monkeypatch.setenv("JUDGE_ODD_KEY", key)
    return key


@pytest.mark.parametrize("form", ["verbatim", "percent-encoded", "JSON-escaped"])
def test_echoed_key_in_any_common_encoding_is_scrubbed(form, odd_key):
    import urllib.parse

    echoed = {"verbatim": odd_key, "percent-encoded": urllib.parse.quote(odd_key, safe=""),
              "JSON-escaped": odd_key.replace("/", "\\/")}[form]
    raw = ('{"choices": [{"message": {"content": "your key: ' + echoed + '"}}]}').encode()
    with JudgeServer(lambda seen: Reply(raw=raw)) as server:
        answer = _ask(_backend(server.url, "JUDGE_ODD_KEY"))
    assert answer == "your key: ***"


def test_echoed_key_in_a_header_or_status_line_is_scrubbed(key_env):
    location = f"http://127.0.0.2:1/?token={KEY}"
    with JudgeServer(lambda seen: Reply(status=307, headers={"Location": location})) as server:
        with pytest.raises(JudgeBackendError, match=r"token=\*\*\*") as info:
            _ask(_backend(server.url, key_env))
    _no_key_anywhere(info.value)
    with HostileServer(respond(f"HTTP/1.1 {KEY}\r\n\r\n".encode())) as server:
        with pytest.raises(JudgeBackendError, match="BadStatusLine") as info:
            _ask(_backend(server.url, key_env))
    _no_key_anywhere(info.value)


def test_lone_surrogate_answer_reaches_the_cache_as_valid_utf8(tmp_path):
    raw = b'{"choices": [{"message": {"content": "\\ud800Yes"}}]}'
    reference, generated = _images()
    with JudgeServer(lambda seen: Reply(raw=raw)) as server:
        cache = AnswerCache(tmp_path / "cache.jsonl")
        answers, asked = ask_all([Question(0, "content", "q", (reference, generated))],
                                 _backend(server.url), cache)
    assert answers == ["?Yes"] and asked == 1
    assert AnswerCache(cache.path).get(next(iter(cache._answers))) == "?Yes"


# --- configuration the client refuses up front ----------------------------------------------

@pytest.mark.parametrize("url, match", [
    ("http://user:pw@127.0.0.1:8000", "user:password@"),
    ("http://127.0.0.1:99999", "out of range|Port"),
    ("http://127.0.0.1:8000/v1 x", "ASCII URL without spaces"),
    ("http:///v1", "host name"),
])
def test_urls_the_client_will_not_send_to(url, match):
    with pytest.raises(JudgeInputError, match=match):
        make_backend(BackendConfig("openai", url, "m"))


def test_key_with_a_newline_is_refused_naming_its_source(monkeypatch):
    monkeypatch.setenv("JUDGE_BAD_KEY", "sk-one\r\nX-Injected: 1")
    with pytest.raises(JudgeInputError, match="environment variable JUDGE_BAD_KEY") as info:
        make_backend(BackendConfig("openai", "http://127.0.0.1:1", "m", api_key_env="JUDGE_BAD_KEY"))
    assert "sk-one" not in str(info.value)


# --- proxies (kept from urllib's behaviour) -------------------------------------------------

def test_http_proxy_from_the_environment_is_used(monkeypatch, key_env):
    from tests.support.judge.server import refused_url

    target = refused_url()  # nothing listens there: only the proxy can answer
    with JudgeServer(lambda seen: Reply("Yes via proxy")) as proxy:
        monkeypatch.setenv("http_proxy", proxy.url.replace("http://", "http://u:p%40ss@"))
        for name in ("no_proxy", "NO_PROXY", "HTTP_PROXY"):
            monkeypatch.delenv(name, raising=False)
        assert _ask(_backend(target, key_env)) == "Yes via proxy"
        (seen,) = proxy.requests
        assert seen.path == target + "/v1/chat/completions"  # absolute-form request
        assert seen.headers["Proxy-Authorization"] == "Basic dTpwQHNz"  # u:p@ss
        monkeypatch.setenv("no_proxy", "127.0.0.1")
        with pytest.raises(JudgeBackendError, match="refused|Errno"):
            _ask(_backend(target, key_env))  # bypassed: straight to the dead port
    assert len(proxy.requests) == 1

