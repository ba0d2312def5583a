"""`python -m hypernet judge`: the paper's MLLM content/style evaluation over a folder tree.

Layout (see hypernet/judge/batch.py and README):
    GENERATED/<method>/<subject>__<style>/*.png
    REFERENCES/subjects/<subject>/*.png
    REFERENCES/styles/<style>.png
Writes to OUT: judgement.json, summary_by_pair.csv, summary_by_method.csv, answers.csv,
report.html, and the resumable answer cache cache/answers.jsonl (unless --cache/--no-cache).
"""

from __future__ import annotations

import argparse
import time


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "judge",
        help="score generated images for subject and style fidelity with a multimodal LLM",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    io_group = parser.add_argument_group("folders")
    io_group.add_argument("--generated", required=True, help="GENERATED/<method>/<subject>__<style>/ images")
    io_group.add_argument("--references", required=True, help="folder with subjects/<subject>/ and styles/<style>.*")
    io_group.add_argument("--out", required=True, help="folder for the JSON, CSV and HTML outputs")
    io_group.add_argument("--images-per-pair", type=int, default=None, metavar="N",
                          help="judge the first N images (by name) of each pair folder; fewer is an error")

    backend = parser.add_argument_group("backend")
    backend.add_argument("--backend", choices=("openai", "ollama", "transformers"), default="openai",
                         help="openai: POST /v1/chat/completions (vLLM, llama.cpp, LM Studio, Ollama /v1, "
                              "OpenRouter, OpenAI); ollama: native /api/chat; transformers: local model folder")
    backend.add_argument("--url", default="", help="server base URL, e.g. http://127.0.0.1:8000/v1")
    backend.add_argument("--model", required=True, help="model name on the server, or the local model folder")
    backend.add_argument("--api-key-env", default="", metavar="NAME",
                         help="NAME of the environment variable that holds the API key (never the key)")
    backend.add_argument("--api-key-file", default="", metavar="PATH",
                         help="file holding the API key (first line, or JSON {\"api_key\": …})")
    backend.add_argument("--concurrency", type=int, default=4, help="requests in flight (default 4)")
    backend.add_argument("--timeout", type=float, default=120.0, help="seconds per request attempt")
    backend.add_argument("--retries", type=int, default=4, help="retries on 429/5xx/timeouts (default 4)")
    backend.add_argument("--backoff", type=float, default=1.0,
                         help="first retry delay in seconds, doubled per retry; Retry-After wins")
    backend.add_argument("--max-backoff", type=float, default=60.0, help="longest single retry delay")
    backend.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (paper)")
    backend.add_argument("--max-tokens", type=int, default=128, help="answer length limit")

    protocol = parser.add_argument_group("protocol")
    protocol.add_argument("--mode", choices=("yesno", "rubric"), default="yesno",
                          help="yesno: the paper's Yes/No questions; rubric: 0–100 scores")
    protocol.add_argument("--threshold", type=float, default=50.0,
                          help="rubric mode: a side counts as correct at score ≥ this")
    protocol.add_argument("--no-names", action="store_true",
                          help="do not tell the judge the subject/style folder names")
    protocol.add_argument("--max-side", type=int, default=512, help="downscale long side to ≤ this (paper: 512)")
    cache = parser.add_mutually_exclusive_group()
    cache.add_argument("--cache", default=None, help="answer cache file (default OUT/cache/answers.jsonl)")
    cache.add_argument("--no-cache", action="store_true", help="ask every question again, store nothing")
    parser.set_defaults(func=run)


def run(args) -> int:
    import json
    import logging
    from pathlib import Path

    from ..judge import AnswerCache, BackendConfig, judge, load_jobs, make_backend, write_outputs
    from ..tooling.progress import ProgressLine

    log = logging.getLogger("hypernet.judge")
    config = BackendConfig(
        protocol=args.backend, url=args.url, model=args.model, api_key_env=args.api_key_env,
        api_key_file=args.api_key_file, timeout=args.timeout, max_retries=args.retries,
        backoff=args.backoff, max_backoff=args.max_backoff, temperature=args.temperature,
        max_tokens=args.max_tokens, concurrency=args.concurrency,
    )
    backend = make_backend(config)  # validates the config and finds the key before any work
    jobs = load_jobs(Path(args.generated), Path(args.references), args.images_per_pair, args.max_side)
    out = Path(args.out)
    cache = None
    if not args.no_cache:
        cache = AnswerCache(Path(args.cache) if args.cache else out / "cache" / "answers.jsonl")
    started = time.monotonic()
    with ProgressLine("judge questions") as bar:
        result = judge(jobs, backend, mode=args.mode, threshold=args.threshold,
                       use_names=not args.no_names, cache=cache, progress=bar.update)
    files = write_outputs(result, jobs, out)
    log.info("judged %d image(s) with %d question(s) (%d asked) in %.1f s; report: %s",
             len(jobs), result.questions, result.asked, time.monotonic() - started, files["html"])
    # The result on stdout: per-method accuracies, machine-readable.
    print(json.dumps({"by_method": result.by_method, "files": {k: str(v) for k, v in files.items()}},
                     indent=2))
    return 0
