"""Driver-side progress: rank 0's reports travel from Ray Train's controller to a display thread.

The queue between them is an actor pinned to the driver's node, where Ray Train pins its
controller too: placed on a training node, it died with that node and took the controller (and
the run) with it (tests/test_node_loss.py). A display must never end a run, so a report that
cannot be forwarded is dropped.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import ray.train


class ForwardReports(ray.train.UserCallback):
    """Runs in Ray Train's controller actor: forwards rank 0's metrics to the driver's queue."""

    def __init__(self, queue: Any) -> None:
        self.queue = queue

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        try:
            self.queue.put(metrics[0])
        except ray.exceptions.RayError:
            pass  # the display is gone; training goes on


@contextmanager
def progress_display(enabled: bool) -> Iterator[ForwardReports]:
    """A callback for the trainer, and a thread printing what it forwards until the block ends."""
    from ray.util.queue import Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
    display = threading.Thread(target=_show, args=(queue, enabled), daemon=True)
    display.start()
    try:
        yield ForwardReports(queue)
    finally:
        try:
            queue.put(None)
        except ray.exceptions.RayError:
            pass  # the queue is gone, and with it the display
        display.join(timeout=10)


def _show(queue: Any, enabled: bool) -> None:
    """Step, loss, val EER, sessions/s, ETA (latest known values)."""
    from rich.console import Console

    console = Console(stderr=True)
    latest: dict[str, Any] = {"train/loss": float("nan"), "train/sessions_per_s": 0.0}
    try:
        for metrics in iter(queue.get, None):
            latest.update(metrics)
            if enabled and "step" in metrics:
                console.print(_line(latest), highlight=False)
    except ray.exceptions.RayError:
        return  # the queue is gone: nothing more to show


def _line(latest: dict[str, Any]) -> str:
    remaining = latest.get("total_steps", 0) - latest["step"]
    step_time = latest.get("train/step_time")
    eta = f"{remaining * step_time / 60:.1f} min" if step_time else "?"
    val_eer = f"{100 * latest['val/eer']:.2f}%" if "val/eer" in latest else "–"
    return (
        f"step {latest['step']}/{latest.get('total_steps', '?')}  epoch {latest.get('epoch', 0)}  "
        f"loss {latest['train/loss']:.4f}  val EER {val_eer}  "
        f"{latest['train/sessions_per_s']:.0f} sessions/s  ETA {eta}"
    )
