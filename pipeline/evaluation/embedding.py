"""Embedding sessions with a model: from a loader's batches, or from raw keystroke arrays.

Raw sessions are featurised by the loaders' own code (:func:`~pipeline.data.batch.make_batch`),
so one session gets one embedding whichever way it comes in.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from rich.progress import MofNCompleteColumn, Progress
from torch import nn

from pipeline.data.batch import Batch, make_batch
from pipeline.models.precision import autocast


@torch.no_grad()
def embed(
    model: nn.Module, loader: Iterable[Batch], gather: bool = False, precision: str = "fp32"
) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """Embeddings (fp32, on the CPU), labels and session ids of every batch of ``loader`` (eval
    mode), the model's forward run at the ``precision`` it trains with.

    With ``gather=True`` (inside a process group) every rank returns the whole split.
    """
    from pipeline.distributed import gather_embeddings

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    chunks, labels, sessions = [], [], []
    for batch in loader:
        batch = batch.to(device, non_blocking=True)
        if batch.labels.shape[0]:
            with autocast(device, precision):
                output = model(batch.features, batch.mask).float()
        else:
            # a rank's trailing empty batch; nn.Module's __getattr__ types the int attribute as Tensor | Module
            output = torch.zeros(0, model.embedding_size, device=device)  # type: ignore[call-overload]
        batch_labels = batch.labels
        if gather:
            output, batch_labels = gather_embeddings(output, batch_labels)
        chunks.append(output.cpu())
        labels.append(batch_labels.cpu().numpy())
        sessions.extend(batch.session_ids)
    model.train(was_training)
    return torch.cat(chunks), np.concatenate(labels), sessions


def embed_sessions(
    model: nn.Module,
    sessions: Mapping[str, np.ndarray],
    features: Sequence[str],
    max_len: int,
    *,
    batch_size: int = 1024,
    progress: bool = False,
    precision: str = "fp32",
) -> tuple[torch.Tensor, list[str]]:
    """Embeddings of raw ``[n_keys, 3]`` sessions and their ids, in ``sessions`` order, the
    model's forward run at ``precision``."""
    ids = list(sessions)

    def batches() -> Iterator[Batch]:
        for start in range(0, len(ids), batch_size):
            chunk = ids[start : start + batch_size]
            unknown = [""] * len(chunk)  # anonymised test sessions: no subject, label −1
            yield make_batch([sessions[s] for s in chunk], [-1] * len(chunk), unknown, chunk, features, max_len)
            bar.advance(task, len(chunk))

    with progress_bar(progress) as bar:
        task = bar.add_task("embedding sessions", total=len(ids))
        embeddings, _, order = embed(model, batches(), precision=precision)
    return embeddings, order


def progress_bar(show: bool) -> Progress:
    return Progress(*Progress.get_default_columns(), MofNCompleteColumn(), disable=not show)
