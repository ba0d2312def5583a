"""Benchmark: a full-UNet LyCORIS LoHa merged with a LoRA through the command line — output size,
peak memory and time, this checkout beside another one (e.g. the code before LyCORIS layers were
written as exact factors), in one run.

    python benchmarks/bench_lycoris.py [--other DIR] [--method sum] [--dtype fp16] [--keep DIR]

Both inputs cover SDXL's 722 UNet Linear layers: a LoHa of rank 8 (as LyCORIS writes it, kohya
keys `hada_w1_a`…, alpha 8) and a plain LoRA of rank 16, fp16 like most published files. Each
checkout's `python -m hypernet merge` runs as its own process (peak RSS from the kernel's
accounting of that child; time is wall clock); the written files are compared with each other
where both exist. `--other` names a checkout of this repository (its own hypernet/ is used);
`git worktree add /tmp/before <commit>` makes one. Figures go to stdout.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def write_inputs(folder: Path) -> tuple[Path, Path]:
    import torch
    from safetensors.torch import save_file

    from hypernet import naming
    from hypernet.tooling import synthetic

    shapes = naming.sdxl_linear_layers()
    gen = torch.Generator().manual_seed(0)
    loha = {}
    for name, (out, inp) in shapes.items():
        key = naming.ldm_to_kohya_key(name)
        for part in ("1", "2"):
            loha[f"{key}.hada_w{part}_a"] = (torch.randn(out, 8, generator=gen) * 0.05).half()
            loha[f"{key}.hada_w{part}_b"] = (torch.randn(8, inp, generator=gen) / inp ** 0.5).half()
        loha[f"{key}.alpha"] = torch.tensor(8.0)
    lora = synthetic.to_state_dict(synthetic.random_factors(shapes, 16, 1, torch.float16), "kohya", alpha=16.0)
    paths = folder / "loha_rank8.safetensors", folder / "lora_rank16.safetensors"
    save_file(loha, str(paths[0]))
    save_file(lora, str(paths[1]))
    return paths


def run_merge(checkout: Path, inputs: tuple[Path, Path], out: Path, method: str, dtype: str) -> dict:
    """One merge in a child process; its peak RSS from RUSAGE_CHILDREN (the largest child so far,
    so each checkout is measured in its own wrapper process)."""
    code = ("import resource, subprocess, sys, time\n"
            "start = time.perf_counter()\n"
            "rc = subprocess.call(sys.argv[1:])\n"
            "print(rc, time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n")
    cmd = [sys.executable, "-c", code, sys.executable, "-m", "hypernet", "merge", str(inputs[0]), str(inputs[1]),
           "-o", str(out), "--method", method, "--dtype", dtype, "--force"]
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    done = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True)
    rc, seconds, rss_kib = done.stdout.split()[-3:]
    result = {"rc": int(rc), "seconds": float(seconds), "peak_rss_mib": int(rss_kib) / 1024,
              "stderr": done.stderr.strip().splitlines()[-3:]}
    result["output_mib"] = out.stat().st_size / 2**20 if out.exists() and int(rc) == 0 else None
    return result


def _delta(handle, module: str):
    keys = set(handle.keys())
    if f"{module}.diff" in keys:
        return handle.get_tensor(f"{module}.diff").float()
    up, down = handle.get_tensor(f"{module}.lora_up.weight").float(), handle.get_tensor(f"{module}.lora_down.weight").float()
    alpha = float(handle.get_tensor(f"{module}.alpha")) if f"{module}.alpha" in keys else down.shape[0]
    return (up.flatten(1) @ down.flatten(1)) * (alpha / down.shape[0])


def compare(a: Path, b: Path, sample: int = 24) -> float:
    """Largest |ΔW difference| over a spread sample of layers of two merged files (read lazily: a
    dense file can be gigabytes), relative to the largest |ΔW| there."""
    from safetensors import safe_open

    with safe_open(str(a), "pt") as first, safe_open(str(b), "pt") as second:
        modules = sorted({k.rsplit(".", 1)[0].removesuffix(".lora_up").removesuffix(".lora_down")
                          for k in first.keys()})
        picked = modules[:: max(1, len(modules) // sample)]
        worst = scale = 0.0
        for module in picked:
            d1, d2 = _delta(first, module), _delta(second, module)
            worst = max(worst, float((d1.flatten(1) - d2.flatten(1)).abs().max()))
            scale = max(scale, float(d1.abs().max()))
    return worst / scale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--other", type=Path, help="another checkout of this repository to run beside this one")
    parser.add_argument("--method", default="sum")
    parser.add_argument("--dtype", default="fp16", choices=("fp16", "bf16", "fp32"))
    parser.add_argument("--keep", type=Path, help="folder for the inputs and outputs (default: a temporary one)")
    args = parser.parse_args(argv)
    folder = args.keep or Path(tempfile.mkdtemp(prefix="bench_lycoris_"))
    folder.mkdir(parents=True, exist_ok=True)
    inputs = write_inputs(folder)
    inputs_mib = sum(p.stat().st_size for p in inputs) / 2**20
    print(f"inputs: LoHa rank 8 ({inputs[0].stat().st_size / 2**20:.0f} MiB) + LoRA rank 16 "
          f"({inputs[1].stat().st_size / 2**20:.0f} MiB), 722 SDXL UNet layers each, fp16; method {args.method}, "
          f"output {args.dtype}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    runs = [("this checkout", REPO)] + ([("other (" + str(args.other) + ")", args.other)] if args.other else [])
    outputs = {}
    for label, checkout in runs:
        out = folder / f"merged_{len(outputs)}.safetensors"
        result = run_merge(checkout, inputs, out, args.method, args.dtype)
        outputs[label] = out if result["output_mib"] is not None else None
        size = f"{result['output_mib']:.0f} MiB ({result['output_mib'] / inputs_mib:.2f}x the inputs)" \
            if result["output_mib"] is not None else "nothing written"
        print(f"{label}: rc {result['rc']}, {result['seconds']:.1f} s, peak RSS {result['peak_rss_mib']:.0f} MiB "
              f"({result['peak_rss_mib'] / inputs_mib:.2f}x the inputs), output {size}")
        if result["rc"] != 0:
            print("   " + "\n   ".join(result["stderr"]))
    written = [p for p in outputs.values() if p is not None]
    if len(written) == 2:
        print(f"the two outputs' ΔW differ by at most {compare(*written):.2e} of the largest |ΔW| "
              "(24 layers spread over the UNet)")
    print(f"(rusage of children; {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB in this process)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
