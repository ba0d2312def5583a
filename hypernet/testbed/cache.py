"""Where the testbed keeps what it builds: `<user cache>/testbed/<world key>/…`.

Every artefact's file name carries a short hash of everything that determines it (world seed and
size, configs, step counts), so a changed setting builds anew and an unchanged one is reused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..catalog import user_cache_dir


def key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def testbed_dir(root: Path | None = None) -> Path:
    return Path(root) if root else user_cache_dir() / "testbed"
