"""ComfyUI entry point for the LoRA.rar node pack.

Only `comfy_entrypoint` lives here; everything is imported lazily so that loading the pack
costs nothing until ComfyUI asks for the node list.
"""

# Served by ComfyUI under /extensions/<this folder's name>/. The frontend's node help panel
# fetches web/docs/<NodeId>.md from there. Declared here rather than as `[tool.comfy] web` in
# pyproject.toml: ComfyUI registers that one under the project name ("lorarar"), while the
# frontend looks under the folder name it reads from each node's python_module.
WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import LoraRarExtension

    return LoraRarExtension()
