"""Helpers shared by the test modules (and a few benchmarks): test modules import from here,
never from each other.

- `files`: writing LoRA files, where the official (third-party) checkpoints are;
- `loras`: SDXL layer subsets at real widths, and shared layouts (SD1.5, LyCORIS adapters);
- `training`: the tiny training data set and the one-thread fixture;
- `judge/`: loopback judge servers (well-behaved and hostile), image layouts, a tiny local VLM.
"""
