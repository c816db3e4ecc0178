"""One bf16 training step of ``configs/gpu.yaml`` on CUDA: every tensor it touches is on the GPU.

A tensor left on the CPU in a GPU step fails loudly only where it meets a GPU tensor; elsewhere
it silently runs on the host (an index, a mask, a statistic) or copies every step. So the step's
every tensor is checked: the batch, each module's inputs and outputs (forward hooks), the model's
embeddings, the gathered batch, the loss, every parameter, gradient and buffer, and the
optimizer's state. And the precision is the one intended (``pipeline/models/precision.py``):
fp32 master weights and gradients, the model's forward under bf16 autocast, the loss in fp32.

Marked ``gpu``: skipped without CUDA (``tests/conftest.py``); ``make test-gpu`` runs it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence

import pipeline.training.model_with_loss
from pipeline.config import TrainConfig
from pipeline.data import SamplerConfig, SubjectBatchLoader
from pipeline.losses.registry import build_loss
from pipeline.models import build_model
from pipeline.training.engine import build_engine
from pipeline.training.schedule import Schedule
from sharding.writer import write_shards
from tests.loopback import free_port

pytestmark = pytest.mark.gpu
CONFIG = Path(__file__).parents[1] / "configs" / "gpu.yaml"  # Type2Branch-large, EERLoss, ZeRO-1, bf16
SUBJECTS, SESSIONS = 4, 8  # the rank's batch: P × K
TRAIN_SUBJECTS = 30  # in the synthetic shards: 40 less 5 validation and 5 test subjects


@dataclass
class Step:
    """What one training step touched: ``(where, tensor)`` pairs, kept as device and dtype only."""

    seen: list[tuple[str, torch.device, torch.dtype]] = field(default_factory=list)
    gradients: dict[str, tuple[torch.device, torch.dtype]] = field(default_factory=dict)
    engine: Any = None

    def note(self, where: str, value: Any) -> None:
        self.seen.extend((where, tensor.device, tensor.dtype) for tensor in tensors_in(value))

    def dtypes(self, where: str) -> set[torch.dtype]:
        return {dtype for name, _, dtype in self.seen if name == where}

    def off_the_gpu(self) -> list[str]:
        return sorted({where for where, device, _ in self.seen if device.type != "cuda"})

    def module_hook(self, name: str) -> Any:
        """A forward hook noting the module's inputs (``"NAME in"``) and outputs (``"NAME out"``)."""
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            self.note(f"{name} in", (args, kwargs))
            self.note(f"{name} out", output)
        return hook

    def gradient_hook(self, name: str) -> Any:
        def hook(grad: torch.Tensor) -> None:
            self.gradients[name] = grad.device, grad.dtype
        return hook


def tensors_in(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a module's inputs or outputs. A ``PackedSequence``'s ``batch_sizes`` is left
    out: PyTorch keeps it on the CPU by design (``pack_padded_sequence`` takes CPU lengths)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, PackedSequence):
        yield from (t for t in (value.data, value.sorted_indices, value.unsorted_indices) if t is not None)
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors_in(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from tensors_in(item)


def optimizer_tensors(engine: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """The torch optimizer's parameters and state under DeepSpeed's ZeRO wrapper. Adam's ``step``
    count is left out: PyTorch keeps it on the CPU by design unless the optimizer is fused."""
    optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for group in optimizer.param_groups:
        yield from (("optimizer parameter", p) for p in group["params"])
    for state in optimizer.state.values():
        yield from ((f"optimizer {name}", v) for name, v in state.items() if name != "step" and torch.is_tensor(v))


@pytest.fixture(scope="module")
def step(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Step]:
    """One step as a worker runs it (``pipeline/training/worker.py``) on one rank, recorded."""
    shards = str(tmp_path_factory.mktemp("shards"))
    write_shards(f"synth:{TRAIN_SUBJECTS + 10}:0", shards, subjects_per_shard=10, val_subjects=5, test_subjects=5)
    config = TrainConfig.load(CONFIG, ["train.num_workers=1", f"data.subjects_per_batch={SUBJECTS}",
                                       f"data.sessions_per_subject={SESSIONS}"])
    recorded = Step()
    with pytest.MonkeyPatch.context() as patch:
        for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0",
                           "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
            patch.setenv(key, value)
        gather = pipeline.training.model_with_loss.gather_batch
        patch.setattr(pipeline.training.model_with_loss, "gather_batch",
                      lambda *args: note_returned(recorded, "gathered batch", gather(*args)))
        try:
            recorded.engine = train_one_step(config, shards, recorded)
            yield recorded
        finally:
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()


def note_returned(step: Step, where: str, value: Any) -> Any:
    step.note(where, value)
    return value


def train_one_step(config: TrainConfig, shards: str, step: Step) -> Any:
    model = build_model(config.model.name, features=tuple(config.data.features),
                        embedding_size=config.model.embedding_size, **config.model.options)
    criterion = build_loss(config.loss.name, config.model.embedding_size, TRAIN_SUBJECTS, **config.loss.options)
    engine = build_engine(config, 1, Schedule(1, 1, 1), model, criterion)
    for name, module in engine.module.named_modules():
        module.register_forward_hook(step.module_hook(name or "model_with_loss"), with_kwargs=True)
    for name, parameter in engine.module.named_parameters():
        parameter.register_hook(step.gradient_hook(name))
    sampler = SamplerConfig(subjects_per_batch=SUBJECTS, sessions_per_subject=SESSIONS, max_len=config.data.max_len)
    loader = SubjectBatchLoader(shards, "train", sampler, rank=0, world_size=1)
    batch = next(iter(loader)).to(engine.device, non_blocking=True)
    step.note("batch", (batch.features, batch.mask, batch.labels))
    loss, _ = engine(batch.features, batch.mask, batch.labels, return_stats=True, step=1)
    step.note("loss", loss)
    engine.backward(loss)
    engine.step()
    return engine


def test_the_batch_the_embeddings_the_gathered_batch_and_the_loss_are_on_the_gpu(step):
    checked = ("batch", "model out", "gathered batch", "loss")  # "model out": the embeddings
    assert {where for where, _, _ in step.seen} >= set(checked)
    assert [where for where in step.off_the_gpu() if where in checked] == []


def test_every_module_s_inputs_and_outputs_are_on_the_gpu(step):
    called = {where.removesuffix(" out") for where, _, _ in step.seen if where.endswith(" out")}
    assert {"model_with_loss", "model", "criterion", "model.gru1", "model.self_attention",
            "model.convs.2.conv"} <= called
    assert step.off_the_gpu() == []


def test_parameters_gradients_buffers_and_optimizer_state_are_fp32_on_the_gpu(step):
    module = step.engine.module
    named = {f"parameter {n}": p for n, p in module.named_parameters()}
    named |= {f"buffer {n}": b for n, b in module.named_buffers()}
    named |= {f"gradient {n}": p.grad for n, p in module.named_parameters() if p.grad is not None}
    named |= {f"{where} {i}": t for i, (where, t) in enumerate(optimizer_tensors(step.engine))}
    assert any(name.startswith("optimizer exp_avg") for name in named), "no Adam state after the step"
    placed = {n: (t.device, t.dtype) for n, t in named.items()}
    placed |= {f"autograd gradient {n}": device_and_dtype for n, device_and_dtype in step.gradients.items()}
    assert {n: (device, dtype) for n, (device, dtype) in placed.items()
            if device.type != "cuda" or (dtype.is_floating_point and dtype != torch.float32)} == {}
    assert set(step.gradients) == {n for n, p in module.named_parameters() if p.requires_grad}


def test_the_model_runs_in_bf16_under_autocast_and_the_loss_in_fp32(step):
    assert step.dtypes("model out") == {torch.bfloat16}
    assert step.dtypes("gathered batch") >= {torch.float32} and torch.bfloat16 not in step.dtypes("gathered batch")
    assert step.dtypes("loss") == {torch.float32}
