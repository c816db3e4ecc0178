"""Training throughput with 1 and 2 Ray/DeepSpeed workers on this machine, and where a step goes.

Both runs use the same per-rank batch (P × K) and model, so 2 workers process twice the
sessions per step; the ratio says how well the two ranks overlap on this machine's cores.
The step split comes from the last logged step of each run (rank 0's clock).
"""

from __future__ import annotations

import tempfile

from bench._training import (
    describe,
    last_step_metrics,
    local_ray,
    run_config,
    split_cells,
    split_header,
    synthetic_shards,
)

STEPS = 20


def main() -> None:
    with tempfile.TemporaryDirectory() as root, local_ray():
        shards = synthetic_shards(root, 700)
        rows = []
        for workers in (1, 2):
            config = run_config(shards, root, f"bench-{workers}", STEPS, [f"train.num_workers={workers}"])
            rows.append((workers, last_step_metrics(config)))

    print(f"{describe(config)}; last of {STEPS} steps")
    print(f"{'workers':>7} {'sessions/s':>11} {'step s':>7} {split_header()}")
    for workers, metrics in rows:
        sessions, step = metrics["train/sessions_per_s"], metrics["train/step_time"]
        print(f"{workers:>7} {sessions:>11.0f} {step:>7.3f} {split_cells(metrics)}")
    print(f"scaling 1 → 2 workers: {rows[1][1]['train/sessions_per_s'] / rows[0][1]['train/sessions_per_s']:.2f}×")


if __name__ == "__main__":
    main()
