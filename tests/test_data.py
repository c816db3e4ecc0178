"""The streaming loader: features, P×K batches, rank disjointness, equal counts, determinism,
exact resume, short subjects, the schedule's step count, evaluation stream, integrity and S3."""

from __future__ import annotations

import itertools
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data import (
    SamplerConfig,
    SessionLoader,
    ShardIntegrityError,
    SubjectBatchLoader,
    featurize,
)
from sharding.writer import write_shards
from tests.shards_fixture import write_shard_set

P, K = 4, 3
UNEVEN = {"train": [30, 5, 17, 9, 22, 11], "val": [10, 7, 4]}


def config(**overrides) -> SamplerConfig:
    defaults = {"subjects_per_batch": P, "sessions_per_subject": K, "shuffle_buffer": 16}
    return SamplerConfig(**{**defaults, **overrides})


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("shards")
    # Every 7th subject has only 2 sessions (< K): exercises short_subjects.
    _, corpus = write_shard_set(root, UNEVEN, sessions=lambda i: 2 if i % 7 == 3 else 15)
    return root, corpus


def epoch(loader: SubjectBatchLoader) -> list:
    return list(loader)


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x.features, y.features) and torch.equal(x.mask, y.mask)
        and torch.equal(x.labels, y.labels) and x.session_ids == y.session_ids
        for x, y in zip(a, b)
    )


# --- features -----------------------------------------------------------------------------


def test_type2branch_features_are_exact() -> None:
    session = np.array([
        [1000, 1100, 65],      # first key: flight 0
        [1300, 1350, 300],     # keycode out of range → 0
        [1250, 1400, 32],      # press before previous press: flight → 0
        [61_250, 61_300, -1],  # 60 s pause: flight capped at 30 s
    ], dtype=np.float64)
    features, mask = featurize([session], max_len=6)
    assert features.dtype == np.float32 and features.shape == (1, 6, 3)
    expected = [[65 / 255, 0.1, 0.0], [0.0, 0.05, 0.3], [32 / 255, 0.15, 0.0], [0.0, 0.05, 30.0]]
    np.testing.assert_allclose(features[0, :4], expected, rtol=1e-6)
    assert (features[0, 4:] == 0).all() and mask.tolist() == [[True] * 4 + [False] * 2]


def test_optional_features_and_truncation() -> None:
    session = np.array([[0, 100, 10], [50, 300, 11], [400, 450, 12]], dtype=np.float64)
    features, mask = featurize([session], ["inter_release", "release_press"], max_len=2)
    # inter-release: 0, (300 − 100) ms; release-to-press: 0, (50 − 100) ms — overlap keeps its sign.
    np.testing.assert_allclose(features[0], [[0.0, 0.0], [0.2, -0.05]], rtol=1e-6)
    assert mask.all()
    with pytest.raises(ValueError, match="features"):
        featurize([session], ["keycode", "speed"])


def test_non_finite_values_become_zero_features() -> None:
    session = np.array([[0, 100, 65], [np.nan, 300, np.inf], [400, np.nan, 66]])
    features, _ = featurize([session], ["keycode", "hold", "flight", "inter_release", "release_press"])
    assert np.isfinite(features).all()
    np.testing.assert_allclose(features[0, 1], [0.0, 0.0, 0.0, 0.2, 0.0])


# --- training stream ----------------------------------------------------------------------


def test_batches_are_p_subjects_by_k_sessions(shard_set: tuple[Path, dict]) -> None:
    root, corpus = shard_set
    loader = SubjectBatchLoader(str(root), config=config(max_len=50), rank=0, world_size=1)
    batches = epoch(loader)
    assert len(batches) == loader.batches_per_epoch > 0
    for batch in batches:
        assert batch.features.shape == (P * K, 50, 3) and batch.features.dtype == torch.float32
        assert batch.mask.dtype == torch.bool and batch.labels.dtype == torch.int64
        blocks = [batch.subject_ids[i * K : (i + 1) * K] for i in range(P)]
        assert all(len(set(b)) == 1 for b in blocks) and len({b[0] for b in blocks}) == P
        assert [loader.subject_ids[label] for label in batch.labels] == batch.subject_ids
        for i in range(P):  # K distinct sessions of the subject, features computed from them
            sessions = batch.session_ids[i * K : (i + 1) * K]
            assert len(set(sessions)) == K
            raw = [corpus[blocks[i][0]][s] for s in sessions]
            expected, mask = featurize(raw, max_len=50)
            assert torch.equal(batch.features[i * K : (i + 1) * K], torch.from_numpy(expected))
            assert torch.equal(batch.mask[i * K : (i + 1) * K], torch.from_numpy(mask))


def test_ranks_get_disjoint_subjects_and_equal_batch_counts(
    shard_set: tuple[Path, dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, _ = shard_set
    subjects, counts = [], []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        loader = SubjectBatchLoader(str(root), config=config())  # skip mode: readers may re-read
        batches = epoch(loader)
        counts.append((len(batches), loader.batches_per_epoch))
        subjects.append({s for b in batches for s in b.subject_ids})
    # 94 subjects over 6 uneven shards: ranks hold different numbers, yet yield the same count.
    assert counts[0] == counts[1] and counts[0][0] == counts[0][1]
    assert not subjects[0] & subjects[1]
    plan = loader.dataset.plan
    rank_subjects = [sum(s.samples for g in rank for s in g) for rank in plan.readers]
    assert plan.batches_per_epoch == min(n // P for n in rank_subjects)


def test_epochs_are_deterministic_from_seed_and_epoch(shard_set: tuple[Path, dict]) -> None:
    root, _ = shard_set
    runs = [SubjectBatchLoader(str(root), config=config(), rank=1, world_size=2) for _ in range(2)]
    first, second = [epoch(r) for r in runs], [epoch(r) for r in runs]
    assert same(first[0], first[1]) and same(second[0], second[1])
    assert not same(first[0], second[0])  # reshuffled per epoch
    other_seed = SubjectBatchLoader(str(root), config=config(seed=1), rank=1, world_size=2)
    assert not same(epoch(other_seed), first[0])


@pytest.mark.parametrize(
    ("world_size", "num_workers", "stop"),
    [(2, 0, 3), (2, 2, 3), (1, 2, 3), (1, 2, -1)],  # (1, 2): workers hold 11 and 12 batches
)
def test_resume_mid_epoch_gives_the_uninterrupted_batches(
    shard_set: tuple[Path, dict], world_size: int, num_workers: int, stop: int
) -> None:
    root, _ = shard_set
    make = lambda: SubjectBatchLoader(  # noqa: E731
        str(root), config=config(), rank=0, world_size=world_size, num_workers=num_workers
    )
    reference = make()
    epoch(reference)
    uninterrupted = epoch(reference)  # epoch 1
    stop %= len(uninterrupted)

    interrupted = make()
    interrupted.set_epoch(1)
    head = list(itertools.islice(interrupted, stop))
    state = interrupted.state_dict()
    assert (state["epoch"], state["step"]) == (1, stop)

    resumed = make()
    resumed.load_state_dict(state)
    assert same(head + epoch(resumed), uninterrupted)
    assert resumed.state_dict()["epoch"] == 2  # finishing an epoch moves to the next


def test_resume_refuses_a_changed_stream(shard_set: tuple[Path, dict]) -> None:
    root, _ = shard_set
    state = SubjectBatchLoader(str(root), config=config(), rank=0, world_size=2).state_dict()
    other = SubjectBatchLoader(str(root), config=config(subjects_per_batch=5), rank=0, world_size=2)
    with pytest.raises(ValueError, match="subjects_per_batch"):
        other.load_state_dict(state)


@pytest.mark.parametrize(("world_size", "num_workers"), [(1, 0), (2, 0), (2, 2), (3, 1)])
def test_the_schedule_counts_exactly_the_batches_every_rank_yields(
    shard_set: tuple[Path, dict], world_size: int, num_workers: int
) -> None:
    """The driver and the experiments size a run from the manifest alone; the loaders agree."""
    from pipeline.config import TrainConfig
    from pipeline.training.components import sampler_config
    from pipeline.training.schedule import schedule_of
    from sharding.format import load_manifest

    root, _ = shard_set
    train = TrainConfig.load(None, [f"data.shards={root}", f"data.subjects_per_batch={P}",
                                    f"data.sessions_per_subject={K}", f"train.num_workers={world_size}",
                                    f"data.loader_workers={num_workers}", "train.epochs=3"])
    schedule = schedule_of(train, load_manifest(str(root)))
    for rank in range(world_size):
        loader = SubjectBatchLoader(str(root), config=sampler_config(train), rank=rank, world_size=world_size,
                                    num_workers=num_workers)
        assert len(epoch(loader)) == schedule.steps_per_epoch
    assert schedule.total_steps == schedule.stop_step == 3 * schedule.steps_per_epoch


def test_a_smaller_training_set_is_the_first_shards_holding_its_subjects(shard_set: tuple[Path, dict]) -> None:
    """data.train_subjects: nested subsets of one split (a scaling study's sizes), trained at equal
    steps with train.steps; the loader, the schedule and the label range agree."""
    from pipeline.config import TrainConfig
    from pipeline.training.components import sampler_config
    from pipeline.training.schedule import schedule_of
    from sharding.format import load_manifest

    root, _ = shard_set
    manifest = load_manifest(str(root))
    sizes = [shard.samples for shard in manifest.shards_of("train")]  # 30, 5, 17, … in manifest order
    held = {}
    for wanted, expected in [(1, sizes[0]), (sizes[0] + 1, sum(sizes[:2])), (sum(sizes[:2]) + 1, sum(sizes[:3]))]:
        train = TrainConfig.load(None, [f"data.shards={root}", f"data.subjects_per_batch={P}", "train.num_workers=1",
                                        f"data.sessions_per_subject={K}", f"data.train_subjects={wanted}",
                                        "train.steps=50", "train.epochs=3"])
        loader = SubjectBatchLoader(str(root), config=sampler_config(train), rank=0, world_size=1)
        assert loader.num_classes == expected
        schedule = schedule_of(train, manifest)
        assert len(epoch(loader)) == schedule.steps_per_epoch == expected // P
        assert schedule.total_steps == schedule.stop_step == 50  # train.steps, whatever the epoch's length
        held[wanted] = set(loader.subject_ids)
    smaller, middle, larger = held.values()
    assert smaller < middle < larger
    with pytest.raises(ValueError, match=f"data.train_subjects=1000, but the training split holds {sum(sizes)}"):
        SubjectBatchLoader(str(root), config=config(subjects=1000))


def test_short_subjects_are_skipped_or_repeated(shard_set: tuple[Path, dict]) -> None:
    root, corpus = shard_set
    short = {s for s, sessions in corpus.items() if len(sessions) < K}
    assert short
    skipped = epoch(SubjectBatchLoader(str(root), config=config(), rank=0, world_size=1))
    assert not short & {s for b in skipped for s in b.subject_ids}

    repeat = config(short_subjects="repeat")
    repeated = epoch(SubjectBatchLoader(str(root), config=repeat, rank=0, world_size=1))
    seen = 0
    for batch in repeated:
        for i in range(P):
            subject = batch.subject_ids[i * K]
            if subject in short:  # K = 3 from 2 sessions: one used twice, the other once
                seen += 1
                assert sorted(Counter(batch.session_ids[i * K : (i + 1) * K]).values()) == [1, 2]
    assert seen


# --- evaluation stream --------------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 2])
def test_evaluation_yields_every_session_once_in_equal_counts(
    shard_set: tuple[Path, dict], num_workers: int
) -> None:
    root, corpus = shard_set
    loaders = [
        SessionLoader(str(root), "val", batch_size=16, rank=r, world_size=2, num_workers=num_workers)
        for r in range(2)
    ]
    runs = [list(loader) for loader in loaders]
    assert len(runs[0]) == len(runs[1]) == loaders[0].batches_per_rank
    rows = [(s, sess) for run in runs for b in run for s, sess in zip(b.subject_ids, b.session_ids)]
    val = {s for s in corpus if s in set(loaders[0].subject_ids)}
    assert sorted(rows) == sorted((s, sess) for s in val for sess in corpus[s])
    batch = next(b for b in runs[0] if len(b.labels))
    subject, session = batch.subject_ids[0], batch.session_ids[0]
    assert torch.equal(batch.features[0], torch.from_numpy(featurize([corpus[subject][session]])[0][0]))


# --- integrity and storage ----------------------------------------------------------------


def test_a_modified_shard_is_an_error(tmp_path: Path) -> None:
    write_shard_set(tmp_path, {"train": [8, 8]})
    shard = tmp_path / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF  # inside the first member's payload: the tar still parses
    shard.write_bytes(bytes(data))
    loader = SubjectBatchLoader(str(tmp_path), config=config(shuffle_buffer=4), rank=0, world_size=1)
    with pytest.raises(ShardIntegrityError, match="train-000001.tar"):
        epoch(loader)


def test_missing_manifest_and_bad_config_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        SubjectBatchLoader(str(tmp_path))
    write_shard_set(tmp_path, {"train": [5, 5]})
    with pytest.raises(ValueError, match="cannot fill one batch"):
        SubjectBatchLoader(str(tmp_path), config=config(subjects_per_batch=8), rank=0, world_size=2)
    with pytest.raises(ValueError, match="short_subjects"):
        config(short_subjects="drop")


@pytest.mark.slow
def test_s3_shards_stream_like_local_ones(shard_set: tuple[Path, dict], s3_url: str) -> None:
    import s3fs

    s3fs.S3FileSystem(endpoint_url=os.environ["AWS_ENDPOINT_URL"]).put(f"{shard_set[0]}/", s3_url, recursive=True)
    local = SubjectBatchLoader(str(shard_set[0]), config=config(), rank=0, world_size=2, num_workers=2)
    remote = SubjectBatchLoader(s3_url, config=config(), rank=0, world_size=2, num_workers=2)
    assert same(epoch(remote), epoch(local))  # forked workers reopen S3 (s3fs is not fork-safe)


def test_shards_from_the_sharding_writer_stream(tmp_path: Path) -> None:
    manifest = write_shards("synth:48:0", str(tmp_path), subjects_per_shard=10, val_subjects=8, test_subjects=0)
    train = epoch(SubjectBatchLoader(str(tmp_path), config=config(), rank=1, world_size=2))
    assert len(train) == 40 // 2 // P and all(b.features.shape == (P * K, 100, 3) for b in train)
    sessions = sum(len(b.labels) for b in SessionLoader(str(tmp_path), "val", rank=0, world_size=1))
    assert sessions == sum(s.sessions for s in manifest.shards_of("val"))
