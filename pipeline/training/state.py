"""What a run has done so far, beyond DeepSpeed's own states; saved in every checkpoint."""

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


# Keys that checkpoints written before a rename still hold: their runs must resume (and an
# experiment re-scores its finished arms by relaunching them).
_RENAMED = {"best_val_eer": "best_val"}
