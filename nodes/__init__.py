"""ComfyUI glue (V3 API). Thin: every node delegates to `hypernet`.

Each topic module `nodes_<topic>.py` exposes `NODES`, a list of io.ComfyNode classes. This
package is only ever imported relatively from the pack's root `__init__` (ComfyUI has a
top-level module called `nodes`).
"""

from __future__ import annotations

import importlib
import logging

from .comfy_v3 import ComfyExtension, io

log = logging.getLogger(__name__)

TOPIC_MODULES = ("nodes_lora", "nodes_merge", "nodes_judge", "nodes_train", "nodes_grid")


class LoraRarExtension(ComfyExtension):
    async def on_load(self) -> None:
        from .paths import register_model_folder

        register_model_folder()

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        node_list: list[type[io.ComfyNode]] = []
        for name in TOPIC_MODULES:
            # One broken topic (say, a missing optional dependency) must not hide the others:
            # log it loudly with its traceback and go on.
            try:
                module = importlib.import_module(f".{name}", __name__)
            except Exception:  # noqa: BLE001 - any import-time failure of that one module
                log.exception("LoRA.rar: the %s nodes failed to load and are not available", name)
                continue
            node_list.extend(module.NODES)
        return node_list
