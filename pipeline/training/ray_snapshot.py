"""Ray Train's record of a run's checkpoints, ``{run}/checkpoint_manager_snapshot.json``: which
checkpoint a relaunch resumes from, and the repair that lets a run go on after a user deleted a
bad checkpoint.

Ray 2.60 (read in ``ray/train/v2/_internal/execution/checkpoint/checkpoint_manager.py``)
resumes a run from its snapshot's ``latest_checkpoint_result`` and never looks at the folders
themselves: without a snapshot a run starts afresh, whatever ``checkpoint_*`` folders exist, and
a folder the snapshot does not name (a stray or half-uploaded one) is ignored. A snapshot naming
a folder that is gone makes Ray refuse the run after its start
(``CheckpointManagerInitializationError``, advising to delete the whole run), which is why the
driver repairs it first.

The snapshot is read and written with Ray's own ``_CheckpointManagerState``, so a repaired one
is in the format Ray parses; that class is private, and pyproject pins ``ray<2.61`` to the
format read here.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import _CheckpointManagerState

SNAPSHOT_NAME = "checkpoint_manager_snapshot.json"  # Ray's CHECKPOINT_MANAGER_SNAPSHOT_FILENAME


@dataclass(frozen=True)
class Resumption:
    """Where a relaunch of a run starts: the checkpoint Ray resumes from and the one reported
    before it, which the run goes on from once the former is deleted."""

    checkpoint: str
    previous: str | None


def resumption(run_dir: str) -> Resumption | None:
    """The checkpoint Ray will resume ``run_dir`` from, found as Ray finds it (its snapshot's
    latest), or ``None`` when Ray starts the run afresh. A snapshot naming deleted checkpoint
    folders is repaired first (:func:`_repaired`), with one warning."""
    from common.atomic import write_atomic
    from sharding.storage import open_fs

    fs, root = open_fs(run_dir)
    fs.invalidate_cache()  # the user may have deleted folders since this process last listed them
    run_dir, path = run_dir.rstrip("/"), f"{root}/{SNAPSHOT_NAME}"
    if not fs.exists(path):
        return None
    state = _parsed(fs.cat_file(path), f"{run_dir}/{SNAPSHOT_NAME}")
    gone = [result.checkpoint_dir_name for result in state.checkpoint_results
            if not fs.exists(f"{root}/{result.checkpoint_dir_name}")]
    if gone:
        state = _repaired(state, gone, run_dir)
        write_atomic(fs, path, state.model_dump_json().encode())
        assert state.latest_checkpoint_result is not None  # _repaired keeps at least one checkpoint
        warnings.warn(f"{run_dir}: Ray's snapshot no longer lists the deleted {', '.join(gone)}; the run goes on "
                      f"from {run_dir}/{state.latest_checkpoint_result.checkpoint_dir_name}", stacklevel=3)
    return _resumption_of(state, run_dir) if state.latest_checkpoint_result else None


def _parsed(data: bytes, url: str) -> _CheckpointManagerState:
    """The snapshot as Ray parses it, or one line naming the file and what is wrong in it."""
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import _CheckpointManagerState

    try:
        return _CheckpointManagerState.model_validate_json(data)
    except ValueError as error:  # pydantic's ValidationError: not JSON, or a field missing
        first = error.errors(include_url=False)[0]  # type: ignore[attr-defined]  # pydantic's ValidationError
        detail = ": ".join(filter(None, [".".join(map(str, first["loc"])), first["msg"]]))
        raise ValueError(f"{url}: not a snapshot Ray Train reads ({detail})") from None


def _repaired(state: _CheckpointManagerState, gone: list[str], run_dir: str) -> _CheckpointManagerState:
    """``state`` without the ``gone`` checkpoints, its latest the newest one left (the highest
    report index). The report counter stays, so new checkpoints still sort after the kept ones;
    validation statuses of dropped checkpoints may stay, as Ray skips names it does not hold.
    With none left the run is refused rather than started afresh, which would overwrite the
    exports of its earlier training."""
    kept = [(result, index) for result, index in zip(state.checkpoint_results, state.checkpoint_report_indices)
            if result.checkpoint_dir_name not in gone]
    if not kept:
        raise ValueError(f"{run_dir}: every checkpoint of the run is deleted ({', '.join(gone)}); "
                         f"delete {run_dir} to train it from scratch")
    pending = [(result, spec)  # Ray looks each pending one up among the kept
               for result, spec in zip(state.pending_training_results, state.pending_validation_specs)
               if result.checkpoint_dir_name not in gone]
    return state.model_copy(update={
        "checkpoint_results": [result for result, _ in kept],
        "checkpoint_report_indices": [index for _, index in kept],
        "latest_checkpoint_result": max(kept, key=lambda pair: pair[1])[0],
        "pending_training_results": [result for result, _ in pending],
        "pending_validation_specs": [spec for _, spec in pending],
    })


def _resumption_of(state: _CheckpointManagerState, run_dir: str) -> Resumption:
    """The snapshot's latest checkpoint and the one reported just before it, as URLs."""
    by_report = [result.checkpoint_dir_name for _, result in
                 sorted(zip(state.checkpoint_report_indices, state.checkpoint_results), key=lambda pair: pair[0])]
    assert state.latest_checkpoint_result is not None  # the caller resumes only a snapshot with one
    latest = state.latest_checkpoint_result.checkpoint_dir_name
    earlier = by_report[:by_report.index(latest)]
    return Resumption(f"{run_dir}/{latest}", f"{run_dir}/{earlier[-1]}" if earlier else None)
