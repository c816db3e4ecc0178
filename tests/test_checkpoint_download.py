"""A remote checkpoint reaches each rank in a folder of its own: no rank reads files another rank is writing."""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs
import ray.train

from pipeline.cluster import ray_storage
from pipeline.training.checkpointer import private_directory


def test_ranks_of_one_node_read_a_remote_checkpoint_from_folders_of_their_own(s3_url: str, tmp_path: Path) -> None:
    source = tmp_path / "checkpoint"
    source.mkdir()
    (source / "mp_rank_00_model_states.pt").write_bytes(b"weights")
    path, filesystem = ray_storage(f"{s3_url}/step00000003")
    pyarrow.fs.copy_files(str(source), path, destination_filesystem=filesystem)
    remote = ray.train.Checkpoint(path, filesystem=filesystem)

    with private_directory(remote) as first, private_directory(remote) as second:
        assert first != second
        for folder in (first, second):
            assert (Path(folder) / "mp_rank_00_model_states.pt").read_bytes() == b"weights"
    assert not Path(first).exists() and not Path(second).exists()  # nothing left behind


def test_a_local_checkpoint_is_read_in_place(tmp_path: Path) -> None:
    with private_directory(ray.train.Checkpoint.from_directory(str(tmp_path))) as folder:
        assert Path(folder) == tmp_path
