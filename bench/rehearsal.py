"""``make rehearsal``: the mission's sizes end to end on one machine (a benchmark, not a test).

KVC-onGoing desktop has 115,120 development and 15,000 evaluation users. The synthetic generator
at those sizes runs the whole pipeline, each stage as the user types it:

1. ``eerpipe shard --source synth:N`` → WebDataset shards on an S3 endpoint (a moto server this
   script starts on 127.0.0.1 and stops);
2. ``eerpipe synth --no-dev-set`` → the evaluation users' KVC files, with KVC's comparison list
   (50 genuine and 50 impostor comparisons per user);
3. ``eerpipe train`` on 2 workers streaming from S3 at a GPU-sized batch per rank (P = 128
   subjects × 8 sessions), validated and checkpointed three times, killed (the whole process
   group, as a lost machine) after its first checkpoint, then relaunched to its end;
4. ``eerpipe evaluate`` on the test users under both protocols;
5. ``eerpipe predict`` → the submission for the evaluation users.

Each stage prints a row: wall time, the peak resident memory of its largest process and of
the command's own process, the bytes its processes read and wrote (``read_chars`` /
``write_chars``: files, pipes and sockets, S3 traffic included, sampled every 0.5 s), and the
files it left (objects on S3 or files on disk). Scale the step count, not the corpus:
``REHEARSAL_STEPS`` (default 300); ``REHEARSAL_SUBJECTS`` and ``REHEARSAL_EVAL_SUBJECTS`` set a
smaller corpus (docs/scale.md reads the rehearsal at two sizes). Work lands in
``rehearsal-out/`` (``REHEARSAL_OUT``), the table also in its ``rehearsal.json``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from common.loopback import free_port

BUCKET = "rehearsal"
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "cpu-local.yaml"
EERPIPE = [sys.executable, "-m", "pipeline.cli"]


@dataclass
class Row:
    stage: str
    wall_s: float
    peak_rss_mb: float  # the stage's largest process
    command_rss_mb: float  # the command's own process (the driver)
    processes: int
    read_mb: float
    written_mb: float
    files: int
    files_mb: float


class Sampled:
    """A command's process tree, sampled every 0.5 s until it ends: peak RSS and I/O per process."""

    def __init__(self, command: list[str], env: dict[str, str]) -> None:
        self.process = subprocess.Popen(command, env=env, start_new_session=True)
        self.root = psutil.Process(self.process.pid)
        self.rss: dict[int, int] = {}
        self.io: dict[int, tuple[int, int]] = {}

    def poll(self) -> bool:
        """Sample once; whether the command still runs."""
        for process in [self.root, *self._children()]:
            try:
                with process.oneshot():
                    self.rss[process.pid] = max(self.rss.get(process.pid, 0), process.memory_info().rss)
                    counters = process.io_counters()
                    self.io[process.pid] = (counters.read_chars, counters.write_chars)
            except psutil.Error:
                continue
        return self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL the command's whole process group: a machine lost, nothing cleaned up."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def _children(self) -> list[psutil.Process]:
        try:
            return self.root.children(recursive=True)
        except psutil.Error:
            return []


def run_stage(name: str, command: list[str], env: dict[str, str], outputs: Any,
              kill_when: Any = None) -> Row:
    """Run ``command`` to its end (or kill it once ``kill_when()`` holds) and measure it."""
    started = time.perf_counter()
    sampled = Sampled(command, env)
    while sampled.poll():
        if kill_when is not None and kill_when():
            sampled.kill()
            break
        time.sleep(0.5)
    if kill_when is None and sampled.process.returncode:
        raise SystemExit(f"rehearsal: {name} failed (exit {sampled.process.returncode}): {' '.join(command)}")
    files, size = outputs()
    mb = 1 / 2**20
    return Row(name, time.perf_counter() - started, max(sampled.rss.values()) * mb,
               sampled.rss.get(sampled.process.pid, 0) * mb, len(sampled.rss),
               sum(read for read, _ in sampled.io.values()) * mb,
               sum(written for _, written in sampled.io.values()) * mb, files, size * mb)


def s3_files(url: str) -> Any:
    """Objects and bytes under ``url``, counted after the stage."""
    def count() -> tuple[int, int]:
        from sharding.storage import open_fs

        fs, root = open_fs(url)
        fs.invalidate_cache()
        sizes = [info["size"] for info in fs.find(root, detail=True).values()] if fs.exists(root) else []
        return len(sizes), sum(sizes)
    return count


def local_files(folder: Path) -> Any:
    def count() -> tuple[int, int]:
        sizes = [path.stat().st_size for path in folder.rglob("*") if path.is_file()]
        return len(sizes), sum(sizes)
    return count


def checkpoint_written(run_url: str) -> Any:
    """Whether a checkpoint of the run is on S3 (the kill waits for one)."""
    def written() -> bool:
        from sharding.storage import open_fs

        fs, root = open_fs(run_url)
        fs.invalidate_cache()
        return bool(fs.glob(f"{root}/checkpoint_*/step*"))
    return written


def moto_server(env: dict[str, str]) -> subprocess.Popen[bytes]:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="rehearsal",
               AWS_SECRET_ACCESS_KEY="rehearsal", AWS_DEFAULT_REGION="us-east-1")
    os.environ.update(env)
    import boto3

    for _ in range(100):
        try:
            boto3.client("s3").create_bucket(Bucket=BUCKET)
            return server
        except Exception:  # noqa: BLE001 - the server is still starting
            time.sleep(0.2)
    raise SystemExit("rehearsal: the moto S3 server did not start")


def stages(out: Path, subjects: int, evaluation: int, steps: int) -> list[tuple[str, list[str], Any, Any]]:
    """Each stage's name, command, output counter and (for the killed launch) kill condition."""
    shards, runs = f"s3://{BUCKET}/shards", f"s3://{BUCKET}/runs"
    every = max(1, steps // 3)
    train = [*EERPIPE, "train", "-c", str(CONFIG), f"data.shards={shards}", f"run.storage={runs}",
             "run.name=rehearsal", "data.subjects_per_batch=128", f"train.steps={steps}", f"train.val_every={every}",
             f"train.checkpoint_every={every}", "train.log_every=10", "wandb.mode=offline"]
    model = f"{runs}/rehearsal"
    return [
        ("shard", [*EERPIPE, "shard", "--source", f"synth:{subjects}:0", "--out", shards, "--workers", "2"],
         s3_files(shards), None),
        ("evaluation set", [*EERPIPE, "synth", "--out", str(out / "kvc"), "--subjects", str(subjects),
                            "--test-subjects", str(evaluation), "--no-dev-set"], local_files(out / "kvc"), None),
        ("train, killed after a checkpoint", train, s3_files(runs), checkpoint_written(model)),
        ("train, relaunched to the end", train, s3_files(runs), None),
        *[(f"evaluate, {protocol}", [*EERPIPE, "evaluate", "--checkpoint", model, "--shards", shards,
                                     "--protocol", protocol, "--out", str(out / f"evaluate-{protocol}"), "--quiet"],
           local_files(out / f"evaluate-{protocol}"), None) for protocol in ("session", "kvc")],
        ("predict", [*EERPIPE, "predict", "--checkpoint", model, "--kvc", str(out / "kvc"), "--scenario", "desktop",
                     "--out", str(out / "submission")], local_files(out / "submission"), None),
    ]


def markdown(rows: list[Row]) -> str:
    lines = ["| stage | wall s | peak RSS, largest process MB | peak RSS, command MB | processes | read MB "
             "| written MB | files | files MB |", "|:--|" + "--:|" * 8]
    lines += [f"| {r.stage} | {r.wall_s:.0f} | {r.peak_rss_mb:.0f} | {r.command_rss_mb:.0f} | {r.processes} | "
              f"{r.read_mb:.0f} | {r.written_mb:.0f} | {r.files} | {r.files_mb:.1f} |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    subjects = int(os.environ.get("REHEARSAL_SUBJECTS", 115_120))
    evaluation = int(os.environ.get("REHEARSAL_EVAL_SUBJECTS", 15_000))
    steps = int(os.environ.get("REHEARSAL_STEPS", 300))
    out = Path(os.environ.get("REHEARSAL_OUT", "rehearsal-out")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    server = moto_server(env)
    rows: list[Row] = []
    started = time.perf_counter()
    print(f"rehearsal: {subjects:,} development and {evaluation:,} evaluation subjects, {steps} steps → {out}",
          flush=True)
    try:
        for name, command, outputs, kill_when in stages(out, subjects, evaluation, steps):
            rows.append(run_stage(name, command, env, outputs, kill_when))
            print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    finally:
        server.terminate()
        server.wait()
    print(f"\n{markdown(rows)}\n\ntotal {(time.perf_counter() - started) / 60:.1f} min")
    (out / "rehearsal.json").write_text(json.dumps({"subjects": subjects, "evaluation_subjects": evaluation,
                                                    "steps": steps, "rows": [asdict(row) for row in rows]}, indent=2))


if __name__ == "__main__":
    main()
