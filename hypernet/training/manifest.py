"""The training manifest: which subject and style LoRAs to train the hypernetwork on.

A JSON or YAML file (paths relative to the manifest's folder):

    resolution: 1024                 # training images are centre-cropped and resized to this
    subjects:
      - name: dog                    # optional; defaults to the LoRA file's stem
        lora: loras/dog.safetensors
        images: images/dog/          # a folder, one file, or a list of files
        prompt: a photo of sks dog
        class_word: dog              # optional, recorded in the data summary
    styles:
      - name: watercolor
        lora: loras/watercolor.safetensors
        images: images/watercolor.png
        prompt: a cat in sks watercolor style
        style_name: watercolor       # optional
    split:                           # optional
      validation_subjects: [dog]     # explicit names, and/or
      validation_styles: [watercolor]
      validation_fraction: 0.2       # otherwise this share of each side (at least one) is held out
      seed: 0

Validation pairs are held-out subjects × held-out styles, so both sides are unseen in training;
training pairs are the remaining subjects × the remaining styles. `validate()` checks every
entry up front and reports every problem together, one line each.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LoraRarError, ManifestError
from ..methods.lorarar import is_hypernet_target
from ..model import DEFAULT_TARGETS

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class Entry:
    kind: str                 # "subject" or "style"
    index: int
    name: str
    lora: Path
    images: list[Path]
    prompt: str
    label: str = ""           # class word (subjects) or style name (styles)
    image_spec: str = ""      # as written in the manifest, for messages

    @property
    def where(self) -> str:
        return f"{self.kind}s[{self.index}] ({self.name})"


@dataclass
class Manifest:
    path: Path
    subjects: list[Entry]
    styles: list[Entry]
    resolution: int | None = None
    validation_subjects: list[str] = field(default_factory=list)
    validation_styles: list[str] = field(default_factory=list)
    validation_fraction: float = 0.2
    split_seed: int = 0

    def split(self) -> tuple[list[tuple[Entry, Entry]], list[tuple[Entry, Entry]]]:
        """(training pairs, validation pairs); validation subjects and styles are unseen in training."""
        val_subjects = self._held_out(self.subjects, self.validation_subjects, 0)
        val_styles = self._held_out(self.styles, self.validation_styles, 1)
        if not val_subjects or not val_styles:
            val_subjects, val_styles = set(), set()  # a pair needs both sides held out
        train = [(a, b) for a in self.subjects if a.name not in val_subjects
                 for b in self.styles if b.name not in val_styles]
        val = [(a, b) for a in self.subjects if a.name in val_subjects
               for b in self.styles if b.name in val_styles]
        return train, val

    def _held_out(self, entries: list[Entry], explicit: list[str], salt: int) -> set[str]:
        if explicit:
            return set(explicit)
        if len(entries) < 2 or self.validation_fraction <= 0:
            return set()
        count = min(len(entries) - 1, max(1, round(self.validation_fraction * len(entries))))
        names = sorted(e.name for e in entries)
        random.Random(self.split_seed * 2 + salt).shuffle(names)
        return set(names[:count])

    def summary(self) -> dict[str, object]:
        train, val = self.split()
        return {
            "subjects": len(self.subjects), "styles": len(self.styles),
            "subject_images": sum(len(e.images) for e in self.subjects),
            "style_images": sum(len(e.images) for e in self.styles),
            "train_pairs": len(train), "validation_pairs": len(val),
            "validation_subjects": sorted({a.name for a, _ in val}),
            "validation_styles": sorted({b.name for _, b in val}),
        }


def _read(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read the training manifest ({exc.strerror})") from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # yaml/json raise many types; report the parser's message
        raise ManifestError(f"{path}: not valid {path.suffix.lstrip('.').upper() or 'JSON'} ({exc})") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: expected a mapping with 'subjects' and 'styles', found {type(data).__name__}")
    return data


def _images(base: Path, spec, problems: list[str], where: str) -> list[Path]:
    specs = spec if isinstance(spec, list) else [spec]
    found: list[Path] = []
    for item in specs:
        if not isinstance(item, str) or not item:
            problems.append(f"{where}: 'images' must be a folder, a file or a list of files, found {item!r}")
            continue
        path = (base / item).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                problems.append(f"{where}: image folder {path} contains no images ({', '.join(IMAGE_SUFFIXES)})")
            found.extend(files)
        elif path.is_file():
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                problems.append(f"{where}: {path} is not an image file ({', '.join(IMAGE_SUFFIXES)})")
            found.append(path)
        else:
            problems.append(f"{where}: image path {path} does not exist")
    return found


def load_manifest(path: str | Path) -> Manifest:
    """Parse the manifest and check its structure and paths (not yet the LoRAs' contents)."""
    path = Path(path)
    data = _read(path)
    base = path.parent
    problems: list[str] = []
    entries: dict[str, list[Entry]] = {"subject": [], "style": []}
    for kind, label_key in (("subject", "class_word"), ("style", "style_name")):
        raw = data.get(f"{kind}s")
        if not isinstance(raw, list) or not raw:
            problems.append(f"'{kind}s' must be a non-empty list, found {raw!r}")
            continue
        for index, item in enumerate(raw):
            where = f"{kind}s[{index}]"
            if not isinstance(item, dict):
                problems.append(f"{where}: expected a mapping with lora, images and prompt, found {item!r}")
                continue
            missing = [k for k in ("lora", "images", "prompt") if not item.get(k)]
            if missing:
                problems.append(f"{where}: missing {', '.join(missing)}")
                continue
            lora = (base / str(item["lora"])).expanduser()
            name = str(item.get("name") or lora.stem)
            where = f"{where} ({name})"
            if not lora.is_file():
                problems.append(f"{where}: LoRA file {lora} does not exist")
            images = _images(base, item["images"], problems, where)
            entries[kind].append(Entry(kind, index, name, lora, images, str(item["prompt"]),
                                       str(item.get(label_key, "")), str(item["images"])))
        names = [e.name for e in entries[kind]]
        for dup in sorted({n for n in names if names.count(n) > 1}):
            problems.append(f"{kind}s: the name {dup!r} is used {names.count(dup)} times; names must be unique")
    split = data.get("split") or {}
    if not isinstance(split, dict):
        problems.append(f"'split' must be a mapping, found {split!r}")
        split = {}
    manifest = Manifest(path, entries["subject"], entries["style"],
                        int(data["resolution"]) if data.get("resolution") else None,
                        [str(n) for n in split.get("validation_subjects") or []],
                        [str(n) for n in split.get("validation_styles") or []],
                        float(split.get("validation_fraction", 0.2)), int(split.get("seed", 0)))
    for kind, names, pool in (("subject", manifest.validation_subjects, manifest.subjects),
                              ("style", manifest.validation_styles, manifest.styles)):
        known = {e.name for e in pool}
        for name in names:
            if name not in known:
                problems.append(f"split: validation_{kind}s names {name!r}, which is not a {kind} in this manifest")
        if pool and names and known <= set(names):
            problems.append(f"split: every {kind} is held out for validation; none is left to train on")
    if problems:
        raise ManifestError(_message(path, problems))
    return manifest


def check_loras(manifest: Manifest, base_shapes: dict[str, tuple[int, int]] | None,
                targets: tuple[str, ...] = DEFAULT_TARGETS) -> None:
    """Read every LoRA and check it against the base model's layer shapes: one problem per bad
    entry (all reported together), so a whole data set can be fixed in one pass."""
    from ..lora import read_lora

    problems = []
    for entry in manifest.subjects + manifest.styles:
        try:
            lora = read_lora(entry.lora)
        except LoraRarError as exc:
            problems.append(f"{entry.where}: {exc}")
            continue
        unet = lora.unet_layers
        if not any(is_hypernet_target(n, targets) for n in unet):
            problems.append(f"{entry.where}: LoRA {entry.lora} has none of the layers the hypernetwork merges "
                            f"({'/'.join(targets)} of attn1/attn2); found {len(unet)} UNet layers")
            continue
        if base_shapes is None:
            continue
        absent = [n for n in unet if n not in base_shapes and not _is_conv_name(n)]
        wrong = [n for n in unet if n in base_shapes and tuple(unet[n].shape[:2]) != tuple(base_shapes[n])]
        if wrong:
            n = wrong[0]
            problems.append(
                f"{entry.where}: LoRA {entry.lora} does not match the base model: {len(wrong)} layer(s) have "
                f"other widths (e.g. {n} is {tuple(unet[n].shape[:2])}, the base model has "
                f"{tuple(base_shapes[n])}); was it trained for a different base model?")
        elif absent:
            problems.append(
                f"{entry.where}: LoRA {entry.lora} has {len(absent)} layer(s) the base model lacks "
                f"(e.g. {absent[0]}); was it trained for a different base model?")
    if problems:
        raise ManifestError(_message(manifest.path, problems))


def _is_conv_name(name: str) -> bool:
    """ResBlock/conv layers (LoCon) are not in the Linear shape table; they are checked on attach."""
    return not any(k in name for k in ("transformer_blocks", "proj_in", "proj_out"))


def _message(path: Path, problems: list[str]) -> str:
    return (f"{path}: {len(problems)} problem(s) in the training manifest:\n"
            + "\n".join(f"  - {p}" for p in problems))
