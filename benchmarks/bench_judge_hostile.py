"""The judge's HTTP client against hostile loopback servers: wall time and peak memory.

    python benchmarks/bench_judge_hostile.py [--timeout 2] [--retries 1] [--limit 60]
                                             [--lib PATH] [--only NAME ...]

Each scenario runs the client in a fresh child process (so its peak RSS is the client's alone,
read from wait4) against a server in this process:

  well-behaved         a normal answer (the baseline: interpreter + PIL + numpy)
  1 GiB, Content-Length  a valid answer padded with 1 GiB of JSON whitespace, length announced
  1 GiB, chunked       the same, chunked, no length announced
  headers dripped      endless header lines, 1 byte every 0.5 s
  body dripped         headers at once, then the body 1 byte every 0.5 s
  deep JSON            4 MiB of "[" (RecursionError in json)
  302 to another port  a redirect to a second server: does the key (and a GET) go there?

`--lib PATH` imports `hypernet` from another checkout (e.g. an older commit unpacked with
`git archive <commit> hypernet | tar -x -C PATH`) to measure before/after; the servers always
come from this tree. A child still running after `--limit` seconds is killed and reported so.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.judge.hostile import (  # noqa: E402
    GIB,
    HostileServer,
    chat_body,
    drip_forever,
    http_response,
    huge_body,
    respond,
)
from tests.support.judge.server import JudgeServer, Reply  # noqa: E402

KEY = "sk-bench-" + "0123456789abcdef" * 2

CLIENT = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
from PIL import Image
import hypernet.judge.backends as backends
from hypernet.judge import BackendConfig, make_backend, prepare
url, timeout, retries = sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
images = (prepare(Image.new("RGB", (64, 64), (200, 10, 10)), "reference"),
          prepare(Image.new("RGB", (64, 64), (10, 200, 10)), "generated"))
config = BackendConfig("openai", url, "m", api_key_env="BENCH_JUDGE_KEY", timeout=timeout,
                       max_retries=retries, backoff=0.1, max_backoff=0.1)
started = time.monotonic()
try:
    outcome = "answer " + repr(make_backend(config).ask("same subject?", images)[:60])
except Exception as exc:
    outcome = f"{type(exc).__module__}.{type(exc).__name__}: {str(exc)[:160]}"
print(json.dumps({"seconds": time.monotonic() - started, "outcome": outcome,
                  "library": os.path.dirname(backends.__file__)}))
"""


def run_client(lib: str, url: str, args) -> dict:
    env = {**os.environ, "BENCH_JUDGE_KEY": KEY}
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", CLIENT, lib, url, str(args.timeout), str(args.retries)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=lib)
    killed = False
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() - started > args.limit:
            proc.send_signal(signal.SIGKILL)
            _, status, usage = os.wait4(proc.pid, 0)
            killed = True
            break
        time.sleep(0.05)
    proc.returncode = 0  # reaped above; keeps Popen from waiting again
    out, err = proc.communicate()
    wall = time.monotonic() - started
    result = {"wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024}  # ru_maxrss: KiB on Linux
    if killed:
        result["outcome"] = f"still running after {args.limit:g} s: killed"
    else:
        try:
            result.update(json.loads(out.decode().strip().splitlines()[-1]))
        except (ValueError, IndexError):
            result["outcome"] = "client crashed: " + err.decode(errors="replace").strip()[-200:]
    return result


def scenarios():
    endless_headers = drip_forever(b"HTTP/1.1 200 OK\r\n", b"X-Drip: aaaaaaaaaaaaaaaa\r\n", 0.5)
    answer = chat_body("Yes")
    body_drip = drip_forever(http_response(content_length=len(answer) + 10**6) + answer, b" ", 0.5)
    return {
        "well-behaved": respond(http_response(body=answer)),
        "1 GiB, Content-Length": huge_body(GIB),
        "1 GiB, chunked": huge_body(GIB, chunked=True, claim=False),
        "headers dripped": endless_headers,
        "body dripped": body_drip,
        "deep JSON": respond(http_response(body=b"[" * (4 << 20))),
    }


def _ask_s(result: dict) -> str:
    return f"{result['seconds']:.1f}" if "seconds" in result else f">{result['wall_s']:.0f}"


def main_bench() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timeout", type=float, default=2.0, help="the judge's per-attempt timeout")
    parser.add_argument("--retries", type=int, default=1, help="the judge's max_retries")
    parser.add_argument("--limit", type=float, default=60.0, help="kill a client after this many seconds")
    parser.add_argument("--lib", default=str(ROOT), help="checkout whose hypernet the client imports")
    parser.add_argument("--only", nargs="*", help="run only these scenarios (names as listed)")
    args = parser.parse_args()
    lib = str(Path(args.lib).resolve())
    print(f"client library: {lib}; timeout {args.timeout:g} s, max_retries {args.retries}, "
          f"limit {args.limit:g} s")
    print("ask s: the ask() call in the client; process s: the whole child, imports included\n"
          "(a killed child has no ask time of its own: it is at least the limit)")
    print(f"{'scenario':<24} {'ask s':>7} {'process s':>9} {'peak RSS MiB':>13}  outcome")
    chosen = set(args.only or [])
    for name, behaviour in scenarios().items():
        if chosen and name not in chosen:
            continue
        with HostileServer(behaviour) as server:
            result = run_client(lib, server.url, args)
        print(f"{name:<24} {_ask_s(result):>7} {result['wall_s']:>9.1f} {result['peak_rss_mib']:>13.0f}  {result['outcome']}"
              f"  [{len(server.requests)} request(s) seen, {server.bytes_sent / 2**20:.1f} MiB sent]")
        if "library" in result and not result["library"].startswith(lib):
            print(f"  warning: the client imported {result['library']}, not --lib")
    if chosen and "302 to another port" not in chosen:
        return
    with JudgeServer(lambda seen: Reply("Yes (from the other port)")) as other:
        target = other.url + "/v1/chat/completions"
        with JudgeServer(lambda seen: Reply(status=302, headers={"Location": target})) as first:
            result = run_client(lib, first.url, args)
    leaked = [(seen.method, seen.headers.get("Authorization") == f"Bearer {KEY}") for seen in other.requests]
    print(f"{'302 to another port':<24} {_ask_s(result):>7} {result['wall_s']:>9.1f} {result['peak_rss_mib']:>13.0f}  "
          f"{result['outcome']}  [other port got {len(leaked)} request(s): "
          f"{', '.join(f'{m} with key' if k else m for m, k in leaked) or 'none'}]")


if __name__ == "__main__":
    main_bench()
