"""`lorarar bench`: time reading, the factored and the dense hypernetwork merge, and writing."""

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmark the merge on a synthetic SDXL pair", description=__doc__)
    p.add_argument("--rank", type=int, default=64, help="LoRA rank (default: %(default)s)")
    p.add_argument("--dtype", choices=("fp16", "fp32", "bf16"), default="fp16",
                   help="dtype of the synthetic files (default: %(default)s)")
    p.add_argument("--hypernet", default=None,
                   help="hypernetwork file (default: the official SDXL one if found, else random weights)")
    p.add_argument("--repeat", type=int, default=3, help="timed repeats of the factored merge")
    p.add_argument("--skip-dense", action="store_true", help="skip the slow dense formulation")
    p.add_argument("--device", default=None,
                   help="also time the hypernetwork on this torch device (e.g. cuda), beside the CPU")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from ..catalog import find_checkpoint
    from ..tooling.bench import format_results, run_benchmark

    hypernet = args.hypernet
    if hypernet is None:
        hypernet = find_checkpoint("lorarar-sdxl")[0]
    results = run_benchmark(args.rank, args.dtype, str(hypernet) if hypernet else None,
                            args.repeat, not args.skip_dense, device=args.device)
    print(json.dumps(results, indent=2) if args.json else format_results(results))
    return 0
