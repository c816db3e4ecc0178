"""The flows behind ``eerpipe evaluate`` and ``eerpipe predict``.

:func:`evaluate` runs the verification protocol on a split of a shard set with an exported
model and writes the report (session pairs or KVC enrolment sets, ``--protocol``);
:func:`predict` scores a KVC test set's own comparison list and writes the challenge's
submission files. Both take the export's features, ``max_len``, distance and impostors per
session (unless ``--impostors`` says otherwise), so the numbers are those the training run's
validation computed for the same model and sessions. The output folder is checked (a local
folder this process can write) before any scoring, and a read that fails because an ``s3://``
bucket is gone (mistyped, or deleted mid-run) names the URL and the bucket.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.evaluation.embedding import embed, embed_sessions, progress_bar
from pipeline.evaluation.protocol import (
    Impostors,
    ProtocolName,
    check_report_fits,
    pair_scores,
    protocol_from,
    protocol_name,
    verify,
)
from pipeline.evaluation.submission import read_test_set, write_predictions
from pipeline.exports import load_model
from pipeline.metrics.verification import Roc
from sharding.format import ShardIntegrityError
from sharding.storage import StorageError, check_writable, open_fs
from sharding.synth import SCENARIOS


@dataclass
class Scored:
    """A model's verification of one split: the report, the comparisons behind it and their ROC."""

    report: dict[str, Any]
    truth: np.ndarray
    scores: np.ndarray
    curve: Roc
    name: str


def score_split(
    checkpoint: str, shards: str, *, split: str = "test", protocol: ProtocolName | None = None,
    impostors: Impostors | None = None, batch_size: int = 1024, progress: bool = False,
    participants: Path | None = None,
) -> Scored:
    """Embed every session of ``split`` with an exported model and run ``protocol`` with
    ``impostors`` per session (default: as the model was validated), on the split's subjects
    listed in ``participants`` if given."""
    embedded = embed_split(checkpoint, shards, split=split, batch_size=batch_size, progress=progress)
    if participants is not None:
        embedded = embedded.only(participants)
    return embedded.score(protocol, impostors)


@dataclass
class EmbeddedSplit:
    """Every session of a split embedded by an exported model, ready for any protocol."""

    embeddings: torch.Tensor
    labels: np.ndarray
    export: dict[str, Any]
    split: str
    subject_ids: list[str]  # subject_ids[label]

    def only(self, participants: Path) -> "EmbeddedSplit":
        """The sessions of the subjects listed in ``participants`` (one id per line): one part of a
        benchmark combined from several sources, reported on its own."""
        from sharding.participants import read_participants

        listed = set(read_participants(participants))
        kept = np.array([subject in listed for subject in self.subject_ids], dtype=bool)
        if kept.sum() < 2:
            raise ValueError(f"{participants}: lists {kept.sum()} of the {self.split} split's subjects; "
                             "a verification report needs at least 2")
        rows = kept[self.labels]
        return EmbeddedSplit(self.embeddings[torch.from_numpy(rows)], self.labels[rows], self.export,
                             f"{self.split} ({participants.stem})", self.subject_ids)

    def score(self, protocol: ProtocolName | None = None, impostors: Impostors | None = None,
              setting: str = "--impostors") -> Scored:
        """The report under ``protocol`` with ``impostors`` per session (default: the export's),
        with the export's distance; a scoring too large for memory is refused naming ``setting``,
        the caller's way to give another count."""
        settings = self.export["eval"]
        if impostors is not None:
            settings = {**settings, "impostors_per_session": impostors}
        chosen = protocol_from(settings, protocol)
        check_report_fits(chosen, len(self.labels), len(np.unique(self.labels)), f"the {self.split} split", setting)
        verified = verify(self.embeddings, self.labels, chosen, settings["distance"])
        title = f"{self.export['model']['name']} on {self.split}, {chosen.name} protocol"
        return Scored(verified.report, verified.truth, verified.scores, verified.curve, title)


def embed_split(
    checkpoint: str, shards: str, *, split: str = "test", batch_size: int = 1024, progress: bool = False
) -> EmbeddedSplit:
    """Embed every session of ``split`` with an exported model, fed as the model was trained."""
    from pipeline.data import SessionLoader

    model, export = load_model(checkpoint, _device())
    loader = SessionLoader(
        shards, split, batch_size=batch_size, max_len=export["data"]["max_len"],
        features=export["data"]["features"], rank=0, world_size=1,
    )
    with progress_bar(progress) as bar:
        batches = bar.track(loader, total=len(loader), description=f"embedding {split} batches")
        embeddings, labels, _ = embed(model, batches, precision=validated_precision(export))
    return EmbeddedSplit(embeddings, labels, export, split, loader.subject_ids)


def evaluate(
    checkpoint: str,
    shards: str,
    *,
    split: str = "test",
    protocol: ProtocolName | None = None,
    impostors: Impostors | None = None,
    out_dir: str | Path = "evaluation",
    batch_size: int = 1024,
    progress: bool = False,
    participants: Path | None = None,
) -> tuple[dict[str, Any], Path]:
    """:func:`score_split`, then ``metrics.json``, ``report.md`` and ``det.png`` in ``out_dir``."""
    from sharding.participants import read_participants

    protocol = protocol_name(protocol)  # refused before the embedding, not after
    check_out_folder(out_dir)
    if participants is not None:
        read_participants(participants)  # a bad list, before the embedding
    with naming_a_missing_bucket(checkpoint, shards):
        scored = score_split(
            checkpoint, shards, split=split, protocol=protocol, impostors=impostors, batch_size=batch_size,
            progress=progress, participants=participants,
        )
    return scored.report, write_report(out_dir, scored)


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
    check_out_folder(out_dir)
    with naming_a_missing_bucket(checkpoint):
        model, export = load_model(checkpoint, _device())
    sessions, pairs = read_test_set(kvc_dir, scenario)
    embeddings, ids = embed_sessions(
        model, sessions, export["data"]["features"], export["data"]["max_len"], batch_size=batch_size,
        progress=progress, precision=validated_precision(export),
    )
    row = {session: i for i, session in enumerate(ids)}
    first = np.fromiter((row[a] for a, _ in pairs), dtype=np.int64, count=len(pairs))
    second = np.fromiter((row[b] for _, b in pairs), dtype=np.int64, count=len(pairs))
    return write_predictions(out_dir, scenario, pair_scores(embeddings, first, second, export["eval"]["distance"]))


def check_out_folder(out_dir: str | Path) -> None:
    """An output folder must be a local folder this process can write (or create): refused
    before anything is scored, so that a long scoring is never lost to an unwritable folder.

    A URL (``s3://…``) is refused too: the files are written with local file operations, which
    would put them in a local folder named ``s3:``.
    """
    if "://" in str(out_dir):
        raise ValueError(f"--out {out_dir}: takes a local folder; copy the results to object storage afterwards")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    try:
        check_writable(str(out), create=False)
    except StorageError as error:
        raise StorageError(f"--out {out}: not writable ({error})") from error


@contextmanager
def naming_a_missing_bucket(*urls: str) -> Iterator[None]:
    """A read from a bucket that is gone fails as a missing file or shard whose message names a
    key without its URL, or nothing at all (s3fs: "The specified bucket does not exist"): then
    say which of ``urls`` has no bucket. Any other failure is passed on as it is."""
    try:
        yield
    except (FileNotFoundError, ShardIntegrityError) as error:
        for url in urls:
            bucket = _missing_bucket(url)
            if bucket:
                raise StorageError(
                    f"{url}: bucket {bucket!r} does not exist (mistyped, or deleted while eerpipe read it)"
                ) from error
        raise


def _missing_bucket(url: str) -> str | None:
    """The bucket of an ``s3://`` URL when the endpoint says it does not exist, else ``None``."""
    if not url.startswith("s3://"):
        return None
    fs, root = open_fs(url)
    bucket = root.split("/", 1)[0]
    try:
        fs.call_s3("head_bucket", Bucket=bucket)
        return None
    except FileNotFoundError:
        return bucket
    except Exception:  # noqa: BLE001 - no answer either way (denied, unreachable): the first error stands
        return None


def write_report(out_dir: str | Path, scored: Scored) -> Path:
    """``metrics.json``, ``report.md`` and ``det.png`` in ``out_dir``."""
    from pipeline.metrics import plot_det, report_to_markdown

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(scored.report, indent=2))
    (out / "report.md").write_text(f"# Verification report: {scored.name}\n\n{report_to_markdown(scored.report)}\n")
    plot_det({scored.name: scored.curve}, out / "det.png")
    return out


def validated_precision(export: dict[str, Any]) -> str:
    """The precision the export's validation embedded at (``train.precision``: bf16 autocast or
    fp32), so that its scores here are those that chose it; exports that predate the key: fp32."""
    return str(export.get("precision", "fp32"))


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
