"""Throughput of the batch judge CLI against a loopback server with a fixed answer delay.

    python benchmarks/bench_judge.py [--delay 0.05] [--images 8] [--concurrency 1 4 16]

A real judge takes ~0.1–2 s per answer, so the CLI's own overhead (image encoding, JSON,
threads) should be invisible and throughput should scale with the in-flight limit until the
server saturates. Every run uses --no-cache so each question really goes over HTTP.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hypernet.cli import main  # noqa: E402
from tests.support.judge.layout import make_layout  # noqa: E402
from tests.support.judge.server import JudgeServer, Reply  # noqa: E402


def main_bench() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--delay", type=float, default=0.05, help="server answer delay in seconds")
    parser.add_argument("--images", type=int, default=8, help="images per pair (2 methods × 2 pairs)")
    parser.add_argument("--refs", type=int, default=3, help="subject reference photos")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    args = parser.parse_args()

    def slow_judge(seen):
        # No image decoding here: the server shares this process (and its GIL) with the CLI,
        # and only the CLI's cost should be measured on top of the fixed delay.
        return Reply("Yes", delay=args.delay)

    methods = {m: {("dog", "watercolor"): None, ("cat", "oil_painting"): None} for m in ("a", "b")}
    with tempfile.TemporaryDirectory() as tmp, JudgeServer(slow_judge) as server:
        generated, references = make_layout(Path(tmp) / "data", methods, args.refs, args.images)
        n_images = 4 * args.images
        n_questions = n_images * (args.refs + 1)
        print(f"{n_images} images, {n_questions} questions, server delay {args.delay * 1000:.0f} ms")
        print(f"{'in flight':>9} {'seconds':>8} {'ideal s':>8} {'images/s':>9} {'questions/s':>12} {'speed-up':>9}")
        base = None
        for concurrency in args.concurrency:
            argv = ["judge", "--generated", str(generated), "--references", str(references),
                    "--out", str(Path(tmp) / f"out{concurrency}"), "--url", server.url,
                    "--model", "bench", "--no-cache", "--concurrency", str(concurrency)]
            before = len(server.requests)
            started = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                code = main(argv)
            seconds = time.perf_counter() - started
            assert code == 0 and len(server.requests) - before == n_questions
            base = base or seconds
            ideal = -(-n_questions // concurrency) * args.delay  # rounds of the fixed delay alone
            print(f"{concurrency:>9} {seconds:>8.2f} {ideal:>8.2f} {n_images / seconds:>9.1f} "
                  f"{n_questions / seconds:>12.1f} {base / seconds:>8.1f}x   "
                  f"(max in flight seen by server: {server.max_in_flight})")
            server.max_in_flight = 0


if __name__ == "__main__":
    main_bench()
