"""Hypernetwork training: manifest (manifest.py), data and base-model bundle (data.py), trainer
(trainer.py), checkpoints (checkpoint.py), torchrun/DDP (ddp.py), ComfyUI adapter
(comfy_adapter.py; comfyui_bridge.py is the one module that imports ComfyUI), loss plots (plot.py) and the built-in SDXL-named test UNet (testmodel.py)."""
