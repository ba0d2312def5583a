"""`python -m hypernet judge` end to end against loopback servers: outputs, accuracies, resume
from the cache, key hygiene, and bad folder layouts."""

from __future__ import annotations

import csv
import json
import logging
import threading

import pytest

from hypernet.cli import main
from hypernet.errors import JudgeInputError
from hypernet.judge import AnswerCache
from tests.support.judge.layout import make_layout
from tests.support.judge.server import JudgeServer, Reply, colour_judge

KEY = "sk-cli-" + "s3cr3t" * 5
OK, BAD_SUBJECT, BAD_STYLE = (True, True), (False, True), (True, False)

# lorarar: all 4 images right on both pairs; direct: dog×watercolor has 2 subject misses and
# 1 style miss (1 of 4 fully right); cat×oil_painting all right.
METHODS = {
    "lorarar": {("dog", "watercolor"): None, ("cat", "oil_painting"): None},
    "direct": {("dog", "watercolor"): [OK, BAD_SUBJECT, BAD_SUBJECT, BAD_STYLE],
               ("cat", "oil_painting"): None},
}


def _argv(generated, references, out, url, *extra):
    return ["judge", "--generated", str(generated), "--references", str(references),
            "--out", str(out), "--url", url, "--model", "judge-model", "--backoff", "0.01",
            "--max-backoff", "0.05", "--timeout", "5", *extra]


@pytest.fixture()
def layout(tmp_path):
    return make_layout(tmp_path / "data", METHODS, subject_refs=3, images=4)


def _read_csv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_cli_end_to_end_outputs_and_accuracies(layout, tmp_path, monkeypatch, capsys, caplog):
    caplog.set_level(logging.DEBUG, logger="hypernet")
    monkeypatch.setenv("JUDGE_TEST_KEY", KEY)
    generated, references = layout
    out = tmp_path / "out"
    with JudgeServer(colour_judge) as server:
        code = main(_argv(generated, references, out, server.url + "/v1",
                          "--api-key-env", "JUDGE_TEST_KEY", "--concurrency", "4"))
    assert code == 0
    assert len(server.requests) == 16 * (3 + 1)  # 16 images × (3 subject refs + 1 style)
    assert all(seen.headers["Authorization"] == f"Bearer {KEY}" for seen in server.requests)
    assert server.max_in_flight <= 4

    result = json.loads((out / "judgement.json").read_text())
    methods = {row["method"]: row for row in result["summary_by_method"]}
    assert methods["lorarar"]["joint_accuracy"] == 1.0 and methods["lorarar"]["images"] == 8
    assert methods["direct"]["content_accuracy"] == 6 / 8
    assert methods["direct"]["style_accuracy"] == 7 / 8
    assert methods["direct"]["joint_accuracy"] == 5 / 8
    assert len(result["records"]) == 16
    record = next(r for r in result["records"] if r["image"].endswith("direct/dog__watercolor/001.png"))
    content = record["checks"]["content"]
    assert [v["answer"] for v in content["votes"]] == ["**No**"] * 3 and content["verdict"] == "no"
    assert all("same subject" in v["question"] for v in content["votes"])
    assert record["checks"]["style"]["verdict"] == "yes" and record["joint"] == "no"

    pairs = _read_csv(out / "summary_by_pair.csv")
    direct_dog = next(r for r in pairs if r["method"] == "direct" and r["subject"] == "dog")
    assert direct_dog["joint_accuracy"] == "0.25" and direct_dog["content_unparseable"] == "0"
    assert len(_read_csv(out / "summary_by_method.csv")) == 2
    assert len(_read_csv(out / "answers.csv")) == 64

    page = (out / "report.html").read_text()
    assert page.count("data:image/jpeg;base64,") == 16 + 2 * 2 * (3 + 1)  # generated + refs per section
    assert "<table>" in page and "62.5%" in page  # direct joint accuracy 5/8

    stdout, stderr = capsys.readouterr()
    assert json.loads(stdout)["by_method"][0]["method"] in ("direct", "lorarar")
    assert "judge questions [" in stderr and "64/64" in stderr
    for path in out.rglob("*"):
        if path.is_file():
            assert KEY not in path.read_text(encoding="utf-8", errors="replace"), path
    assert KEY not in stdout + stderr + caplog.text
    assert "JUDGE_TEST_KEY" in (out / "judgement.json").read_text()  # the source is named


def test_cli_resumes_from_cache_after_interruption(layout, tmp_path, capsys):
    generated, references = layout
    out = tmp_path / "out"
    budget = threading.Semaphore(20)

    def dies_after_20(seen):
        return colour_judge(seen) if budget.acquire(blocking=False) else Reply(status=500)

    with JudgeServer(dies_after_20) as broken:
        code = main(_argv(generated, references, out, broken.url, "--retries", "0",
                          "--concurrency", "2"))
    assert code == 1
    assert "gave up after 1 attempt" in capsys.readouterr().err
    cached = len(AnswerCache(out / "cache" / "answers.jsonl"))
    assert cached == 20  # every answer that arrived was kept, in-flight ones included

    with JudgeServer(colour_judge) as healthy:
        assert main(_argv(generated, references, out, healthy.url, "--concurrency", "4")) == 0
    assert len(healthy.requests) == 64 - cached  # only the missing questions were asked
    resumed = json.loads((out / "judgement.json").read_text())
    assert resumed["asked_this_run"] == 64 - cached

    with JudgeServer(colour_judge) as again:
        assert main(_argv(generated, references, out, again.url)) == 0
    assert again.requests == []  # everything from the cache now
    fresh_out = tmp_path / "fresh"
    with JudgeServer(colour_judge) as fresh:
        assert main(_argv(generated, references, fresh_out, fresh.url, "--no-cache")) == 0
    assert not (fresh_out / "cache").exists()
    fresh_result = json.loads((fresh_out / "judgement.json").read_text())
    assert fresh_result["summary_by_pair"] == resumed["summary_by_pair"]


def test_cli_ollama_single_method_unparseable_and_names(tmp_path):
    generated, references = make_layout(tmp_path / "d", {"mine": {("dog", "watercolor"): None}},
                                        subject_refs=2, images=3)
    pair_root = generated / "mine"  # pairs directly inside: one method named "mine"

    def mumbles_on_style(seen):
        return Reply("I cannot tell.") if "same style" in seen.prompt else colour_judge(seen)

    out = tmp_path / "out"
    with JudgeServer(mumbles_on_style) as server:
        assert main(_argv(pair_root, references, out, server.url, "--backend", "ollama")) == 0
    assert {seen.path for seen in server.requests} == {"/api/chat"}
    assert all("(dog)" in s.prompt or "(watercolor)" in s.prompt for s in server.requests)
    (row,) = _read_csv(out / "summary_by_method.csv")
    assert row["method"] == "mine" and row["content_accuracy"] == "1.0"
    assert row["style_unparseable"] == "3" and row["style_accuracy"] == ""  # n/a, not 0
    assert row["joint_unparseable"] == "3" and row["joint_no"] == "0"

    with JudgeServer(colour_judge) as server:
        main(_argv(pair_root, references, tmp_path / "o2", server.url, "--no-names", "--no-cache"))
    assert not any("(dog)" in s.prompt for s in server.requests)


def test_cli_rubric_mode(tmp_path):
    generated, references = make_layout(tmp_path / "d", {"m": {("cat", "oil_painting"): None}},
                                        subject_refs=2, images=2)

    def scores(seen):
        return Reply("Score: 80/100" if "same subject" in seen.prompt else "40")

    out = tmp_path / "out"
    with JudgeServer(scores) as server:
        assert main(_argv(generated, references, out, server.url, "--mode", "rubric",
                          "--threshold", "60")) == 0
    (row,) = _read_csv(out / "summary_by_method.csv")
    assert float(row["content_score"]) == 80.0 and float(row["style_score"]) == 40.0
    assert row["content_accuracy"] == "1.0" and row["style_accuracy"] == "0.0"
    assert "0 to 100" in server.requests[0].prompt


def _break(kind, generated, references):
    pair = generated / "direct" / "dog__watercolor"
    if kind == "no subjects folder":
        (references / "subjects").rename(references / "subjectz")
        return "subjects \\(subject references\\), found none"
    if kind == "no subject folder":
        (references / "subjects" / "dog").rename(references / "subjects" / "doggo")
        return "subjects/dog, found none"
    if kind == "no style image":
        (references / "styles" / "watercolor.png").unlink()
        return "style reference for .*dog__watercolor.*found none"
    if kind == "non-image file":
        (pair / "notes.txt").write_text("hello")
        return "notes.txt is not an image"
    if kind == "broken png":
        (pair / "999.png").write_bytes(b"not a png")
        return "999.png: expected an image file"
    if kind == "empty pair folder":
        for f in pair.iterdir():
            f.unlink()
        return "no images in .*dog__watercolor"
    if kind == "bad pair name":
        pair.rename(pair.parent / "dog-watercolor")
        return "expected a name <subject>__<style>"
    if kind == "too few images":
        return "expected at least 9, found 4"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["no subjects folder", "no subject folder", "no style image",
                                  "non-image file", "broken png", "empty pair folder",
                                  "bad pair name", "too few images"])
def test_cli_bad_layouts_fail_clearly_before_any_request(kind, layout, tmp_path, capsys):
    generated, references = layout
    expected = _break(kind, generated, references)
    extra = ["--images-per-pair", "9"] if kind == "too few images" else []
    with JudgeServer(colour_judge) as server:
        code = main(_argv(generated, references, tmp_path / "out", server.url, *extra))
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: ")
    assert __import__("re").search(expected, err), err
    assert server.requests == []


def test_cli_missing_generated_folder(tmp_path, capsys):
    code = main(_argv(tmp_path / "nothing", tmp_path, tmp_path / "out", "http://127.0.0.1:9"))
    assert code == 1 and "--generated: expected a folder" in capsys.readouterr().err


def test_cache_skips_a_truncated_line_and_survives_threads(tmp_path):
    path = tmp_path / "c" / "answers.jsonl"
    cache = AnswerCache(path)
    threads = [threading.Thread(target=lambda i=i: [cache.put(f"k{i}-{j}", "Yes " * 50, "m")
                                                      for j in range(50)]) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with open(path, "ab") as handle:
        handle.write(b'{"key": "cut", "answ')  # a crash mid-line
    reloaded = AnswerCache(path)
    assert len(reloaded) == 400 and reloaded.get("k7-49") == "Yes " * 50
    assert reloaded.get("cut") is None


def test_cache_skips_hostile_lines_and_keeps_only_string_answers(tmp_path):
    path = tmp_path / "answers.jsonl"
    good = json.dumps({"key": "good", "answer": "Yes", "model": "m"})
    path.write_bytes(b"\n".join([
        b"[" * 100_000,  # RecursionError in json
        b'{"key": "big", "answer": ' + b"9" * 5000 + b"}",  # int past the digit limit
        b'{"key": "num", "answer": 5}', b'{"key": ["k"], "answer": "Yes"}', b'["key", "answer"]',
        b"\xff\xfe not utf-8", good.encode(),
    ]) + b"\n")
    cache = AnswerCache(path)
    assert len(cache) == 1 and cache.get("good") == "Yes" and cache.get("num") is None


def test_cache_that_cannot_be_read_or_appended_is_one_clean_error(tmp_path):
    folder_as_cache = tmp_path / "answers.jsonl"
    folder_as_cache.mkdir()
    with pytest.raises(JudgeInputError, match="answers.jsonl: cannot be read"):
        AnswerCache(folder_as_cache)
    path = tmp_path / "ok.jsonl"
    cache = AnswerCache(path)
    path.mkdir()  # the file became a folder after loading: appending fails
    with pytest.raises(JudgeInputError, match="ok.jsonl: cannot append an answer"):
        cache.put("k", "Yes", "m")


def test_cli_hostile_server_gives_one_error_line(layout, tmp_path, capsys, monkeypatch):
    from tests.support.judge.hostile import HostileServer, http_response, respond

    monkeypatch.setenv("JUDGE_TEST_KEY", KEY)
    generated, references = layout
    body = b'{"echo": "' + KEY.encode() + b'", "choices": ' + b"[" * 100_000  # RecursionError
    with HostileServer(respond(http_response(body=body))) as server:
        code = main(_argv(generated, references, tmp_path / "out", server.url,
                          "--api-key-env", "JUDGE_TEST_KEY", "--retries", "0", "--concurrency", "1"))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 1 and len(lines) == 1 and "expected a JSON response" in lines[0]
    assert "Traceback" not in err and KEY not in err
