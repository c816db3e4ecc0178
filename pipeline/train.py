"""Distributed training: Ray Train (V2) launches DeepSpeed workers; the loss sees the global batch.

Driver (:func:`train`): checks the shards and the storage, starts (or joins) Ray, and runs a
``TorchTrainer`` whose workers run :func:`worker_loop`; a progress line follows rank 0's reports.

Worker (:func:`worker_loop`), one per rank:

1. streams its own shards with the subject-aware sampler (P subjects × K sessions, subjects
   disjoint across ranks, the same number of batches on every rank);
2. embeds its batch, all-gathers embeddings and labels with gradients (:class:`Verifier`), and
   computes the loss on the global batch — DeepSpeed averages the gradients, which makes them
   those of one process holding the global batch (``pipeline/distributed.py``);
3. validates on the val split, tracks the best model by val EER, logs to W&B on rank 0;
4. checkpoints through DeepSpeed on every rank (model, optimizer, schedule, stream position,
   RNG state, step, config), then ``ray.train.report`` on every rank — a barrier.

Relaunching the same ``run.name`` resumes from the latest checkpoint in ``run.storage``.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.train
import torch
from torch import nn

from pipeline.config import TrainConfig, use_local_ray_settings
from pipeline.distributed import gather_embeddings
from pipeline.losses import EERLoss
from pipeline.losses.registry import WeightedSum, build_loss

EXPORT_DIR = "export"  # {storage}/{name}/export/{best,final}/model.pt


class Verifier(nn.Module):
    """Model and loss in one module, with the cross-rank gather between them.

    One module so that DeepSpeed optimises the loss's own weights too (ArcFace, CosFace), and
    so that "where does the loss see global pairs" is this forward.
    """

    def __init__(self, model: nn.Module, criterion: nn.Module) -> None:
        super().__init__()
        self.model, self.criterion = model, criterion
        self.timings: dict[str, float] = {}

    def forward(
        self, features: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, return_stats: bool = False
    ) -> tuple[torch.Tensor, Any]:
        start = time.perf_counter()
        embeddings = self.model(features, mask)
        middle = time.perf_counter()
        embeddings, labels = gather_embeddings(embeddings.float(), labels)
        if return_stats and isinstance(self.criterion, (EERLoss, WeightedSum)):
            loss, stats = self.criterion(embeddings, labels, return_stats=True)
        else:
            loss, stats = self.criterion(embeddings, labels), None
        self.timings = {"forward": middle - start, "gather_loss": time.perf_counter() - middle}
        return loss, stats


@dataclass
class TrainResult:
    """What a finished (or deliberately stopped) run left behind."""

    run_dir: str
    checkpoint: str | None
    metrics: dict[str, Any]
    final_model: str
    best_model: str
    curve: list[tuple[int, float]]  # (step, val EER) of every kept checkpoint


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------
def train(config: TrainConfig, resume_from: str | None = None, show_progress: bool = True) -> TrainResult:
    """Run (or resume) ``config.run.name`` to the end of its schedule; returns where things are."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    from sharding.format import load_manifest
    from sharding.storage import check_writable

    config = _absolute_paths(config)
    manifest = load_manifest(config.data.shards)  # fails fast: no shards, unreachable storage
    if not manifest.shards_of("train") or not manifest.shards_of("val"):
        raise ValueError(f"{config.data.shards}: training needs train and val shards")
    check_writable(config.run.storage)
    deepspeed_config(config, config.train.num_workers)  # bad settings fail here, not in the workers
    if config.train.init_from:
        warm_start_weights(config)
    build_loss(config.loss.name, config.model.embedding_size, num_classes=1, **config.loss.options)  # name, options
    lr_factor(0, config.train.warmup_steps, 1, config.train.schedule)
    storage_path, storage_filesystem = ray_storage(config.run.storage)

    init_ray(config.train.use_gpu)
    queue = Queue()
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"config": config.to_dict(), "resume_from": resume_from},
        scaling_config=ScalingConfig(num_workers=config.train.num_workers, use_gpu=config.train.use_gpu),
        run_config=RunConfig(
            name=config.run.name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=config.train.num_to_keep),
            failure_config=FailureConfig(max_failures=config.train.max_failures),
            callbacks=[_ForwardReports(queue)],
        ),
    )
    display = threading.Thread(target=_show_progress, args=(queue, show_progress), daemon=True)
    display.start()
    try:
        result = trainer.fit()
    finally:
        queue.put(None)
        display.join(timeout=10)
    run_dir = f"{config.run.storage}/{config.run.name}"
    return TrainResult(
        run_dir=run_dir,
        checkpoint=_checkpoint_url(result.checkpoint, config.run.storage),
        metrics=dict(result.metrics or {}),
        final_model=f"{run_dir}/{EXPORT_DIR}/final/model.pt",
        best_model=f"{run_dir}/{EXPORT_DIR}/best/model.pt",
        curve=sorted((m["step"], m["val/eer"]) for _, m in result.best_checkpoints if "val/eer" in m),
    )


def sampler_config(config: TrainConfig) -> Any:
    """The subject-aware sampler's settings (a ``SamplerConfig``) of a training config."""
    from pipeline.data import SamplerConfig

    return SamplerConfig(
        subjects_per_batch=config.data.subjects_per_batch,
        sessions_per_subject=config.data.sessions_per_subject,
        max_len=config.data.max_len,
        features=tuple(config.data.features),
        short_subjects=config.data.short_subjects,
        seed=config.run.seed,
    )


def warm_start_weights(config: TrainConfig) -> dict[str, torch.Tensor]:
    """The weights of ``config.train.init_from``, refused unless they were trained for the same
    model and features: fine-tuning changes the loss or the data, never the architecture."""
    from pipeline.evaluate import load_model

    model, export = load_model(config.train.init_from)
    wanted = {
        "model": {"name": config.model.name, "embedding_size": config.model.embedding_size, "options": config.model.options},
        "features": list(config.data.features),
    }
    found = {"model": {"options": {}, **export["model"]}, "features": export["data"]["features"]}
    if found != wanted:
        raise ValueError(f"train.init_from={config.train.init_from}: exported for {found}, this run trains {wanted}")
    return model.state_dict()


def init_ray(use_gpu: bool = False) -> None:
    """Join the cluster named by ``RAY_ADDRESS`` (a Ray job, KubeRay), else start a local one."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_config=ray.LoggingConfig(log_level="ERROR"))
        return
    use_local_ray_settings()
    ray.init(
        address="local",
        include_dashboard=False,
        logging_config=ray.LoggingConfig(log_level="ERROR"),
        runtime_env=None if use_gpu else {"env_vars": {"DS_ACCELERATOR": "cpu"}},
    )


def _checkpoint_url(checkpoint: Any, storage: str) -> str | None:
    """The checkpoint as a URL that ``--resume-from`` accepts (Ray drops ``s3://``)."""
    if checkpoint is None:
        return None
    return f"s3://{checkpoint.path}" if storage.startswith("s3://") else checkpoint.path


def ray_storage(url: str) -> tuple[str, Any]:
    """Ray's ``(storage_path, storage_filesystem)``: pyarrow ignores endpoint variables, so S3
    with a custom endpoint gets an explicit filesystem and a path without ``s3://``."""
    if not url.startswith("s3://"):
        return str(Path(url.removeprefix("file://")).resolve()), None
    import pyarrow.fs

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if not endpoint:
        return url, None
    scheme, _, host = endpoint.rpartition("://")
    filesystem = pyarrow.fs.S3FileSystem(endpoint_override=host, scheme=scheme or "https", region=region or "us-east-1")
    return url.removeprefix("s3://"), filesystem


def _absolute_paths(config: TrainConfig) -> TrainConfig:
    """Workers run in other folders: local paths must be absolute before they travel."""
    data = config.to_dict()
    for section, key in (("run", "storage"), ("data", "shards"), ("wandb", "dir"), ("train", "init_from")):
        value = data[section][key]
        if value and "://" not in value:
            data[section][key] = str(Path(value).resolve())
        elif value.startswith("file://"):
            data[section][key] = str(Path(value.removeprefix("file://")).resolve())
    return TrainConfig.from_dict(data)


class _ForwardReports(ray.train.UserCallback):
    """Runs in Ray Train's controller actor: forwards rank 0's metrics to the driver's queue."""

    def __init__(self, queue: Any) -> None:
        self.queue = queue

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        self.queue.put(metrics[0])


def _show_progress(queue: Any, enabled: bool) -> None:
    """Driver-side progress: step, loss, val EER, sessions/s, ETA (latest known values)."""
    from rich.console import Console

    console = Console(stderr=True)
    latest: dict[str, Any] = {"train/loss": float("nan"), "train/sessions_per_s": 0.0}
    for metrics in iter(queue.get, None):
        latest.update(metrics)
        if not enabled or "step" not in metrics:
            continue
        remaining = latest.get("total_steps", 0) - latest["step"]
        step_time = latest.get("train/step_time")
        eta = f"{remaining * step_time / 60:.1f} min" if step_time else "?"
        val_eer = f"{100 * latest['val/eer']:.2f}%" if "val/eer" in latest else "–"
        console.print(
            f"step {latest['step']}/{latest.get('total_steps', '?')}  epoch {latest.get('epoch', 0)}  "
            f"loss {latest['train/loss']:.4f}  val EER {val_eer}  "
            f"{latest['train/sessions_per_s']:.0f} sessions/s  ETA {eta}",
            highlight=False,
        )


# ---------------------------------------------------------------------------------------------
# Worker
# ---------------------------------------------------------------------------------------------
def worker_loop(payload: dict[str, Any]) -> None:
    """The training function every Ray Train worker runs."""
    import deepspeed

    from pipeline.data import SessionLoader, SubjectBatchLoader
    from pipeline.evaluate import embed, save_model, verify
    from pipeline.models import build_model

    config = TrainConfig.from_dict(payload["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(config.run.seed)  # identical initial weights on every rank
    features = tuple(config.data.features)

    loader = SubjectBatchLoader(
        config.data.shards,
        "train",
        sampler_config(config),
        rank=rank,
        world_size=world,
        num_workers=config.data.loader_workers,
    )
    validation = SessionLoader(
        config.data.shards,
        "val",
        batch_size=config.data.eval_batch_size,
        max_len=config.data.max_len,
        features=features,
        rank=rank,
        world_size=world,
    )
    model = build_model(
        config.model.name, features=features, embedding_size=config.model.embedding_size, **config.model.options
    )
    if config.train.init_from:  # a checkpoint of this run, if any, still wins in _restore
        model.load_state_dict(warm_start_weights(config))
    criterion = build_loss(config.loss.name, config.model.embedding_size, loader.num_classes, **config.loss.options)
    schedule_steps = config.train.epochs * loader.batches_per_epoch
    stop_step = schedule_steps
    if config.train.max_steps > 0:
        stop_step = min(stop_step, config.train.max_steps)
    if config.train.stop_after_epochs > 0:
        stop_step = min(stop_step, config.train.stop_after_epochs * loader.batches_per_epoch)

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # inference-only op: skip its JIT build
    engine, *_ = deepspeed.initialize(
        model=Verifier(model, criterion),
        config=deepspeed_config(config, world),
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, config.train.warmup_steps, schedule_steps, config.train.schedule)
        ),
    )

    state = {"step": 0, "best_val_eer": math.inf, "train_seconds": 0.0}
    restored = _restore(engine, loader, rank, payload.get("resume_from"))
    if restored:
        state.update(restored)
    run_dir = f"{config.run.storage}/{config.run.name}"
    wandb_run = _start_wandb(config, run_dir) if rank == 0 else None

    def validate() -> dict[str, float]:
        embeddings, labels, _ = embed(engine.module.model, validation, gather=True)
        if rank != 0:
            return {}
        report, truth, scores = verify(
            embeddings, labels, impostors_per_session=config.eval.impostors_per_session, distance=config.eval.distance
        )
        results = {f"val/{k}": v for k, v in report["global"].items() if isinstance(v, float)}
        results.update({f"val/per_subject_{k}": v for k, v in report.get("mean_per_subject", {}).items() if isinstance(v, float)})
        if results["val/eer"] < state["best_val_eer"]:
            state["best_val_eer"] = results["val/eer"]
            save_model(f"{run_dir}/{EXPORT_DIR}/best/model.pt", engine.module.model, config.to_dict())
        if wandb_run is not None:
            _log_det(wandb_run, truth, scores, state["step"])
        return results

    sessions_per_step = config.data.subjects_per_batch * config.data.sessions_per_subject * world
    fetched = launched = time.perf_counter()
    seconds_before = state["train_seconds"]  # training time of earlier launches of this run
    while state["step"] < stop_step:
        for batch in loader:
            data_time = time.perf_counter() - fetched
            step = state["step"] + 1
            log_now = step % config.train.log_every == 0 or step == stop_step
            begin = time.perf_counter()
            loss, stats = engine(batch.features, batch.mask, batch.labels, return_stats=log_now)
            backward_start = time.perf_counter()
            engine.backward(loss)
            # ZeRO-0 keeps no norm of its own, and step() clears the (averaged) gradients.
            parameter_grad_norm = _parameter_grad_norm(engine.module) if log_now else None
            step_start = time.perf_counter()
            engine.step()
            done = time.perf_counter()
            state["step"] = step

            epoch_end = loader.step >= loader.batches_per_epoch
            validate_now = epoch_end or (config.train.val_every > 0 and step % config.train.val_every == 0)
            checkpoint_now = (
                epoch_end or step == stop_step
                or (config.train.checkpoint_every > 0 and step % config.train.checkpoint_every == 0)
            )
            state["train_seconds"] = seconds_before + time.perf_counter() - launched
            metrics: dict[str, Any] = {
                "step": step, "epoch": loader.epoch, "total_steps": stop_step, "time/train_s": state["train_seconds"]
            }
            if log_now:
                metrics.update(
                    _train_metrics(
                        engine, loss, stats, parameter_grad_norm, data_time, begin, backward_start, step_start, done,
                        sessions_per_step,
                    )
                )
            if validate_now:
                metrics.update(validate())
            if wandb_run is not None and (log_now or validate_now):
                wandb_run.log({k: v for k, v in metrics.items() if k not in ("step", "total_steps")}, step=step)
            if checkpoint_now:
                _checkpoint(engine, loader, state, config, rank, metrics)
            elif log_now or validate_now:
                ray.train.report(metrics)
            fetched = time.perf_counter()
            if step >= stop_step:
                break

    if rank == 0:
        save_model(f"{run_dir}/{EXPORT_DIR}/final/model.pt", engine.module.model, config.to_dict())
    if wandb_run is not None:
        wandb_run.finish()


def deepspeed_config(config: TrainConfig, world: int) -> dict[str, Any]:
    """DeepSpeed settings from the training config (fp32 + gloo on CPU, bf16 on GPU)."""
    train = config.train
    if train.precision not in ("fp32", "bf16"):
        raise ValueError(f"train.precision must be fp32 or bf16, got {train.precision!r}")
    if train.zero_stage not in (0, 1, 2):
        # Stage 3 partitions the weights themselves; the exports read them whole from rank 0.
        raise ValueError(f"train.zero_stage must be 0, 1 or 2, got {train.zero_stage}")
    micro_batch = config.data.subjects_per_batch * config.data.sessions_per_subject
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "train_batch_size": micro_batch * world,
        "gradient_accumulation_steps": 1,
        "optimizer": {
            "type": "AdamW" if train.weight_decay else "Adam",
            "params": {"lr": train.lr, "weight_decay": train.weight_decay, "torch_adam": True},
        },
        "gradient_clipping": train.grad_clip,
        "zero_optimization": {"stage": train.zero_stage},
        "bf16": {"enabled": train.precision == "bf16"},
        "steps_per_print": 10**9,
    }


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Linear warm-up, then cosine decay to zero over the schedule (or constant)."""
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"train.schedule must be cosine or constant, got {schedule!r}")
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _parameter_grad_norm(module: nn.Module) -> float | None:
    grads = [p.grad.norm() for p in module.parameters() if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else None


def _train_metrics(
    engine: Any, loss: torch.Tensor, stats: Any, parameter_grad_norm: float | None, data_time: float, begin: float,
    backward_start: float, step_start: float, done: float, sessions_per_step: int,
) -> dict[str, float]:
    timings = engine.module.timings
    grad_norm = engine.get_global_grad_norm()
    if grad_norm is None:
        grad_norm = parameter_grad_norm
    metrics = {
        "train/loss": float(loss.detach()),
        "train/lr": float(engine.get_lr()[0]),
        "train/step_time": done - begin + data_time,
        "train/sessions_per_s": sessions_per_step / max(1e-9, done - begin + data_time),
        "time/data": data_time,
        "time/forward": timings.get("forward", 0.0),
        "time/gather_loss": timings.get("gather_loss", 0.0),
        "time/backward": step_start - backward_start,
        "time/optimizer": done - step_start,
    }
    if grad_norm is not None:
        metrics["train/grad_norm"] = float(grad_norm)
    if stats is not None:
        metrics.update(
            {
                "train/threshold": stats.threshold,
                "train/soft_far": stats.soft_far,
                "train/soft_frr": stats.soft_frr,
                "train/batch_eer": stats.exact_eer,
            }
        )
    return metrics


def _checkpoint(engine: Any, loader: Any, state: dict[str, Any], config: TrainConfig, rank: int, metrics: dict[str, Any]) -> None:
    """DeepSpeed checkpoint on every rank, then one report (a barrier) with it."""
    with tempfile.TemporaryDirectory() as directory:
        engine.save_checkpoint(
            directory,
            tag=f"step{state['step']:08d}",
            client_state={**state, "loader": loader.state_dict(), "config": config.to_dict()},
        )
        rng = Path(directory, "rng")
        rng.mkdir(exist_ok=True)
        torch.save({"torch": torch.get_rng_state()}, rng / f"rank{rank}.pt")
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def _restore(engine: Any, loader: Any, rank: int, resume_from: str | None) -> dict[str, Any] | None:
    """Latest checkpoint of this run, else ``resume_from``; ``None`` for a fresh start."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and resume_from:
        path, filesystem = ray_storage(resume_from)
        checkpoint = ray.train.Checkpoint(path, filesystem=filesystem)
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        _, client_state = engine.load_checkpoint(directory)
        if client_state is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint in {checkpoint.path}")
        loader.load_state_dict(client_state["loader"])
        rng = Path(directory, "rng", f"rank{rank}.pt")
        if rng.exists():
            torch.set_rng_state(torch.load(rng, weights_only=True)["torch"])
    return {key: client_state[key] for key in ("step", "best_val_eer", "train_seconds")}


def wandb_run_id(config: TrainConfig) -> str:
    """Stable across relaunches of a run, so an online resumed run continues the same W&B run."""
    digest = hashlib.sha256(f"{config.run.storage}/{config.run.name}".encode()).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9_-]', '-', config.run.name)[:48]}-{digest}"


def _start_wandb(config: TrainConfig, run_dir: str) -> Any:
    if not config.wandb.enabled:
        return None
    import wandb

    mode = config.wandb.mode
    if mode == "auto":
        mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    directory = config.wandb.dir or (run_dir if "://" not in run_dir else str(Path("wandb-runs").resolve()))
    Path(directory).mkdir(parents=True, exist_ok=True)
    return wandb.init(
        project=config.wandb.project,
        name=config.run.name,
        id=wandb_run_id(config),
        resume="allow",
        mode=mode,
        dir=directory,
        config=config.to_dict(),
    )


def _log_det(run: Any, truth: Any, scores: Any, step: int) -> None:
    import wandb

    from pipeline.metrics import plot_det

    with tempfile.TemporaryDirectory() as directory:
        path = plot_det({"val": (truth, scores)}, Path(directory, "det.png"))
        run.log({"val/det": wandb.Image(str(path))}, step=step)
