"""Safe file I/O: safetensors reading with clear errors, atomic and streaming writing, hashing.

Pickles are never loaded: a `.ckpt`/`.pt`/`.bin` LoRA is refused before anything is read.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from .errors import LoraFormatError, OutputExistsError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit

_DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def read_header(path: Path) -> tuple[dict, int]:
    """Validate a safetensors header and return (header dict, data offset)."""
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
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoraFormatError(f"{path}: corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise LoraFormatError(f"{path}: corrupt safetensors header (expected a JSON object)")
    data_len = size - 8 - header_len
    for name, info in header.items():
        if name == "__metadata__":
            continue
        end = info.get("data_offsets", [0, 0])[1] if isinstance(info, dict) else None
        if not isinstance(end, int) or end > data_len:
            raise LoraFormatError(
                f"{path}: truncated or corrupt: tensor {name!r} ends at byte {end} of a "
                f"{data_len}-byte data section")
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
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise LoraFormatError(f"{path}: cannot read safetensors data ({exc})") from None
    metadata = header.get("__metadata__") or {}
    return tensors, {str(k): str(v) for k, v in metadata.items()}


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


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], force: bool = False) -> Path:
    """Call write(tmp_path) on a temporary file beside `path`, then rename it into place.

    A crash or an error leaves no half-written file, and never touches an existing `path`
    unless `force`.
    """
    path = Path(path)
    check_writable(path, force)
    # A fresh unique name that `write` creates itself, so the file gets the user's umask like any
    # other (tempfile.mkstemp's 0600 would make merged LoRAs and reports private to the writer).
    tmp_path = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp_path)
        if not force and path.exists():  # someone else wrote it meanwhile
            raise OutputExistsError(f"{path} appeared while writing; refusing to overwrite it")
        os.replace(tmp_path, path)
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
        header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape),
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
