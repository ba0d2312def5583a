"""`lorarar inspect FILE`: what a LoRA (or hypernetwork) file contains."""

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("inspect", help="describe a LoRA or hypernetwork file", description=__doc__)
    p.add_argument("file", help=".safetensors LoRA, or a hypernetwork (.pth/.safetensors)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from ..inspection import describe_lora
    from ..model import describe, is_hypernet_file, load_hypernet

    path = Path(args.file)
    if is_hypernet_file(path):
        model = load_hypernet(path)
        info = {"file": str(path), "hypernetwork": describe(model)}
    else:
        info = describe_lora(path)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k}: {v}")
        elif isinstance(value, list):
            if value:
                print(f"{key}:")
                for v in value:
                    print(f"  - {v}")
        else:
            print(f"{key}: {value}")
    return 0
