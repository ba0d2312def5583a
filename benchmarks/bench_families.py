"""Benchmark: an np-lora merge of a Flux.1 pair against one of an SDXL pair, side by side in one run
— time and peak memory, with the size of the two input files.

    python benchmarks/bench_families.py [--rounds 3] [--method np-lora] [--json]

Cases (each pair written to disk as its trainer writes it, then read and merged by the library):

- SDXL rank 64: kohya keys over SDXL's 722 UNet Linear layers, fp16 (the official LoRA.rar rank);
- Flux.1 rank 16, kohya: every Linear of the 19 double and 38 single blocks (304 weights, q/k/v and
  the single blocks' MLP input fused as sd-scripts writes them), bf16;
- Flux.1 rank 16, diffusers: the same weights as ai-toolkit/diffusers write them — q, k and v (and
  the single blocks' MLP input) each its own LoRA, which the reader places into the fused weights as
  block-sparse LoRAs (so its merged rank is larger), bf16.

Every measurement runs in a fresh process: time = reading both files + the merge (wall clock,
median of the rounds, cases interleaved round by round so a busy machine slows all alike); peak
memory = the process's peak RSS growth over the read + merge (the kernel's VmHWM, reset before
reading), compared with the two files' size — once in a cold process, and once "warm": after
one small merge in the same process, as a running ComfyUI has done, so that the one-time set-up
of the code and linear-algebra routines (about 7-15 MB) is not counted as the merge's. Figures go
to stdout; quote them with the date and machine (docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CASES = ("sdxl-r64-kohya", "flux1-r16-kohya", "flux1-r16-diffusers")


def write_pair(case: str, folder: Path) -> tuple[Path, Path]:
    import torch
    from safetensors.torch import save_file

    from hypernet import families, naming
    from hypernet.tooling import synthetic

    paths = (folder / f"{case}-content.safetensors", folder / f"{case}-style.safetensors")
    for seed, path in enumerate(paths, start=1):
        if case.startswith("sdxl"):
            shapes = naming.sdxl_linear_layers()
            sd = synthetic.to_state_dict(synthetic.random_factors(shapes, 64, seed, torch.float16), "kohya", alpha=64.0)
        else:
            table = families.get("flux1").table("flux1-dev")
            shapes = {n: s for n, s in table.items() if n.startswith(("double_blocks.", "single_blocks."))}
            sd = _flux(shapes, seed, case.endswith("diffusers"))
        save_file(sd, str(path))
    return paths


def _flux(shapes: dict, seed: int, diffusers: bool) -> dict:
    """A rank-16 bf16 Flux LoRA: kohya (fused weights) or diffusers (one LoRA per projection)."""
    import torch

    from hypernet import families, naming

    spec = families.get("flux1")
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, (rows, cols) in shapes.items():
        parts = spec.parts_of(name)
        if diffusers and parts:
            pieces = [(p.name, len(spec.part_rows(name, [p.name], cols))) for p in parts]
        else:
            pieces = [(None, rows)]
        for part, length in pieces:
            up = (torch.randn(length, 16, generator=gen) * 0.01).to(torch.bfloat16)
            down = (torch.randn(16, cols, generator=gen) / cols ** 0.5).to(torch.bfloat16)
            if part is None and not diffusers:
                key = naming.kohya_key(name, "flux1")
                out.update({f"{key}.lora_up.weight": up, f"{key}.lora_down.weight": down,
                            f"{key}.alpha": torch.tensor(16.0)})
                continue
            key = "transformer." + _diffusers_name(name, part)
            out.update({f"{key}.lora_B.weight": up, f"{key}.lora_A.weight": down})
    return out


def _diffusers_name(name: str, part: str | None) -> str:
    """The diffusers module of (a part of) a Flux weight, from the family's diffusers vocabulary."""
    from hypernet import families

    for mapping in families.get("flux1").vocabularies["diffusers"].mappings:
        template = mapping.regex.pattern.strip("^$").replace("\\", "")
        index = name.split(".")[1]
        if mapping.target.replace("{i}", index) == name and mapping.parts == ((part,) if part else ()):
            return template.replace("(?P<i>d+)", index)
    raise KeyError((name, part))


MEASURE = r"""
import json, sys, time
from pathlib import Path

sys.path.insert(0, sys.argv[1])
import torch
from hypernet import families
from hypernet.lora import read_lora
from hypernet.merge import merge

torch.set_num_threads(1)
families.get("sdxl"); families.get("flux1")  # the specs are loaded once per process, not per merge


def rss(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    return 0


if sys.argv[5] == "warm":
    # A long-running process (ComfyUI) has merged before: one small merge first pages in the code
    # paths and lets the linear-algebra routines set up their workspaces, so only what this
    # merge's data costs is measured. "cold" leaves that one-time cost in.
    from hypernet import naming
    from hypernet.lora import lora_from_state_dict
    from hypernet.tooling import synthetic
    small = dict(list(naming.sdxl_linear_layers().items())[:2])
    pair = [lora_from_state_dict(synthetic.to_state_dict(synthetic.random_factors(small, 4, seed, torch.float16),
                                                         "kohya", alpha=4.0)) for seed in (1, 2)]
    merge(*pair, None, method=sys.argv[4])
    del pair
Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
before = rss("VmRSS:")
started = time.perf_counter()
content, style = read_lora(sys.argv[2]), read_lora(sys.argv[3])
read = time.perf_counter() - started
merged = merge(content, style, None, method=sys.argv[4])
total = time.perf_counter() - started
print(json.dumps({"read_s": read, "total_s": total, "peak_growth": rss("VmHWM:") - before,
                  "layers": len(merged.layers), "family": merged.family,
                  "rank": max(merged.ranks()) if merged.ranks() else 0}))
"""


def measure(paths: tuple[Path, Path], method: str, warm: bool = False) -> dict:
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(REPO), str(paths[0]), str(paths[1]), method,
                           "warm" if warm else "cold"], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--method", default="np-lora")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    results: dict[str, list[dict]] = {c: [] for c in cases}
    with tempfile.TemporaryDirectory() as folder:
        pairs = {c: write_pair(c, Path(folder)) for c in cases}
        sizes = {c: sum(p.stat().st_size for p in pairs[c]) for c in cases}
        for _ in range(args.rounds):
            for case in cases:
                cold, warm = measure(pairs[case], args.method), measure(pairs[case], args.method, warm=True)
                cold["warm_peak_growth"] = warm["peak_growth"]
                results[case].append(cold)
    rows = []
    for case in cases:
        runs = results[case]
        rows.append({"case": case, "layers": runs[0]["layers"], "merged_rank": runs[0]["rank"],
                     "files_mb": sizes[case] / 1e6,
                     "read_s": statistics.median(r["read_s"] for r in runs),
                     "total_s": statistics.median(r["total_s"] for r in runs),
                     "peak_growth_mb": statistics.median(r["peak_growth"] for r in runs) / 1e6,
                     "warm_peak_growth_mb": statistics.median(r["warm_peak_growth"] for r in runs) / 1e6})
    for row in rows:
        row["memory_vs_files"] = row["peak_growth_mb"] / row["files_mb"]
        row["warm_memory_vs_files"] = row["warm_peak_growth_mb"] / row["files_mb"]
    baseline = rows[0]["total_s"] if rows and rows[0]["case"].startswith("sdxl") else None
    if args.json:
        print(json.dumps({"method": args.method, "rounds": args.rounds, "rows": rows}, indent=1))
        return 0
    print(f"{args.method} merge, read + merge, median of {args.rounds} rounds (fresh process each; 1 torch thread)")
    print(f"{'case':22s} {'layers':>6s} {'rank':>5s} {'2 files':>9s} {'read':>7s} {'total':>7s} {'vs SDXL':>8s} "
          f"{'peak RSS +':>11s} {'vs files':>9s} {'warm +':>9s} {'vs files':>9s}")
    for row in rows:
        ratio = f"{row['total_s'] / baseline:.2f}x" if baseline else "-"
        print(f"{row['case']:22s} {row['layers']:6d} {row['merged_rank']:5d} {row['files_mb']:7.1f}MB "
              f"{row['read_s']:6.2f}s {row['total_s']:6.2f}s {ratio:>8s} {row['peak_growth_mb']:9.1f}MB "
              f"{row['memory_vs_files']:8.2f}x {row['warm_peak_growth_mb']:7.1f}MB {row['warm_memory_vs_files']:8.2f}x")
    print("peak RSS +: a fresh process (one-time library set-up included); warm +: after one small merge "
          "in the same process, as in a running ComfyUI")
    return 0


if __name__ == "__main__":
    sys.exit(main())
