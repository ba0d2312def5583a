"""`python -m hypernet judge` over generated images, against the classifier-backed loopback server,
compared with classifying the same images directly: the two must give the same accuracies."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from ..judge.batch import discover_pairs, split_pair
from .bench import write_references
from .build import BuiltWorld, load_png
from .judge_server import ClassifierJudgeServer
from .judges import Judges


def direct_accuracies(judges: Judges, generated: Path, world) -> dict[str, dict[str, float]]:
    counts: dict[str, list[int]] = {}
    for method, pair_dir in discover_pairs(generated):
        subject, style = split_pair(pair_dir)
        files = sorted(pair_dir.glob("*.png"))
        subjects, styles = judges.classify(np.stack([load_png(f) for f in files]), world)
        c = counts.setdefault(method, [0, 0, 0, 0])
        for a, b in zip(subjects, styles):
            c[0] += a == subject
            c[1] += b == style
            c[2] += a == subject and b == style
            c[3] += 1
    return {m: {"content": c[0] / c[3], "style": c[1] / c[3], "joint": c[2] / c[3], "images": c[3]}
            for m, c in counts.items()}


def judge_check(built: BuiltWorld, bench_dir: Path, out: Path | None = None) -> dict:
    generated = Path(bench_dir) / "generated"
    out = Path(out or Path(bench_dir) / "judge")
    pairs = sorted({split_pair(p) for _, p in discover_pairs(generated)})
    references = write_references(built, out / "references", pairs)
    judges = built.judges()
    with ClassifierJudgeServer(judges, built.world) as server:
        proc = subprocess.run(
            [sys.executable, "-m", "hypernet", "judge", "--generated", str(generated), "--references",
             str(references), "--out", str(out / "report"), "--url", server.url, "--model", "testbed-classifiers",
             "--no-cache", "--concurrency", "4"],
            capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2], timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"python -m hypernet judge failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    via_judge = {row["method"]: {"content": row["content_accuracy"], "style": row["style_accuracy"],
                                 "joint": row["joint_accuracy"], "images": row["images"]}
                 for row in json.loads(proc.stdout)["by_method"]}
    direct = direct_accuracies(judges, generated, built.world)
    agree = set(via_judge) == set(direct) and all(
        abs(via_judge[m][k] - direct[m][k]) < 1e-9 for m in direct for k in ("content", "style", "joint"))
    result = {"agree": agree, "via_judge": via_judge, "direct": direct, "requests": server.requests}
    (out / "judge_check.json").write_text(json.dumps(result, indent=1))
    return result
