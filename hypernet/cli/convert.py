"""`lorarar convert-hypernet IN OUT`: official .pth ↔ our .safetensors hypernetwork format.

OUT ending in .safetensors gets our format (with metadata); .pth/.pt gets the official layout.
Converting there and back loses nothing.
"""

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("convert-hypernet", help="convert a hypernetwork between formats",
                              description=__doc__)
    p.add_argument("input", help="hypernetwork (.pth official or .safetensors ours)")
    p.add_argument("output", help="target file: .safetensors (ours) or .pth (official layout)")
    p.add_argument("--base-family", default=None, help="record this base family (default: keep / sdxl)")
    p.add_argument("--license", default=None, help="license text to record in the metadata")
    p.add_argument("--name", default=None, help="name to record in the metadata")
    p.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..catalog import load_catalog
    from ..model import describe, load_hypernet, save_hypernet
    from ..safetensors_io import sha256_file

    source = Path(args.input)
    model = load_hypernet(source)
    # An official checkpoint carries its license and provenance along into our format.
    digest = sha256_file(source)
    for entry in load_catalog().values():
        if entry.sha256 == digest:
            model.config.name, model.config.license = entry.name, entry.license
            model.config.base_family = entry.base_family
            model.config.extra["source_sha256"] = digest
    for field in ("base_family", "license", "name"):
        if getattr(args, field) is not None:
            setattr(model.config, field, getattr(args, field))
    path = save_hypernet(model, args.output, force=args.force)
    print(f"{path}: {describe(model)}")
    return 0
