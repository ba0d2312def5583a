"""Logic of the LoRA file nodes (nodes/nodes_lora.py): reading a LoRA file into a `LORA_MODEL`,
turning any `LORA_MODEL` back into a `LoraFile` with errors naming the input, and saving a
`LORA_MODEL` into `models/loras` under a sanitised prefix, never overwriting."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath

import torch

from ..errors import LoraFormatError, LoraRarError, OutputExistsError
from ..lora import LoraFile, adapter_config_for, lora_from_state_dict
from ..safetensors_io import DTYPE_NAMES, atomic_write, load_safetensors, sha256_file, write_safetensors_streaming
from ..writer import DTYPES, merge_metadata
from .cache import IdentityCache
from .lazy import LazyMergedLora, LoadedLora

log = logging.getLogger(__name__)

LORA_EXTENSIONS = (".safetensors", ".sft")   # pickled LoRAs are refused (they can run code)
DEFAULT_SAVE_PREFIX = "lorarar/merged"


def is_lora_file_name(name: str) -> bool:
    return name.lower().endswith(LORA_EXTENSIONS)


def load_lora_model(path: str | Path, name: str = "") -> LoadedLora:
    """Read a LoRA file for a `LORA_MODEL` socket; errors name the file and what is wrong."""
    path = Path(path)
    name = name or path.name
    tensors, metadata = load_safetensors(path)
    # alpha may live outside the tensors: in the header (lora_from_state_dict reads it) or, for
    # peft's adapter_model.safetensors, in the adapter_config.json beside it
    lora = lora_from_state_dict(tensors, metadata, source=name, adapter_config=adapter_config_for(path))
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


_UNSAFE_CHARS = re.compile(r"[^\w\-. ()\[\]+,=@]")
# A prefix is a few folders and a name; these caps keep every path legal on common file systems
# (255-byte names) and turn a 2,000-level prefix into one clear error instead of a recursion.
MAX_PREFIX_FOLDERS = 32
MAX_PREFIX_PART_BYTES = 200
MAX_PREFIX_BYTES = 1024


def _shown(prefix: str) -> str:
    return repr(prefix if len(prefix) <= 80 else prefix[:80] + "…")


def sanitise_prefix(prefix: str) -> PurePosixPath:
    """A user's filename prefix → a safe relative path (subfolders allowed).

    Rejects absolute paths, drive letters and `..`; replaces characters that are unsafe in file
    names on some system; drops `.` parts and a trailing extension the node adds itself. At most
    MAX_PREFIX_FOLDERS folders deep, MAX_PREFIX_PART_BYTES bytes per part, MAX_PREFIX_BYTES in all.
    """
    text = (prefix or "").strip().replace("\\", "/")
    if not text:
        return PurePosixPath(DEFAULT_SAVE_PREFIX)
    if text.startswith("/") or re.match(r"^[A-Za-z]:", text) or text.startswith("~"):
        raise LoraRarError(
            f"filename_prefix: {_shown(prefix)} is an absolute path; give a name relative to models/loras")
    raw_parts = text.split("/")
    if len(raw_parts) > MAX_PREFIX_FOLDERS + 1:
        raise LoraRarError(f"filename_prefix: {_shown(prefix)} is {len(raw_parts) - 1} folders deep; at most "
                           f"{MAX_PREFIX_FOLDERS} accepted")
    if len(text.encode("utf-8")) > MAX_PREFIX_BYTES:
        raise LoraRarError(f"filename_prefix: {_shown(prefix)} is {len(text.encode('utf-8'))} bytes long; "
                           f"at most {MAX_PREFIX_BYTES} accepted")
    parts = []
    for part in raw_parts:
        part = part.strip()
        if part in ("", "."):
            continue
        if part == "..":
            raise LoraRarError(f"filename_prefix: {_shown(prefix)} leaves the loras folder ('..' is not allowed)")
        part = _UNSAFE_CHARS.sub("_", part).strip(". ")
        if len(part.encode("utf-8")) > MAX_PREFIX_PART_BYTES:
            raise LoraRarError(f"filename_prefix: the part {_shown(part)} is longer than {MAX_PREFIX_PART_BYTES} bytes")
        if part:
            parts.append(part)
    if not parts:
        return PurePosixPath(DEFAULT_SAVE_PREFIX)
    if parts[-1].lower().endswith(".safetensors"):
        parts[-1] = parts[-1][: -len(".safetensors")] or "merged"
    return PurePosixPath(*parts)


def _next_counter(folder: Path, stem: str) -> int:
    """1 + the highest counter among `<stem>_<digits>.safetensors` in `folder` (1 if none)."""
    pattern = re.compile(rf"^{re.escape(stem)}_(\d{{1,9}})\.safetensors$")
    try:
        names = [entry.name for entry in os.scandir(folder)] if folder.is_dir() else []
    except OSError:
        names = []
    return max((int(m.group(1)) for name in names if (m := pattern.match(name))), default=0) + 1


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def save_folder(loras_dir: str | Path, relative: PurePosixPath, extra_roots: Iterable[str | Path] = ()) -> Path:
    """The folder `relative`'s parent names inside `loras_dir`, created if missing, after the
    symlink policy below; returned as the path through `loras_dir` (what the user sees).

    Symlink policy. ComfyUI users link model folders on purpose (a models/loras on another drive,
    a shared collection linked in), and ComfyUI lists LoRAs through such links. What they never
    mean is that a *workflow's* prefix may send a file anywhere a link happens to lead (a link
    unpacked from an archive, planted by another user, or left dangling). So:
    - `loras_dir` itself is resolved first: if the whole folder is a link, that is where LoRAs live;
    - every folder the prefix names may be a real folder or a link, but where it resolves must
      stay inside the resolved `loras_dir` or inside one of `extra_roots`: the other folders
      ComfyUI is configured to hold LoRAs (`folder_paths.get_folder_paths("loras")`, i.e.
      extra_model_paths.yaml). A link to anywhere else is refused, naming the link and its target
      and saying how to allow it (register the target as a LoRA folder);
    - a dangling link, or one to a file, is refused; the prefix itself can never add a link,
      `..` or an absolute path (sanitise_prefix), and new folders are created only inside an
      allowed one. The check is repeated after creating the folders (a link swapped in meanwhile).
    """
    root = Path(loras_dir)
    allowed = [root.resolve(), *(Path(r).resolve() for r in extra_roots)]
    folder = root
    for part in relative.parts[:-1]:
        folder = folder / part
        if not (folder.is_symlink() or folder.exists()):
            continue  # created below, inside the last existing (checked) folder
        target = folder.resolve()
        if folder.is_symlink() and not folder.exists():
            raise LoraRarError(f"filename_prefix: {folder} is a broken link (to {target}); remove it or pick another prefix")
        if not target.is_dir():
            raise LoraRarError(f"filename_prefix: {folder} is not a folder")
        if not _inside(target, allowed):
            raise LoraRarError(
                f"filename_prefix: {folder} links to {target}, outside the LoRA folders; saving through it is "
                "refused. Save elsewhere, or add that folder to ComfyUI's LoRA paths (extra_model_paths.yaml)")
    folder.mkdir(parents=True, exist_ok=True)
    if not _inside(folder.resolve(), allowed):
        raise LoraRarError(f"filename_prefix: {folder} resolves to {folder.resolve()}, outside the LoRA folders; refused")
    return folder


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
        if kind not in DTYPE_NAMES:
            raise LoraFormatError(f"merged_lora: tensor {key!r} has dtype {tensor.dtype}, which safetensors here cannot store")
        entries.append((key, kind, tuple(tensor.shape), lambda t=tensor: t.detach().cpu()))
    metadata = {"lorarar.note": "LORA_MODEL saved by Save Merged LoRA (LoRA.rar); not a LoRA.rar merge result"}
    return (lambda tmp: write_safetensors_streaming(tmp, entries, metadata)), "LORA_MODEL"


def unsaveable_reason(state_dict: object) -> str | None:
    """Why Save Merged LoRA should write nothing for this input, or None. A merge that is not one
    LoRA (k-lora: its MODEL switches LoRAs while sampling) and an empty merge (both strengths 0)
    are normal results of a workflow whose method or strengths a user changed: Save says so on
    the node instead of failing the whole run."""
    reason = getattr(state_dict, "unsaveable_reason", None)
    if reason:
        return reason
    provenance = getattr(state_dict, "provenance", None)
    if isinstance(state_dict, LazyMergedLora) and provenance is not None:
        merged = provenance.merged
        if merged.content_strength == 0 and merged.style_strength == 0:
            return ("both strengths are 0, so the merge changes nothing; an all-zero LoRA would only "
                    "take disk space")
    return None


def save_lora_model(state_dict: dict, loras_dir: str | Path, prefix: str, dtype: str = "fp32",
                    extra_roots: Iterable[str | Path] = ()) -> Path:
    """Write into `loras_dir/<prefix>_<counter>.safetensors`, the next free counter; never
    overwrites (a file appearing meanwhile bumps the counter). `extra_roots`: ComfyUI's other LoRA
    folders, where a symlinked subfolder may lead (see save_folder for the symlink policy)."""
    if dtype not in DTYPES:
        raise LoraRarError(f"dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    if not isinstance(state_dict, dict) or not state_dict:
        raise LoraFormatError("merged_lora: expected a non-empty LoRA state dict")
    relative = sanitise_prefix(prefix)
    try:
        folder = save_folder(loras_dir, relative, extra_roots)
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
    except OSError as exc:  # read-only folder, full disk, a name the file system refuses
        if isinstance(exc, LoraRarError):
            raise
        raise LoraRarError(f"filename_prefix: cannot write into {Path(loras_dir) / relative.parent}: "
                           f"{exc.strerror or exc}") from None
    raise OutputExistsError(f"filename_prefix: no free file name for {relative} in {folder}")
