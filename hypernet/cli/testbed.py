"""`python -m hypernet testbed build|bench|judge-check|bundle`: the world with ground truth.

build   train (or load from the cache) the base model, subject/style LoRAs, judges and the
        testbed hypernetwork of one world (deterministic from --world-seed)
bench   every merge method on the held-out pairs: content/style/joint accuracy, the ZipLoRA
        objective's terms, merge time; bench.json, bench.md, table.png, samples.png
judge-check   run `python -m hypernet judge` against the loopback classifier server over the
        benchmark's generated images and compare with direct classification
bundle  copy the demo's files (base, two LoRAs, hypernetwork, judges) into weights/testbed/
"""

from __future__ import annotations

import argparse


def _world_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--world-seed", type=int, default=0, help="world seed: subjects, styles, split (default 0)")
    p.add_argument("--subjects", type=int, default=20, help="subjects in the world (default 20, at most 32)")
    p.add_argument("--styles", type=int, default=16, help="styles in the world (default 16)")
    p.add_argument("--tiny", action="store_true", help="a test-sized world (seconds; checks the pipeline only)")
    p.add_argument("--cache", default=None, metavar="DIR",
                   help="cache folder (default: $LORARAR_CACHE/testbed or ~/.cache/lorarar/testbed)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a busy 2-core machine more threads are slower)")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("testbed", help="the testbed world: build it, benchmark every merge method",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="testbed_command", metavar="ACTION")
    b = sub.add_parser("build", help="build (or load) a world")
    _world_args(b)
    b.set_defaults(func=run_build)
    c = sub.add_parser("bench", help="benchmark every merge method on the held-out pairs")
    _world_args(c)
    c.add_argument("--out", required=True, help="folder for bench.json, bench.md, table.png, samples.png")
    c.add_argument("--images", type=int, default=10, help="images per pair and method (default 10)")
    c.add_argument("--sampling-steps", type=int, default=20, help="DDIM steps (default 20)")
    c.add_argument("--ziplora-steps", type=int, default=100, help="ZipLoRA steps per pair (default 100)")
    c.add_argument("--hypernet", default=None, help="hypernetwork file (default: the world's testbed H)")
    c.add_argument("--methods", nargs="*", default=[], help="only these rows (default: all)")
    c.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    c.add_argument("--force", action="store_true", help="write into a non-empty --out")
    c.set_defaults(func=run_bench)
    j = sub.add_parser("judge-check", help="judge a benchmark's images through the loopback judge server")
    _world_args(j)
    j.add_argument("--bench", required=True, help="a benchmark's --out folder")
    j.set_defaults(func=run_judge_check)
    d = sub.add_parser("bundle", help="write the demo's files into weights/testbed/ (maintainers)")
    _world_args(d)
    d.add_argument("--pair", nargs=2, metavar=("SUBJECT", "STYLE"), default=None,
                   help="the demo pair (default: the first held-out pair)")
    d.add_argument("--dest", default=None, help="destination (default: the pack's weights/testbed)")
    d.set_defaults(func=run_bundle)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _settings(args):
    from ..testbed.build import WorldSettings

    if args.tiny:
        s = WorldSettings.tiny(args.world_seed)
        if args.subjects != 20:
            s.subjects = args.subjects
        if args.styles != 16:
            s.styles = args.styles
        return s
    return WorldSettings(seed=args.world_seed, subjects=args.subjects, styles=args.styles)


def _build(args):
    import logging
    import time
    from pathlib import Path

    import torch

    from ..testbed.build import build_world

    torch.set_num_threads(max(1, args.threads))
    log = logging.getLogger("hypernet.testbed")
    last = {}
    start = time.perf_counter()

    def progress(stage, done, total):
        if last.get(stage) is None or done == total or time.perf_counter() - last[stage] > 30:
            last[stage] = time.perf_counter()
            log.info("%s: %d/%d (%.0f s)", stage, done, total, time.perf_counter() - start)
    return build_world(_settings(args), Path(args.cache) if args.cache else None, progress)


def run_build(args) -> int:
    import json

    built = _build(args)
    print(json.dumps({"world": str(built.folder), "judges_accuracy": built.info["judges_accuracy"],
                      "timings_s": built.info["timings_this_run_s"], "test_pairs": len(built.world.test_pairs)},
                     indent=1))
    return 0


def run_bench(args) -> int:
    import json
    import logging
    from pathlib import Path

    from ..errors import OutputExistsError
    from ..testbed.bench import BenchSettings
    from ..testbed.bench import run_bench as bench

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise OutputExistsError(f"{out} is not empty; refusing to overwrite it (use --force)")
    built = _build(args)
    settings = BenchSettings(images=args.images, sampling_steps=args.sampling_steps,
                             ziplora_steps=args.ziplora_steps, seed=args.seed, methods=tuple(args.methods))
    log = logging.getLogger("hypernet.testbed")
    report = bench(built, settings, out, Path(args.hypernet) if args.hypernet else None,
                   lambda stage, d, n: log.info("bench %s: %d/%d", stage, d, n))
    print((out / "bench.md").read_text())
    print(json.dumps({k: report[k] for k in ("wall_seconds", "judges_accuracy") if k in report}))
    return 0


def run_judge_check(args) -> int:
    import json
    from pathlib import Path

    from ..testbed.judge_check import judge_check

    built = _build(args)
    result = judge_check(built, Path(args.bench))
    print(json.dumps(result, indent=1))
    return 0 if result["agree"] else 1


def run_bundle(args) -> int:
    from pathlib import Path

    from ..testbed.demo import bundle

    built = _build(args)
    pair = tuple(args.pair) if args.pair else built.world.test_pairs[0]
    dest = bundle(built, pair, Path(args.dest) if args.dest else None)
    print(dest)
    return 0
