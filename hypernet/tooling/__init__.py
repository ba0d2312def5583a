"""Tooling around the method: synthetic LoRAs at real SDXL shapes in every key layout (tests,
benchmarks, the test model), the merge benchmark behind `python -m hypernet bench`, and the CLI
progress line."""
