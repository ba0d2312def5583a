"""The logic behind the ComfyUI nodes, as plain functions (no ComfyUI import here, so it is
unit-tested without ComfyUI; `nodes/` only adds schemas, folder lookups and comfy calls).

One module per node topic, mirroring `nodes/`: `lora` (Load LoRA, Save Merged LoRA),
`hypernet` (Load Hypernetwork), `merge` (LoRA.rar Merge), `train` (ZipLoRA Merge, Train
Hypernetwork); plus what they share: `cache` (identity-keyed caches), `lazy` (the LORA_MODEL
dict types), `plot` (the coefficient chart).
"""
