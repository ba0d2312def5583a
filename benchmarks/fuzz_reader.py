"""Mutation fuzzing of the LoRA and hypernetwork readers (issue 9): >= 10,000 mutated files of
every key layout, model family and adapter kind; prints cases, clean errors, other exceptions (must be 0),
peak memory and the slowest case.

    python benchmarks/fuzz_reader.py [--cases 10000] [--seed 0] [--json]

The engine is hypernet/tooling/fuzzing.py (the default test suite runs 300 cases of it)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hypernet.tooling import fuzzing  # noqa: E402

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--cases" not in argv:
        argv = ["--cases", "10000", *argv]
    sys.exit(fuzzing.main(argv))
