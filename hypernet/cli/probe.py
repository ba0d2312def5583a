"""`lorarar probe HYPERNET [CONTENT STYLE]`: what a hypernetwork does with LoRAs, as JSON.

Per width group of the layers it merges (`to_q`/`to_out.0`): H(0) — its coefficients for a zero
input, the fixed recipe it falls back to when the LoRAs are small next to its bias — the mean and
spread of the coefficients (m_c, m_s), the share of negative ones, |W1·x| / |b1| (the input's term
next to the bias of H's first layer) and how far the merged update is from the merge with the
constant coefficients H(0). These are the figures every LoRA.rar merge reports about itself.

With CONTENT and STYLE: for that pair, fed to H directly — files of any base model; layers of a
width H has no input for are left out and counted (an SDXL hypernetwork on SD1.5 files reads their
640- and 1280-wide attention layers). Without: for synthetic pairs whose ΔW columns are 0.1 … 30
times the size of real trained LoRAs' (median column norm 0.05 at ×1).
"""

import argparse


def _magnitudes(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None
    if not values or any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("probe", help="what a hypernetwork does with a LoRA pair (or synthetic ones), as JSON",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("hypernet", help="catalog name (lorarar-sdxl, lorarar-koala-700m) or a hypernetwork file")
    p.add_argument("loras", nargs="*", metavar="LORA", help="CONTENT STYLE: a pair of LoRA files (content first)")
    p.add_argument("--hypernet-dir", action="append", default=[], metavar="DIR",
                   help="extra folder to look for catalog checkpoints in (repeatable)")
    p.add_argument("--magnitudes", type=_magnitudes, default=None, metavar="X,Y,…",
                   help="without a pair: sizes relative to real trained LoRAs (default: 0.1,0.3,1,3,10,30)")
    p.add_argument("--rank", type=int, default=16, help="without a pair: rank of the synthetic LoRAs (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="without a pair: seed of the synthetic LoRAs (default: %(default)s)")
    p.add_argument("--table", action="store_true", help="print a text table instead of JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    import sys
    from pathlib import Path

    from ..catalog import resolve_hypernet
    from ..errors import LoraRarError
    from ..probe import MAGNITUDES, hypernet_facts, probe_magnitudes, probe_pair, read_for_probe, table

    if len(args.loras) not in (0, 2):
        raise LoraRarError(f"probe: expected no LoRA or a pair (CONTENT STYLE), got {len(args.loras)} file(s)")
    if args.loras and args.magnitudes is not None:
        raise LoraRarError("--magnitudes is for synthetic pairs; it does not apply when a pair of files is given")
    if args.rank < 1:
        raise LoraRarError(f"--rank: expected a positive rank, got {args.rank}")
    hypernet = resolve_hypernet(args.hypernet, [Path(d) for d in args.hypernet_dir])
    document = {"hypernetwork": hypernet_facts(hypernet)}
    if args.loras:
        content, style = (read_for_probe(path) for path in args.loras)
        for lora in (content, style):
            for note in lora.notes:
                print(f"note: {Path(lora.source).name}: {note}", file=sys.stderr)
        document.update(probe_pair(hypernet, content, style))
        print(f"note: {document['summary']}", file=sys.stderr)
        for warning in document["warnings"]:
            print(f"note: {warning}", file=sys.stderr)
        if document["left_out"]:
            print("note: left out (no input layer of the hypernetwork for their width): "
                  + ", ".join(f"{n} layers {w} wide" for w, n in document["left_out"].items()), file=sys.stderr)
    else:
        document.update(probe_magnitudes(hypernet, args.magnitudes or MAGNITUDES, args.rank, args.seed))
    print(table(document) if args.table else json.dumps(document, indent=1, ensure_ascii=False))
    return 0
