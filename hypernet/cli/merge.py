"""`lorarar merge CONTENT STYLE -o OUT`: merge a subject LoRA and a style LoRA into one file."""

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("merge", help="merge a content (subject) LoRA and a style LoRA",
                              description=__doc__)
    p.add_argument("content", help="subject/content LoRA (.safetensors)")
    p.add_argument("style", help="style LoRA (.safetensors)")
    p.add_argument("-o", "--output", required=True, help="merged LoRA to write (.safetensors)")
    p.add_argument("--hypernet", default="lorarar-sdxl",
                   help="catalog name (lorarar-sdxl, lorarar-koala-700m) or a file path "
                        "(default: %(default)s)")
    p.add_argument("--hypernet-dir", action="append", default=[], metavar="DIR",
                   help="extra folder to look for catalog checkpoints in (repeatable)")
    p.add_argument("--download", action="store_true",
                   help="download a missing catalog checkpoint (sha256-verified; you accept its "
                        "CC BY-NC-SA 4.0 license)")
    p.add_argument("--content-strength", type=float, default=1.0, help="default: %(default)s")
    p.add_argument("--style-strength", type=float, default=1.0, help="default: %(default)s")
    from ..merge import REGISTRY

    p.add_argument("--method", choices=tuple(REGISTRY), default="lorarar",
                   help="; ".join(f"{m.name}: {m.summary}" for m in REGISTRY.values()) + " (default: %(default)s)")
    p.add_argument("--allow-width-fallback", action="store_true",
                   help="sum layers whose width the hypernetwork has no input for, instead of failing")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32",
                   help="dtype of the written factors (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import logging
    from pathlib import Path

    from ..catalog import resolve_hypernet
    from ..errors import OutputExistsError
    from ..lora import read_lora
    from ..merge import merge, method_spec
    from ..safetensors_io import sha256_file
    from ..tooling.progress import ProgressLine
    from ..writer import merge_metadata, save_merged

    log = logging.getLogger("hypernet.merge")
    out = Path(args.output)
    if out.exists() and not args.force:  # fail before the slow part
        raise OutputExistsError(f"{out} already exists; refusing to overwrite it (use --force)")
    spec = method_spec(args.method)
    content = read_lora(args.content)
    style = read_lora(args.style)
    hypernet = None
    if spec.needs_hypernet:
        hypernet = resolve_hypernet(args.hypernet, [Path(d) for d in args.hypernet_dir],
                                    allow_download=args.download)
    params = {"unsupported_width": "sum" if args.allow_width_fallback else "error"} if args.method == "lorarar" else {}
    with ProgressLine(args.method) as bar:
        merged = merge(content, style, hypernet, args.content_strength, args.style_strength, args.method,
                       params=params, expected_family="sdxl", progress=bar.update)
    metadata = merge_metadata(
        merged, hypernet_name=hypernet.config.name if hypernet else "",
        hypernet_sha256=sha256_file(hypernet.source_path) if hypernet else "",
        content_sha256=sha256_file(args.content), style_sha256=sha256_file(args.style),
        content_name=Path(args.content).name, style_name=Path(args.style).name)
    save_merged(merged, out, metadata, args.dtype, args.force)
    log.info("wrote %s (%s)", out, merged.report.summary())
    for note in merged.report.notes:
        log.warning("%s", note)
    print(out)
    return 0
