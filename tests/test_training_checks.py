"""What ``eerpipe train`` refuses before Ray starts, in one line, and how checkpoints are loaded.

No Ray here: every refusal below must come from the driver in seconds. The DeepSpeed test runs
one rank in this process (gloo on the CPU) to check the workers' own loading path.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import TrainConfig
from pipeline.training import prepare
from pipeline.training.ray_snapshot import resumption
from sharding.writer import write_shards

CONFIG = Path(__file__).parents[1] / "configs" / "cpu-local.yaml"  # P = 16 per rank, 2 ranks
runner = CliRunner()


class Payload:
    """A pickle that creates ``marker`` when unpickled: the shape of a malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("shards")  # 70 training subjects in 4 shards
    write_shards("synth:80:0", str(out), subjects_per_shard=20, val_subjects=5, test_subjects=5)
    return str(out)


def train(shards: str, storage: Path, *args: str) -> object:
    return runner.invoke(app, ["train", "--quiet", "--config", str(CONFIG), f"data.shards={shards}",
                               f"run.storage={storage}", "wandb.enabled=false", *args])


def write_checkpoint(folder: Path, states: object) -> Path:
    """A checkpoint folder as Ray keeps it: DeepSpeed's tag folder with the model states file."""
    path = folder / "step00000003" / "mp_rank_00_model_states.pt"
    path.parent.mkdir(parents=True)
    torch.save(states, path)
    return path


def assert_refused_in_one_line(result: object, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    assert result.stderr.count("\n") == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.epochs=-1"], "train.epochs must be ≥ 1, got -1"),
        (["train.epochs=0"], "train.epochs must be ≥ 1, got 0"),
        (["model.name=unknown"], "unknown model 'unknown'"),
        (["data.subjects_per_batch=40"],
         "data.subjects_per_batch=40 on train.num_workers=2 ranks needs 80 training subjects"),
        (["data.loader_workers=4"], "4 shards cannot feed 8 readers"),
        (["data.subjects_per_batch=34"], "cannot fill one batch of 34 subjects"),
        (["loss.name=set2set", "loss.memory.size=64"],
         "loss.memory.size=64 needs a loss that scores pairs against a memory (contrastive, eer,"),
        (["data.hard_batches.enabled=true", "data.hard_batches.cap=8"],
         "data.hard_batches: seeds × (1 + cap) = 18 subjects do not fit in data.subjects_per_batch=16"),
        (["data.hard_batches.sessions_per_centroid=0"], "data.hard_batches.sessions_per_centroid must be ≥ 1, got 0"),
    ],
)
def test_settings_the_shards_cannot_serve_are_refused_before_ray_starts(shards, tmp_path, overrides, message):
    import ray

    assert_refused_in_one_line(train(shards, tmp_path, *overrides), message)
    assert not ray.is_initialized()
    assert not (tmp_path / "cpu-local").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.lr=.nan"], "train.lr must be a finite number, got nan"),
        (["train.lr=.inf"], "train.lr must be a finite number, got inf"),
        (["train.weight_decay=-1"], "train.weight_decay must be ≥ 0, got -1.0"),
        (["data.features=[keycode,bogus]"], "data.features must name distinct features of"),
        (["data.max_len=100000"], "data.max_len must be ≤ 4096, got 100000"),
        (["model.embedding_size=-5"], "model.embedding_size must be ≥ 1, got -5"),
        (["model.options.bogus=1"], "model 'bigru' with model.options={'hidden': 64, 'bogus': 1}: TypeError"),
        (["loss.options.bogus=1"], "loss 'eer' with loss.options={'bogus': 1}: TypeError"),
        (["model.options.hidden=1e7"], "model 'bigru' with model.options={'hidden': '1e7'}: TypeError"),
        (["model.options.hidden=10000000"], "weights, more than 1,000,000,000"),
        (["train.lr=[1"], "override 'train.lr=[1': not valid config YAML"),
        (["model.options.x=!!python/name:os.system"], "could not determine a constructor for the tag"),
    ],
)
def test_a_setting_that_would_fail_inside_the_workers_is_refused_in_one_line_before_ray_starts(
    shards, tmp_path, overrides, message
):
    import ray

    assert_refused_in_one_line(train(shards, tmp_path, *overrides), message)
    assert not ray.is_initialized()
    assert not (tmp_path / "cpu-local").exists()


ALIAS_BOMB = "a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
    f"{name}: &{name} [{', '.join([f'*{previous}'] * 9)}]\n" for previous, name in zip("abcdefg", "bcdefgh")
) + "model: {options: {x: *h}}\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (ALIAS_BOMB, "not valid config YAML: aliases (*name) are not allowed"),
        ("train: {lr: [1\n", "not valid config YAML: expected ',' or ']'"),
        ("train: !!python/object/apply:os.system [echo]\n", "could not determine a constructor for the tag"),
        (None, "is a folder; --config takes a YAML file"),
    ],
)
def test_a_config_file_that_is_not_plain_yaml_settings_is_refused_in_one_line(tmp_path, text, message):
    path = tmp_path / "config.yaml"
    path.mkdir() if text is None else path.write_text(text)
    result = runner.invoke(app, ["train", "--quiet", "--config", str(path)])
    assert_refused_in_one_line(result, f"{path}: ", message)


def test_a_run_folder_that_is_a_file_is_refused_before_ray_starts(shards, tmp_path):
    (tmp_path / "cpu-local").write_text("not a folder")
    assert_refused_in_one_line(train(shards, tmp_path), f"{tmp_path / 'cpu-local'}: the run's folder", "is a file")


def test_a_malicious_resume_checkpoint_is_refused_without_running_it(shards, tmp_path):
    marker = tmp_path / "executed"
    states = write_checkpoint(tmp_path / "evil", {"module": Payload(marker), "optimizer": None})
    result = train(shards, tmp_path / "runs", "--resume-from", str(tmp_path / "evil"))
    assert_refused_in_one_line(result, f"{states}: refused to load: it names io.open")
    assert "weights_only" not in result.stderr  # never torch's advice to load it anyway
    assert not marker.exists()


OLDER, NEWER = "checkpoint_2026-01-01_00-00-00.000000", "checkpoint_2026-01-01_00-00-09.000000"  # Ray's names


def write_ray_snapshot(run: Path, names: list[str]) -> Path:
    """Ray Train's snapshot of a run that reported the checkpoints ``names`` in this order (the
    last its latest), each after a report without one (a logged step), built with Ray's classes."""
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import (
        _CheckpointManagerState,
        _TrainingResultState,
    )

    results = [_TrainingResultState(checkpoint_dir_name=name, metrics={"step": 3 * (n + 1)})
               for n, name in enumerate(names)]
    state = _CheckpointManagerState(
        checkpoint_results=results, checkpoint_report_indices=[2 * n + 1 for n in range(len(names))],
        latest_checkpoint_result=results[-1], pending_training_results=[], pending_validation_specs=[],
        current_report_index=2 * len(names), validated_checkpoint_dir_names=[],
        timed_out_validation_checkpoint_dir_names=[], failed_validation_checkpoint_dir_names=[],
    )
    path = run / "checkpoint_manager_snapshot.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(state.model_dump_json())
    return path


def write_run(run: Path, *names: str) -> Path:
    """A run folder as Ray leaves it: a good checkpoint under each name, and its snapshot."""
    for name in names:
        write_checkpoint(run / name, {"module": {"weight": torch.zeros(2)}})
    return write_ray_snapshot(run, list(names))


def ray_resumes_from(storage: str, name: str) -> str | None:
    """The checkpoint folder that Ray's own checkpoint manager resumes run ``name`` from (what
    ``ray.train.get_checkpoint()`` returns in the workers), loaded as a relaunch loads it."""
    from ray.train import CheckpointConfig
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import CheckpointManager
    from ray.train.v2._internal.execution.storage import StorageContext

    from pipeline.cluster import ray_storage

    path, filesystem = ray_storage(storage)
    manager = CheckpointManager(CheckpointConfig(num_to_keep=2), StorageContext(path, name, filesystem, read_only=True))
    latest = manager.latest_checkpoint_result
    return latest and Path(latest.checkpoint.path).name


def test_a_relaunch_resumes_from_ray_s_snapshot_not_from_the_newest_checkpoint_folder(shards, tmp_path):
    """A folder the snapshot does not name (here an empty one, as an interrupted upload leaves)
    is ignored, as Ray ignores it; without a snapshot Ray starts afresh, whatever folders exist."""
    run = tmp_path / "cpu-local"
    snapshot = write_run(run, OLDER)
    (run / NEWER).mkdir()
    config = TrainConfig.load(CONFIG, [f"data.shards={shards}", f"run.storage={tmp_path}"])
    assert resumption(str(run)).checkpoint == str(run / OLDER)
    assert ray_resumes_from(str(tmp_path), "cpu-local") == OLDER
    prepare(config)
    snapshot.unlink()
    assert resumption(str(run)) is None and ray_resumes_from(str(tmp_path), "cpu-local") is None
    prepare(config)


@pytest.mark.parametrize("storage", ["local", "s3"])
def test_deleting_the_newest_checkpoint_repairs_ray_s_snapshot_to_go_on_from_the_previous_one(
    shards, tmp_path, request, storage
):
    """Ray alone would refuse the whole run after its start; the driver drops the deleted
    checkpoint from the snapshot, and Ray's own checkpoint manager then resumes from the
    previous one. End to end: tests/test_train.py."""
    from ray.train.v2._internal.exceptions import CheckpointManagerInitializationError

    from sharding.storage import open_fs

    runs = request.getfixturevalue("s3_url") if storage == "s3" else str(tmp_path / "runs")
    fs, root = open_fs(f"{runs}/cpu-local")
    fs.put(str(write_run(tmp_path / "built", OLDER, NEWER).parent), root, recursive=True)
    fs.rm(f"{root}/{NEWER}", recursive=True)
    with pytest.raises(CheckpointManagerInitializationError, match="does not exist anymore"):
        ray_resumes_from(runs, "cpu-local")
    config = TrainConfig.load(CONFIG, [f"data.shards={shards}", f"run.storage={runs}"])
    message = (f"{runs}/cpu-local: Ray's snapshot no longer lists the deleted {NEWER}; "
               f"the run goes on from {runs}/cpu-local/{OLDER}")
    with pytest.warns(UserWarning, match=f"^{re.escape(message)}$"):
        prepare(config)
    assert ray_resumes_from(runs, "cpu-local") == OLDER


def test_a_run_whose_every_checkpoint_was_deleted_is_refused_rather_than_restarted(shards, tmp_path):
    """A fresh start would overwrite the exports of the run's earlier training: the user decides."""
    run = tmp_path / "cpu-local"
    snapshot = write_ray_snapshot(run, [OLDER, NEWER])
    before = snapshot.read_text()
    result = train(shards, tmp_path)
    assert_refused_in_one_line(result, f"{run}: every checkpoint of the run is deleted ({OLDER}, {NEWER}); "
                                       f"delete {run} to train it from scratch")
    assert snapshot.read_text() == before


def test_a_snapshot_ray_could_not_read_is_refused_in_one_line(shards, tmp_path):
    (tmp_path / "cpu-local").mkdir()
    (tmp_path / "cpu-local" / "checkpoint_manager_snapshot.json").write_text("{}")
    message = "checkpoint_manager_snapshot.json: not a snapshot Ray Train reads (checkpoint_results: Field required)"
    assert_refused_in_one_line(train(shards, tmp_path), message)


def truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def poisoned(path: Path) -> None:
    torch.save({"module": Payload(path.with_name("executed"))}, path)


@pytest.mark.parametrize(("spoil", "reason"), [
    (poisoned, "refused to load: it names io.open"),
    (truncated, "unreadable"),
], ids=["malicious", "truncated"])
@pytest.mark.parametrize(("names", "way_out"), [
    ((OLDER, NEWER), "delete {run}/{NEWER} to go on from the previous checkpoint ({run}/{OLDER})"),
    ((NEWER,), "it is the run's only checkpoint: delete {run} to train it from scratch"),
], ids=["previous", "only"])
def test_a_relaunch_from_a_corrupt_or_malicious_checkpoint_is_refused_naming_the_way_out(
    shards, tmp_path, spoil, reason, names, way_out
):
    """The checkpoint Ray would resume from (its snapshot's latest) is checked; the refusal says
    how to go on from the previous one. A real run's folder: tests/test_train.py."""
    run = tmp_path / "runs" / "cpu-local"
    write_run(run, *names)
    states = next((run / NEWER).glob("step*/mp_rank_00_model_states.pt"))
    spoil(states)
    result = train(shards, tmp_path / "runs")
    assert_refused_in_one_line(result, f"{states}: {reason}", "; " + way_out.format(run=run, OLDER=OLDER, NEWER=NEWER))
    assert not states.with_name("executed").exists()


def test_a_relative_resume_path_is_the_driver_s_and_must_exist(shards, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_checkpoint(tmp_path / "saved", {"module": {"weight": torch.zeros(2)}, "step": 3})
    config = TrainConfig.load(CONFIG, [f"data.shards={shards}", "run.storage=runs"])
    _, resume_from = prepare(config, "saved")
    assert resume_from == str(tmp_path / "saved")
    with pytest.raises(FileNotFoundError, match=f"no checkpoint folder at {tmp_path / 'missing'}$"):
        prepare(config, "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no DeepSpeed checkpoint in"):
        prepare(config, "empty")


def test_a_run_for_a_low_fmr_validated_on_a_few_drawn_impostors_is_warned_before_the_launch(shards, tmp_path):
    target = ["loss.name=eer", "loss.options.target.fmr=0.001"]
    config = TrainConfig.load(CONFIG, [f"data.shards={shards}", f"run.storage={tmp_path}", *target])
    with pytest.warns(UserWarning, match="the choice is mostly noise; set eval.impostors_per_session=all"):
        prepare(config)


def test_a_checkpoint_resumes_only_with_the_memory_it_was_saved_with(shards, tmp_path):
    write_checkpoint(tmp_path / "saved", {"module": {"weight": torch.zeros(2)}})
    config = TrainConfig.load(CONFIG, [f"data.shards={shards}", f"run.storage={tmp_path}", "loss.memory.size=64"])
    with pytest.raises(ValueError, match="saved with cross-batch memory none, this run has size=64 encoder=momentum$"):
        prepare(config, str(tmp_path / "saved"))


@pytest.mark.parametrize(
    ("saved_parts", "overrides", "message"),
    [
        ({}, ["loss.options.threshold_momentum=0.9"],
         "saved without a persistent threshold (threshold_momentum > 0), this run has one"),
        ({"threshold": {"value": torch.tensor(0.5)}}, [],
         "saved with a persistent threshold (threshold_momentum > 0), this run has none"),
    ],
)
def test_a_checkpoint_resumes_only_with_the_persistent_threshold_it_was_saved_with(
    shards, tmp_path, saved_parts, overrides, message
):
    write_checkpoint(tmp_path / "saved", {"module": {"weight": torch.zeros(2)}, **saved_parts})
    config = TrainConfig.load(CONFIG, [f"data.shards={shards}", f"run.storage={tmp_path}", *overrides])
    with pytest.raises(ValueError, match=re.escape(message) + "$"):
        prepare(config, str(tmp_path / "saved"))


def test_a_persistent_threshold_without_the_implicit_gradient_is_refused_in_one_line(shards, tmp_path):
    result = train(shards, tmp_path, "loss.options.threshold_momentum=0.9", "loss.options.threshold_grad=unrolled")
    assert_refused_in_one_line(result, "threshold_momentum=0.9 needs threshold_grad='implicit'")
    assert not (tmp_path / "cpu-local").exists()


def test_the_workers_load_deepspeed_states_weights_only(one_rank, tmp_path):
    """ZeRO-1 states (which name three DeepSpeed classes) load; a tampered file is refused by name."""
    from pipeline.safe_load import UnsafeFileError
    from pipeline.training.engine import build_engine
    from pipeline.training.schedule import Schedule

    config = TrainConfig.load(None, ["train.zero_stage=1", "train.num_workers=1"])
    engine = build_engine(config, 1, Schedule(1, 1, 1), torch.nn.Linear(3, 2), torch.nn.Identity())
    engine.save_checkpoint(str(tmp_path), tag="t", client_state={"run": {"step": 1}})
    _, client_state = engine.load_checkpoint(str(tmp_path), tag="t")
    assert client_state["run"] == {"step": 1}
    optimizer_states = next((tmp_path / "t").glob("*optim_states.pt"))
    marker = tmp_path / "executed"
    torch.save({"optimizer_state_dict": Payload(marker)}, optimizer_states)
    with pytest.raises(UnsafeFileError, match=f"{optimizer_states}: refused to load: it names io.open"):
        engine.load_checkpoint(str(tmp_path), tag="t")
    assert not marker.exists()
    assert os.environ["DS_ACCELERATOR"] == "cpu"


def test_a_bf16_engine_holds_fp32_weights_and_gradients_and_runs_the_model_under_bf16_autocast(one_rank):
    """configs/gpu.yaml's precision: DeepSpeed's own bf16 block (bf16 weights, fp32 inputs and
    BatchNorm statistics) stays off; the model's forward is autocast, the loss and weights fp32."""
    from pipeline.losses.registry import build_loss
    from pipeline.models import build_model
    from pipeline.training.engine import build_engine
    from pipeline.training.schedule import Schedule

    config = TrainConfig.load(Path(CONFIG).with_name("gpu.yaml"), ["train.num_workers=1", "data.subjects_per_batch=4",
                                                                   "data.sessions_per_subject=2"])
    model = build_model("bigru", features=tuple(config.data.features), embedding_size=8, hidden=8)
    engine = build_engine(config, 1, Schedule(1, 1, 1), model, build_loss("eer", 8, 4))
    output_types: list[torch.dtype] = []
    model.register_forward_hook(lambda _module, _inputs, output: output_types.append(output.dtype))
    labels = torch.arange(4).repeat_interleave(2)
    loss, _ = engine(torch.rand(8, 20, len(config.data.features)), torch.ones(8, 20, dtype=torch.bool), labels)
    engine.backward(loss)
    assert engine.communication_data_type == torch.float32  # gradients are reduced across ranks in fp32
    assert not engine.bfloat16_enabled()
    assert output_types == [torch.bfloat16] and loss.dtype == torch.float32
    assert {parameter.dtype for parameter in engine.module.parameters()} == {torch.float32}
    engine.step()
    assert {parameter.dtype for parameter in engine.module.parameters()} == {torch.float32}


def test_a_failed_run_names_the_rank_whose_own_error_it_was_not_a_peer_waiting_for_it():
    from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

    from pipeline.training.driver import _first_cause

    waiting = RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer")
    full = OSError(28, "No space left on device")
    assert _first_cause(WorkerGroupError("", {0: waiting, 1: full})) == ("rank 1", full)
    assert _first_cause(WorkerGroupError("", {0: waiting, 1: waiting})) == ("rank 0", waiting)
    assert _first_cause(ControllerError(full)) == ("the controller", full)


def test_a_second_launch_of_a_running_run_is_refused_naming_its_folder_and_holder_before_ray_starts(shards, tmp_path):
    import ray

    from pipeline.training.driver import run_lock

    run = tmp_path / "cpu-local"
    checkpoint = write_checkpoint(run / OLDER, {"module": {"weight": torch.zeros(2)}})  # the running run's
    with run_lock(str(run)):
        holder = (run / "_lock.json").read_text()
        result = train(shards, tmp_path)
        assert (run / "_lock.json").read_text() == holder
    assert_refused_in_one_line(result, f"{run} is locked by another training run: pid {os.getpid()} on "
                                       f"{socket.gethostname()}, started ")
    assert not ray.is_initialized()
    assert checkpoint.exists() and not (run / "_lock.json").exists()
