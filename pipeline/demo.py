"""``make demo``: synthetic corpus → shards → Ray + DeepSpeed training with EERLoss → KVC report."""

from __future__ import annotations

import sys


def main() -> int:
    print(
        "eerpipe demo: distributed training is not built yet (issue 6). "
        "Available now: `eerpipe synth`, `eerpipe shard`, `eerpipe shards verify|stats`, "
        "`from pipeline.losses import EERLoss`, `from pipeline.metrics import verification_report`.",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
