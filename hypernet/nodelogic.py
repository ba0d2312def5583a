"""The logic behind the ComfyUI nodes, as plain functions (no ComfyUI import here, so it is
unit-tested without ComfyUI; `nodes/` only adds schemas, folder lookups and comfy calls).

- reading a LoRA file into a `LORA_MODEL` (`LoadedLora`) and turning any `LORA_MODEL` back into
  a `LoraFile`, with errors naming the input;
- hypernetwork choices, cached loading (path + mtime + size) and the opt-in catalog download;
- the merge: coefficients cached by the identity of (content, style, hypernetwork), so changing
  only the strengths never runs the hypernetwork again;
- the patch plan: how the merged result reaches `comfy.sd.load_lora_for_models` cheaply;
- saving a `LORA_MODEL` into `models/loras` under a sanitised prefix, never overwriting.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch

from . import catalog, naming, plot
from .errors import HypernetError, LoraFormatError, LoraRarError, OutputExistsError
from .lazy import LazyMergedLora, LoadedLora, MergeProvenance
from .lora import LoraFile, lora_from_state_dict, require_family
from .merge import METHODS, Coefficients, MergedLora, assemble, compute_coefficients
from .model import HyperNetwork
from .safetensors_io import _DTYPE_NAMES, atomic_write, load_safetensors, sha256_file, write_safetensors_streaming
from .writer import DTYPES, merge_metadata, save_merged

log = logging.getLogger(__name__)

LORA_EXTENSIONS = (".safetensors", ".sft")   # pickled LoRAs are refused (they can run code)
HYPERNET_EXTENSIONS = (".safetensors", ".pth")
OFFICIAL_SDXL = "lorarar-sdxl"
DEFAULT_SAVE_PREFIX = "lorarar/merged"
Progress = Callable[[int, int], None]


class IdentityCache:
    """A few results keyed by the identity of their input objects.

    Holds strong references to the inputs, so an id can never be reused by another object while
    its entry lives (a plain `id()` key could silently match a new dict at the same address).
    Entries keep LoRAs alive, so the caches below are small: two entries serve two merge nodes
    in one workflow (e.g. lorarar vs sum) without recomputing, and retain no more LoRAs than
    ComfyUI's own output cache does.
    """

    def __init__(self, size: int = 2):
        self.size = size
        self._entries: list[tuple[tuple, object]] = []
        self.hits = self.misses = 0

    def get_or_compute(self, objects: tuple, compute: Callable[[], object]):
        for index, (keys, value) in enumerate(self._entries):
            if len(keys) == len(objects) and all(a is b for a, b in zip(keys, objects)):
                self._entries.append(self._entries.pop(index))
                self.hits += 1
                return value
        self.misses += 1
        value = compute()
        self._entries.append((objects, value))
        del self._entries[:-self.size]
        return value

    def clear(self) -> None:
        self._entries.clear()


# ---------------------------------------------------------------------------------------------
# LoRAs

def is_lora_file_name(name: str) -> bool:
    return name.lower().endswith(LORA_EXTENSIONS)


def load_lora_model(path: str | Path, name: str = "") -> LoadedLora:
    """Read a LoRA file for a `LORA_MODEL` socket; errors name the file and what is wrong."""
    path = Path(path)
    name = name or path.name
    tensors, metadata = load_safetensors(path)
    lora = lora_from_state_dict(tensors, metadata, source=name)
    return LoadedLora(tensors, path, lora, name)


_PARSED = IdentityCache()


def lora_file_of(state_dict: dict, role: str) -> LoraFile:
    """The canonical form of a `LORA_MODEL` input (`role` names the input in errors)."""
    if not isinstance(state_dict, dict):
        raise LoraFormatError(f"{role}: expected a LoRA state dict, got {type(state_dict).__name__}")
    if isinstance(state_dict, LoadedLora) and state_dict.lora_file is not None:
        return state_dict.lora_file
    if isinstance(state_dict, LazyMergedLora) and state_dict.provenance is not None:
        source = f"{role} (a LoRA.rar merge result)"
    else:
        source = role

    def parse() -> LoraFile:
        bad = next((k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)), None)
        if bad is not None:
            raise LoraFormatError(f"{role}: entry {bad!r} is not a tensor")
        return lora_from_state_dict(state_dict, source=source)

    return _PARSED.get_or_compute((state_dict,), parse)


def name_of(state_dict: dict, role: str) -> str:
    return getattr(state_dict, "name", "") or role


def check_sdxl(lora: LoraFile, role: str, hypernet: HyperNetwork | None) -> None:
    """Both inputs must look like SDXL LoRAs; one message naming the input otherwise."""
    try:
        require_family(lora, "sdxl", role)
    except LoraFormatError as exc:
        extra = ""
        if hypernet is not None:
            extra = (f"; this hypernetwork supports {hypernet.config.base_family.upper()} widths "
                     f"{'/'.join(map(str, hypernet.widths))}")
        raise LoraFormatError(f"{exc}{extra}") from None


# ---------------------------------------------------------------------------------------------
# Hypernetworks

def official_file_name() -> str:
    return catalog.load_catalog()[OFFICIAL_SDXL].file


def hypernet_choices(listed: list[str]) -> list[str]:
    """Files found in the hypernetwork folders, plus the official SDXL checkpoint's catalog file
    name even when it is absent (so a shared workflow keeps its value); official first."""
    official = official_file_name()
    rest = sorted({n for n in listed if n.lower().endswith(HYPERNET_EXTENSIONS)} - {official})
    return [official, *rest]


_HYPERNETS: dict[tuple[str, int, int], HyperNetwork] = {}


def load_hypernet_cached(path: str | Path) -> HyperNetwork:
    """Load (and, for catalog files, sha256-verify) a hypernetwork once per path+mtime+size."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError as exc:
        raise HypernetError(f"hypernetwork {path}: cannot read ({exc.strerror})") from None
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    model = _HYPERNETS.get(key)
    if model is None:
        entry = catalog.entry_for_file(path.name)
        model = catalog.load_checkpoint_file(path, entry)
        if entry:
            log.info("loaded %s from %s (license: %s)", entry.title, path, entry.license)
        else:
            model.config.name = model.config.name or path.stem
        for stale in [k for k in _HYPERNETS if k[0] == key[0]]:
            del _HYPERNETS[stale]  # the file changed on disk: forget the old weights
        _HYPERNETS[key] = model
    return model


def resolve_hypernet_choice(name: str, full_path: str | Path | None, download: bool,
                            download_dir: Path, search_dirs: list[Path],
                            progress: Progress | None = None, url: str | None = None) -> HyperNetwork:
    """The node's choice → a loaded hypernetwork. `full_path` is where the folder lookup found
    `name` (None if nowhere); a missing catalog file is downloaded only when `download`
    (`url` overrides the catalog's address, for mirrors and tests; the sha256 check stays)."""
    if full_path is not None and Path(full_path).is_file():
        return load_hypernet_cached(full_path)
    entry = catalog.entry_for_file(name)
    places = ", ".join(str(d) for d in search_dirs) or "the lorarar model folder"
    if entry is None:
        raise HypernetError(f"hypernetwork {name!r} was not found in {places}")
    if not download:
        raise HypernetError(
            f"hypernetwork {name!r} ({entry.title}) is not installed. Put {entry.file} into "
            f"{download_dir} (searched: {places}), or switch 'download' on to fetch it from "
            f"{entry.url} ({entry.bytes:,} bytes, sha256-checked). License: {entry.license}")
    log.warning("downloading %s: license %s (%s)", entry.title, entry.license, entry.license_url)
    path = catalog.download(entry, download_dir, accept_license=True, url=url, progress=progress)
    return load_hypernet_cached(path)


def hypernet_file_tooltip() -> str:
    entry = catalog.load_catalog()[OFFICIAL_SDXL]
    return (f"Hypernetwork checkpoint from models/lorarar (or the pack's weights folder). "
            f"{entry.file} is the official SDXL checkpoint of the LoRA.rar paper, licensed "
            f"{entry.license} ({entry.license_url}); it is not shipped with this pack.")


def download_tooltip() -> str:
    entry = catalog.load_catalog()[OFFICIAL_SDXL]
    return (f"Allow downloading the chosen official checkpoint if it is missing "
            f"({entry.bytes:,} bytes from {entry.url}, sha256-verified) into models/lorarar. "
            f"By switching this on you accept its license: {entry.license}.")


# ---------------------------------------------------------------------------------------------
# Merging

_COEFFICIENTS = IdentityCache()


def merge_coefficients(content: LoraFile, style: LoraFile, hypernet: HyperNetwork,
                       progress: Progress | None = None) -> tuple[Coefficients, int]:
    """compute_coefficients, cached by the identity of its three inputs (the strengths do not
    enter: H sees the LoRAs as their files define them, DESIGN §10)."""
    return _COEFFICIENTS.get_or_compute(
        (content, style, hypernet), lambda: compute_coefficients(content, style, hypernet, "error", progress))


_NO_COEFFICIENTS: Coefficients = {}  # never mutated


@dataclass
class MergeResult:
    merged: MergedLora
    content: LoraFile
    style: LoraFile
    coefficients: Coefficients


def run_merge(content_sd: dict, style_sd: dict, hypernet: HyperNetwork | None,
              content_strength: float, style_strength: float, method: str,
              progress: Progress | None = None) -> MergeResult:
    """Everything the merge node computes, before touching the model."""
    if method not in METHODS:
        raise LoraRarError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")
    if method == "lorarar" and hypernet is None:
        raise HypernetError("hypernetwork: method 'lorarar' needs a hypernetwork; connect "
                            "'Load Hypernetwork (LoRA.rar)' or choose method 'sum'")
    content = lora_file_of(content_sd, "content LoRA")
    style = lora_file_of(style_sd, "style LoRA")
    check_sdxl(content, "content LoRA", hypernet if method == "lorarar" else None)
    check_sdxl(style, "style LoRA", hypernet if method == "lorarar" else None)
    coefficients: Coefficients = _NO_COEFFICIENTS  # one shared object: caches keyed on it hit for "sum"
    if method == "lorarar":
        coefficients, _ = merge_coefficients(content, style, hypernet, progress)  # widths: 'error', never a fallback
    merged = assemble(content, style, coefficients, content_strength, style_strength, method)
    log.info("LoRA.rar merge: %s", merged.report.summary())
    return MergeResult(merged, content, style, coefficients)


def merged_lora_output(result: MergeResult, content_sd: dict, style_sd: dict,
                       hypernet: HyperNetwork | None) -> LazyMergedLora:
    """The merged LoRA for the LORA_MODEL output: lazy, with provenance for saving."""
    provenance = MergeProvenance(
        result.merged,
        content_name=name_of(content_sd, ""), content_path=getattr(content_sd, "path", None),
        style_name=name_of(style_sd, ""), style_path=getattr(style_sd, "path", None),
        hypernet_name=hypernet.config.name if hypernet is not None else "",
        hypernet_path=getattr(hypernet, "source_path", None) if hypernet is not None else None)
    return LazyMergedLora.from_merged(result.merged, provenance)


_SCALED_DOWNS = IdentityCache()


def _scaled_downs(content: LoraFile, style: LoraFile, coefficients: Coefficients) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """down · diag(m) for both sides of every hypernetwork-merged layer, float32 (ComfyUI
    computes patches in float32 anyway, so the patched weights match the library's ΔW).

    Independent of the strengths, so cached with the coefficients. Layers of equal shape are
    scaled in one batched multiply: a few large tensor ops instead of ~1100 small ones (each
    small op pays thread start-up; on a busy machine that dominated this step)."""

    def build() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        groups: dict[tuple, list[str]] = {}
        for name in coefficients:
            c, s = content.layers.get(name), style.layers.get(name)
            if c is None or s is None or not (c.is_low_rank and s.is_low_rank) or c.mid is not None \
                    or s.mid is not None or c.down.dim() != 2 or s.down.dim() != 2:
                continue  # dense layers never reach the patch plan's low-rank path
            groups.setdefault((tuple(c.down.shape), c.down.dtype, tuple(s.down.shape), s.down.dtype), []).append(name)
        scaled: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        with torch.no_grad():
            for names in groups.values():
                sides = []
                for index, lora in enumerate((content, style)):
                    downs = torch.stack([lora.layers[n].down for n in names]).float()
                    columns = torch.stack([coefficients[n][index] for n in names]).float()
                    sides.append(downs.mul_(columns[:, None, :]).unbind(0))
                scaled.update((n, (sides[0][i], sides[1][i])) for i, n in enumerate(names))
        return scaled

    return _SCALED_DOWNS.get_or_compute((content, style, coefficients), build)


_SIDE_DICTS = IdentityCache()


def _side_state_dicts(result: MergeResult, include_text_encoders: bool) -> tuple[dict, dict]:
    """Content-side and style-side kohya dicts of the plan's low-rank layers. They hold no
    strength (that is the patch strength), so a strength change reuses them as they are."""
    merged, coefficients = result.merged, result.coefficients

    def build() -> tuple[dict, dict]:
        scaled = _scaled_downs(result.content, result.style, coefficients) if coefficients else {}
        sides: tuple[dict, dict] = ({}, {})
        for name, layer in merged.layers.items():
            if layer.diff is not None or (not include_text_encoders and naming.is_text_encoder(name)):
                continue
            key = naming.ldm_to_kohya_key(name)
            columns = coefficients.get(name)
            for index, lora in enumerate((result.content, result.style)):
                source = lora.layers.get(name)
                if source is None:
                    continue
                down = source.down
                if columns is not None:
                    down = scaled[name][index] if name in scaled else \
                        down.float() * columns[index].reshape(1, -1, *([1] * (down.dim() - 2)))
                sides[index][f"{key}.lora_up.weight"] = source.up
                sides[index][f"{key}.lora_down.weight"] = down
                if source.alpha is not None:
                    sides[index][f"{key}.alpha"] = torch.tensor(float(source.alpha))
        return sides

    # Which layers are dense depends on the LoRAs only, never on the strengths.
    return _SIDE_DICTS.get_or_compute((result.content, result.style, coefficients, include_text_encoders), build)


def patch_plan(result: MergeResult, include_text_encoders: bool = True) -> list[tuple[dict[str, torch.Tensor], float]]:
    """(kohya state dict, strength) pairs whose patches add up to exactly the merged ΔW.

    Concatenating both sides into one rank-(r_c + r_s) LoRA would copy every factor of both
    files. ComfyUI can hold several patches per weight and adds them when it patches, so each
    side is given as its own LoRA (its original tensors, no copy; the hypernetwork's columns
    folded into `down` for the ~280 merged matrices) at its strength — the same work as two
    stacked LoraLoaders. Layers without a low-rank form go in a third dict as `.diff` (strength
    already inside). A handful of load_lora_for_models calls, never one per layer (DESIGN §8).
    """
    merged = result.merged
    content_sd, style_sd = _side_state_dicts(result, include_text_encoders)
    plan = [(sd, strength) for sd, strength in ((content_sd, merged.content_strength), (style_sd, merged.style_strength))
            if sd and strength != 0]
    dense = {f"{naming.ldm_to_kohya_key(name)}.diff": layer.diff for name, layer in merged.layers.items()
             if layer.diff is not None and (include_text_encoders or not naming.is_text_encoder(name))}
    if dense:
        plan.append((dense, 1.0))
    return plan


def plot_title(result: MergeResult, content_name: str, style_name: str, hypernet_name: str) -> tuple[str, str]:
    merged = result.merged
    title = f"LoRA.rar {merged.report.method} merge" + (f" - {hypernet_name}" if hypernet_name else "")
    subtitle = (f"content {content_name or '?'} x{merged.content_strength:g}, style {style_name or '?'} "
                f"x{merged.style_strength:g}; {merged.report.hypernet_layers} matrices by the "
                f"hypernetwork, {merged.report.summed_layers} summed")
    return title, subtitle


_BLOCK_MEANS = IdentityCache()


def coefficient_image(result: MergeResult, content_name: str, style_name: str, hypernet_name: str) -> torch.Tensor:
    """The merge node's IMAGE output: mean coefficients per transformer block (cached per
    coefficient set; only the subtitle changes with the strengths)."""
    means = _BLOCK_MEANS.get_or_compute((result.coefficients,), lambda: plot.block_means(result.coefficients))
    title, subtitle = plot_title(result, content_name, style_name, hypernet_name)
    return plot.image_to_tensor(plot.coefficient_plot(means, title, subtitle))


# ---------------------------------------------------------------------------------------------
# Saving

_UNSAFE_CHARS = re.compile(r"[^\w\-. ()\[\]+,=@]")


def sanitise_prefix(prefix: str) -> PurePosixPath:
    """A user's filename prefix → a safe relative path (subfolders allowed).

    Rejects absolute paths, drive letters and `..`; replaces characters that are unsafe in file
    names on some system; drops `.` parts and a trailing extension the node adds itself.
    """
    text = (prefix or "").strip().replace("\\", "/")
    if not text:
        return PurePosixPath(DEFAULT_SAVE_PREFIX)
    if text.startswith("/") or re.match(r"^[A-Za-z]:", text) or text.startswith("~"):
        raise LoraRarError(
            f"filename_prefix: {prefix!r} is an absolute path; give a name relative to models/loras")
    parts = []
    for part in text.split("/"):
        part = part.strip()
        if part in ("", "."):
            continue
        if part == "..":
            raise LoraRarError(f"filename_prefix: {prefix!r} leaves the loras folder ('..' is not allowed)")
        part = _UNSAFE_CHARS.sub("_", part).strip(". ")
        if part:
            parts.append(part)
    if not parts:
        return PurePosixPath(DEFAULT_SAVE_PREFIX)
    if parts[-1].lower().endswith(".safetensors"):
        parts[-1] = parts[-1][: -len(".safetensors")] or "merged"
    return PurePosixPath(*parts)


def _next_counter(folder: Path, stem: str) -> int:
    pattern = re.compile(rf"^{re.escape(stem)}_(\d+)\.safetensors$")
    numbers = [int(m.group(1)) for p in folder.iterdir() if (m := pattern.match(p.name))] if folder.is_dir() else []
    return max(numbers, default=0) + 1


def _file_sha256(path: Path | None) -> str:
    if path is None or not Path(path).is_file():
        return ""
    return sha256_file(path)


def _writer_for(state_dict: dict, dtype: str) -> tuple[Callable[[Path], None], str]:
    """(write(tmp_path), description) for a LORA_MODEL: streamed from the merge when it came
    from our merge node (full provenance metadata), else the dict's tensors cast to `dtype`."""
    provenance = getattr(state_dict, "provenance", None)
    if isinstance(state_dict, LazyMergedLora) and provenance is not None:
        merged = provenance.merged
        metadata = merge_metadata(
            merged, hypernet_name=provenance.hypernet_name,
            hypernet_sha256=_file_sha256(provenance.hypernet_path),
            content_sha256=_file_sha256(provenance.content_path),
            style_sha256=_file_sha256(provenance.style_path),
            content_name=provenance.content_name, style_name=provenance.style_name)
        entries = merged.kohya_entries(DTYPES[dtype])
        return (lambda tmp: write_safetensors_streaming(tmp, entries, metadata)), "LoRA.rar merge"
    target = DTYPES[dtype]
    entries = []
    for key, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            raise LoraFormatError(f"merged_lora: entry {key!r} is not a tensor")
        kind = tensor.dtype
        if kind.is_floating_point:
            kind = torch.float32 if key.endswith(".alpha") else target
        if kind not in _DTYPE_NAMES:
            raise LoraFormatError(f"merged_lora: tensor {key!r} has dtype {tensor.dtype}, which safetensors here cannot store")
        entries.append((key, kind, tuple(tensor.shape), lambda t=tensor: t.detach().cpu()))
    metadata = {"lorarar.note": "LORA_MODEL saved by Save Merged LoRA (LoRA.rar); not a LoRA.rar merge result"}
    return (lambda tmp: write_safetensors_streaming(tmp, entries, metadata)), "LORA_MODEL"


def save_lora_model(state_dict: dict, loras_dir: str | Path, prefix: str, dtype: str = "fp32") -> Path:
    """Write into `loras_dir/<prefix>_<counter>.safetensors`, the next free counter; never
    overwrites (a file appearing meanwhile bumps the counter)."""
    if dtype not in DTYPES:
        raise LoraRarError(f"dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    if not isinstance(state_dict, dict) or not state_dict:
        raise LoraFormatError("merged_lora: expected a non-empty LoRA state dict")
    relative = sanitise_prefix(prefix)
    root = Path(loras_dir)
    folder = root.joinpath(*relative.parts[:-1])
    folder.mkdir(parents=True, exist_ok=True)
    write, kind = _writer_for(state_dict, dtype)
    counter = _next_counter(folder, relative.name)
    for _ in range(1000):
        path = folder / f"{relative.name}_{counter:05d}.safetensors"
        try:
            atomic_write(path, write, force=False)
        except OutputExistsError:
            counter += 1
            continue
        log.info("saved %s (%s, %s) to %s", relative.name, kind, dtype, path)
        return path
    raise OutputExistsError(f"filename_prefix: no free file name for {relative} in {folder}")
