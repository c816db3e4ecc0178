"""``eerpipe evaluate`` and ``eerpipe predict`` on a small synthetic corpus and a fresh model.

The corpus is written once in the KVC format (60 dev subjects, 6 evaluation subjects) and
sharded (12 test subjects, no val split). The model is a small random TypeNet exported with
``save_model`` into a run folder, with non-default features, ``max_len`` and eval settings so
that a path ignoring the export's settings fails.
"""

from __future__ import annotations

import ast
import json
import os
import uuid
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pipeline import exports
from pipeline.cli import app
from pipeline.data import SessionLoader
from pipeline.data.shards import ShardSet
from pipeline.evaluation.embedding import embed
from pipeline.evaluation.protocol import SessionPairs, comparisons, verify
from pipeline.exports import load_model, save_model
from pipeline.metrics import eer
from pipeline.models import build_model
from sharding.format import load_manifest
from sharding.kvc import read_dev_set
from sharding.synth import write_kvc
from sharding.writer import write_shards

runner = CliRunner()
EXPORT_CONFIG = {
    "model": {"name": "typenet", "embedding_size": 16, "options": {"hidden": 16}},
    "data": {"features": ["keycode", "hold", "flight", "release_press"], "max_len": 60},
    "eval": {"impostors_per_session": 4, "distance": "cosine"},
    "train": {"precision": "fp32"},
}
TEST_SUBJECTS = 12


@dataclass(frozen=True)
class Corpus:
    kvc: Path  # write_kvc root: desktop/desktop_{dev_set.npy,test_sessions.npy,comparisons.txt,ground_truth.json}
    shards: Path
    run: Path  # a training run folder: export/best/model.pt


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    root = tmp_path_factory.mktemp("evaluate")
    write_kvc(root / "kvc", scenario="desktop", subjects=60, test_subjects=6, seed=0)
    write_shards(f"kvc:{root / 'kvc'}:desktop", str(root / "shards"), subjects_per_shard=5,
                 val_subjects=0, test_subjects=TEST_SUBJECTS)
    torch.manual_seed(0)
    model = build_model("typenet", features=EXPORT_CONFIG["data"]["features"], embedding_size=16, hidden=16)
    save_model(str(root / "run" / "export" / "best" / "model.pt"), model, EXPORT_CONFIG)
    return Corpus(root / "kvc", root / "shards", root / "run")


def evaluate(*args: str) -> object:
    return runner.invoke(app, ["evaluate", "--quiet", *args])


def predict(*args: str) -> object:
    return runner.invoke(app, ["predict", "--quiet", *args])


def read_predictions(out: Path, scenario: str = "desktop") -> list[float]:
    text = (out / f"{scenario}_predictions.txt").read_text()
    assert "\n" not in text  # one line, the KVC submission format
    with zipfile.ZipFile(out / f"{scenario}_predictions.zip") as bundle:
        assert bundle.namelist() == [f"{scenario}_predictions.txt"]
        assert bundle.read(f"{scenario}_predictions.txt").decode() == text
    scores = ast.literal_eval(text)
    assert isinstance(scores, list) and all(isinstance(s, float) for s in scores)
    return scores


def test_evaluate_writes_the_official_report_of_the_split(corpus: Corpus, tmp_path: Path) -> None:
    result = evaluate("--checkpoint", str(corpus.run), "--shards", str(corpus.shards), "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert 0.0 <= metrics["global"]["eer"] <= 1.0
    # Every pair of a subject's 15 sessions is genuine; 4 impostors per session (the export's setting).
    assert metrics["global"]["genuine"] == TEST_SUBJECTS * 15 * 14 // 2
    assert metrics["global"]["impostor"] == TEST_SUBJECTS * 15 * 4
    assert metrics["mean_per_subject"]["subjects"] == TEST_SUBJECTS
    assert (tmp_path / "report.md").read_text().startswith("# Verification report: typenet on test")
    assert (tmp_path / "det.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| Global |" in result.stdout and "| Mean per subject |" in result.stdout


def test_evaluate_with_the_kvc_protocol_verifies_sessions_against_enrolment_sets(
        corpus: Corpus, tmp_path: Path) -> None:
    result = evaluate("--checkpoint", str(corpus.run), "--shards", str(corpus.shards), "--protocol", "kvc",
                      "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    # 5 enrolment sessions per subject, the other 10 verified: once against their own set, and
    # against 4 other subjects' sets (the export's impostors_per_session).
    assert metrics["global"]["genuine"] == TEST_SUBJECTS * 10
    assert metrics["global"]["impostor"] == TEST_SUBJECTS * 10 * 4
    assert (tmp_path / "report.md").read_text().startswith("# Verification report: typenet on test, kvc protocol")


def test_evaluate_can_score_every_impostor_comparison_of_the_split(corpus: Corpus, tmp_path: Path) -> None:
    result = evaluate("--checkpoint", str(corpus.run), "--shards", str(corpus.shards), "--impostors", "all",
                      "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    sessions = TEST_SUBJECTS * 15
    metrics = json.loads((tmp_path / "metrics.json").read_text())["global"]
    assert metrics["genuine"] + metrics["impostor"] == sessions * (sessions - 1) // 2


def test_a_bad_impostor_count_is_refused_naming_the_option(corpus: Corpus, tmp_path: Path) -> None:
    result = evaluate("--checkpoint", str(corpus.run), "--shards", str(corpus.shards), "--impostors", "0",
                      "--out", str(tmp_path / "out"))
    assert result.exit_code == 1
    assert "--impostors takes a positive whole number or 'all', got '0'" in result.output


def test_a_model_is_evaluated_on_a_test_only_shard_set_of_another_corpus(corpus: Corpus, tmp_path: Path) -> None:
    other = tmp_path / "other-corpus"
    write_kvc(other, scenario="desktop", subjects=8, test_subjects=2, seed=1)
    write_shards(f"kvc:{other}:desktop", str(tmp_path / "shards"), split="test")
    result = evaluate("--checkpoint", str(corpus.run), "--shards", str(tmp_path / "shards"), "--protocol", "kvc",
                      "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["mean_per_subject"]["subjects"] == 8


def test_an_unknown_protocol_is_refused_naming_it_before_any_model_is_read(corpus: Corpus, tmp_path: Path) -> None:
    result = evaluate("--checkpoint", str(tmp_path / "no-model"), "--shards", str(corpus.shards), "--protocol",
                      "enrol", "--out", str(tmp_path / "out"))
    assert result.exit_code == 1
    assert "--protocol must be one of session, kvc, got 'enrol'" in result.output
    assert not (tmp_path / "out").exists()


def test_predict_writes_one_score_per_comparison_zipped(corpus: Corpus, tmp_path: Path) -> None:
    result = predict("--checkpoint", str(corpus.run / "export" / "best"), "--kvc", str(corpus.kvc),
                     "--scenario", "desktop", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    scores = read_predictions(tmp_path)
    truth = json.loads((corpus.kvc / "desktop" / "desktop_ground_truth.json").read_text())["labels"]
    assert len(scores) == len(truth) == 6 * 2 * 5 * 10
    assert 0.0 <= eer(truth, scores)[0] <= 1.0


def test_predict_and_evaluate_score_the_same_sessions_identically(corpus: Corpus, tmp_path: Path) -> None:
    """The test split as a KVC test set, compared as the protocol compares it, gives evaluate's EER."""
    model, export = load_model(str(corpus.run))
    loader = SessionLoader(str(corpus.shards), "test", batch_size=1024, max_len=export["data"]["max_len"],
                           features=export["data"]["features"], rank=0, world_size=1)
    embeddings, labels, session_ids = embed(model, loader)
    expected = verify(embeddings, labels, SessionPairs(4), "cosine")
    first, second, _ = comparisons(labels, impostors_per_session=4)
    manifest = load_manifest(str(corpus.shards))
    test_subjects = {s for s, shard in manifest.subjects.items() if shard.startswith("test")}
    raw = {sid: keys for user, sessions in read_dev_set(corpus.kvc / "desktop" / "desktop_dev_set.npy")
           if user in test_subjects for sid, keys in sessions.items()}
    kvc = tmp_path / "kvc"
    kvc.mkdir()
    np.save(kvc / "desktop_test_sessions.npy", {sid: raw[sid] for sid in session_ids}, allow_pickle=True)
    pairs = [(session_ids[a], session_ids[b]) for a, b in zip(first, second)]
    (kvc / "desktop_comparison_list.txt").write_text(str(pairs))  # the site's other file name

    assert predict("--checkpoint", str(corpus.run), "--kvc", str(kvc), "--scenario", "desktop",
                   "--out", str(tmp_path / "out")).exit_code == 0
    scores = np.array(read_predictions(tmp_path / "out"))
    np.testing.assert_allclose(scores, expected.scores, rtol=0, atol=1e-6)

    assert evaluate("--checkpoint", str(corpus.run), "--shards", str(corpus.shards),
                    "--out", str(tmp_path / "eval")).exit_code == 0
    reported = json.loads((tmp_path / "eval" / "metrics.json").read_text())["global"]["eer"]
    assert eer(expected.truth, scores)[0] == pytest.approx(reported, abs=1e-12)


def test_evaluate_reads_model_and_shards_from_s3(corpus: Corpus, s3_url: str, tmp_path: Path) -> None:
    save_model(f"{s3_url}/run/export/best/model.pt", load_model(str(corpus.run))[0], EXPORT_CONFIG)
    write_shards(f"kvc:{corpus.kvc}:desktop", f"{s3_url}/shards", subjects_per_shard=5,
                 val_subjects=0, test_subjects=TEST_SUBJECTS)
    for where, model, shards in (("local", str(corpus.run), str(corpus.shards)),
                                 ("s3", f"{s3_url}/run", f"{s3_url}/shards")):
        result = evaluate("--checkpoint", model, "--shards", shards, "--out", str(tmp_path / where))
        assert result.exit_code == 0, result.output
    assert (tmp_path / "s3" / "metrics.json").read_text() == (tmp_path / "local" / "metrics.json").read_text()


def test_a_tampered_model_file_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self) -> tuple:
            return (open, (str(marker), "w"))

    torch.save({"format": 1, "state_dict": Payload()}, tmp_path / "model.pt")
    result = evaluate("--checkpoint", str(tmp_path), "--shards", str(tmp_path))
    assert result.exit_code == 1 and "not an eerpipe model export" in result.stderr
    assert "names io.open" in result.stderr  # what the file holds, in one line
    assert "weights_only" not in result.stderr  # never torch's advice to load it unsafely
    assert not marker.exists()


def run_on_missing_inputs(command: str, tmp_path: Path, out: str) -> Any:
    """``command`` with model and data that would fail later, if anything ran before ``--out``'s check."""
    missing = str(tmp_path / "nothing")
    if command == "evaluate":
        return evaluate("--checkpoint", missing, "--shards", missing, "--out", out)
    return predict("--checkpoint", missing, "--kvc", missing, "--scenario", "desktop", "--out", out)


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_an_out_path_that_is_a_file_is_refused_before_anything_is_scored(
    corpus: Corpus, tmp_path: Path, command: str
) -> None:
    taken = tmp_path / "taken"
    taken.write_text("keep me")
    result = run_on_missing_inputs(command, tmp_path, str(taken))
    assert result.exit_code == 1, result.output
    assert f"--out {taken}: exists and is not a folder" in result.stderr and result.stderr.count("\n") == 1
    assert taken.read_text() == "keep me"


@pytest.fixture
def read_only_folder(tmp_path: Path) -> Path:
    """A folder this process cannot create files in: mode 0555 stops a user; root, whom modes do
    not stop, gets /sys, where no one may create files."""
    folder = tmp_path / "read-only"
    folder.mkdir(mode=0o555)
    return Path("/sys") if os.access(folder, os.W_OK) else folder


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_an_out_folder_that_cannot_be_written_is_refused_before_anything_is_scored(
    tmp_path: Path, read_only_folder: Path, command: str
) -> None:
    result = run_on_missing_inputs(command, tmp_path, str(read_only_folder))
    assert result.exit_code == 1, result.output
    assert f"--out {read_only_folder}: not writable" in result.stderr and result.stderr.count("\n") == 1


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_an_object_store_out_is_refused_rather_than_written_to_a_local_folder_named_after_it(
    tmp_path: Path, command: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = run_on_missing_inputs(command, tmp_path, "s3://bucket/evaluation")
    assert result.exit_code == 1, result.output
    assert "--out s3://bucket/evaluation: takes a local folder" in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "s3:").exists()


@pytest.fixture
def doomed_bucket(s3_endpoint: str) -> Iterator[str]:
    """The name of a fresh bucket of the test's own, for a test that deletes it (the session's
    bucket is shared); deleted afterwards if the test did not."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    bucket = f"doomed-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    yield bucket
    if bucket in {b["Name"] for b in s3.list_buckets()["Buckets"]}:
        delete_bucket(bucket)


def delete_bucket(bucket: str) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    for item in s3.list_objects_v2(Bucket=bucket).get("Contents", []):
        s3.delete_object(Bucket=bucket, Key=item["Key"])
    s3.delete_bucket(Bucket=bucket)


def then_deleting(read: Callable[..., Any], bucket: str) -> Callable[..., Any]:
    """``read``, after which ``bucket`` is deleted: the run's next read finds it gone."""

    def read_and_delete(*args: Any, **kwargs: Any) -> Any:
        result = read(*args, **kwargs)
        delete_bucket(bucket)
        return result

    return read_and_delete


@pytest.mark.parametrize(("command", "deleted_after"), [
    ("evaluate", "finding the model"), ("predict", "finding the model"), ("evaluate", "reading a shard"),
])
def test_a_bucket_deleted_mid_run_is_named_in_one_line(
    corpus: Corpus, doomed_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    command: str, deleted_after: str,
) -> None:
    model, shards = str(corpus.run), str(corpus.shards)
    if deleted_after == "finding the model":
        model = f"s3://{doomed_bucket}/run"
        save_model(f"{model}/export/best/model.pt", load_model(str(corpus.run))[0], EXPORT_CONFIG)
        monkeypatch.setattr(exports, "find_export", then_deleting(exports.find_export, doomed_bucket))
    else:
        shards = f"s3://{doomed_bucket}/shards"
        write_shards(f"kvc:{corpus.kvc}:desktop", shards, subjects_per_shard=5,
                     val_subjects=0, test_subjects=TEST_SUBJECTS)
        monkeypatch.setattr(ShardSet, "read", then_deleting(ShardSet.read, doomed_bucket))
    if command == "evaluate":
        result = evaluate("--checkpoint", model, "--shards", shards, "--out", str(tmp_path / "out"))
    else:
        result = predict("--checkpoint", model, "--kvc", str(corpus.kvc), "--scenario", "desktop",
                         "--out", str(tmp_path / "out"))
    assert result.exit_code == 1, result.output
    gone = model if deleted_after == "finding the model" else shards
    assert f"{gone}: bucket {doomed_bucket!r} does not exist" in result.stderr and result.stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("command", "fault", "message"),
    [
        ("evaluate", "no model", "no exported model"),
        ("evaluate", "text model", "not an eerpipe model export"),
        ("evaluate", "future format", "unsupported export format 2"),
        ("evaluate", "missing split", "no 'val' shards"),
        ("predict", "no model", "no exported model"),
        ("predict", "unknown scenario", "unknown scenario 'tablet'"),
        ("predict", "no test files", "no mobile_test_sessions.npy"),
        ("predict", "unknown session", "compares session 'nobody'"),
        ("predict", "no comparisons", "desktop_comparisons.txt: no comparisons to score"),
    ],
)
def test_bad_input_exits_1_with_one_clear_line(
    corpus: Corpus, tmp_path: Path, command: str, fault: str, message: str
) -> None:
    model, split, scenario, kvc = str(corpus.run), "test", "desktop", corpus.kvc
    if fault == "no model":
        model = str(tmp_path / "nothing")
    elif fault == "text model":
        model = str(tmp_path / "model.pt")
        Path(model).write_text("not a model")
    elif fault == "future format":
        model = str(tmp_path / "model.pt")
        torch.save({"format": 2}, model)
    elif fault == "missing split":
        split = "val"
    elif fault == "unknown scenario":
        scenario = "tablet"
    elif fault == "no test files":
        scenario = "mobile"
    elif fault in ("unknown session", "no comparisons"):
        kvc = tmp_path
        (tmp_path / "desktop_test_sessions.npy").write_bytes(
            (corpus.kvc / "desktop" / "desktop_test_sessions.npy").read_bytes())
        comparisons = "[('00000001', 'nobody')]" if fault == "unknown session" else "[]"
        (tmp_path / "desktop_comparisons.txt").write_text(comparisons)
    if command == "evaluate":
        result = evaluate("--checkpoint", model, "--shards", str(corpus.shards), "--split", split,
                          "--out", str(tmp_path / "out"))
    else:
        result = predict("--checkpoint", model, "--kvc", str(kvc), "--scenario", scenario,
                         "--out", str(tmp_path / "out"))
    assert result.exit_code == 1, result.output
    assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "out").exists()  # nothing written on failure
