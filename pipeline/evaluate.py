"""Verification protocol shared by validation, ``eerpipe evaluate`` and the experiments.

Every session of a split is embedded once. Comparisons are session against session, scored
``−distance`` (higher = more similar, as the KVC metrics expect):

* genuine: every unordered pair of sessions of the same subject;
* impostor: for each session, ``impostors_per_session`` sessions of other subjects drawn with a
  fixed seed, so that two models are scored on the very same comparisons.

Each comparison is attributed to the subject of its first session, for the mean per-subject
block of the report.

Exported models (``model.pt``) hold the weights and what is needed to rebuild and feed the
model; they are plain tensors and builtins, loaded with ``torch.load(weights_only=True)``.

:func:`evaluate` runs this protocol on a split of a shard set (``eerpipe evaluate``);
:func:`predict` scores a KVC test set's own comparison list instead and writes the challenge's
submission files (``eerpipe predict``). Both featurise and embed sessions through the same code
as the loaders, so one session gets one embedding whichever way it comes in.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import MofNCompleteColumn, Progress
from torch import nn

from pipeline.data.batch import Batch, make_batch
from pipeline.metrics import verification_report
from sharding.kvc import KVCFileError, read_comparisons, read_test_sessions
from sharding.synth import SCENARIOS

EXPORT_FORMAT = 1
MODEL_FILE = "model.pt"
RUN_EXPORT = "export/best/model.pt"  # a training run folder's best model (see pipeline.train)
_PAIR_CHUNK = 1 << 16


def comparisons(
    labels: np.ndarray, impostors_per_session: int = 10, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(first, second, is_genuine)`` row indices of the protocol's comparisons."""
    labels = np.asarray(labels)
    order = np.argsort(labels, kind="stable")
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    first, second = [], []
    for members in np.split(order, bounds):
        a, b = np.triu_indices(len(members), 1)
        first.append(members[a])
        second.append(members[b])
    genuine_first, genuine_second = np.concatenate(first), np.concatenate(second)

    rng = np.random.default_rng(seed)
    anchor = np.repeat(np.arange(len(labels)), impostors_per_session)
    other = rng.integers(0, len(labels), size=anchor.size)
    clash = labels[other] == labels[anchor]
    while clash.any() and len(np.unique(labels)) > 1:  # redraw same-subject picks
        other[clash] = rng.integers(0, len(labels), size=int(clash.sum()))
        clash = labels[other] == labels[anchor]
    is_genuine = np.r_[np.ones(genuine_first.size, bool), np.zeros(anchor.size, bool)]
    return np.r_[genuine_first, anchor], np.r_[genuine_second, other], is_genuine


def pair_scores(embeddings: torch.Tensor, first: np.ndarray, second: np.ndarray, distance: str) -> np.ndarray:
    """``−distance`` between rows ``first[i]`` and ``second[i]``, in chunks to bound memory."""
    if distance == "cosine":
        embeddings = nn.functional.normalize(embeddings, dim=1)
    elif distance != "euclidean":
        raise ValueError(f"distance must be 'euclidean' or 'cosine', got {distance!r}")
    scores = []
    for start in range(0, len(first), _PAIR_CHUNK):
        a = embeddings[torch.as_tensor(first[start : start + _PAIR_CHUNK])]
        b = embeddings[torch.as_tensor(second[start : start + _PAIR_CHUNK])]
        gap = (1 - (a * b).sum(1)) if distance == "cosine" else (a - b).norm(dim=1)
        scores.append(-gap.double().numpy())
    return np.concatenate(scores) if scores else np.zeros(0)


def verify(
    embeddings: torch.Tensor,
    labels: np.ndarray,
    *,
    impostors_per_session: int = 10,
    distance: str = "euclidean",
    seed: int = 0,
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """The full KVC report of a split's embeddings, plus the comparisons' truth and scores."""
    first, second, truth = comparisons(labels, impostors_per_session, seed)
    scores = pair_scores(embeddings.detach().float().cpu(), first, second, distance)
    report = verification_report(truth.astype(int), scores, subjects=np.asarray(labels)[first])
    return report, truth.astype(int), scores


@torch.no_grad()
def embed(model: nn.Module, loader: Any, gather: bool = False) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """Embeddings, labels and session ids of every batch of ``loader`` (eval mode).

    With ``gather=True`` (inside a process group) every rank returns the whole split.
    """
    from pipeline.distributed import gather_embeddings

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    chunks, labels, sessions = [], [], []
    for batch in loader:
        rows = batch.labels.shape[0]
        output = (
            model(batch.features.to(device), batch.mask.to(device)).float()
            if rows
            else torch.zeros(0, model.embedding_size, device=device)  # a rank's trailing empty batch
        )
        batch_labels = batch.labels.to(device)
        if gather:
            output, batch_labels = gather_embeddings(output, batch_labels)
        chunks.append(output.cpu())
        labels.append(batch_labels.cpu().numpy())
        sessions.extend(batch.session_ids)
    model.train(was_training)
    return torch.cat(chunks), np.concatenate(labels), sessions


def save_model(path: str, model: nn.Module, config: dict[str, Any]) -> None:
    """Write an inference export (weights + model/data/eval config) to a path or URL, atomically."""
    from sharding.storage import open_fs

    buffer = io.BytesIO()
    torch.save(
        {
            "format": EXPORT_FORMAT,
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "model": config["model"],
            "data": {"features": list(config["data"]["features"]), "max_len": config["data"]["max_len"]},
            "eval": config["eval"],
        },
        buffer,
    )
    fs, target = open_fs(path)
    parent = target.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    partial = f"{target}.partial"
    fs.pipe_file(partial, buffer.getvalue())
    fs.mv(partial, target)


def find_export(path: str) -> str:
    """The ``model.pt`` that ``path`` names: the file, a folder holding it, or a training run folder.

    A run folder resolves to its best export, so ``--checkpoint`` takes whatever ``eerpipe train``
    printed.
    """
    from sharding.storage import StorageError, open_fs

    fs, target = open_fs(path)
    try:
        if fs.isfile(target):
            return path
        for inner in (MODEL_FILE, RUN_EXPORT):
            if fs.isfile(f"{target}/{inner}"):
                return f"{path.rstrip('/')}/{inner}"
    except Exception as error:  # noqa: BLE001 - any backend error means "cannot read here"
        raise StorageError(f"cannot read {path!r}: {_first_line(error)}") from error
    raise FileNotFoundError(
        f"no exported model at {path!r}: expected a {MODEL_FILE} file, a folder holding one, "
        f"or a training run folder with {RUN_EXPORT}"
    )


def load_model(path: str, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild an exported model (eval mode, on ``device``) and return it with its export metadata.

    ``torch.load(weights_only=True)`` rebuilds only tensors and builtin containers: a tampered
    file is refused, never executed.
    """
    from pipeline.models import build_model
    from sharding.storage import open_fs

    url = find_export(path)
    fs, target = open_fs(url)
    try:
        payload = torch.load(io.BytesIO(fs.cat_file(target)), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError...
        raise ValueError(f"{url}: not an eerpipe model export ({_first_line(error)})") from error
    found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
    if found != EXPORT_FORMAT:
        raise ValueError(f"{url}: unsupported export format {found!r} (this eerpipe reads {EXPORT_FORMAT})")
    try:
        spec, data = payload["model"], payload["data"]
        model = build_model(
            spec["name"],
            features=tuple(data["features"]),
            embedding_size=spec["embedding_size"],
            **spec.get("options", {}),
        )
        model.load_state_dict(payload["state_dict"])
    except (KeyError, TypeError, RuntimeError) as error:
        raise ValueError(f"{url}: the export does not rebuild its model ({_first_line(error)})") from error
    return model.to(device).eval(), payload


def _first_line(error: BaseException) -> str:
    """``Type: first line`` of an error, for one-line messages (torch's run to many lines)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _progress(show: bool) -> Progress:
    return Progress(*Progress.get_default_columns(), MofNCompleteColumn(), disable=not show)


@dataclass
class Scored:
    """A model's verification of one split: the report and the comparisons behind it."""

    report: dict[str, Any]
    truth: np.ndarray
    scores: np.ndarray
    name: str


def score_split(
    checkpoint: str, shards: str, *, split: str = "test", batch_size: int = 1024, progress: bool = False
) -> Scored:
    """Embed every session of ``split`` with an exported model and run the protocol.

    Features, ``max_len``, distance and impostors per session come from the export, so the
    numbers are those the training run's validation computed for the same model and sessions.
    """
    from pipeline.data import SessionLoader

    model, export = load_model(checkpoint, _device())
    loader = SessionLoader(
        shards, split, batch_size=batch_size, max_len=export["data"]["max_len"],
        features=export["data"]["features"], rank=0, world_size=1,
    )
    with _progress(progress) as bar:
        batches = bar.track(loader, total=len(loader), description=f"embedding {split} batches")
        embeddings, labels, _ = embed(model, batches)
    settings = export["eval"]
    report, truth, scores = verify(
        embeddings, labels,
        impostors_per_session=settings["impostors_per_session"], distance=settings["distance"],
    )
    return Scored(report, truth, scores, f"{export['model']['name']} on {split}")


def evaluate(
    checkpoint: str,
    shards: str,
    *,
    split: str = "test",
    out_dir: str | Path = "evaluation",
    batch_size: int = 1024,
    progress: bool = False,
) -> tuple[dict[str, Any], Path]:
    """:func:`score_split`, then ``metrics.json``, ``report.md`` and ``det.png`` in ``out_dir``."""
    scored = score_split(checkpoint, shards, split=split, batch_size=batch_size, progress=progress)
    return scored.report, write_report(out_dir, scored.report, scored.truth, scored.scores, scored.name)


def embed_sessions(
    model: nn.Module,
    sessions: Mapping[str, np.ndarray],
    features: Sequence[str],
    max_len: int,
    *,
    batch_size: int = 1024,
    progress: bool = False,
) -> tuple[torch.Tensor, list[str]]:
    """Embeddings of raw ``[n_keys, 3]`` sessions and their ids, in ``sessions`` order.

    Batches are built by :func:`~pipeline.data.batch.make_batch`, the loaders' own featurisation,
    and embedded by :func:`embed`: a session gets the same embedding here as from the shards.
    """
    ids = list(sessions)

    def batches() -> Iterator[Batch]:
        for start in range(0, len(ids), batch_size):
            chunk = ids[start : start + batch_size]
            unknown = [""] * len(chunk)  # anonymised test sessions: no subject, label −1
            yield make_batch([sessions[s] for s in chunk], [-1] * len(chunk), unknown, chunk, features, max_len)
            bar.advance(task, len(chunk))

    with _progress(progress) as bar:
        task = bar.add_task("embedding sessions", total=len(ids))
        embeddings, _, order = embed(model, batches())
    return embeddings, order


def kvc_test_files(root: str | Path, scenario: str) -> tuple[Path, Path]:
    """``({scenario}_test_sessions.npy, comparisons file)`` in ``root`` or ``root/scenario``.

    Unlike :func:`sharding.kvc.find_files` the dev set need not be there: predicting needs only
    the test files.
    """
    root = Path(root)
    for folder in (root / scenario, root):
        sessions = folder / f"{scenario}_test_sessions.npy"
        if sessions.is_file():
            for name in (f"{scenario}_comparisons.txt", f"{scenario}_comparison_list.txt"):
                if (folder / name).is_file():
                    return sessions, folder / name
            raise KVCFileError(f"{folder}: no {scenario}_comparisons.txt or {scenario}_comparison_list.txt")
    raise KVCFileError(f"{root}: no {scenario}_test_sessions.npy here or in a {scenario} subfolder")


def predict(
    checkpoint: str,
    kvc_dir: str | Path,
    scenario: str,
    out_dir: str | Path,
    *,
    batch_size: int = 1024,
    progress: bool = False,
) -> Path:
    """Score every comparison of a KVC test set, in order; write the submission files.

    Score = −distance (the export's), higher = same subject. Returns the path of
    ``{scenario}_predictions.txt``; ``{scenario}_predictions.zip`` lies next to it.
    """
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; expected one of {SCENARIOS}")
    model, export = load_model(checkpoint, _device())
    sessions_path, comparisons_path = kvc_test_files(kvc_dir, scenario)
    sessions = read_test_sessions(sessions_path)
    malformed = [s for s, keys in sessions.items() if not _is_session(keys)]
    if not sessions or malformed:
        problem = f"session {malformed[0]!r} is not a numeric [n_keys, 3] array" if malformed else "no sessions"
        raise KVCFileError(f"{sessions_path}: {problem}")
    pairs = read_comparisons(comparisons_path)
    missing = next((s for pair in pairs for s in pair if s not in sessions), None)
    if missing is not None:
        raise KVCFileError(f"{comparisons_path}: compares session {missing!r}, absent from {sessions_path.name}")

    embeddings, ids = embed_sessions(
        model, sessions, export["data"]["features"], export["data"]["max_len"],
        batch_size=batch_size, progress=progress,
    )
    row = {session: i for i, session in enumerate(ids)}
    first = np.fromiter((row[a] for a, _ in pairs), dtype=np.int64, count=len(pairs))
    second = np.fromiter((row[b] for _, b in pairs), dtype=np.int64, count=len(pairs))
    return write_predictions(out_dir, scenario, pair_scores(embeddings, first, second, export["eval"]["distance"]))


def _is_session(keys: Any) -> bool:
    return (
        isinstance(keys, np.ndarray) and keys.ndim == 2 and keys.shape[1] == 3
        and (np.issubdtype(keys.dtype, np.number) or keys.size == 0)
    )


def write_predictions(out_dir: str | Path, scenario: str, scores: np.ndarray) -> Path:
    """``{scenario}_predictions.txt`` (one line, ``str(list_of_scores)``) and its zip, for upload.

    Each file is replaced whole (written aside, then renamed), so an earlier submission is never
    left half-overwritten.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if not np.isfinite(scores).all():
        raise ValueError("the model produced non-finite scores (NaN or inf); no predictions written")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = out / f"{scenario}_predictions.txt"
    line = str(scores.tolist()).encode()  # repr of each float: parses back to the same value
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as bundle:
        bundle.writestr(text.name, line)
    for path, data in ((text, line), (text.with_suffix(".zip"), archive.getvalue())):
        partial = path.with_name(f"{path.name}.partial")
        partial.write_bytes(data)
        partial.replace(path)
    return text


def write_report(out_dir: str | Path, report: dict[str, Any], truth: np.ndarray, scores: np.ndarray, name: str) -> Path:
    """``metrics.json``, ``report.md`` and ``det.png`` in ``out_dir``."""
    import json

    from pipeline.metrics import plot_det, report_to_markdown

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(f"# Verification report: {name}\n\n{report_to_markdown(report)}\n")
    plot_det({name: (truth, scores)}, out / "det.png")
    return out
