"""What a run has done so far, beyond DeepSpeed's own states (saved in every checkpoint), and
where a stage of a staged run stands in it."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass
class RunState:
    """The run's progress: a relaunch continues from these values."""

    step: int = 0  # optimizer steps taken
    best_val: float = math.inf  # the best export's value of the validation metric that selects it
    train_seconds: float = 0.0  # training wall time, summed over the launches of the run

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = {_RENAMED.get(key, key): value for key, value in state.items()}
        for field in fields(self):
            setattr(self, field.name, type(getattr(self, field.name))(state[field.name]))


@dataclass(frozen=True)
class StageContext:
    """What a stage's workers know of the staged run: where its W&B run is, and where they are in it."""

    index: int
    step_offset: int  # the steps of the stages before this one
    run_name: str  # the staged run's name and storage, which give its W&B run id
    run_storage: str
    config: dict[str, Any]  # the staged run's config, W&B's record of the run


# Keys that checkpoints written before a rename still hold: their runs must resume (and an
# experiment re-scores its finished arms by relaunching them).
_RENAMED = {"best_val_eer": "best_val"}
