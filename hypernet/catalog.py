"""Known hypernetwork checkpoints (weights/catalog.json): find them locally, or download them
only when the user explicitly asks, verifying size and sha256 and stating the license.

The official LoRA.rar checkpoints are CC BY-NC-SA 4.0 third-party data: never shipped here.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from .errors import HypernetError, LoraRarError
from .model import HyperNetwork, load_hypernet
from .safetensors_io import atomic_write, sha256_file

log = logging.getLogger(__name__)



def _pack_weights_dir() -> Path:
    """The pack's `weights/` folder: beside `hypernet/` in a clone (a ComfyUI custom node, an
    editable install), or inside the package as `hypernet/weights` in a wheel (pyproject maps it)."""
    here = Path(__file__).resolve().parent
    beside, inside = here.parent / "weights", here / "weights"
    return inside if not (beside / "catalog.json").is_file() and (inside / "catalog.json").is_file() else beside


PACK_WEIGHTS_DIR = _pack_weights_dir()
CATALOG_PATH = PACK_WEIGHTS_DIR / "catalog.json"


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    title: str
    file: str
    url: str
    sha256: str
    bytes: int
    license: str
    license_url: str
    base_family: str
    widths: tuple[int, ...]


def load_catalog(path: Path = CATALOG_PATH) -> dict[str, CatalogEntry]:
    data = json.loads(path.read_text())
    entries = {}
    for raw in data["checkpoints"]:
        raw = dict(raw, widths=tuple(raw["widths"]))
        entries[raw["name"]] = CatalogEntry(**raw)
    return entries


def user_cache_dir() -> Path:
    """`$LORARAR_CACHE`, else `$XDG_CACHE_HOME/lorarar`, else `~/.cache/lorarar`."""
    if env := os.environ.get("LORARAR_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lorarar"


def default_search_dirs() -> list[Path]:
    return [PACK_WEIGHTS_DIR, user_cache_dir()]


def entry_for_file(name: str) -> CatalogEntry | None:
    """The catalog entry whose file name is `name` (a bare name or a path in either slash style)."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    return next((e for e in load_catalog().values() if e.file == base), None)


def load_checkpoint_file(path: Path, entry: CatalogEntry | None) -> HyperNetwork:
    """Load a hypernetwork file; a catalog checkpoint must match its sha256 and carries the
    catalog's name, license and base family."""
    model = load_hypernet(path, expected_sha256=entry.sha256 if entry else None)
    if entry:
        model.config.name, model.config.license = entry.name, entry.license
        model.config.base_family = entry.base_family
    return model


def find_checkpoint(spec: str | Path, search_dirs: Iterable[Path] = ()) -> tuple[Path | None, CatalogEntry | None]:
    """`spec` is a file path, a catalog name (`lorarar-sdxl`) or a catalog file name.
    Returns (its path, or None if not present in any folder; its catalog entry, if any)."""
    catalog = load_catalog()
    text = str(spec)
    entry = catalog.get(text) or entry_for_file(text)
    path = Path(text).expanduser()
    if path.is_file():
        return path, entry_for_file(path.name)
    if entry is None:
        raise HypernetError(
            f"hypernetwork {text!r} was not found: it is neither a file nor a known name "
            f"(known: {', '.join(catalog)}; searched: {_places(search_dirs)})")
    for folder in [*search_dirs, *default_search_dirs()]:
        candidate = Path(folder) / entry.file
        if candidate.is_file():
            return candidate, entry
    return None, entry


def _places(search_dirs: Iterable[Path]) -> str:
    return ", ".join(dict.fromkeys(str(d) for d in [*search_dirs, *default_search_dirs()]))


# A download may take as long as the file needs at this average rate, but never less than this:
# a server that drips bytes must not keep the node (or the CLI) waiting for ever.
MIN_DOWNLOAD_RATE = 100_000   # bytes per second
MIN_DOWNLOAD_SECONDS = 300.0


def download(entry: CatalogEntry, dest_dir: Path, accept_license: bool = False,
             url: str | None = None, progress: Callable[[int, int], None] | None = None,
             timeout: float = 60.0, deadline: float | None = None) -> Path:
    """Download `entry` into `dest_dir` after the user accepted its license; verify and rename.

    `timeout` bounds each network operation; `deadline` (default: the file's size at
    `MIN_DOWNLOAD_RATE`, at least `MIN_DOWNLOAD_SECONDS`) bounds the whole download. Nothing but
    the catalog's public file is asked for and no credentials are sent, so redirects (GitHub
    sends one to its raw-content host) are followed. Every failure is a `HypernetError` naming the
    URL; a failed download leaves nothing behind.
    """
    if not accept_license:
        raise HypernetError(
            f"{entry.title} is licensed {entry.license} ({entry.license_url}). Downloading it "
            "needs your explicit agreement (--download / the node's download switch)")
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / entry.file
    url = url or entry.url
    limit = deadline if deadline is not None else max(MIN_DOWNLOAD_SECONDS, entry.bytes / MIN_DOWNLOAD_RATE)
    log.info("downloading %s (%d bytes, license %s) from %s", entry.name, entry.bytes, entry.license, url)

    def fetch(tmp: Path) -> None:
        end = time.monotonic() + limit
        done = 0
        with urllib.request.urlopen(url, timeout=timeout) as response, tmp.open("wb") as out:
            # read1 returns what has arrived (≤ 64 KiB), so the deadline is checked while a slow
            # server drips; read() would wait for a full 64 KiB first.
            while chunk := response.read1(1 << 16):
                done += len(chunk)
                if done > entry.bytes:
                    raise HypernetError(f"{url}: more than the expected {entry.bytes} bytes; aborted")
                if time.monotonic() > end:
                    raise HypernetError(f"{url}: only {done:,} of {entry.bytes:,} bytes after {limit:.0f} s; aborted")
                out.write(chunk)
                if progress:
                    progress(done, entry.bytes)
        if done != entry.bytes:
            raise HypernetError(f"{url}: got {done} bytes, expected {entry.bytes}")
        actual = sha256_file(tmp)
        if actual != entry.sha256:
            raise HypernetError(f"{url}: sha256 {actual} does not match the catalog's {entry.sha256}")

    try:
        return atomic_write(target, fetch, force=True)
    except LoraRarError:
        raise  # already says what went wrong (size, sha256, deadline)
    except urllib.error.HTTPError as exc:
        raise HypernetError(f"{url}: the server answered {exc.code} {exc.reason}; cannot download {entry.file}. "
                            f"{_by_hand(entry, dest_dir)}") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise HypernetError(f"{url}: download of {entry.file} failed ({type(exc).__name__}: {reason}). "
                            f"{_by_hand(entry, dest_dir)}") from None


def _by_hand(entry: CatalogEntry, dest_dir: Path) -> str:
    """What to do when this machine cannot download (offline, a proxy, a firewall)."""
    return (f"To install it by hand, download {entry.url} on a machine that can ({entry.bytes:,} bytes, "
            f"sha256 {entry.sha256}) and save it as {dest_dir / entry.file}")


def resolve_hypernet(spec: str | Path, search_dirs: Iterable[Path] = (), allow_download: bool = False,
                     download_dir: Path | None = None, url: str | None = None,
                     progress: Callable[[int, int], None] | None = None,
                     load: Callable[[Path], HyperNetwork] | None = None) -> HyperNetwork:
    """The one way CLI and nodes turn a user's choice into a loaded hypernetwork.

    `spec`: a path, a catalog name or a catalog file name. A catalog checkpoint found nowhere is
    downloaded into `download_dir` (default: the user cache) only with `allow_download` — the
    user's explicit acceptance of its license; `url` overrides the catalog's address (mirrors,
    tests; the size and sha256 checks stay). `load` replaces the plain loader (the node's cache).
    """
    search_dirs = list(search_dirs)
    path, entry = find_checkpoint(spec, search_dirs)
    if path is None:
        assert entry is not None
        target = download_dir or user_cache_dir()
        if not allow_download:
            raise HypernetError(
                f"hypernetwork {entry.name} ({entry.title}) is not installed: {entry.file} was not found in "
                f"{_places(search_dirs)}. Put it into {target}, or allow its download ('download' switch on "
                f"the node, --download on the command line) to fetch it from {entry.url} "
                f"({entry.bytes:,} bytes, sha256-checked). License: {entry.license}")
        log.warning("downloading %s: license %s (%s)", entry.title, entry.license, entry.license_url)
        path = download(entry, target, accept_license=True, url=url, progress=progress)
    if load is not None:
        return load(path)
    return load_checkpoint_file(path, entry_for_file(path.name))
