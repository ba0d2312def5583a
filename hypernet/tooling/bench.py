"""`lorarar bench`: time the LoRA.rar merge on a rank-64 SDXL-shaped pair, side by side.

Measures in one run: reading both files, the factored hypernetwork merge (all 280 to_q/to_out.0
matrices), the dense formulation of the same merge, and writing; prints the dense/factored
ratio, the largest coefficient difference between them and peak memory.
"""

from __future__ import annotations

import logging
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..lora import read_lora
from ..merged import assemble
from ..methods.lorarar import accelerator_group_coefficients, coefficient_pass, compute_coefficients, shape_groups
from ..methods.lorarar_diagnostics import measure_contribution
from ..model import HypernetConfig, HyperNetwork, load_hypernet
from ..writer import save_merged
from . import synthetic

log = logging.getLogger(__name__)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def coefficient_flops(content, style, hypernet, names) -> float:
    """Floating-point operations of the factored pass over `names`: W1·up for both sides, the
    (hidden × r_c+r_s)·(r_c+r_s × in) product and the head (the arithmetic floor of the method)."""
    hidden, total = hypernet.config.hidden, 0
    for name in names:
        c, s = content.layers[name], style.layers[name]
        out_width, in_width, rank = c.shape[0], math.prod(c.shape[1:]), c.rank + s.rank
        total += 2 * hidden * out_width * rank + 2 * hidden * rank * in_width + 4 * hidden * in_width
    return float(total)


_RATE_SIZE = 2048


def matmul_rate(a: torch.Tensor, b: torch.Tensor) -> float:
    """GFLOP/s of one float32 product a @ b (this machine's reference rate, on its threads)."""
    start = time.perf_counter()
    torch.mm(a, b)
    return 2 * a.shape[0] * a.shape[1] * b.shape[1] / (time.perf_counter() - start) / 1e9


def stacked_pass(content, style, hypernet, names, batch: int | None = None) -> None:
    """The pass as accelerators run it — each group of equal shapes stacked, widened and scaled
    into fresh tensors, one batched call of H — on the CPU: the buffered CPU pass's comparison.
    `batch` layers per call instead of a whole group is what the CPU ran before 2026-12-02 (4)."""
    with torch.no_grad():
        for group in shape_groups(content, style, names)[0].values():
            step = batch or len(group)
            for start in range(0, len(group), step):
                chunk = group[start:start + step]
                accelerator_group_coefficients(hypernet, [content.layers[n] for n in chunk],
                                               [style.layers[n] for n in chunk], torch.device("cpu"))


def measured_pass(content, style, hypernet):
    """The coefficient pass as a merge runs it: with the measures of its diagnostics (issue 17)
    and their reduction to the per-width figures."""
    passed = coefficient_pass(content, style, hypernet)
    return measure_contribution(hypernet, passed.coefficients, passed.measures, passed.widths)


def dense_coefficients(content, style, hypernet, names):
    """The dense formulation: form ΔW_c and ΔW_s (out×in) and feed every column through H."""
    with torch.no_grad():
        return {n: hypernet.coefficients_dense(content.layers[n].delta(), style.layers[n].delta()) for n in names}


def _timed_on(device: str, content, style, hypernet, repeat: int) -> tuple[list[float], dict]:
    """Coefficient pass times on `device` (first call = warm-up: kernels, allocator), result of the last."""
    synchronize = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    compute_coefficients(content, style, hypernet, device=device)
    synchronize()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        coefficients, _ = compute_coefficients(content, style, hypernet, device=device)
        synchronize()
        times.append(time.perf_counter() - start)
    return times, coefficients


def run_benchmark(rank: int = 64, dtype: str = "fp16", hypernet_path: str | None = None,
                  repeat: int = 3, dense: bool = True, folder: str | None = None,
                  device: str | None = None) -> dict[str, float]:
    """`device` (e.g. "cuda"): also time the coefficient pass there, beside the CPU's, from factors
    in CPU memory as ComfyUI holds them (the transfer of the factors H needs is included)."""
    torch_dtype = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    hypernet = load_hypernet(hypernet_path) if hypernet_path else HyperNetwork(HypernetConfig()).eval()
    results: dict[str, float] = {"threads": torch.get_num_threads(), "rank": rank}
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        paths = []
        for seed, name in ((1, "content"), (2, "style")):
            path = Path(tmp) / f"{name}.safetensors"
            save_file(synthetic.sdxl_lora(rank=rank, seed=seed, alpha=rank / 2, dtype=torch_dtype, te_layers=12), str(path))
            paths.append(path)
        files_mib = sum(p.stat().st_size for p in paths) / 2**20
        results["files_MiB"] = files_mib

        baseline = _rss_kib("VmRSS")
        tracked = _reset_peak_rss()
        start = time.perf_counter()
        content, style = read_lora(paths[0]), read_lora(paths[1])
        results["read_s"] = time.perf_counter() - start

        coefficients, _ = compute_coefficients(content, style, hypernet)
        start = time.perf_counter()
        merged = assemble(content, style, coefficients, method="lorarar")
        results["assemble_s"] = time.perf_counter() - start
        if tracked:
            results["peak_read_merge_MiB"] = (_rss_kib("VmHWM") - baseline) / 1024
            results["peak_over_files"] = results["peak_read_merge_MiB"] / files_mib

        # Peak memory above covers reading and one merge; the comparison pass below stacks whole
        # groups, which the merge never does. The machine's matmul rate is measured right before
        # and after every repeat, so that a slower moment of a shared machine slows both sides of
        # the ratio alike.
        flops = coefficient_flops(content, style, hypernet, coefficients)
        a, b = torch.randn(_RATE_SIZE, _RATE_SIZE), torch.randn(_RATE_SIZE, _RATE_SIZE)
        matmul_rate(a, b)
        times, shares, rates, stacked, measured = [], [], [], [], []
        for _ in range(repeat):
            before = matmul_rate(a, b)
            start = time.perf_counter()
            coefficients, _ = compute_coefficients(content, style, hypernet)
            times.append(time.perf_counter() - start)
            rates.append(max(before, matmul_rate(a, b)))
            shares.append(flops / 1e9 / times[-1] / rates[-1])
            start = time.perf_counter()
            stacked_pass(content, style, hypernet, list(coefficients))
            stacked.append(time.perf_counter() - start)
            start = time.perf_counter()
            measured_pass(content, style, hypernet)
            measured.append(time.perf_counter() - start)
        del a, b
        results["with_diagnostics_s"] = statistics.median(measured)
        results["diagnostics_overhead"] = results["with_diagnostics_s"] / statistics.median(times) - 1
        results["stacked_s"] = statistics.median(stacked)
        results["stacked_over_factored"] = results["stacked_s"] / statistics.median(times)
        results["factored_s"] = statistics.median(times)
        results["factored_min_s"] = min(times)
        results["matrices"] = len(coefficients)
        results["factored_GFLOP"] = flops / 1e9
        results["matmul_GFLOPs"] = statistics.median(rates)
        results["share_of_matmul_rate"] = statistics.median(shares)
        results["share_of_matmul_rate_best"] = max(shares)
        if device and device != "cpu":
            device_times, on_device = _timed_on(device, content, style, hypernet, max(repeat, 5))
            results["device"] = device
            results["device_factored_s"] = statistics.median(device_times)
            results["device_factored_min_s"] = min(device_times)
            results["cpu_over_device"] = results["factored_s"] / results["device_factored_s"]
            results["device_max_relative_diff"] = max(
                float((on_device[n][i] - coefficients[n][i]).abs().max() / coefficients[n][i].abs().max().clamp_min(1e-12))
                for n in coefficients for i in (0, 1))

        if dense:
            start = time.perf_counter()
            reference = dense_coefficients(content, style, hypernet, list(coefficients))
            results["dense_s"] = time.perf_counter() - start
            results["dense_over_factored"] = results["dense_s"] / results["factored_s"]
            results["max_coefficient_diff"] = max(
                float((coefficients[n][i] - reference[n][i]).abs().max()) for n in reference for i in (0, 1))

        out = Path(tmp) / "merged.safetensors"
        start = time.perf_counter()
        save_merged(merged, out)
        results["write_s"] = time.perf_counter() - start
        results["merged_MiB"] = out.stat().st_size / 2**20
    return results


def format_results(r: dict[str, float]) -> str:
    lines = [f"rank-{r['rank']:.0f} SDXL pair, {r['files_MiB']:.0f} MiB on disk, torch threads {r['threads']:.0f}",
             f"read both files            {r['read_s']:8.3f} s",
             f"hypernetwork merge         {r['factored_s']:8.3f} s  (median; best {r['factored_min_s']:.3f} s; "
             f"{r['matrices']:.0f} matrices, factored)",
             f"  = {r['factored_GFLOP'] / r['factored_s']:.0f} GFLOP/s ({r['factored_GFLOP']:.1f} GFLOP) = "
             f"{r['share_of_matmul_rate']:.0%} of this machine's fp32 matmul rate (median; best "
             f"{r['share_of_matmul_rate_best']:.0%}; {r['matmul_GFLOPs']:.0f} GFLOP/s on {_RATE_SIZE}² "
             "products timed around each repeat)",
             f"  the same pass stacked per group (as on a GPU) {r['stacked_s']:.3f} s = "
             f"{r['stacked_over_factored']:.2f}x the buffered CPU pass",
             f"  with the merge's diagnostics (what a merge runs) {r['with_diagnostics_s']:.3f} s = "
             f"{r['diagnostics_overhead']:+.0%} (medians, side by side)",
             f"assemble merged LoRA       {r['assemble_s']:8.3f} s"]
    if "device" in r:
        lines += [f"hypernetwork merge on {r['device']:<5}{r['device_factored_s'] * 1000:8.1f} ms  (median; best "
                  f"{r['device_factored_min_s'] * 1000:.1f} ms; factors from CPU memory) = "
                  f"{r['cpu_over_device']:.0f}x faster than the CPU",
                  f"max relative diff vs CPU   {r['device_max_relative_diff']:8.2e}"]
    if "dense_s" in r:
        lines += [f"dense formulation          {r['dense_s']:8.3f} s",
                  f"dense / factored           {r['dense_over_factored']:8.1f} x",
                  f"max |coefficient diff|     {r['max_coefficient_diff']:8.2e}"]
    lines.append(f"write merged ({r['merged_MiB']:.0f} MiB)     {r['write_s']:8.3f} s")
    if "peak_read_merge_MiB" in r:
        lines.append(f"peak RSS read+merge        {r['peak_read_merge_MiB']:8.0f} MiB = "
                     f"{r['peak_over_files']:.2f} x the two files")
    return "\n".join(lines)
