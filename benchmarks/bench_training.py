"""ZipLoRA vs. the hypernetwork merge, and the trainer's step time.

Prints, for one model size:
- time per ZipLoRA step (4 UNet passes + backward into m_c, m_s) and per trainer step
  (the same passes + backward into H + AdamW);
- ZipLoRA's total time for one pair (`--ziplora-steps`, default 100, timed in full unless
  `--extrapolate-from N` times N steps and scales) versus LoRA.rar's hypernetwork merge
  (coefficients + assembly of the merged LoRA) for the same pair, as a ratio measured in this run.

Models: `--model tiny` (test UNet, 32/64-wide attention, 64 px), `--model small` (80/160/320
widths, SDXL's transformer depths 0/2/4, 256 px — a moderately sized CPU UNet), `--full-sdxl`
(SDXL's real topology 320/640/1280, depths 0/2/10, 2048-wide context, 1024 px, rank-64 LoRAs on
all 722 layers; needs a GPU: `--full-sdxl --device cuda`; random weights, same cost).

    python benchmarks/bench_training.py --model tiny
    python benchmarks/bench_training.py --model small --extrapolate-from 5
    python benchmarks/bench_training.py --full-sdxl --device cuda
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hypernet.lora import lora_from_state_dict  # noqa: E402
from hypernet.merged import assemble  # noqa: E402
from hypernet.methods.lorarar import compute_coefficients  # noqa: E402
from hypernet.model import HypernetConfig, HyperNetwork, load_hypernet  # noqa: E402
from hypernet.tooling import synthetic  # noqa: E402
from hypernet.training.data import TrainingBase  # noqa: E402
from hypernet.training.manifest import load_manifest  # noqa: E402
from hypernet.training.objective import DiscreteSchedule, ldm_denoiser  # noqa: E402
from hypernet.training.testmodel import ToyEncoder, UNetConfig, build_unet, random_lora, write_dataset  # noqa: E402
from hypernet.training.trainer import Trainer, TrainSettings  # noqa: E402
from hypernet.training.ziplora import ZipLoraSettings, ziplora_merge  # noqa: E402

OFFICIAL = Path(__file__).resolve().parents[2] / "shared" / "official-hypernets" / "lorarar_sdxl_hypernet.pth"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "small"), default="tiny")
    parser.add_argument("--full-sdxl", action="store_true", help="SDXL's full-size topology (GPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rank", type=int, default=None, help="LoRA rank (default 4 tiny, 16 small, 64 SDXL)")
    parser.add_argument("--ziplora-steps", type=int, default=100)
    parser.add_argument("--extrapolate-from", type=int, default=0, metavar="N",
                        help="time N ZipLoRA steps and scale to --ziplora-steps (0: run them all)")
    parser.add_argument("--trainer-steps", type=int, default=5)
    parser.add_argument("--merge-repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.full_sdxl:
        config, resolution, rank, label = UNetConfig.sdxl(), 1024, args.rank or 64, "full-size SDXL topology"
    elif args.model == "small":
        config, resolution, rank, label = UNetConfig.small(), 256, args.rank or 16, "small CPU UNet"
    else:
        config, resolution, rank, label = UNetConfig.tiny(), 64, args.rank or 4, "tiny test UNet"
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    autocast = torch.float16 if device.type == "cuda" else None
    unet = build_unet(config, 0, device, dtype)
    params = sum(p.numel() for p in unet.parameters())
    print(f"model: {label}, {params / 1e6:.1f} M parameters, {resolution} px, LoRA rank {rank}, device {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} CPU threads'})")

    if args.full_sdxl:  # synthetic LoRAs on all 722 kohya SDXL layers (names match the topology)
        content = lora_from_state_dict(synthetic.sdxl_lora(rank, 1, te_layers=0), source="content")
        style = lora_from_state_dict(synthetic.sdxl_lora(rank, 2, te_layers=0), source="style")
    else:
        content = lora_from_state_dict(random_lora(unet, rank, 1), source="content")
        style = lora_from_state_dict(random_lora(unet, rank, 2), source="style")
    widths = config.attention_widths
    hypernet = load_hypernet(OFFICIAL) if args.full_sdxl and OFFICIAL.is_file() else \
        HyperNetwork(HypernetConfig(hidden=128, widths=widths))

    # -- the hypernetwork merge for this pair (what the LoRA.rar Merge node does, on the CPU)
    times = []
    for _ in range(args.merge_repeats):
        start = time.perf_counter()
        coefficients, _ = compute_coefficients(content, style, hypernet)
        assemble(content, style, coefficients, method="lorarar")
        times.append(time.perf_counter() - start)
    merge_s = statistics.median(times)
    print(f"hypernetwork merge (coefficients + assembly, CPU): {merge_s * 1e3:.2f} ms median of {len(times)} "
          f"({len(coefficients)} coefficient layers)")

    # -- ZipLoRA for the same pair
    encoder = ToyEncoder(config)
    gen = torch.Generator().manual_seed(0)
    subject = [(encoder.encode_image(torch.rand(1, resolution, resolution, 3, generator=gen)).to(device),
                {k: v.to(device) for k, v in encoder.encode_prompt("a photo of sks dog", ()).items()})
               for _ in range(3)]
    style_ex = [(encoder.encode_image(torch.rand(1, resolution, resolution, 3, generator=gen)).to(device),
                 {k: v.to(device) for k, v in encoder.encode_prompt("a cat in watercolor style", ()).items()})]
    schedule, denoise = DiscreteSchedule.scaled_linear(), ldm_denoiser(unet, dtype)
    # warm-up (allocator, kernels, lazy imports) is not part of a step
    ziplora_merge(unet, denoise, schedule, content, style, subject, style_ex, ZipLoraSettings(steps=1), device, autocast)
    steps = args.extrapolate_from or args.ziplora_steps
    step_times = []
    sync(device)
    start = time.perf_counter()
    result = ziplora_merge(unet, denoise, schedule, content, style, subject, style_ex, ZipLoraSettings(steps=steps),
                           device, autocast, progress=lambda i, n, r: (sync(device), step_times.append(time.perf_counter())))
    sync(device)
    total = time.perf_counter() - start
    per_step = statistics.median([b - a for a, b in zip([start] + step_times[:-1], step_times)])
    # measured N steps (incl. attach/assembly) + the remaining steps at the median step time
    ziplora_total = total + max(0, args.ziplora_steps - steps) * per_step
    how = "measured" if not args.extrapolate_from else f"extrapolated from {steps} timed steps"
    print(f"ZipLoRA: {per_step * 1e3:.1f} ms per step (median), {steps} steps took {total:.2f} s; "
          f"{args.ziplora_steps} steps = {ziplora_total:.2f} s "
          f"per pair ({how}); loss {result.history[0]['total']:.4g} -> {result.history[-1]['total']:.4g}")
    print(f"ZipLoRA / hypernetwork merge time ratio: {ziplora_total / merge_s:,.0f}x")
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")

    # -- trainer steps (same passes, backward into H, AdamW), on a small on-disk data set
    if not args.full_sdxl:
        with tempfile.TemporaryDirectory() as tmp:
            manifest = load_manifest(write_dataset(Path(tmp) / "data", config=config, subjects=3, styles=3))
            base = TrainingBase(unet, denoise, schedule, encoder, resolution, "test", label, device, autocast)
            trainer = Trainer(base, manifest, TrainSettings(steps=args.trainer_steps + 1, checkpoint_every=0,
                                                            validate_every=0), Path(tmp) / "run")
            trainer.prepare()
            trainer.train_step()  # warm-up
            times = []
            for _ in range(args.trainer_steps):
                sync(device)
                start = time.perf_counter()
                trainer.train_step()
                sync(device)
                times.append(time.perf_counter() - start)
            print(f"trainer: {statistics.median(times) * 1e3:.1f} ms per step (median of {len(times)}, 1 pair/step)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
