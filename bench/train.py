"""Training throughput with 1 and 2 Ray/DeepSpeed workers on this machine, and where a step goes.

Both runs use the same per-rank batch (P × K) and model, so 2 workers process twice the
sessions per step; the ratio says how well the two ranks overlap on this machine's cores.
The step split comes from the last logged step of each run (rank 0's clock).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from pipeline.cluster import use_local_ray_settings
from pipeline.config import TrainConfig

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "cpu-local.yaml"
PHASES = ("data", "forward", "gather_loss", "backward", "optimizer")


def main() -> None:
    use_local_ray_settings()
    import ray

    from pipeline.training import train
    from sharding.writer import write_shards

    with tempfile.TemporaryDirectory() as root:
        write_shards("synth:800:0", f"{root}/shards", subjects_per_shard=100, val_subjects=50, test_subjects=50)
        rows = []
        for workers in (1, 2):
            config = TrainConfig.load(
                CONFIG,
                [
                    f"data.shards={root}/shards", f"run.storage={root}/runs", f"run.name=bench-{workers}",
                    f"train.num_workers={workers}", "train.epochs=1", "train.max_steps=20",
                    "train.log_every=20", "wandb.enabled=false",
                ],
            )
            metrics = train(config, show_progress=False).metrics
            rows.append((workers, metrics))
        ray.shutdown()

    print(f"{config.model.name} {config.model.options}, length {config.data.max_len}, {config.loss.name} loss, "
          f"P×K = {config.data.subjects_per_batch}×{config.data.sessions_per_subject} per rank, fp32, gloo; last of 20 steps")
    print(f"{'workers':>7} {'sessions/s':>11} {'step s':>7} " + " ".join(f"{p:>12}" for p in PHASES))
    for workers, metrics in rows:
        split = " ".join(f"{metrics[f'time/{p}']:12.3f}" for p in PHASES)
        print(f"{workers:>7} {metrics['train/sessions_per_s']:>11.0f} {metrics['train/step_time']:>7.3f} {split}")
    print(f"scaling 1 → 2 workers: {rows[1][1]['train/sessions_per_s'] / rows[0][1]['train/sessions_per_s']:.2f}×")


if __name__ == "__main__":
    main()
