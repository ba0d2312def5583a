"""Text shown on a node in the canvas after it ran — the saved file's path, a warning — so a user
sees it without wiring a preview node. ComfyUI's own "Get Image Size" node does the same: the
server's `send_progress_text` (both the pinned 1.27 frontend and 1.58 show it as a text box at the
bottom of the node until the next run). Also logged, for API users and the server log."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def show_on_node(node_id: str | None, text: str, level: int = logging.INFO) -> None:
    log.log(level, "%s", text)
    if node_id is None:
        return
    try:
        from server import PromptServer

        PromptServer.instance.send_progress_text(text, node_id)
    except Exception as exc:  # noqa: BLE001 — no server (in-process use) or an older one: the log has it
        log.debug("could not show text on node %s: %s", node_id, exc)
