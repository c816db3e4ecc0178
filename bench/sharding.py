"""Throughput of the synthetic corpus and of sharding, projected to the full KVC dev set.

    python -m bench.sharding

Target (issue 4): the full dev-set size, 115,120 desktop + 40,639 mobile = 155,759 subjects,
synthesised and sharded in <= 10 minutes on 2 cores. Reference measured in the same run: the
bare cost of the shard format (``encode_subject`` + ``TarWriter`` in memory, no validation,
no storage), so the ratio column shows what the writer adds on top of the format itself.
"""

from __future__ import annotations

import io
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
from webdataset import TarWriter

from sharding.format import encode_subject
from sharding.synth import SynthCorpus, write_kvc
from sharding.writer import write_shards

SUBJECTS = 3_000
PER_SHARD = 500
FULL_DEV_SET = 115_120 + 40_639
TARGET_S = 600.0


def _cpu_seconds() -> float:
    """CPU time of this process and its reaped children (the shard workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _timed(fn) -> tuple[float, float, object]:
    wall, cpu = time.perf_counter(), _cpu_seconds()
    result = fn()
    return time.perf_counter() - wall, _cpu_seconds() - cpu, result


def main() -> None:
    corpus = SynthCorpus(seed=0)
    corpus.subject(0)  # build the shared sentence pool and styles outside the timings
    generate_s, generate_cpu, subjects = _timed(
        lambda: [corpus.subject(i) for i in range(SUBJECTS)])

    def format_only() -> int:
        buffer = io.BytesIO()
        with TarWriter(buffer, encoder=False, mtime=0) as tar:
            for i, sessions in enumerate(subjects):
                tar.write(encode_subject(corpus.subject_id(i), sessions))
        return len(buffer.getvalue())

    reference_s, _, _ = _timed(format_only)
    # (stage, processes, wall s, cpu s, shard bytes)
    rows = [("synth: generate subjects", 1, generate_s, generate_cpu, None)]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        synth_s, synth_cpu, _ = _timed(
            lambda: write_kvc(root / "kvc", subjects=SUBJECTS, test_subjects=2))
        rows.append(("eerpipe synth: write KVC files", 1, synth_s, synth_cpu, None))
        for number, (label, spec, workers) in enumerate((
                ("shard --source synth:", f"synth:{SUBJECTS}", 1),
                ("shard --source synth:", f"synth:{SUBJECTS}", 2),
                ("shard --source kvc:", f"kvc:{root / 'kvc'}", 2))):
            seconds, cpu, manifest = _timed(lambda spec=spec, number=number, workers=workers: write_shards(
                spec, str(root / f"out-{number}"), subjects_per_shard=PER_SHARD, workers=workers))
            rows.append((label, workers, seconds, cpu, sum(s.bytes for s in manifest.shards)))

    scale = FULL_DEV_SET / SUBJECTS
    print(f"\nsharding benchmark: {SUBJECTS:,} synthetic desktop subjects, {PER_SHARD} per shard, "
          f"local folder; reference = shard format only, in memory ({reference_s:.2f} s)")
    print("projections to 155,759 subjects: 'wall' scales this run's wall time (inflated when the "
          "machine is shared); '2 cores' = CPU time / min(processes, 2), i.e. two dedicated cores")
    print(f"{'stage':<32}{'procs':>6}{'wall s':>8}{'cpu s':>8}{'subj/s':>8}{'MB/s':>7}{'x ref':>7}"
          f"{'wall min':>10}{'2 cores min':>12}")
    projected = {}
    for label, procs, seconds, cpu, size in rows:
        mb = f"{size / seconds / 1e6:7.1f}" if size else f"{'':>7}"
        projected[(label, procs)] = cpu * scale / min(procs, 2) / 60
        print(f"{label:<32}{procs:>6}{seconds:8.2f}{cpu:8.2f}{SUBJECTS / seconds:8.0f}{mb}"
              f"{seconds / reference_s:7.1f}{seconds * scale / 60:10.1f}"
              f"{projected[(label, procs)]:12.1f}")
    direct = projected[("shard --source synth:", 2)]
    via_files = projected[("eerpipe synth: write KVC files", 1)] + projected[("shard --source kvc:", 2)]
    for label, minutes in (("shard --source synth:155759 --workers 2", direct),
                           ("eerpipe synth + shard --source kvc: --workers 2", via_files)):
        print(f"projected on 2 cores, {label}: {minutes:.1f} min = {minutes * 60 / TARGET_S:.2f} x "
              "the 10-minute target")
    sizes = np.array([s.bytes for s in manifest.shards]) / 1e6
    print(f"shard sizes (MB, {len(sizes)} shards of <= {PER_SHARD} subjects): min {sizes.min():.2f}"
          f" median {np.median(sizes):.2f} max {sizes.max():.2f}; "
          f"{sizes.sum() / SUBJECTS * 1e3:.1f} kB per subject")


if __name__ == "__main__":
    main()
