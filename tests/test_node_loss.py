"""A node lost mid-run: two Ray nodes on one machine, one training worker on each, shards,
checkpoints and exports on S3 only. One node is removed once a checkpoint is on S3 and its
local temporary folder deleted; a fresh node joins; the run resumes from S3 and ends with the
parameters of a straight run on the same cluster, bit for bit.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from pipeline.cluster import LOCAL_RAY_ENV
from pipeline.training import train
from sharding.writer import write_shards
from tests.test_train import assert_same_parameters, config, train_acting_after_a_checkpoint

pytestmark = pytest.mark.slow


class TwoNodes:
    """A head that runs no training (0 CPUs: the driver and Ray Train's controller live there)
    and nodes of one CPU each, so that a 2-worker run puts one worker on each node. Each node's
    processes get their own temporary folder, deleted when the node is removed."""

    def __init__(self, root: Path) -> None:
        from ray.cluster_utils import Cluster

        self.root, self.count = root, 0
        self.cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "node_ip_address": "127.0.0.1"},
                               shutdown_at_exit=False)  # its exit hooks can only be set from the main thread
        self.nodes = {self.add(): None for _ in range(2)}

    def add(self) -> object:
        self.count += 1
        folder = self.root / f"node{self.count}"
        folder.mkdir()
        node = self.cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1", env_vars={"TMPDIR": str(folder)})
        node.eerpipe_tmp = folder  # type: ignore[attr-defined]
        return node

    def remove_a_training_node(self) -> Path:
        """Remove the node of one training worker (every process of it), delete its temporary
        folder, and add a fresh node; the removed node's folder, now gone, is returned."""
        (node,) = [node for node in self.cluster.worker_nodes if _runs_a_training_worker(node)][:1]
        self.cluster.remove_node(node, allow_graceful=False)
        shutil.rmtree(node.eerpipe_tmp)
        self.add()
        return node.eerpipe_tmp

    def shutdown(self) -> None:
        self.cluster.shutdown()


def _runs_a_training_worker(node: object) -> bool:
    import ray._private.ray_constants as constants

    raylet = psutil.Process(node.all_processes[constants.PROCESS_TYPE_RAYLET][0].process.pid)  # type: ignore[attr-defined]
    titles = []
    for process in raylet.children(recursive=True):
        try:
            titles.append(" ".join([process.name(), *process.cmdline()]))
        except psutil.Error:
            continue
    return any("RayTrainWorker" in title for title in titles)


@pytest.fixture(scope="module")
def two_nodes(s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoNodes]:
    """The cluster, started after the S3 variables and with the local settings every node's
    processes inherit; the driver (this process) joins it through ``RAY_ADDRESS``."""
    import ray

    with pytest.MonkeyPatch.context() as env:
        for key, value in {**LOCAL_RAY_ENV, "DS_ACCELERATOR": "cpu"}.items():
            env.setenv(key, value)
        nodes = TwoNodes(tmp_path_factory.mktemp("nodes"))
        env.setenv("RAY_ADDRESS", nodes.cluster.address)
        try:
            yield nodes
        finally:
            ray.shutdown()
            nodes.shutdown()


def test_a_run_that_loses_a_node_resumes_from_s3_on_a_fresh_node_and_ends_as_a_straight_run(two_nodes, s3_url):
    shards = f"{s3_url}/shards"
    write_shards("synth:240:0", shards, subjects_per_shard=60, val_subjects=30, test_subjects=30)
    straight = train(config(shards, f"{s3_url}/runs", "straight"), show_progress=False)

    removed: list[Path] = []
    lost = train_acting_after_a_checkpoint(config(shards, f"{s3_url}/runs", "node-lost", "train.max_failures=2"),
                                           lambda _: removed.append(two_nodes.remove_a_training_node()))
    assert removed and not removed[0].exists()  # a node went, with its local files, mid-run
    assert lost.metrics["step"] == straight.metrics["step"]
    assert lost.run_dir.startswith("s3://") and lost.final_model.startswith("s3://")
    assert_same_parameters(straight.final_model, lost.final_model)
