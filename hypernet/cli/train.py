"""`python -m hypernet train MANIFEST --base CKPT`: train a LoRA.rar hypernetwork.

The base checkpoint is loaded through ComfyUI (set COMFYUI_PATH to a ComfyUI checkout and run
with ComfyUI's Python); `--base tiny` uses the built-in test UNet (no ComfyUI needed).
Multi-GPU: `torchrun --nproc_per_node N -m hypernet train …` (DDP over the hypernetwork; each
rank draws different pairs; `--pairs-per-step` must be a multiple of N).

Writes to OUT: train_log.jsonl, checkpoints/step_NNNNNN/, loss.png, and the hypernetwork
(default OUT/hypernet.safetensors; put it in ComfyUI/models/lorarar/ to use it in ComfyUI).
"""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a hypernetwork on subject/style LoRA pairs (ZipLoRA objective)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manifest", help="training manifest (.json or .yaml): subjects and styles, see README")
    p.add_argument("--base", required=True, help="base checkpoint (.safetensors, loaded via ComfyUI) or 'tiny'")
    p.add_argument("--out", required=True, help="run folder: log, checkpoints, loss plot")
    p.add_argument("--output", default=None, help="hypernetwork file to write (default OUT/hypernet.safetensors)")
    p.add_argument("--force", action="store_true", help="overwrite --output if it exists")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    p.add_argument("--lr", type=float, default=0.01, help="AdamW learning rate (default 0.01)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay (default 1e-4)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clip (default 1.0)")
    p.add_argument("--lam", type=float, default=0.01, help="weight of Σ|cos(m_c, m_s)| (default 0.01)")
    p.add_argument("--seed", type=int, default=0, help="seed for H's init, pair/image/timestep/noise draws")
    p.add_argument("--pairs-per-step", type=int, default=1, help="pairs per step over all processes (default 1)")
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints (0: end only)")
    p.add_argument("--validate-every", type=int, default=100, help="steps between validations (0: end only)")
    p.add_argument("--validation-draws", type=int, default=2, help="timestep/noise draws per validation pair")
    p.add_argument("--hidden", type=int, default=128, help="hidden width of a new hypernetwork (default 128)")
    p.add_argument("--targets", default="to_q,to_out.0", help="attention projections H merges (default to_q,to_out.0)")
    p.add_argument("--init-hypernet", default=None, metavar="PATH",
                   help="start from this hypernetwork (.pth official or ours); new widths get new input layers")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="DIR",
                   help="resume from the newest checkpoint in OUT (or in DIR / a step_NNNNNN folder)")
    p.add_argument("--amp", choices=("auto", "off", "fp16", "bf16"), default="auto",
                   help="mixed precision on GPU (auto: bf16 where supported, else fp16)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute transformer blocks (GPU)")
    p.add_argument("--resolution", type=int, default=None, help="training image size (default: manifest/base)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--input-normalisation", choices=("none", "layer_rms"), default="none",
                   help="how H reads its columns: raw (the paper's H, default) or divided by each side's layer RMS; "
                        "stored in the hypernetwork and applied by every merge with it")
    p.add_argument("--name", default="", help="name stored in the hypernetwork's metadata")
    p.add_argument("--check-only", action="store_true", help="validate the manifest against the base and stop")
    p.set_defaults(func=run)


def run(args) -> int:
    import logging
    from pathlib import Path

    from ..errors import TrainingError
    from ..model import load_hypernet
    from ..tooling.progress import ProgressLine
    from ..training.ddp import init_world, shutdown
    from ..training.injection import linear_layer_shapes
    from ..training.manifest import check_loras, load_manifest
    from ..training.trainer import Trainer, TrainSettings

    log = logging.getLogger("hypernet.train")
    world = init_world(args.device)
    if not world.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
        manifest = load_manifest(args.manifest)
        if args.base == "tiny":
            from ..training.testmodel import tiny_base

            base = tiny_base(device=world.device, **({"resolution": args.resolution} if args.resolution else {}))
        else:
            from ..training.comfyui_bridge import load_comfy_checkpoint

            base, _ = load_comfy_checkpoint(args.base, args.resolution)
        if args.resolution:
            base.resolution = args.resolution
        check_loras(manifest, linear_layer_shapes(base.unet), targets)
        log.info("manifest OK: %s", manifest.summary())
        if args.check_only:
            return 0
        settings = TrainSettings(
            steps=args.steps, lr=args.lr, weight_decay=args.weight_decay, grad_clip=args.grad_clip, lam=args.lam,
            seed=args.seed, pairs_per_step=args.pairs_per_step, checkpoint_every=args.checkpoint_every,
            validate_every=args.validate_every, validation_draws=args.validation_draws, hidden=args.hidden,
            targets=targets, amp=args.amp, gradient_checkpointing=args.gradient_checkpointing,
            input_normalisation=args.input_normalisation, name=args.name or Path(args.output or "hypernet").stem)
        out = Path(args.out)
        output = Path(args.output) if args.output else out / "hypernet.safetensors"
        if output.exists() and not args.force and args.resume is None:
            raise TrainingError(f"{output} exists; pass --force to overwrite it or choose another --output")
        init = load_hypernet(args.init_hypernet) if args.init_hypernet else None
        resume = None if args.resume is None else Path(args.resume or out)
        trainer = Trainer(base, manifest, settings, out, world, init, resume)
        bar = ProgressLine("train") if world.is_main else None
        result = trainer.run(output, force=True, progress=(lambda i, n, r: bar.update(i, n)) if bar else None)
        if world.is_main:
            print(f"{result.output}")
            if result.validation:
                v = result.validation
                print(f"validation objective over {v['pairs']} held-out pairs: hypernet "
                      f"{v['hypernet']['total']:.6g} (mse {v['hypernet']['mse']:.6g}), sum {v['sum']['total']:.6g} "
                      f"(mse {v['sum']['mse']:.6g})")
        return 0
    finally:
        shutdown(world)
