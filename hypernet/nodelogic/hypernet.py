"""Logic of the hypernetwork loader node: the choices it lists, cached loading (path + mtime +
size) and the opt-in, sha256-checked catalog download."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from .. import catalog
from ..errors import HypernetError
from ..model import HyperNetwork, is_hypernet_file
from ..progress import Progress

log = logging.getLogger(__name__)

HYPERNET_EXTENSIONS = (".safetensors", ".pth")
OFFICIAL_SDXL = "lorarar-sdxl"


def official_file_name() -> str:
    return catalog.load_catalog()[OFFICIAL_SDXL].file


def hypernet_choices(listed: list[str], full_path: Callable[[str], str | None] | None = None) -> list[str]:
    """Files found in the hypernetwork folders, plus the official SDXL checkpoint's catalog file
    name even when it is absent (so a shared workflow keeps its value); official first. With
    `full_path` (name → file), only files whose header says they are hypernetworks are listed —
    the folders also hold other weights (the pack's testbed model, judges, LoRAs) that would only
    fail when picked; a .pth is judged by its extension (its keys sit inside a pickle)."""
    official = official_file_name()
    rest = {n for n in listed if n.lower().endswith(HYPERNET_EXTENSIONS)} - {official}
    if full_path is not None:
        rest = {n for n in rest if (path := full_path(n)) is not None and is_hypernet_file(Path(path))}
    return [official, *sorted(rest)]


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
    """The node's choice → a loaded hypernetwork (cached). `full_path` is where ComfyUI's folder
    lookup found `name` (None if nowhere); the rest is `catalog.resolve_hypernet`."""
    spec = full_path if full_path is not None and Path(full_path).is_file() else name
    return catalog.resolve_hypernet(spec, search_dirs, allow_download=download, download_dir=download_dir,
                                    url=url, progress=progress, load=load_hypernet_cached)


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

