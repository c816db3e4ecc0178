"""Checkpoints: everything a run needs to continue bit-identically, and loading them safely.

A checkpoint is a folder that Ray Train keeps under ``{storage}/{name}/checkpoint_*``:

* DeepSpeed's states (model, optimizer, learning-rate schedule) from ``engine.save_checkpoint``;
* the state of every named *part* of the run (:class:`Stateful`: the :class:`RunState`, the
  loader's stream position, the cross-batch memory's queue and momentum encoder and the loss's
  persistent threshold when the run has them), stored as DeepSpeed client state, and the
  config it was trained with;
* each rank's random generators (``rng/rank{r}.pt``, :func:`save_rng`).

Loading never runs code: DeepSpeed's checkpoint engine calls ``torch.load(weights_only=False)``,
so :func:`install_safe_loading` replaces its loader by a weights-only one that allows the three
DeepSpeed classes its ZeRO optimizer states hold (found by inspecting real checkpoints), and the
driver checks a checkpoint the same way before launch (:func:`check_checkpoint`). Which
checkpoint a relaunch resumes from is for Ray's snapshot of the run to say, not the folders'
names (:mod:`~pipeline.training.ray_snapshot`).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import torch

from pipeline.config import TrainConfig
from pipeline.safe_load import load_weights_only

MODEL_STATES_SUFFIX = "_model_states.pt"  # DeepSpeed's file of the model (and client state)


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def deepspeed_types() -> list[Any]:
    """The classes DeepSpeed's states may hold beyond tensors and builtins (ZeRO ≥ 1 optimizer
    states name these three; stage-0 states name none)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def load_states(path: str, map_location: Any = None) -> Any:
    """One DeepSpeed states file, weights-only; a file needing anything else is refused by name."""
    return load_weights_only(path, path, deepspeed_types(), map_location=map_location)


def install_safe_loading(engine: Any) -> None:
    """Make ``engine.load_checkpoint`` read every states file through :func:`load_states`."""
    engine.checkpoint_engine.load = load_states


def check_checkpoint(url: str) -> dict[str, Any]:
    """Refuse, before launch, a checkpoint folder that is missing, holds no DeepSpeed states, or
    holds a file a weights-only load refuses (the workers would refuse it too, after Ray's start).
    Returns the model states (with the run's parts and config), for further checks."""
    from sharding.storage import open_fs

    fs, root = open_fs(url)
    if not fs.isdir(root):
        raise FileNotFoundError(f"no checkpoint folder at {url}")
    files = sorted(path for path in fs.find(root) if path.endswith(".pt"))
    if not any(path.endswith(MODEL_STATES_SUFFIX) for path in files):
        raise FileNotFoundError(f"no DeepSpeed checkpoint in {url}")
    types = deepspeed_types()
    model_states: dict[str, Any] = {}
    for path in files:
        name = f"{url.rstrip('/')}/{path[len(root.rstrip('/')) + 1:]}"
        states = load_weights_only(fs.cat_file(path), name, types, map_location="cpu")
        if path.endswith(MODEL_STATES_SUFFIX) and isinstance(states, dict):
            model_states = states
    return model_states


class Checkpointer:
    """Saves and restores a run's checkpoint on every rank."""

    def __init__(self, engine: Any, parts: Mapping[str, Stateful], config: TrainConfig, rank: int) -> None:
        self.engine, self.parts, self.config, self.rank = engine, parts, config, rank

    @contextmanager
    def written(self, tag: str) -> Iterator[Any]:
        """A checkpoint written to a temporary folder, as a ``ray.train.Checkpoint`` to report
        before the folder goes away (Ray copies it to the run's storage)."""
        import ray.train

        with tempfile.TemporaryDirectory() as directory:
            client_state = {name: part.state_dict() for name, part in self.parts.items()}
            self.engine.save_checkpoint(directory, tag=tag,
                                        client_state={**client_state, "config": self.config.to_dict()})
            save_rng(directory, self.rank, torch.device(self.engine.device))
            yield ray.train.Checkpoint.from_directory(directory)

    def restore(self, resume_from: str | None) -> bool:
        """Load this run's latest checkpoint, else ``resume_from``; ``False`` for a fresh start."""
        import ray.train

        from pipeline.cluster import ray_storage

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None and resume_from:
            path, filesystem = ray_storage(resume_from)
            checkpoint = ray.train.Checkpoint(path, filesystem=filesystem)
        if checkpoint is None:
            return False
        with private_directory(checkpoint) as directory:
            _, client_state = self.engine.load_checkpoint(directory)
            if client_state is None:
                raise FileNotFoundError(f"no DeepSpeed checkpoint in {checkpoint.path}")
            for name, part in self.parts.items():
                part.load_state_dict(client_state[name])
            restore_rng(directory, self.rank, torch.device(self.engine.device))
        return True


def save_rng(directory: str | Path, rank: int, device: torch.device) -> None:
    """This rank's random generators into the checkpoint: torch's CPU generator and, on a GPU,
    the generator of the device the rank trains on (dropout draws there).

    Python's ``random`` and numpy's global generator are left out: nothing in training draws
    from them (the loaders seed numpy generators of their own from the run's seed).
    """
    states = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    path = _rng_file(directory, rank)
    path.parent.mkdir(exist_ok=True)
    torch.save(states, path)


def restore_rng(directory: str | Path, rank: int, device: torch.device) -> None:
    """Set the generators :func:`save_rng` saved. A checkpoint written before the GPU's state was
    saved (or without RNG files) restores what it holds; a GPU's state is not restored on a CPU."""
    path = _rng_file(directory, rank)
    if not path.exists():
        return
    states = load_weights_only(path, str(path))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"], device)


def _rng_file(directory: str | Path, rank: int) -> Path:
    return Path(directory, "rng", f"rank{rank}.pt")


@contextmanager
def private_directory(checkpoint: Any) -> Iterator[str]:
    """The checkpoint's files in a folder no other process writes: a local checkpoint's own
    folder, a remote one downloaded into a fresh folder for this rank alone.

    Why not ``Checkpoint.as_directory``: it shares one download folder among the processes of a
    node, and a rank that arrives after the first download finished downloads again into it,
    over the files another rank is reading (seen as a corrupt ``mp_rank_00_model_states.pt`` on
    a loaded machine). Ranks of one node now each download their own copy.
    """
    import pyarrow.fs

    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        yield checkpoint.path
        return
    with tempfile.TemporaryDirectory() as directory:
        yield checkpoint.to_directory(directory)
