"""``make bench``: run every benchmark module in this folder and print its table.

Each module measures its own reference in the same run and prints ratios, so the numbers
compare across machines of different speed.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

# Run by their own targets: `make bench-gpu` and `make smoke-gpu` (exit 2 without CUDA), and
# `make rehearsal` (the mission's sizes end to end: up to an hour).
SEPARATE = {"gpu", "smoke_gpu", "rehearsal"}


def main(selected: list[str]) -> None:
    names = sorted(p.stem for p in Path(__file__).parent.glob("*.py") if not p.stem.startswith("_"))
    names = [name for name in names if name not in SEPARATE]
    for name in selected or names:
        print(f"\n=== bench.{name} ===", flush=True)
        importlib.import_module(f"bench.{name}").main()


if __name__ == "__main__":
    main(sys.argv[1:])
