"""`lorarar merge CONTENT STYLE -o OUT`: merge a subject LoRA and a style LoRA into one file.

k-lora is not one LoRA (each attention projection switches from the content LoRA to the style
LoRA during sampling): with it, OUT must be a .json file, which receives the switch points.
"""

import argparse


def method_options() -> dict[str, tuple[str, str]]:
    """CLI option (argparse dest) → (method, parameter), from the method registry; an option given
    for another method is an error, not ignored."""
    from ..merge import REGISTRY

    return {param.flag.lstrip("-").replace("-", "_"): (method.name, name)
            for method in REGISTRY.values() for name, param in method.params.items() if param.flag}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("merge", help="merge a content (subject) LoRA and a style LoRA",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("content", help="subject/content LoRA (.safetensors)")
    p.add_argument("style", help="style LoRA (.safetensors)")
    p.add_argument("-o", "--output", required=True,
                   help="merged LoRA to write (.safetensors); for --method k-lora a .json schedule")
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
    for method in REGISTRY.values():  # every method's settings, as the registry describes them
        for param in method.params.values():
            if not param.flag:
                continue
            if param.switch is not None:
                p.add_argument(param.flag, action="store_true", help=f"{method.name}: {param.help}")
                continue
            default = "" if param.default is None else f" (default: {param.default})"
            p.add_argument(param.flag, type=param.kind, choices=param.choices or None, metavar=param.metavar,
                           help=f"{method.name}: {param.help}{default}")
    p.add_argument("--dora", choices=("refuse", "drop-magnitude"), default="refuse",
                   help="DoRA layers need the base model's weights to apply their magnitude: 'refuse' (default) "
                        "stops with an error; 'drop-magnitude' merges them as plain LoRAs (an approximation "
                        "the report and the file's metadata state). The ComfyUI node applies DoRA exactly")
    from .. import families

    p.add_argument("--family", choices=("auto", *families.FAMILY_IDS), default="auto",
                   help="the base model both LoRAs are for: 'auto' (default) detects it from their keys and "
                        "shapes (and the hypernetwork's); give it where a file fits several")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32",
                   help="dtype of the written factors (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.set_defaults(func=run)


def method_params(args: argparse.Namespace) -> dict:
    """The chosen method's parameters from the options; one error for an option of another method."""
    from ..errors import LoraRarError
    from ..merge import REGISTRY

    params = {}
    for option, (method, name) in method_options().items():
        value = getattr(args, option)
        switch = REGISTRY[method].params[name].switch
        if value is None or value is False:
            continue
        if method != args.method:
            flag = "--" + option.replace("_", "-")
            raise LoraRarError(f"{flag} is a setting of --method {method}, not of --method {args.method}")
        params[name] = switch if switch is not None else value
    return params


def schedule_document(merged, content_name: str, style_name: str, params: dict) -> dict:
    """What a k-lora merge is, as JSON: per layer (kohya module name) the p at which it switches
    from the content LoRA to the style LoRA (non-finite values as strings)."""
    from .. import naming

    def number(value: float):
        return value if value == value and abs(value) != float("inf") else str(value)

    return {
        "method": merged.report.method, "content": content_name, "style": style_name, "params": params,
        "content_strength": merged.content_strength, "style_strength": merged.style_strength,
        "rule": "each listed layer uses the content LoRA while p < switch_point and the style LoRA from "
                "it on (p = fraction of sampling done) — in switch_rows only those rows, the others are the sum; "
                "every other layer is the sum of both",
        "switch_points": {naming.kohya_key(n, merged.family): number(p) for n, p in merged.switch_points.items()},
        # where only some rows of a fused weight switch (Flux's single-block linear1: q/k/v, not the MLP)
        "switch_rows": {naming.kohya_key(n, merged.family): list(r) for n, r in merged.switch_rows.items()},
        "family": merged.family,
        "report": merged.report.as_dict(), "notes": merged.report.notes,
    }


def run(args: argparse.Namespace) -> int:
    import json
    import sys
    from pathlib import Path

    from ..catalog import resolve_hypernet
    from ..errors import LoraRarError, OutputExistsError
    from ..lora import read_lora
    from ..merge import merge, method_spec
    from ..safetensors_io import atomic_write, sha256_file
    from ..tooling.progress import ProgressLine
    from ..writer import merge_metadata, save_merged

    out = Path(args.output)
    spec = method_spec(args.method)
    params = spec.resolve(method_params(args))  # bad settings fail before anything is read
    scheduled = args.method == "k-lora"
    if scheduled and out.suffix.lower() != ".json":
        raise LoraRarError(
            f"--output {out}: a k-lora merge switches between the two LoRAs during sampling, so it is not "
            "one LoRA file; give a .json output to write its switch points, use the LoRA.rar Merge node in "
            "ComfyUI to sample with it, or choose --method np-lora, lorarar or sum for a LoRA file")
    if out.exists() and not args.force:  # fail before the slow part
        raise OutputExistsError(f"{out} already exists; refusing to overwrite it (use --force)")
    family = None if args.family == "auto" else args.family
    content = read_lora(args.content, family=family)
    style = read_lora(args.style, family=family)
    hypernet = None
    if spec.needs_hypernet:
        hypernet = resolve_hypernet(args.hypernet, [Path(d) for d in args.hypernet_dir],
                                    allow_download=args.download)
    with ProgressLine(args.method) as bar:
        merged = merge(content, style, hypernet, args.content_strength, args.style_strength, args.method,
                       params=params, expected_family=family, progress=bar.update, dora=args.dora)
    if not scheduled and args.content_strength == 0 and args.style_strength == 0:
        raise LoraRarError("--content-strength and --style-strength are both 0: the merged LoRA would change "
                           f"nothing; {out} was not written")
    if scheduled:
        document = schedule_document(merged, Path(args.content).name, Path(args.style).name, params)
        text = json.dumps(document, indent=1, allow_nan=False) + "\n"
        atomic_write(out, lambda tmp: tmp.write_text(text, encoding="utf-8"), args.force)
    else:
        metadata = merge_metadata(
            merged, hypernet_name=hypernet.config.name if hypernet else "",
            hypernet_sha256=sha256_file(hypernet.source_path) if hypernet else "",
            content_sha256=sha256_file(args.content), style_sha256=sha256_file(args.style),
            content_name=Path(args.content).name, style_name=Path(args.style).name)
        metadata["lorarar.params"] = json.dumps(params, sort_keys=True)
        save_merged(merged, out, metadata, args.dtype, args.force)
    # The report is CLI output, not a log line (issue 9: left-out layers must never be only in a
    # log): stderr, so that stdout stays the one path scripts read.
    print(f"merged: {merged.report.summary()}", file=sys.stderr)
    for note in merged.report.notes:
        print(f"note: {note}", file=sys.stderr)
    print(out)
    return 0
