"""Benchmark: the four merge methods side by side on full-size SDXL shapes, and what K-LoRA's
switching adds to sampling.

(1) Merge time of lorarar, np-lora, k-lora and sum for one synthetic rank-64 pair at every SDXL
    shape (`hypernet.tooling.synthetic.sdxl_lora`: the 722 UNet layers plus text-encoder layers):
    the strength-free merge the node caches, wall and CPU time, and the peak memory above the
    start (Linux VmHWM, reset before each method).
(2) With a ComfyUI (COMFYUI_PATH, run under its venv; skipped otherwise):
    (a) full-size SDXL UNet (fp16, random weights), weights patched as the sampler patches them:
        the work a k-lora MODEL adds to one image — ON_PRE_RUN, one ON_PREPARE_STATE per step at
        the sigmas of a real schedule, ON_CLEANUP, called exactly as ComfyUI's sampler calls them —
        against sum's (no callbacks). This is the per-step overhead on the real SDXL layer sizes,
        independent of how fast the UNet itself runs.
    (b) real sampling (comfy.sample.sample) on a mid-size SDXL-topology UNet (SDXL's 70
        transformer blocks and 560 attention projections, widths divided by --width-divisor):
        seconds per image for sum, k-lora as this pack runs it (patches exchanged at the switch
        points), and k-lora as bypass-style forward hooks (the alternative: every call of a
        switching layer adds its active side's x·Aᵀ·Bᵀ), after one warm-up image each.

Wall-clock figures on a shared machine only mean something when it is otherwise idle: the load
average is printed with them.

    COMFYUI_PATH=<ComfyUI checkout> <its venv>/bin/python benchmarks/bench_methods.py
    .venv/bin/python benchmarks/bench_methods.py            # (1) only
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import logging
import os
import statistics
import sys
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench_methods")


# --- measuring ----------------------------------------------------------------------------------

def _status(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_reset() -> int | None:
    """Reset the peak-RSS mark to the current RSS (Linux); returns the current RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return _status("VmRSS")


def timed(fn):
    """(wall s, CPU s, peak RSS above the start in bytes or None, result)."""
    gc.collect()
    start_rss = peak_reset()
    start, cpu = time.perf_counter(), time.process_time()
    value = fn()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = _status("VmHWM")
    return wall, cpu, (peak - start_rss if peak is not None and start_rss is not None else None), value


def mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.0f} MiB"


# --- the pack ----------------------------------------------------------------------------------

def import_pack(with_nodes: bool):
    """The library (and, with ComfyUI, the node modules) from one package, so that the node code
    and the library share their classes. As a package named lorarar_pack: its `nodes` must not
    shadow ComfyUI's nodes.py."""
    spec = importlib.util.spec_from_file_location("lorarar_pack", REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    package = importlib.util.module_from_spec(spec)
    sys.modules["lorarar_pack"] = package
    spec.loader.exec_module(package)
    names = {"merge": "merge", "lora": "lora", "model": "model", "synthetic": "tooling.synthetic",
             "node_logic": "nodelogic.merge"}
    lib = types.SimpleNamespace(**{key: importlib.import_module(f"lorarar_pack.hypernet.{name}")
                                   for key, name in names.items()})
    lib.nodes_merge = importlib.import_module("lorarar_pack.nodes.nodes_merge") if with_nodes else None
    return lib


# --- (1) merge time -------------------------------------------------------------------------------

def bench_merges(lib, repeats: int, rank: int) -> None:
    import torch

    shapes = lib.synthetic.sdxl_layer_shapes(te_layers=2)
    content = lib.lora.lora_from_state_dict(lib.synthetic.sdxl_lora(rank=rank, seed=1, alpha=rank, te_layers=2))
    style = lib.lora.lora_from_state_dict(lib.synthetic.sdxl_lora(rank=rank, seed=2, alpha=rank, te_layers=2))
    hypernet = lib.model.HyperNetwork(lib.model.HypernetConfig())  # random: the same work as the official one
    print(f"(1) merge time, synthetic rank-{rank} pair at full SDXL shapes ({len(shapes)} layers: 722 UNet + "
          f"{len(shapes) - 722} text-encoder), float32 factors, strength-free merge; median/min of {repeats}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs")
    print(f"    {'method':8s} {'wall median':>12s} {'wall min':>9s} {'CPU median':>11s} {'peak memory':>12s}  what it did")
    for method in lib.merge.METHODS:
        runs = [timed(lambda m=method: lib.merge.merge(content, style, hypernet if m == "lorarar" else None,
                                                      method=m, expected_family="sdxl"))
                for _ in range(repeats)]
        walls, cpus = [r[0] for r in runs], [r[1] for r in runs]
        peaks = [r[2] for r in runs if r[2] is not None]
        merged = runs[-1][3]
        print(f"    {method:8s} {statistics.median(walls):10.2f} s {min(walls):7.2f} s {statistics.median(cpus):9.2f} s "
              f"{mib(max(peaks) if peaks else None):>12s}  {merged.report.method_layers} layers "
              f"{merged.report.method_label}")
        del runs, merged
        gc.collect()


# --- (2) ComfyUI ---------------------------------------------------------------------------------

def import_comfy(root: Path):
    sys.path.insert(0, str(root))
    os.chdir(root)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sample
    import comfy.samplers
    import comfy.sd
    import comfy.supported_models

    return comfy


def sdxl_config(width_divisor: int) -> dict:
    """SDXL's UNet config; widths divided by `width_divisor` (1 = the real SDXL)."""
    return {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
        "model_channels": 320 // width_divisor, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
        "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
        "context_dim": 2048, "num_head_channels": 64 // width_divisor,
        "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
        "use_temporal_attention": False, "use_temporal_resblock": False}


def build_unet(comfy, width_divisor: int, dtype, seed: int = 0):
    import torch

    config = comfy.supported_models.SDXL(sdxl_config(width_divisor))
    config.set_inference_dtype(dtype, None)
    model = config.get_model({}, device=torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.diffusion_model.named_parameters():
            if "norm" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    device = comfy.model_management.get_torch_device()
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=device,
                                               offload_device=comfy.model_management.unet_offload_device())
    return patcher, sum(p.numel() for p in model.diffusion_model.parameters())


def lora_shapes(patcher) -> dict[str, tuple[int, int]]:
    """What a kohya SDXL LoRA trains, at this UNet's widths: the transformer blocks' Linears."""
    import torch

    shapes = {}
    for name, module in patcher.model.diffusion_model.named_modules():
        if isinstance(module, torch.nn.Linear) and (".transformer_blocks." in name or name.endswith(("proj_in", "proj_out"))):
            shapes[name] = (module.out_features, module.in_features)
    return shapes


def merge_node(lib, model, content, style, method):
    return lib.nodes_merge.LoraRarMerge.execute(content_lora=content, style_lora=style, content_strength=1.0,
                                                 style_strength=1.0, method=method, model=model).args[0]


def bench_switching(comfy, lib, steps: int, rank: int) -> None:
    """(2a): callback work per image on the full-size SDXL, weights patched."""
    import torch

    patcher, params = build_unet(comfy, 1, torch.float16)
    shapes = lora_shapes(patcher)
    content = lib.synthetic.to_state_dict(lib.synthetic.random_factors(shapes, rank, 1, torch.float16), alpha=rank)
    style = lib.synthetic.to_state_dict(lib.synthetic.random_factors(shapes, rank, 2, torch.float16), alpha=rank)
    model_sampling = patcher.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(model_sampling, "karras", steps)
    print(f"\n(2a) full-size SDXL UNet ({params / 1e9:.2f} B parameters, fp16, random weights), two rank-{rank} "
          f"LoRAs on its {len(shapes)} transformer Linears; one image = pre-run + {steps} steps (karras sigmas) + "
          f"cleanup; load average {os.getloadavg()[0]:.1f}")
    for method in ("sum", "k-lora"):
        node_wall, _, _, model = timed(lambda m=method: merge_node(lib, patcher, content, style, m))
        load_wall, _, _, _ = timed(lambda m=model: comfy.model_management.load_models_gpu([m], force_patch_weights=True))
        images, images_cpu = [], []
        for _ in range(3):
            def one_image(m=model):
                m.pre_run()
                for sigma in sigmas[:-1]:
                    m.prepare_state(sigma.reshape(1))
                m.cleanup()
            w, c, _, _ = timed(one_image)
            images.append(w)
            images_cpu.append(c)
        switching = sum(1 for k in model.get_all_callbacks("on_prepare_state"))
        print(f"    {method:7s} node {node_wall:6.2f} s, weights patched in {load_wall:6.2f} s; per image: CPU "
              f"{statistics.median(images_cpu) * 1e3:8.1f} ms (wall {statistics.median(images) * 1e3:.1f}) = "
              f"{statistics.median(images_cpu) / steps * 1e3:6.2f} ms per step ({switching} callback(s))")
        comfy.model_management.unload_all_models()
        del model
        gc.collect()
    merged = lib.node_logic.run_merge(content, style, None, 1.0, 1.0, "k-lora")
    during = sum(0 < p < 1 for p in merged.switch_points.values())
    print(f"    k-lora: {during} of {len(merged.switch_points)} attention projections switch during sampling "
          "(each computed once per image, at its switch point; back after sampling = the kept tensor put back)")


class BypassHooks:
    """K-LoRA as bypass-style forward hooks (the alternative to exchanging patches): the switching
    layers keep their base weight and every call adds the active side's low-rank update."""

    def __init__(self, plan, model, model_sampling):
        import torch

        self.hooks, self.sigma = [], float("inf")
        self.model_sampling = model_sampling
        unet = model.model.diffusion_model
        modules = dict(unet.named_modules())
        for kohya, point in plan.points.items():
            name = self._module_name(kohya, modules)
            sides = []
            for sd, strength in ((plan.content, plan.content_strength), (plan.style, plan.style_strength)):
                up, down = sd[f"{kohya}.lora_up.weight"].float(), sd[f"{kohya}.lora_down.weight"].float()
                scale = float(sd[f"{kohya}.alpha"]) / down.shape[0] * strength
                sides.append((down, up * scale))
            threshold = model_sampling.percent_to_sigma(point)
            self.hooks.append(modules[name].register_forward_hook(self._hook(sides, threshold, torch)))

    @staticmethod
    def _module_name(kohya: str, modules) -> str:
        wanted = kohya[len("lora_unet_"):]
        return next(n for n in modules if n.replace(".", "_") == wanted)

    def _hook(self, sides, threshold, torch):
        def hook(module, inputs, output):
            down, up = sides[1] if self.sigma <= threshold else sides[0]
            x = inputs[0]
            if down.dtype != x.dtype or down.device != x.device:
                down, up = down.to(x), up.to(x)
            return output + torch.nn.functional.linear(torch.nn.functional.linear(x, down), up)
        return hook

    def on_prepare_state(self, patcher, timestep):
        self.sigma = float(timestep.reshape(-1)[0])

    def remove(self):
        for handle in self.hooks:
            handle.remove()


def bench_sampling(comfy, lib, steps: int, rank: int, width_divisor: int, latent: int, repeats: int) -> None:
    """(2b): real sampling, seconds per image."""
    import torch

    patcher, params = build_unet(comfy, width_divisor, torch.float32)
    shapes = lora_shapes(patcher)
    content = lib.synthetic.to_state_dict(lib.synthetic.random_factors(shapes, rank, 1), alpha=rank)
    style = lib.synthetic.to_state_dict(lib.synthetic.random_factors(shapes, rank, 2), alpha=rank)
    gen = torch.Generator().manual_seed(0)
    positive = [[torch.randn(1, 77, 2048, generator=gen), {"pooled_output": torch.randn(1, 1280, generator=gen)}]]
    negative = [[torch.randn(1, 77, 2048, generator=gen), {"pooled_output": torch.randn(1, 1280, generator=gen)}]]
    empty = torch.zeros(1, 4, latent, latent)
    noise = torch.randn(1, 4, latent, latent, generator=gen)

    def sample(model):
        return comfy.sample.sample(model, noise, steps, 2.0, "dpmpp_2m", "karras", positive, negative, empty,
                                   denoise=1.0, disable_pbar=True, seed=0)

    sum_model = merge_node(lib, patcher, content, style, "sum")
    k_model = merge_node(lib, patcher, content, style, "k-lora")
    merged = lib.node_logic.run_merge(content, style, None, 1.0, 1.0, "k-lora")
    plan = lib.node_logic.switch_plan(merged, include_text_encoders=False)
    bypass_model = patcher
    for sd, strength in plan.static:
        bypass_model = comfy.sd.load_lora_for_models(bypass_model, None, sd, strength, strength)[0]
    bypass_model = bypass_model.clone()
    hooks = {}

    def run_bypass():
        bypass = BypassHooks(plan, bypass_model, bypass_model.get_model_object("model_sampling"))
        bypass_model.remove_callbacks_with_key("on_prepare_state", "bench_bypass")
        bypass_model.add_callback_with_key("on_prepare_state", "bench_bypass", bypass.on_prepare_state)
        try:
            return sample(bypass_model)
        finally:
            bypass.remove()
            hooks["count"] = len(bypass.hooks)

    variants = [("sum", lambda: sample(sum_model)), ("k-lora", lambda: sample(k_model)),
                ("k-lora as bypass hooks", run_bypass)]
    print(f"\n(2b) sampling on a mid-size SDXL-topology UNet (widths / {width_divisor}: "
          f"{params / 1e6:.0f} M parameters, fp32, all 70 transformer blocks), rank-{rank} LoRAs on "
          f"{len(shapes)} Linears, {latent}x{latent} latent, dpmpp_2m karras {steps} steps, cfg 2 (batch 2); "
          f"{sum(0 < p < 1 for p in merged.switch_points.values())} of {len(merged.switch_points)} projections "
          f"switch during sampling; after one warm-up image, median/min of {repeats}; "
          f"load average {os.getloadavg()[0]:.1f}")
    # CPU time of this (single-threaded) process is the figure to compare on a shared machine:
    # other engineers' jobs stretch wall time by whatever they take. Two rounds over the variants
    # show drift; each variant keeps its model loaded for its images (steady state).
    wall: dict[str, list[float]] = {label: [] for label, _ in variants}
    cpu: dict[str, list[float]] = {label: [] for label, _ in variants}
    for _round in range(2):
        for label, run in variants:
            run()  # warm-up: loads and patches the weights, as a first image would
            for _ in range(repeats):
                w, c, _, _ = timed(run)
                wall[label].append(w)
                cpu[label].append(c)
            comfy.model_management.unload_all_models()
    base = statistics.median(cpu["sum"])
    for label, _ in variants:
        c = statistics.median(cpu[label])
        print(f"    {label:24s} CPU {c:7.2f} s per image (min {min(cpu[label]):.2f}) = {c / base:5.3f}x sum, "
              f"{(c - base) / steps * 1e3:+7.1f} ms per step; wall median {statistics.median(wall[label]):.2f} s")
    print(f"    (bypass: {hooks.get('count', 0)} forward hooks; {2 * repeats} images per variant)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=64, help="rank of the synthetic LoRAs in (1) and (2a)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30, help="sampling steps in (2a)")
    parser.add_argument("--sample-steps", type=int, default=12, help="sampling steps in (2b)")
    parser.add_argument("--sample-rank", type=int, default=16, help="LoRA rank in (2b)")
    parser.add_argument("--width-divisor", type=int, default=5, help="(2b): SDXL widths divided by this")
    parser.add_argument("--latent", type=int, default=32, help="(2b): latent size (pixels / 8)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--skip", choices=("comfy", "merges", "full"), action="append", default=[],
                        help="leave out (2), (1), or (2a) (the full-size SDXL, ~7 GB of memory); repeatable")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    root = Path(os.environ["COMFYUI_PATH"]) if os.environ.get("COMFYUI_PATH") else None
    comfy = import_comfy(root) if root is not None and "comfy" not in args.skip else None
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    lib = import_pack(with_nodes=comfy is not None)
    if "merges" not in args.skip:
        bench_merges(lib, args.repeats, args.rank)
    if comfy is None:
        print("\n(2) skipped: set COMFYUI_PATH and run under that ComfyUI's python for the sampling figures")
        return 0
    print(f"\nComfyUI at {root}")
    if "full" not in args.skip:
        bench_switching(comfy, lib, args.steps, args.rank)
    bench_sampling(comfy, lib, args.sample_steps, args.sample_rank, args.width_divisor, args.latent, args.repeats)
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
