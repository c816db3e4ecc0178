"""Markdown table of every finished arm in ``experiments/results`` (EER vs step, final report).

    .venv/bin/python -m experiments.summarize
"""

from __future__ import annotations

import json

from experiments.recipe import RESULTS
from pipeline.metrics import fnmr_key

STEPS = (200, 400, 600, 800, 1000)


def geometry(config: dict) -> str:
    """How the arm's embeddings are compared. Arms saved without ``loss_repr`` ran before
    ``normalize=True`` became EERLoss's default, so an EER arm without the key in its options was raw."""
    if config["loss"].startswith("triplet"):
        return "L2-normalised"
    if "loss_repr" in config:
        return "L2-normalised" if "normalize=True" in config["loss_repr"] else "raw"
    return "L2-normalised" if json.loads(config["eer"]).get("normalize") else "raw"


def main() -> None:
    print("| arm | loss | options | " + " | ".join(f"EER@{s}" for s in STEPS)
          + " | batch EER (last) | final EER | FNMR@1%FMR | mean per-subject EER |")
    print("|---" * (len(STEPS) + 7) + "|")
    for path in sorted(RESULTS.glob("*.json")):
        run = json.loads(path.read_text())
        config, curve, report = run["config"], {c["step"]: c for c in run["curve"]}, run["report"]
        options = config["eer"] if config["loss"].startswith("eer") else f"margin={config['margin']}"
        if config["loss"] == "triplet_registry":
            options = "semi-hard miner, margin=0.2 (registry default)"
        if config["loss"] == "eer+triplet":
            options += f", weight={config['mix_weight']}, margin={config['margin']}"
        for key in ("lr", "p", "warmup", "init"):
            if config.get(key) not in (None, 0, 1e-3, 32):
                options += f", {key}={config[key]}"
        options += f" — {geometry(config)}"
        cells = [f"{100 * curve[s]['eer']:.2f}" if s in curve else "" for s in STEPS]
        last = run["curve"][-1]
        print(f"| {path.stem} | {config['loss']} | {options} | " + " | ".join(cells)
              + f" | {100 * last['batch_eer']:.2f} | **{100 * report['global']['eer']:.2f}** "
              f"| {100 * report['global'][fnmr_key(0.01)]:.2f} "
              f"| {100 * report['mean_per_subject']['eer']:.2f} |")


if __name__ == "__main__":
    main()
