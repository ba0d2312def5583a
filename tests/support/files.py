"""LoRA files for tests, and where the official hypernetwork checkpoints are.

The official checkpoints are third-party data (CC BY-NC-SA 4.0) and never in the repository:
`LORARAR_OFFICIAL_HYPERNETS` names a folder holding `lorarar_sdxl_hypernet.pth` (and
`lorarar_koala700m_hypernet.pth`); by default the project's sibling `shared/official-hypernets/`.
Tests that need them skip when they are absent.
"""

from __future__ import annotations

import os
from pathlib import Path

from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[2]
OFFICIAL_DIR = Path(os.environ.get("LORARAR_OFFICIAL_HYPERNETS") or REPO.parent / "shared" / "official-hypernets")
OFFICIAL_SDXL = OFFICIAL_DIR / "lorarar_sdxl_hypernet.pth"


def write_lora(path: Path, state_dict: dict, metadata: dict | None = None) -> Path:
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path), metadata)
    return path
