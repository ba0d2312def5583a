"""`python -m hypernet testbed build|gate|bench|judge-check|bundle`: the world with ground truth.

build   train (or load from the cache) the base model, the judges, subject/style LoRAs, the
        per-pair reference LoRAs and the testbed hypernetworks of one world (deterministic from
        --world-seed)
gate    one of the four gates (judges, base, loras, headroom): its figures and PASS/FAIL
bench   every merge method on the held-out pairs: content/style/joint accuracy per style regime,
        the ZipLoRA objective's terms, merge time, H's input dependence; bench.json, bench.md,
        table.png, samples.png
judge-check   run `python -m hypernet judge` against the loopback classifier server over the
        benchmark's generated images and compare with direct classification
bundle  copy the demo's files (base, two LoRAs, hypernetwork, judges) into weights/testbed/
"""

from __future__ import annotations

import argparse


def _world_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--world-seed", type=int, default=0, help="world seed: subjects, styles, split (default 0)")
    p.add_argument("--subjects", type=int, default=20, help="subjects in the world (default 20, at most 28)")
    p.add_argument("--styles", type=int, default=24, help="styles in the world, half per style regime (default 24)")
    p.add_argument("--tiny", action="store_true", help="a test-sized world (seconds; checks the pipeline only)")
    p.add_argument("--cache", default=None, metavar="DIR",
                   help="cache folder (default: $LORARAR_CACHE/testbed or ~/.cache/lorarar/testbed)")
    p.add_argument("--lora-steps", type=int, default=None,
                   help="training steps of each LoRA (default: the settings', 600); part of the LoRAs' cache key")
    p.add_argument("--lora-rank", type=int, default=None,
                   help="rank of each LoRA (default: the settings', 4); part of the LoRAs' cache key")
    p.add_argument("--lora-lr", type=float, default=None,
                   help="learning rate of each LoRA (default: the settings', 5e-3); part of the LoRAs' cache key")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a busy 2-core machine more threads are slower)")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("testbed", help="the testbed world: build it, benchmark every merge method",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="testbed_command", metavar="ACTION")
    b = sub.add_parser("build", help="build (or load) a world")
    _world_args(b)
    b.set_defaults(func=run_build)
    g = sub.add_parser("gate", help="measure one gate: judges, base, loras or headroom")
    g.add_argument("gate", choices=("judges", "base", "loras", "headroom"))
    _world_args(g)
    g.add_argument("--out", default=None, help="folder for the gate's JSON (and headroom's bench files)")
    g.add_argument("--seed", type=int, default=0, help="seed of the gate's draws (default 0)")
    g.set_defaults(func=run_gate)
    c = sub.add_parser("bench", help="benchmark every merge method on the held-out pairs")
    _world_args(c)
    c.add_argument("--out", required=True, help="folder for bench.json, bench.md, table.png, samples.png")
    c.add_argument("--images", type=int, default=10, help="images per pair and method (default 10)")
    c.add_argument("--sampling-steps", type=int, default=20, help="DDIM steps (default 20)")
    c.add_argument("--ziplora-steps", type=int, default=100, help="ZipLoRA steps per pair (default 100)")
    c.add_argument("--hypernet", default=None, help="hypernetwork file (default: the world's testbed H, raw and "
                                                    "normalised columns, one row each)")
    c.add_argument("--guidance", type=float, default=None, help="classifier-free guidance (default: the base's, 2.0)")
    c.add_argument("--methods", nargs="*", default=[], help="only these rows (default: all)")
    c.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    c.add_argument("--split", choices=("test", "train"), default="test",
                   help="test: the held-out pairs (the verdict); train: 12 pairs per style regime drawn from the "
                        "testbed H's own training pairs (does H fit what it was trained on?)")
    c.add_argument("--force", action="store_true", help="write into a non-empty --out")
    c.set_defaults(func=run_bench)
    j = sub.add_parser("judge-check", help="judge a benchmark's images through the loopback judge server")
    _world_args(j)
    j.add_argument("--bench", required=True, help="a benchmark's --out folder")
    j.set_defaults(func=run_judge_check)
    d = sub.add_parser("bundle", help="write the demo's files into weights/testbed/ (maintainers)")
    _world_args(d)
    d.add_argument("--bench", default=None, help="a verdict benchmark's --out folder: the demo pair is picked "
                                                 "from its per-pair results by the rule in docs/testbed.md")
    d.add_argument("--pair", nargs=2, metavar=("SUBJECT", "STYLE"), default=None,
                   help="the demo pair, given by hand instead of --bench")
    d.add_argument("--dest", default=None, help="destination (default: the pack's weights/testbed)")
    d.set_defaults(func=run_bundle)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _settings(args):
    from dataclasses import replace

    from ..testbed.build import WorldSettings

    if args.tiny:
        s = WorldSettings.tiny(args.world_seed)
        if args.subjects != 20:
            s.subjects = args.subjects
        if args.styles != 24:
            s.styles = args.styles
    else:
        s = WorldSettings(seed=args.world_seed, subjects=args.subjects, styles=args.styles)
    if getattr(args, "lora_steps", None) is not None:
        s.lora = replace(s.lora, steps=args.lora_steps)
    if getattr(args, "lora_rank", None) is not None:
        s.lora = replace(s.lora, rank=args.lora_rank)
    if getattr(args, "lora_lr", None) is not None:
        s.lora = replace(s.lora, lr=args.lora_lr)
    return s


def _build(args, hypernet: bool = True, references: bool = True):
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
    return build_world(_settings(args), Path(args.cache) if args.cache else None, progress, hypernet=hypernet,
                       references=references)


def run_build(args) -> int:
    import json

    built = _build(args)
    print(json.dumps({"world": str(built.folder), "timings_s": built.info["timings_this_run_s"],
                      "base_pretraining_once_s": built.info["base_pretraining_once_s"],
                      "test_pairs": len(built.world.test_pairs)}, indent=1))
    return 0


def run_gate(args) -> int:
    import json
    from pathlib import Path

    import torch

    from ..testbed import gates

    torch.set_num_threads(max(1, args.threads))
    out = Path(args.out) if args.out else None
    if args.gate == "judges":  # needs the judges (and the base they are calibrated on), not the LoRAs or H
        from ..testbed.build import build_base, build_judges
        from ..testbed.cache import testbed_dir
        from ..testbed.judges import Judges
        from ..testbed.world import World

        s = _settings(args)
        root = testbed_dir(Path(args.cache) if args.cache else None)
        base = None
        if s.judges.calibrate_on == "base samples":
            model, base_path, _ = build_base(root, s.base_config, s.base)
            base = (model, base_path)
        path, _ = build_judges(root, s.judges, lambda *a: None, base)
        world = World.create(s.seed, s.subjects, s.styles, s.test_subjects, s.test_styles)
        result = gates.gate_judges(world, Judges.load(path), seed=args.seed)
        text = gates.print_gate_judges(result)
    elif args.gate == "base":
        from ..testbed.build import build_base, build_judges
        from ..testbed.cache import testbed_dir
        from ..testbed.judges import Judges

        s = _settings(args)
        root = testbed_dir(Path(args.cache) if args.cache else None)
        model, base_path, _ = build_base(root, s.base_config, s.base)
        path, _ = build_judges(root, s.judges, lambda *a: None, (model, base_path))
        result = gates.gate_base(model, Judges.load(path), seed=args.seed)
        if out:
            from ..testbed.figures import labelled_grid

            out.mkdir(parents=True, exist_ok=True)
            ex = result["examples"]
            labelled_grid([[im] for im in ex["images"]], ex["prompts"], ["sample"], scale=3).save(out / "gate_base.png")
        result.pop("examples")
        text = gates.print_gate_base(result)
    elif args.gate == "loras":
        built = _build(args, hypernet=False, references=False)  # gate 3 needs no per-pair references
        result = gates.gate_loras(built, seed=args.seed)
        text = gates.print_gate_loras(result)
    else:
        built = _build(args, hypernet=False)
        result = gates.gate_headroom(built, out or Path(built.folder) / "gate_headroom", seed=args.seed + 1)
        result.pop("bench")
        text = gates.print_gate_headroom(result)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"gate_{args.gate}.json").write_text(json.dumps(result, indent=1, default=str))
    print(text)
    return 0 if result["pass"] else 1


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
    settings = BenchSettings(images=args.images, sampling_steps=args.sampling_steps, guidance=args.guidance,
                             ziplora_steps=args.ziplora_steps, seed=args.seed, methods=tuple(args.methods))
    log = logging.getLogger("hypernet.testbed")
    pairs = None
    if args.split == "train":
        from ..testbed.build import training_pairs_sample

        pairs = training_pairs_sample(built, 12)
    report = bench(built, settings, out, {"lorarar": Path(args.hypernet)} if args.hypernet else built.hypernet_paths,
                   pairs=pairs, progress=lambda stage, d, n: log.info("bench %s: %d/%d", stage, d, n))
    print((out / "bench.md").read_text())
    print(json.dumps({k: report[k] for k in ("wall_seconds", "date", "threads") if k in report}))
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
    import json
    from pathlib import Path

    from ..errors import LoraRarError
    from ..testbed.demo import PICK_RULE, bundle, pick_pair

    if bool(args.bench) == bool(args.pair):
        raise LoraRarError("bundle: give either --bench (the pair is picked by the stated rule) or --pair")
    built = _build(args)
    if args.bench:
        pair, rule = pick_pair(json.loads((Path(args.bench) / "bench.json").read_text())), PICK_RULE
    else:
        pair, rule = tuple(args.pair), ""
    dest = bundle(built, pair, Path(args.dest) if args.dest else None, rule)
    print(f"{dest}: {pair[0]} x {pair[1]} ({rule or 'given by hand'})")
    return 0
