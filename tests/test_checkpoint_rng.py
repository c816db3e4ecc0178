"""A checkpoint holds each rank's random generators (torch's CPU one, and on a GPU its device's),
weights-only loadable; restoring them replays the draws; older checkpoints still restore."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.config import TrainConfig
from pipeline.safe_load import load_weights_only
from pipeline.training.checkpointer import Checkpointer, restore_rng, save_rng

CPU = torch.device("cpu")


def saved_states(directory: Path, rank: int) -> dict[str, torch.Tensor]:
    path = directory / "rng" / f"rank{rank}.pt"
    return load_weights_only(path, str(path))


def test_the_cpu_generator_is_saved_per_rank_and_restoring_it_replays_the_draws(tmp_path: Path) -> None:
    torch.manual_seed(3)
    save_rng(tmp_path, 1, CPU)
    expected = torch.rand(8)
    assert set(saved_states(tmp_path, 1)) == {"torch"}  # no GPU state on a CPU rank
    torch.rand(100)
    restore_rng(tmp_path, 1, CPU)
    assert torch.equal(torch.rand(8), expected)


def test_an_older_checkpoint_a_gpu_ones_state_on_a_cpu_and_a_missing_file_restore_what_applies(tmp_path: Path) -> None:
    torch.manual_seed(5)
    state = torch.get_rng_state()
    expected = torch.rand(8)
    (tmp_path / "rng").mkdir()
    torch.save({"torch": state, "cuda": torch.zeros(16, dtype=torch.uint8)}, tmp_path / "rng" / "rank0.pt")
    restore_rng(tmp_path, 0, CPU)  # a GPU run's checkpoint resumed on a CPU: its CPU generator only
    assert torch.equal(torch.rand(8), expected)
    torch.save({"torch": state}, tmp_path / "rng" / "rank0.pt")  # written before GPU states were saved
    restore_rng(tmp_path, 0, CPU)
    assert torch.equal(torch.rand(8), expected)
    restore_rng(tmp_path, 7, CPU)  # no file for this rank: nothing to restore, no error


class CpuEngine:
    """What the checkpointer asks of a DeepSpeed engine when it writes a checkpoint."""

    device = "cpu"

    def save_checkpoint(self, directory: str, tag: str, client_state: dict) -> None:
        Path(directory, tag).mkdir()


def test_a_written_checkpoint_holds_the_ranks_generators(tmp_path: Path) -> None:
    checkpointer = Checkpointer(CpuEngine(), {}, TrainConfig.load(None, []), rank=2)
    with checkpointer.written("step00000001") as checkpoint:
        assert torch.equal(saved_states(Path(checkpoint.path), 2)["torch"], torch.get_rng_state())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_the_devices_generator_is_saved_and_restored_too(tmp_path: Path) -> None:
    device = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(7)
    save_rng(tmp_path, 0, device)
    expected = torch.rand(8), torch.rand(8, device=device)
    assert set(saved_states(tmp_path, 0)) == {"torch", "cuda"}
    torch.rand(100)
    torch.rand(100, device=device)
    restore_rng(tmp_path, 0, device)
    assert torch.equal(torch.rand(8), expected[0])
    assert torch.equal(torch.rand(8, device=device), expected[1])
