"""ComfyUI entry point for the LoRA.rar node pack.

Only `comfy_entrypoint` lives here; everything is imported lazily so that loading the pack
costs nothing until ComfyUI asks for the node list.
"""


async def comfy_entrypoint():
    from .nodes import LoraRarExtension

    return LoraRarExtension()
