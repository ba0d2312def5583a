"""`python -m hypernet demo`: the LoRA.rar merge end to end, offline, in seconds on a CPU.

Merges two bundled testbed LoRAs (a subject and a style, a pair the bundled testbed
hypernetwork never saw) with that hypernetwork, samples content-only / style-only / sum /
lorarar images from the same noise into one labelled PNG (plus the coefficient plot), writes
the merged LoRA as a kohya file, and prints what the testbed's judges say about each row.
The testbed is a 32×32 toy world (see docs/testbed.md); for SDXL use `python -m hypernet merge`.
"""

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="merge two bundled testbed LoRAs and show the result (offline, seconds)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-o", "--output", default="lorarar-demo",
                   help="folder for demo.png, coefficients.png, merged_lorarar.safetensors, verdicts.json "
                        "(default: ./%(default)s)")
    p.add_argument("--images", type=int, default=4, help="images per row (default 4)")
    p.add_argument("--seed", type=int, default=0, help="noise seed, the same for every row (default 0)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
    p.add_argument("--bundle", default=None, help="folder with the demo files (default: the pack's weights/testbed)")
    p.add_argument("--force", action="store_true", help="overwrite the files in --output")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    import torch

    from ..testbed.demo import run_demo

    torch.set_num_threads(1)
    result = run_demo(Path(args.output), Path(args.bundle) if args.bundle else None, args.images, args.steps,
                      args.seed, args.force)
    subject, style = result["pair"]
    print(f'prompt: "{result["prompt"]}"  (content LoRA {subject}, style LoRA {style}; '
          f'{result.get("regime") or "?"} style regime)')
    if result.get("picked_by"):
        print(f"pair: {result['picked_by']}")
    print(f"hypernetwork merge: {result['merge_seconds'] * 1000:.0f} ms")
    print(f"{'row':34s} content  style  joint   each image: subject verdict / style verdict")
    for name, v in result["verdicts"].items():
        outcomes = "  ".join(f"{_short(i['subject'], subject)}/{_short(i['style'], style)}" for i in v["images"])
        print(f"{name:34s} {v['content']:6.0%} {v['style']:6.0%} {v['joint']:6.0%}   {outcomes}")
    print("  (✓ = the pair's subject / style; ? = not recognisable; other names: what the judges saw instead)")
    out = Path(args.output)
    print(f"wrote {out / 'demo.png'}, {out / 'coefficients.png'}, {out / 'merged_lorarar.safetensors'}, "
          f"{out / 'verdicts.json'} in {result['seconds']:.1f} s")
    return 0


def _short(said: str, wanted: str) -> str:
    if said == wanted:
        return "✓"
    return "?" if said == "not recognisable" else said
