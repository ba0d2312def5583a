"""Model folders of the pack, registered with ComfyUI's folder_paths.

`models/lorarar` holds hypernetwork checkpoints (not `models/hypernetworks`: core's A1111-style
hypernetwork loader lists that one and would offer our files to the wrong node). Users can add
more places in extra_model_paths.yaml under the key `lorarar:`; those are kept. The pack's own
`weights/` folder is searched too. Registration is idempotent and also runs from the schemas
that list files, so the lists are right even if `on_load` has not run yet.
"""

from __future__ import annotations

import os

FOLDER = "lorarar"
EXTENSIONS = {".safetensors", ".pth"}


def pack_weights_dir() -> str:
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "weights")


def register_model_folder() -> None:
    import folder_paths

    default = os.path.join(folder_paths.models_dir, FOLDER)
    registered = folder_paths.folder_names_and_paths.get(FOLDER, ([], set()))[0]
    if not registered or registered[0] != default:
        try:
            # is_default puts models/lorarar first even when extra_model_paths.yaml registered
            # the folder name before us (ComfyUI reads that file before loading custom nodes).
            folder_paths.add_model_folder_path(FOLDER, default, is_default=True)
        except TypeError:  # ComfyUI of 2024, before is_default (and it appends duplicates)
            if default not in registered:
                folder_paths.add_model_folder_path(FOLDER, default)
    if pack_weights_dir() not in folder_paths.folder_names_and_paths[FOLDER][0]:
        folder_paths.add_model_folder_path(FOLDER, pack_weights_dir())
    paths, extensions = folder_paths.folder_names_and_paths[FOLDER]
    if set(extensions) != EXTENSIONS:
        # The yaml path registers the name with an empty extension set (= every file).
        folder_paths.folder_names_and_paths[FOLDER] = (paths, set(EXTENSIONS))
        cache = getattr(folder_paths, "filename_list_cache", None)
        if isinstance(cache, dict):
            cache.pop(FOLDER, None)


def model_folder_paths() -> list[str]:
    import folder_paths

    register_model_folder()
    return folder_paths.get_folder_paths(FOLDER)


def default_model_folder() -> str:
    import folder_paths

    register_model_folder()
    return os.path.join(folder_paths.models_dir, FOLDER)


def hypernet_files() -> list[str]:
    import folder_paths

    register_model_folder()
    return folder_paths.get_filename_list(FOLDER)


def hypernet_full_path(name: str) -> str | None:
    import folder_paths

    register_model_folder()
    return folder_paths.get_full_path(FOLDER, name)
