"""`python -m hypernet ziplora`: merge one subject LoRA and one style LoRA with ZipLoRA.

Optimises per-column merge coefficients for this pair (Adam, lr 0.01, 100 steps by default)
on ZipLoRA's objective through the base model, which is loaded through ComfyUI (set
COMFYUI_PATH to a ComfyUI checkout and run with ComfyUI's Python; `--base tiny` uses the
built-in test UNet). Writes the exact low-rank merged LoRA (kohya SDXL format, like `merge`),
and optionally the loss curve (PNG) and the per-step losses (JSON).
"""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("ziplora", help="merge a subject and a style LoRA with ZipLoRA (slow baseline)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="base checkpoint (.safetensors, loaded via ComfyUI) or 'tiny'")
    p.add_argument("--content", required=True, help="subject (content) LoRA")
    p.add_argument("--subject-images", required=True, nargs="+", help="subject photos (files or folders)")
    p.add_argument("--subject-prompt", required=True, help='e.g. "a photo of sks dog"')
    p.add_argument("--style", required=True, help="style LoRA")
    p.add_argument("--style-images", required=True, nargs="+", help="style reference image(s)")
    p.add_argument("--style-prompt", required=True, help='e.g. "a cat in watercolor style"')
    p.add_argument("--out", required=True, help="merged LoRA to write (.safetensors)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--steps", type=int, default=100, help="optimisation steps (default 100)")
    p.add_argument("--lr", type=float, default=0.01, help="Adam learning rate (default 0.01)")
    p.add_argument("--lam", type=float, default=0.01, help="weight of Σ|cos(m_c, m_s)| (default 0.01)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--targets", default="to_q,to_out.0", help="attention projections with coefficients")
    p.add_argument("--content-strength", type=float, default=1.0)
    p.add_argument("--style-strength", type=float, default=1.0)
    p.add_argument("--resolution", type=int, default=None, help="image size (default 1024 SDXL, 512 SD1.5)")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32", help="dtype of the written LoRA")
    p.add_argument("--loss-plot", default=None, metavar="PNG", help="write the loss curve here")
    p.add_argument("--loss-log", default=None, metavar="JSON", help="write the per-step losses here")
    p.set_defaults(func=run)


def _image_paths(specs: list[str]):
    from pathlib import Path

    from ..errors import TrainingError
    from ..training.manifest import IMAGE_SUFFIXES

    paths = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            paths += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            paths.append(path)
        else:
            raise TrainingError(f"{path}: no such image file or folder")
    if not paths:
        raise TrainingError(f"no images found in {' '.join(specs)}")
    return paths


def run(args) -> int:
    import json
    import logging
    from pathlib import Path

    from ..lora import read_lora
    from ..tooling.progress import ProgressLine
    from ..training.data import encode_examples, load_image
    from ..training.plot import plot_curves
    from ..training.ziplora import ZipLoraSettings, ziplora_merge
    from ..writer import merge_metadata, save_merged

    log = logging.getLogger("hypernet.ziplora")
    out = Path(args.out)
    if out.exists() and not args.force:
        from ..errors import OutputExistsError

        raise OutputExistsError(f"{out} exists; pass --force to overwrite it")
    content, style = read_lora(args.content), read_lora(args.style)
    subject_paths, style_paths = _image_paths(args.subject_images), _image_paths(args.style_images)
    if args.base == "tiny":
        from ..training.testmodel import tiny_base

        base = tiny_base(**({"resolution": args.resolution} if args.resolution else {}))
    else:
        from ..training.comfyui_bridge import load_comfy_checkpoint

        base, _ = load_comfy_checkpoint(args.base, args.resolution)
    resolution = args.resolution or base.resolution
    subjects = encode_examples(base.encoder, [load_image(p, resolution) for p in subject_paths],
                               args.subject_prompt, base.device)
    styles = encode_examples(base.encoder, [load_image(p, resolution) for p in style_paths],
                             args.style_prompt, base.device)
    settings = ZipLoraSettings(steps=args.steps, lr=args.lr, lam=args.lam, seed=args.seed,
                               targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()),
                               content_strength=args.content_strength, style_strength=args.style_strength)
    if base.before_training:
        base.before_training()
    bar = ProgressLine("ziplora")
    result = ziplora_merge(base.unet, base.denoise, base.schedule, content, style, subjects, styles, settings,
                           base.device, base.autocast_dtype, progress=lambda i, n, r: bar.update(i, n),
                           check_interrupt=base.check_interrupt)
    metadata = merge_metadata(result.merged, content_name=Path(args.content).name, style_name=Path(args.style).name)
    metadata["lorarar.ziplora"] = json.dumps({"steps": args.steps, "lr": args.lr, "lam": args.lam, "seed": args.seed,
                                              "final_loss": result.history[-1]["total"],
                                              "seconds": round(result.seconds, 2)})
    save_merged(result.merged, out, metadata, args.dtype, force=args.force)
    if args.loss_plot:
        steps = [h["step"] for h in result.history]
        image = plot_curves({k: list(zip(steps, [h[k] for h in result.history])) for k in ("total", "content", "style")},
                            title=f"ZipLoRA: {Path(args.content).stem} × {Path(args.style).stem}")
        image.save(args.loss_plot)
    if args.loss_log:
        Path(args.loss_log).write_text(json.dumps(result.history, indent=1), encoding="utf-8")
    log.info("%d steps in %.1f s; loss %.5g → %.5g", args.steps, result.seconds, result.history[0]["total"],
             result.history[-1]["total"])
    print(out)
    return 0
