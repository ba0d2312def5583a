"""Safe file I/O: safetensors reading with clear errors, atomic and streaming writing, hashing.

Pickles are never loaded: a `.ckpt`/`.pt`/`.bin` LoRA is refused before anything is read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import stat
import struct
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from .errors import LoraFormatError, OutputExistsError

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit

DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
# Bytes per element of every whole-byte dtype the safetensors format defines. The sub-byte ones
# (F4, F6_*) are refused: no LoRA is stored that way and their sizes are packed.
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}


class _DuplicateKey(ValueError):
    pass


def _refuse_duplicates(pairs: list[tuple[str, object]]) -> dict:
    result: dict = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def strict_json_loads(raw: bytes | str, what: str) -> object:
    """Parse JSON the way a file format should be parsed: UTF-8 only, duplicate keys refused,
    NaN/Infinity refused. Nesting deeper than the interpreter's recursion limit (RecursionError)
    and integers too long to convert are clean errors too. `what` names the input."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError as exc:
        raise LoraFormatError(f"{what}: not UTF-8 JSON ({exc})") from None

    def refuse_constant(name: str) -> float:
        raise ValueError(f"{name} is not a JSON number")

    try:
        return json.loads(text, object_pairs_hook=_refuse_duplicates, parse_constant=refuse_constant)
    except _DuplicateKey as exc:
        raise LoraFormatError(f"{what}: the key {str(exc)!r} appears twice; a file with two values "
                              "for one name is ambiguous and refused") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError; so are huge integers
        raise LoraFormatError(f"{what}: not valid JSON ({str(exc)[:200]})") from None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_tensor_entries(path: Path, header: dict, data_len: int) -> None:
    """Every tensor entry well-formed, its bytes inside the data section and of its size, the
    entries tiling the data section without gaps or overlaps (what safetensors itself demands)."""
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict):
            raise LoraFormatError(f"{where}: expected an entry with dtype, shape and data_offsets, found {type(info).__name__}")
        missing = {"dtype", "shape", "data_offsets"} - info.keys()
        if missing:
            raise LoraFormatError(f"{where}: its header entry lacks {', '.join(sorted(missing))}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise LoraFormatError(f"{where}: dtype {dtype!r} is not one this reader supports "
                                  f"({', '.join(DTYPE_SIZES)})")
        if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d < 1 << 40 for d in shape):
            raise LoraFormatError(f"{where}: shape must be a list of non-negative integers, found {str(shape)[:80]}")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
            raise LoraFormatError(f"{where}: data_offsets must be two integers [begin, end], found {str(offsets)[:80]}")
        begin, end = offsets
        if not 0 <= begin <= end or end > data_len:
            raise LoraFormatError(f"{path}: truncated or corrupt: tensor {name!r} spans bytes {begin}..{end} "
                                  f"of a {data_len}-byte data section")
        nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        if end - begin != nbytes:
            raise LoraFormatError(f"{where}: shape {shape} of {dtype} needs {nbytes} bytes, its data_offsets "
                                  f"give {end - begin}")
        spans.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise LoraFormatError(f"{path}: corrupt: tensor {name!r} starts at byte {begin} of the data section, "
                                  f"expected {position} (tensors must follow each other without gaps or overlaps)")
        position = end
    if position != data_len and spans:
        raise LoraFormatError(f"{path}: corrupt: the tensors cover {position} bytes of a {data_len}-byte data section")


def read_header(path: Path) -> tuple[dict, int]:
    """Validate a safetensors header and return (header dict, data offset).

    Everything the safetensors library would trip over is refused here with one
    LoraFormatError naming the file: bad JSON, duplicate keys, deep nesting, malformed entries,
    offsets outside the data or not tiling it, a `__metadata__` that is not strings to strings.
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(9)
        if len(head) < 9:
            raise LoraFormatError(f"{path}: not a safetensors file (only {size} bytes)")
        # A safetensors header (JSON) always starts at byte 8 with "{"; only without that do the
        # pickle signatures count (the length's first byte may well be 0x80 in a real file).
        if head[8:9] != b"{" and (head[:2] == b"PK" or head[:1] == b"\x80"):
            raise LoraFormatError(
                f"{path}: this is a pickled PyTorch file, not safetensors; pickles can run code "
                "when loaded, so they are refused. Convert it to .safetensors with a trusted tool.")
        (header_len,) = struct.unpack("<Q", head[:8])
        f.seek(8)
        if header_len > min(_MAX_HEADER, size - 8):
            raise LoraFormatError(
                f"{path}: not a safetensors file or truncated: header claims {header_len} bytes, "
                f"file has {size - 8} after the length field")
        raw = f.read(header_len)
    header = strict_json_loads(raw, f"{path}: corrupt safetensors header")
    if not isinstance(header, dict):
        raise LoraFormatError(f"{path}: corrupt safetensors header (expected a JSON object, found {type(header).__name__})")
    metadata = header.get("__metadata__")
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(v, str) for v in metadata.values())):
        raise LoraFormatError(f"{path}: corrupt safetensors header: __metadata__ must map names to strings, "
                              f"found {str(metadata)[:80]}")
    _check_tensor_entries(path, header, size - 8 - header_len)
    return header, 8 + header_len


def load_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load every tensor and the metadata of a safetensors file, with errors that name it."""
    path = Path(path)
    if not path.is_file():
        raise LoraFormatError(f"{path}: no such file")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise LoraFormatError(
            f"{path}: {path.suffix} files are pickles, which can run code when loaded; only "
            ".safetensors LoRAs are accepted. Convert it with a trusted tool first.")
    header, _ = read_header(path)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, ValueError, RuntimeError, TypeError) as exc:
        raise LoraFormatError(f"{path}: cannot read safetensors data ({exc})") from None
    metadata = header.get("__metadata__") or {}
    return tensors, dict(metadata)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_writable(path: Path, force: bool) -> None:
    if path.exists() and not force:
        raise OutputExistsError(f"{path} already exists; refusing to overwrite it (use --force)")
    if not path.parent.is_dir():
        raise LoraFormatError(f"{path}: the folder {path.parent} does not exist")


# Temporary files of atomic_write: `.<name>.<pid>-<32 hex>.tmp` (older versions wrote
# `.<name>.<32 hex>.tmp`, also ours). `<name>` is cut to 100 bytes so the temporary name stays
# legal whenever the final one is.
_TEMP_NAME = re.compile(r"^\..+\.(?:(?P<pid>\d{1,10})-)?[0-9a-f]{32}\.tmp$", re.DOTALL)
# When a leftover counts as stale (its writer was killed: SIGKILL, power loss) and is removed by
# the next atomic_write into the same folder:
# - untouched for STALE_TEMP_S, whoever wrote it: a live writer streams continuously, so a
#   quarter of an hour without a write means nobody is writing it any more;
# - or, on POSIX, its name carries a PID that no longer runs here and it is untouched for
#   STALE_DEAD_WRITER_S (not at once: on a network share the writer may be another machine,
#   whose PIDs mean nothing here, and a live writer there keeps the file's mtime fresh).
STALE_TEMP_S = 15 * 60
STALE_DEAD_WRITER_S = 60


def _temp_name(name: str) -> str:
    short = name.encode("utf-8")[:100].decode("utf-8", "ignore")
    return f".{short}.{os.getpid()}-{uuid.uuid4().hex}.tmp"


def _process_gone(pid: int) -> bool:
    if os.name != "posix":
        return False  # os.kill(pid, 0) on Windows would send CTRL_C_EVENT; age alone decides there
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError, OSError):
        return False  # someone else's live process (or a PID this system cannot hold)
    return False


def remove_stale_temp_files(folder: Path, now: float | None = None) -> list[Path]:
    """Delete leftovers of killed atomic_write calls in `folder` (only names of our pattern,
    only regular files, only stale ones: see STALE_TEMP_S); returns what was removed."""
    now = time.time() if now is None else now
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        if not match:
            continue
        try:
            info = entry.stat(follow_symlinks=False)
            if not stat.S_ISREG(info.st_mode):
                continue
            age = now - info.st_mtime
            pid = match.group("pid")
            if age > STALE_TEMP_S or (pid is not None and int(pid) != os.getpid() and age > STALE_DEAD_WRITER_S
                                      and _process_gone(int(pid))):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
                log.info("removed %s, a temporary file left by an interrupted write", entry.path)
        except OSError as exc:  # raced with another cleaner, or not ours to delete
            log.debug("could not remove %s: %s", entry.path, exc)
    return removed


def _fsync(path: Path, directory: bool = False) -> None:
    if directory and os.name != "posix":
        return  # directories cannot be opened for fsync on Windows
    fd = os.open(path, os.O_RDWR if os.name == "nt" else os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], force: bool = False) -> Path:
    """Call write(tmp_path) on a temporary file beside `path`, then rename it into place.

    A crash or an error leaves no half-written file, and never touches an existing `path`
    unless `force`. The data is fsync'ed before the rename (so a power loss cannot leave an
    empty file under the final name), the file gets the permissions the user's umask gives any
    new file whatever `write` used to create it, and stale temporary files of earlier, killed
    writes into the same folder are removed first (see remove_stale_temp_files).
    """
    path = Path(path)
    check_writable(path, force)
    remove_stale_temp_files(path.parent)
    tmp_path = path.with_name(_temp_name(path.name))
    try:
        # Created here, so it gets the umask's mode; some writers (safetensors' save_file) create
        # their files 0600, which would make merged LoRAs and hypernetworks private to the writer.
        with open(tmp_path, "xb"):
            pass
        mode = stat.S_IMODE(os.stat(tmp_path).st_mode)
        write(tmp_path)
        if stat.S_IMODE(os.stat(tmp_path).st_mode) != mode:
            os.chmod(tmp_path, mode)
        _fsync(tmp_path)
        if not force and path.exists():  # someone else wrote it meanwhile
            raise OutputExistsError(f"{path} appeared while writing; refusing to overwrite it")
        os.replace(tmp_path, path)
        try:
            _fsync(path.parent, directory=True)
        except OSError:
            pass  # some filesystems cannot sync a directory; the file itself is on disk
    finally:
        tmp_path.unlink(missing_ok=True)
    return path


def write_safetensors_streaming(
    path: Path,
    entries: Iterable[tuple[str, torch.dtype, tuple[int, ...], Callable[[], torch.Tensor]]],
    metadata: dict[str, str],
) -> None:
    """Write a safetensors file computing one tensor at a time.

    `entries` gives (name, dtype, shape, make_tensor). Only one tensor is in memory at once, so
    a merged LoRA can be written without materialising the whole state dict.
    """
    entries = sorted(entries, key=lambda e: e[0])
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, dtype, shape, _ in entries:
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors does
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, dtype, shape, make in entries:
            tensor = make().to(dtype).contiguous()
            if tuple(tensor.shape) != tuple(shape):
                raise RuntimeError(f"tensor {name}: promised shape {shape}, made {tuple(tensor.shape)}")
            f.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))  # no extra copy
