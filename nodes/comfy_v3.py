"""The ComfyUI node API this pack is written against, imported in one place.

Comfy-Org asks packs to import a *versioned* V3 API (`comfy_api.v0_0_2`) rather than
`comfy_api.latest`, whose contents may change with any ComfyUI update (Comfy-Org/ComfyUI#10951).
ComfyUI builds that predate the versioned module fall back to `latest`. Every node module imports
`io`, `ui` and `ComfyExtension` from here, so a future pin is a one-line change.
"""

from __future__ import annotations

try:
    from comfy_api.v0_0_2 import ComfyExtension, io, ui
    API_VERSION = "v0_0_2"
except ImportError:  # ComfyUI before the versioned modules (≤ 0.3.5x)
    from comfy_api.latest import ComfyExtension, io, ui
    API_VERSION = "latest"

__all__ = ["API_VERSION", "ComfyExtension", "io", "ui"]
