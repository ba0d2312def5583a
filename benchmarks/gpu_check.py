"""GPU check: every merge method patches exactly in a real CUDA ComfyUI, with dynamic VRAM on
(ComfyUI ≥ 0.15's default) and off (`--disable-dynamic-vram`), and the node's timings. One command,
a few minutes on one GPU:

    COMFYUI_PATH=<ComfyUI ≥ 0.15 checkout> <its venv>/bin/python benchmarks/gpu_check.py --out DIR

and its CPU dry run (classic patcher only — ComfyUI makes every CPU model a classic one — with
K-LoRA's two ways of switching, exchange and per-cast):

    COMFYUI_PATH=<checkout> <its venv>/bin/python benchmarks/gpu_check.py --dry-run

Per mode it starts a headless ComfyUI server with this pack and the test-only pack
(tests/integration/custom_nodes_testonly), writes two LoRA files and a small random hypernetwork
for the test-only SDXL-topology model, and runs, for lorarar, np-lora, sum and k-lora, the merge
→ a recorder → KSampler. The recorder keeps, at every model call, the weights that call was cast
to (low-VRAM and dynamic-VRAM patches and weight functions applied: what the model computed
with); each is compared with base + the library's merge at that call's progress p (K-LoRA: the
side its schedule picks at p, calls within 2e-3 of a layer's switch point left out). The model is
stored in fp16 on a GPU (the low-precision patch path dynamic VRAM takes) with layers wide enough
that dynamic VRAM stages them (ComfyUI loads modules of 16 KiB or less whole); the tolerance is one
rounding of that dtype. Then timings at SDXL's widths (640/1280, one transformer block per level):
the merge node cold and after a strength change, and sampling with k-lora vs sum (k-lora's
per-cast switching adds one rank-r product per switching layer per model call).

Prints a table per mode and writes DIR/gpu_check.json. Exit status 1 when any check fails.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

log = logging.getLogger("gpu_check")

METHODS = ("lorarar", "np-lora", "sum", "k-lora")
CONTENT_STRENGTH, STYLE_STRENGTH = 0.9, 1.1
SPREAD = (0.3, 0.6, 0.8, 1.0, 1.2, 1.5, 1.9, 2.6)  # content magnitudes: k-lora switch points spread out
BOUNDARY = 2e-3


def modes(dry_run: bool) -> list[tuple[str, tuple[str, ...], dict]]:
    if dry_run:
        return [("cpu, k-lora by exchange", ("--cpu",), {}),
                ("cpu, k-lora per cast", ("--cpu",), {"LORARAR_K_LORA_SWITCH": "per-cast"})]
    return [("dynamic VRAM", (), {}), ("classic (--disable-dynamic-vram)", ("--disable-dynamic-vram",), {})]


def tiny(channels: int, dtype: str, seed: int = 7) -> dict:
    return {"class_type": "LoraRarTestTinySDXL", "inputs": {"seed": seed, "channels": channels, "dtype": dtype}}


def method_prompt(method: str, files: dict, model: dict, steps: int, size: int, record: str | None) -> dict:
    prompt = {
        "1": model,
        "2": {"class_type": "LoraRarLoadLora", "inputs": {"lora_name": files["content"]}},
        "3": {"class_type": "LoraRarLoadLora", "inputs": {"lora_name": files["style"]}},
        "4": {"class_type": "LoraRarLoadHypernet", "inputs": {"hypernet_name": files["hypernet"], "download": False}},
        "5": {"class_type": "LoraRarMerge", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "content_lora": ["2", 0], "style_lora": ["3", 0],
            "hypernetwork": ["4", 0], "content_strength": CONTENT_STRENGTH, "style_strength": STYLE_STRENGTH,
            "method": method}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["5", 1], "text": "a sks dog in watercolor style"}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["5", 1], "text": "blurry"}},
        "8": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "9": {"class_type": "KSampler", "inputs": {
            "model": ["10", 0] if record else ["5", 0], "positive": ["6", 0], "negative": ["7", 0],
            "latent_image": ["8", 0], "seed": 3, "cfg": 2.0, "steps": steps, "sampler_name": "euler",
            "scheduler": "normal", "denoise": 1.0}},
        "11": {"class_type": "SaveLatent", "inputs": {"samples": ["9", 0], "filename_prefix": f"latents/{method}"}},
    }
    if record:
        prompt["10"] = {"class_type": "LoraRarTestRecordWeights",
                        "inputs": {"model": ["5", 0], "name": record, "substring": "diffusion_model."}}
    return prompt


def write_inputs(server, channels: int, dtype: str, tag: str) -> tuple[dict, dict, dict]:
    """Base weights of the tiny model, two LoRA files and a random hypernetwork for its widths."""
    import torch
    from safetensors.torch import save_file

    from hypernet.model import HypernetConfig, HyperNetwork, save_hypernet
    from hypernet.tooling.synthetic import random_factors, to_state_dict
    from tests.integration.comfy_support import dump, lora_shapes

    server.run_prompt({"1": tiny(channels, dtype),
                       "2": {"class_type": "LoraRarTestDumpWeights", "inputs": {"model": ["1", 0], "name": f"base_{tag}"}}})
    base = dump(server, f"base_{tag}")
    shapes = {n: s for n, s in lora_shapes(base).items() if not n.startswith(("te1.", "te2."))}
    content = random_factors(shapes, 4, seed=41)
    content = {n: (up * SPREAD[i % len(SPREAD)], down) for i, (n, (up, down)) in enumerate(content.items())}
    loras = server.base_dir / "models" / "loras"
    files = {"content": f"gpu_content_{tag}.safetensors", "style": f"gpu_style_{tag}.safetensors",
             "hypernet": f"gpu_hypernet_{tag}.safetensors"}
    save_file(to_state_dict(content, "kohya", alpha=2.0), loras / files["content"])
    save_file(to_state_dict(random_factors(shapes, 6, seed=42), "kohya", alpha=6.0), loras / files["style"])
    torch.manual_seed(0)
    hypernet = HyperNetwork(HypernetConfig(hidden=16, widths=(2 * channels, 4 * channels), name="gpu-check"))
    save_hypernet(hypernet, server.base_dir / "models" / "lorarar" / files["hypernet"])
    return base, files, {"hypernet": hypernet}


def expected_merges(server, files: dict, hypernet) -> dict:
    from hypernet import merge as merge_lib
    from hypernet.lora import read_lora

    loras = server.base_dir / "models" / "loras"
    content, style = read_lora(loras / files["content"]), read_lora(loras / files["style"])
    return {m: merge_lib.merge(content, style, hypernet if m == "lorarar" else None, CONTENT_STRENGTH,
                               STYLE_STRENGTH, m) for m in METHODS}


# One rounding of the storage dtype, relative (round-to-nearest is half of it; ComfyUI's stochastic
# rounding of fp16/bf16 weights up to all of it), and the absolute floor near zero.
ROUNDING = {"fp32": (1e-5, 1e-6), "fp16": (2.0 ** -10, 2.0 ** -24), "bf16": (2.0 ** -7, 1e-30)}


def compare(calls, merged, base, dtype: str) -> dict:
    """Worst error of the recorded weights against base + the library's ΔW at each call's p, in
    units of one rounding of the weight's storage dtype (fp32: the tests' 1e-5 relative); ≤ 1
    passes."""
    relative, floor = ROUNDING[dtype]
    worst, judged, style_seen = 0.0, 0, 0
    for p, weights in calls:
        for layer in merged.layers:
            if layer.startswith(("te1.", "te2.")):
                continue
            weight = weights.get(layer)
            if weight is None:
                return {"ok": False, "why": f"layer {layer} not recorded"}
            point = merged.switch_points.get(layer)
            if point is not None and abs(p - point) < BOUNDARY:
                continue
            if point is not None and p >= point:
                style_seen += 1
            stored = base[f"unet.{layer}.weight"]
            exact = stored.float() + merged.delta_at(layer, p).reshape(stored.shape)
            unit = exact.abs() * relative + floor
            worst = max(worst, float(((weight.float() - exact).abs() / unit).max()))
            judged += 1
    return {"ok": judged > 0 and worst <= 1.0, "worst_in_roundings": round(worst, 3), "judged": judged,
            "calls": len(calls), "style_side_judged": style_seen}


def correctness(server, channels: int, dtype: str, steps: int) -> dict:
    from tests.integration.comfy_support import read_record

    base, files, extra = write_inputs(server, channels, dtype, "check")
    expected = expected_merges(server, files, extra["hypernet"])
    out = {}
    for method in METHODS:
        record = f"rec_{method.replace('-', '_')}"
        server.run_prompt(method_prompt(method, files, tiny(channels, dtype), steps, 64, record), timeout=600)
        out[method] = compare(read_record(server, f"{record}_0"), expected[method], base, dtype)
        if method == "k-lora":
            moving = sum(0 < p < 1 for p in expected[method].switch_points.values())
            out[method]["switching_layers"] = moving
            out[method]["ok"] = out[method]["ok"] and out[method]["style_side_judged"] > 0 and moving > 0
    return out


def timings(server, channels: int, dtype: str, steps: int, size: int, repeats: int) -> dict:
    """Wall time of whole prompts (the server's queue included), median of `repeats`."""
    import statistics

    _, files, _ = write_inputs(server, channels, dtype, "timing")
    model = tiny(channels, dtype, seed=11)

    def run(prompt) -> float:
        start = time.perf_counter()
        server.run_prompt(prompt, timeout=600)
        return time.perf_counter() - start

    merge_only = {k: v for k, v in method_prompt("lorarar", files, model, steps, size, None).items()
                  if k in ("1", "2", "3", "4", "5")}
    merge_only["12"] = {"class_type": "PreviewImage", "inputs": {"images": ["5", 3]}}
    out = {"merge cold (s)": run(merge_only)}
    changed = []
    for i in range(repeats):
        merge_only["5"]["inputs"]["style_strength"] = STYLE_STRENGTH + 0.01 * (i + 1)
        changed.append(run(merge_only))
    out["merge, strength changed (s)"] = statistics.median(changed)
    for method in ("sum", "k-lora"):
        prompt = method_prompt(method, files, model, steps, size, None)
        run(prompt)  # first run: model load, merge, caches
        times = []
        for i in range(repeats):
            prompt["9"]["inputs"]["seed"] = 100 + i  # a new seed re-runs sampling only
            times.append(run(prompt))
        out[f"sampling {steps} steps at {size}px, {method} (s)"] = statistics.median(times)
    sum_time = out[f"sampling {steps} steps at {size}px, sum (s)"]
    out["k-lora / sum sampling time"] = out[f"sampling {steps} steps at {size}px, k-lora (s)"] / sum_time
    return {k: round(v, 4) for k, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="run on the CPU (classic patcher, both k-lora backends)")
    parser.add_argument("--out", type=Path, default=None, help="folder for gpu_check.json (default: a temporary one)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps of the correctness runs")
    parser.add_argument("--repeats", type=int, default=3, help="repeats per timing")
    parser.add_argument("--skip-timings", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if not os.environ.get("COMFYUI_PATH"):
        parser.error("set COMFYUI_PATH to a ComfyUI checkout (tests/integration/setup_comfyui.sh makes one)")
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            parser.error("no CUDA device: run with --dry-run on a CPU")
    from tests.integration.comfy_support import running_comfy

    dry = args.dry_run
    check = {"channels": 32 if dry else 64, "dtype": "fp32" if dry else "fp16", "steps": args.steps or (4 if dry else 8)}
    timing = {"channels": 64 if dry else 320, "dtype": "fp32" if dry else "fp16", "steps": 4 if dry else 20,
              "size": 64 if dry else 1024}
    report = {"comfyui": os.environ["COMFYUI_PATH"], "check": check, "timing": timing, "modes": {}}
    failed = False
    root = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    for number, (label, device_args, env) in enumerate(modes(dry)):
        started = time.perf_counter()
        folder = root / f"mode{number}"
        folder.mkdir()
        try:
            with running_comfy(folder, label=f"mode{number}", env=env, device_args=device_args) as server:
                result = {"correctness": correctness(server, check["channels"], check["dtype"], check["steps"])}
                if not args.skip_timings:
                    result["timings"] = timings(server, timing["channels"], timing["dtype"], timing["steps"],
                                                timing["size"], args.repeats)
        except BaseException as exc:  # noqa: BLE001 — a failed server start (pytest's Failed) or check
            if isinstance(exc, KeyboardInterrupt):
                raise
            result = {"error": f"{type(exc).__name__}: {exc}"[:4000]}
        result["seconds"] = round(time.perf_counter() - started, 1)
        report["modes"][label] = result
        failed |= "error" in result or not all(r["ok"] for r in result["correctness"].values())
        print(f"\n== {label} ({result['seconds']} s)")
        if "error" in result:
            print(f"   ERROR {result['error']}")
            continue
        for method, r in result["correctness"].items():
            detail = f"worst {r.get('worst_in_roundings')} roundings over {r.get('judged')} weights in {r.get('calls')} calls"
            if method == "k-lora":
                detail += f", {r.get('switching_layers')} switching layers, {r.get('style_side_judged')} judged on the style side"
            print(f"   {method:8s} {'ok  ' if r['ok'] else 'FAIL'} {detail}{'; ' + r['why'] if 'why' in r else ''}")
        for name, value in result.get("timings", {}).items():
            print(f"   {name}: {value}")
    out = args.out or root
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"\n{'FAILED' if failed else 'all checks passed'}; report: {out / 'gpu_check.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
