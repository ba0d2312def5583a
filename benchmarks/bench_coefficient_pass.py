"""Benchmark: arrangements of LoRA.rar's CPU coefficient pass, side by side (issue 12).

One rank-64 fp16 SDXL-shaped pair in memory (SDXL's 280 to_q/to_out.0 matrices) and the official
hypernetwork if it is found (else random weights of the same shapes). Each round times every
arrangement once, in turn, each between two 2048² float32 matmuls, and prints per arrangement the
median time and the median and best share of the machine's matmul rate (the faster of the two
neighbouring matmuls):

- "before": what the CPU ran until 2026-12-02 — factors stacked, widened and scaled into fresh
  tensors, 4 layers per call of `HyperNetwork.coefficients_factored`;
- "stacked per group": the same with each group of equal shapes in one call (what a GPU runs);
- "buffered C/B": the shipped pass (hypernet/methods/lorarar_cpu.py) with chunks of C layers and
  activation blocks of B layers (the default is 16/4);
- "shipped + diagnostics": what a merge runs — the shipped pass with the measures of the merge's
  own diagnostics (hypernet/methods/lorarar_diagnostics.py) and their reduction to the figures.

    python benchmarks/bench_coefficient_pass.py [--rounds 11] [--arrangements 4/2,8/4,16/4,32/4,80/4]

Only an otherwise idle machine gives figures worth comparing across runs; the ratios between
arrangements of one run hold up better (the load average is printed).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from hypernet.catalog import find_checkpoint  # noqa: E402
from hypernet.lora import lora_from_state_dict  # noqa: E402
from hypernet.methods import lorarar, lorarar_cpu, lorarar_diagnostics  # noqa: E402
from hypernet.model import HypernetConfig, HyperNetwork, load_hypernet  # noqa: E402
from hypernet.tooling import synthetic  # noqa: E402
from hypernet.tooling.bench import coefficient_flops, matmul_rate, stacked_pass  # noqa: E402


def _before(content, style, hypernet, names):
    """The pre-2026-12-02 CPU arrangement: batches of 4 layers, stacked per batch."""
    stacked_pass(content, style, hypernet, names, batch=4)


def _buffered(chunk: int, block: int):
    def run(content, style, hypernet, names):
        lorarar_cpu.CHUNK, lorarar_cpu.BLOCK = chunk, block
        try:
            lorarar.compute_coefficients(content, style, hypernet)
        finally:
            lorarar_cpu.CHUNK, lorarar_cpu.BLOCK = default_chunk, default_block
    return run


def _with_diagnostics(content, style, hypernet, names):
    """What a merge runs: the shipped pass plus the measures of its diagnostics (issue 17) and
    their reduction to the per-width figures."""
    passed = lorarar.coefficient_pass(content, style, hypernet)
    lorarar_diagnostics.measure_contribution(hypernet, passed.coefficients, passed.measures, passed.widths)


default_chunk, default_block = lorarar_cpu.CHUNK, lorarar_cpu.BLOCK


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--arrangements", default="4/2,8/4,16/4,32/4,80/4",
                        help="chunk/block pairs of the buffered pass, comma-separated (default: %(default)s)")
    parser.add_argument("--hypernet", default=None, help="hypernetwork file (default: the official SDXL one if found)")
    args = parser.parse_args(argv)
    try:
        pairs = [tuple(int(x) for x in spec.split("/")) for spec in args.arrangements.split(",")]
        if any(len(p) != 2 or min(p) < 1 for p in pairs):
            raise ValueError
    except ValueError:
        parser.error(f"--arrangements: expected chunk/block pairs such as 16/4,32/8, got {args.arrangements!r}")

    path = args.hypernet or find_checkpoint("lorarar-sdxl")[0]
    hypernet = load_hypernet(path) if path else HyperNetwork(HypernetConfig()).eval()
    content = lora_from_state_dict(synthetic.sdxl_lora(rank=64, seed=1, alpha=32, dtype=torch.float16, te_layers=0))
    style = lora_from_state_dict(synthetic.sdxl_lora(rank=64, seed=2, alpha=32, dtype=torch.float16, te_layers=0))
    names = list(lorarar.compute_coefficients(content, style, hypernet)[0])
    flops = coefficient_flops(content, style, hypernet, names)
    arrangements = {"before (batches of 4, stacked)": _before, "stacked per group": stacked_pass}
    arrangements.update({f"buffered {c}/{b}" + (" (shipped)" if (c, b) == (default_chunk, default_block) else ""):
                         _buffered(c, b) for c, b in pairs})
    arrangements["shipped + diagnostics (a merge)"] = _with_diagnostics

    print(f"{len(names)} matrices, {flops / 1e9:.1f} GFLOP per pass; hypernetwork "
          f"{Path(path).name if path else 'random weights'}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.1f}")
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    for run in arrangements.values():  # warm-up: allocator, kernels
        run(content, style, hypernet, names)
    times = {label: [] for label in arrangements}
    shares = {label: [] for label in arrangements}
    for _ in range(args.rounds):
        for label, run in arrangements.items():
            before = matmul_rate(a, b)
            start = time.perf_counter()
            run(content, style, hypernet, names)
            times[label].append(time.perf_counter() - start)
            shares[label].append(flops / 1e9 / times[label][-1] / max(before, matmul_rate(a, b)))
    width = max(map(len, arrangements))
    for label in arrangements:
        print(f"{label:<{width}}  median {statistics.median(times[label]):.3f} s  share of matmul rate: "
              f"median {statistics.median(shares[label]):.2f}, best {max(shares[label]):.2f}")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
