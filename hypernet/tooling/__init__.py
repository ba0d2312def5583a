"""Tooling around the method: synthetic LoRAs at real SDXL shapes in every naming family (tests,
benchmarks, the test model), the merge benchmark behind `python -m hypernet bench`, and the CLI
progress line."""
