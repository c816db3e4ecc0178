"""``eerpipe job``: training runs submitted to a real Ray head on 127.0.0.1 with token auth.

One head per module (``ray start --head --block`` with the dashboard and job server, stopped
by signalling that process only: ``ray stop`` would also stop other Ray clusters on the
machine). The CLI runs as a subprocess, as a user runs it; the job API is also read directly
with the cluster's token to check what Ray stored.

A job is some 20 s of process start-ups (its driver, Ray Train's controller, the worker) on
one core: the job that resumes run ``tiny`` runs in the background, while the tests between
run ``tiny``'s first job and the resume test (the module's last) run on the other core.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from jobs.submission import CONFIG_KEY, PACKAGES, PASS_THROUGH, RESUMED_KEY, RUN_KEY, job_request
from pipeline.cli import app
from pipeline.cluster import arm_run_name, check_run_name
from pipeline.config import TrainConfig
from tests.loopback import free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = ["train.num_workers=1", "train.log_every=1", "wandb.enabled=false"]
SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIA-submitter-key-id-0001",
    "AWS_SECRET_ACCESS_KEY": "submitter-secret-access-key-0002",
    "AWS_SESSION_TOKEN": "submitter-session-token-0003",
    "WANDB_API_KEY": "submitter-wandb-api-key-0004",
}
SETTINGS = {"AWS_REGION": "eu-west-3", "WANDB_PROJECT": "eerpipe-jobs-test"}


@dataclass
class Background:
    """A command running in the background."""

    process: subprocess.Popen
    output: Path  # its stdout and stderr files

    def result(self, timeout_s: float = 300) -> subprocess.CompletedProcess:
        """Its outcome, once it has ended."""
        self.process.wait(timeout=timeout_s)
        return subprocess.CompletedProcess(self.process.args, self.process.returncode,
                                           (self.output / "stdout").read_text(), (self.output / "stderr").read_text())

    def stop(self) -> None:
        """Kill it if it still runs (a job it submitted ends with the cluster)."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


@dataclass
class Cluster:
    address: str  # the job API, http://127.0.0.1:PORT
    client_address: str  # Ray Client, ray://127.0.0.1:PORT
    token: str
    root: Path  # scratch: shards, run storage

    def env(self, **extra: str) -> dict[str, str]:
        """A submitter's environment: the cluster's token, no address, no auth mode."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k not in SECRETS}
        env.update(RAY_AUTH_TOKEN=self.token, RAY_USAGE_STATS_ENABLED="0", **extra)
        return env

    def command(self, *args: str, address: bool = True) -> list[str]:
        return [str(BIN / "eerpipe"), "job", *args] + (["--address", self.address] if address else [])

    def eerpipe(self, *args: str, env: dict[str, str] | None = None,
                address: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(*args, address=address), env=env or self.env(), capture_output=True,
                              text=True, timeout=300)

    def eerpipe_in_background(self, *args: str) -> Background:
        """:meth:`eerpipe`, started; its output goes to files (a pipe nobody reads would fill)."""
        output = Path(tempfile.mkdtemp(prefix="background-", dir=self.root))
        with open(output / "stdout", "w") as stdout, open(output / "stderr", "w") as stderr:
            process = subprocess.Popen(self.command(*args), env=self.env(), stdout=stdout, stderr=stderr, text=True)
        return Background(process, output)

    def client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.address, headers={"Authorization": f"Bearer {self.token}"})


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    from sharding.writer import write_shards

    root = Path(tempfile.mkdtemp(prefix="eerjob-", dir="/tmp"))  # short: Ray's socket paths
    token = secrets.token_hex(16)
    dashboard, client_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(
        RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # node IP 127.0.0.1
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",  # stop at once on SIGTERM
        # a ray:// connection whose server died starting (ray-project/ray#63202; jobs.client
        # tries again) is given up on after 10 s, not 30 (one starts in about 2 s)
        RAY_CLIENT_SERVER_CHECK_CHANNEL_TIMEOUT_S="10",
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # the jobs' `eerpipe`
    )
    log = open(root / "head.log", "w")
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={free_port()}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={free_port()}",
         f"--ray-client-server-port={client_port}", "--num-cpus=2", f"--temp-dir={root / 'ray'}"],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    write_shards("synth:300:0", str(root / "shards"), subjects_per_shard=100, val_subjects=30, test_subjects=30)
    ready = Cluster(f"http://127.0.0.1:{dashboard}", f"ray://127.0.0.1:{client_port}", token, root)
    try:
        _wait_until_serving(ready, head)
        yield ready
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        log.close()
        shutil.rmtree(root, ignore_errors=True)


def _wait_until_serving(cluster: Cluster, head: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if head.poll() is not None:
            pytest.fail(f"ray start exited {head.returncode}:\n{(cluster.root / 'head.log').read_text()[-3000:]}")
        try:
            cluster.client().list_jobs()
            return
        except Exception:
            time.sleep(0.2)
    pytest.fail(f"no job API at {cluster.address} after {timeout_s} s")


def submit_args(cluster: Cluster, name: str, *overrides: str) -> list[str]:
    return ["submit", "--config", str(ROOT / "configs/cpu-local.yaml"), "--name", name,
            f"data.shards={cluster.root / 'shards'}", f"run.storage={cluster.root / 'runs'}", *TINY, *overrides]


@dataclass
class Submitted:
    result: subprocess.CompletedProcess
    submission_id: str
    info: dict


@dataclass
class TinyRun:
    first: Submitted  # its first job, ended
    resume: Background  # `eerpipe job resume tiny train.max_steps=5 --follow`


@pytest.fixture(scope="module")
def tiny_run(cluster: Cluster) -> Iterator[TinyRun]:
    """Run ``tiny``: 3 steps, submitted with secrets and settings in the submitter's environment
    and followed to their end; then resumed to 5 steps by a second job, in the background."""
    env = cluster.env(**SECRETS, **SETTINGS)
    result = cluster.eerpipe(*submit_args(cluster, "tiny", "train.max_steps=3"), "--follow", env=env)
    submission_id = result.stdout.split("submitted ", 1)[1].split()[0] if "submitted " in result.stdout else ""
    info = cluster.client().get_job_info(submission_id).model_dump() if submission_id else {}
    resume = cluster.eerpipe_in_background("resume", "tiny", "train.max_steps=5", "--follow")
    try:
        yield TinyRun(Submitted(result, submission_id, info), resume)
    finally:
        resume.stop()  # if the resume test did not wait for it


@pytest.fixture(scope="module")
def finished_run(tiny_run: TinyRun) -> Submitted:
    """Run ``tiny``'s first job."""
    return tiny_run.first


# ---------------------------------------------------------------------------------------------
# What a job is made of (no cluster)
# ---------------------------------------------------------------------------------------------
def test_a_job_runs_eerpipe_train_on_its_own_config_with_the_projects_code(tmp_path: Path) -> None:
    config = TrainConfig.load(ROOT / "configs/cpu-local.yaml", ["run.storage=/abs/runs"])
    request = job_request(config, str(tmp_path), environ={**SECRETS, **SETTINGS, "HOME": "/home/x"})

    assert shlex.split(request.entrypoint) == ["eerpipe", "train", "--config", "eerpipe-job.yaml"]
    assert request.runtime_env["working_dir"] == str(tmp_path)
    assert [Path(p).name for p in request.runtime_env["py_modules"]] == list(PACKAGES)
    assert TrainConfig.from_dict(yaml.safe_load(request.metadata[CONFIG_KEY])) == config
    assert request.metadata[RUN_KEY] == "cpu-local"
    assert request.submission_id.startswith("cpu-local-")


def test_only_non_secret_settings_travel_from_the_submitters_environment(tmp_path: Path) -> None:
    config = TrainConfig.load(ROOT / "configs/gpu.yaml")
    request = job_request(config, str(tmp_path), environ={**SECRETS, **SETTINGS, "AWS_ENDPOINT_URL": "http://s3.local"})

    assert request.runtime_env["env_vars"] == {
        **SETTINGS, "AWS_ENDPOINT_URL": "http://s3.local", "RAY_TRAIN_ENABLE_WORKER_STRUCTURED_LOGGING": "0",
    }
    assert not set(PASS_THROUGH) & set(SECRETS)
    assert not any(value in json.dumps(request.__dict__) for value in SECRETS.values())


def test_cpu_runs_ask_deepspeed_for_its_cpu_accelerator(tmp_path: Path) -> None:
    request = job_request(TrainConfig.load(ROOT / "configs/cpu-local.yaml"), str(tmp_path), environ={})
    assert request.runtime_env["env_vars"]["DS_ACCELERATOR"] == "cpu"


@pytest.mark.parametrize("env", [{}, {"RAY_ADDRESS": ""}])
def test_without_an_address_the_cli_says_how_to_give_one(env: dict[str, str]) -> None:
    result = CliRunner().invoke(app, ["job", "list"], env={"RAY_ADDRESS": None, "RAY_API_SERVER_ADDRESS": None, **env})
    assert result.exit_code == 1
    assert "no cluster address" in result.output and "--address" in result.output


def test_a_ray_client_connection_the_head_fails_to_start_is_retried_and_others_are_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ray-project/ray#63202: the head's per-connection server dies in fork about 1 time in 10."""
    from jobs import client, head

    attempts: list[str] = []

    def head_that_fails_twice(address: str, timeout_s: float) -> str:
        attempts.append(address)
        if len(attempts) <= 2:
            raise ConnectionAbortedError("Initialization failure from server: Starting Ray client server failed")
        return "connected"

    monkeypatch.setattr(head, "BoundedJobClient", head_that_fails_twice)
    monkeypatch.setattr(client.time, "sleep", lambda seconds: None)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    assert client.connect("ray://127.0.0.1:10001") == "connected" and len(attempts) == 3

    attempts.clear()
    with pytest.raises(client.JobError, match="cannot reach a Ray job API at http://127.0.0.1:8265"):
        client.connect("http://127.0.0.1:8265")
    assert len(attempts) == 1


# ---------------------------------------------------------------------------------------------
# Refused before the head is asked, or given up on in seconds (no cluster)
# ---------------------------------------------------------------------------------------------
CLOSED = "http://127.0.0.1:1"  # nothing listens: a command that got this far would say "cannot reach"


@pytest.mark.parametrize("name", ["   ", "", "../../etc", "runs/other", ".."])
def test_a_run_name_that_would_leave_run_storage_is_refused_naming_the_option(name: str) -> None:
    config = str(ROOT / "configs/cpu-local.yaml")
    result = CliRunner().invoke(app, ["job", "submit", "--config", config, "--name", name, "--address", CLOSED])
    assert result.exit_code == 1
    assert "--name must be a folder name" in result.stderr and repr(name) in result.stderr
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize("name", ["cpu-local", "kvc_desktop.v2", arm_run_name("eer+multisimilarity", "0123abcd")])
def test_the_names_eerpipe_gives_runs_pass_the_run_name_rule(name: str) -> None:
    assert check_run_name(name, "--name") == name


@contextmanager
def silent_head() -> Iterator[str]:
    """A port on 127.0.0.1 that takes connections (the kernel's backlog) and never answers, as
    a wedged head or a proxy holding the port does; closed when the block ends."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


def test_a_head_that_never_answers_fails_the_submission_in_seconds_naming_it() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(EERPIPE_HEAD_TIMEOUT_S="1", RAY_USAGE_STATS_ENABLED="0")
    with silent_head() as address:
        started = time.monotonic()
        result = subprocess.run(
            [str(BIN / "eerpipe"), "job", "submit", "--config", str(ROOT / "configs/cpu-local.yaml"),
             "--address", address], env=env, capture_output=True, text=True, timeout=60,
        )
    assert result.returncode == 1
    assert f"{address}: no answer from the Ray head within 1 s" in result.stderr
    assert result.stderr.count("\n") == 1
    assert time.monotonic() - started < 30


@pytest.mark.parametrize("value", ["soon", "0", "-5", "nan"])
def test_a_head_timeout_that_is_not_a_positive_number_is_refused_naming_the_variable(value: str) -> None:
    result = CliRunner().invoke(app, ["job", "list", "--address", CLOSED], env={"EERPIPE_HEAD_TIMEOUT_S": value})
    assert result.exit_code == 1
    assert f"EERPIPE_HEAD_TIMEOUT_S={value!r}: expected a positive number of seconds" in result.stderr


# ---------------------------------------------------------------------------------------------
# Against a real Ray head
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_submitted_run_trains_to_success_and_its_logs_are_readable(cluster: Cluster, finished_run: Submitted) -> None:
    assert finished_run.result.returncode == 0, finished_run.result.stderr + finished_run.result.stdout
    assert "step 3/3" in finished_run.result.stdout  # --follow streamed the job's output
    assert "status: SUCCEEDED" in finished_run.result.stderr
    assert (cluster.root / "runs/tiny/export/final/model.pt").is_file()

    logs = cluster.eerpipe("logs", finished_run.submission_id)
    assert logs.returncode == 0 and "step 3/3" in logs.stdout
    status = cluster.eerpipe("status", finished_run.submission_id)
    assert status.returncode == 0 and "SUCCEEDED" in status.stdout and "eerpipe train" in status.stdout
    listing = cluster.eerpipe("list")
    assert listing.returncode == 0 and finished_run.submission_id in listing.stdout


@pytest.mark.slow
def test_no_secret_of_the_submitter_reaches_the_job_table(cluster: Cluster, finished_run: Submitted) -> None:
    stored = json.dumps(finished_run.info, default=str)
    for value in [*SECRETS.values(), cluster.token]:
        assert value not in stored
    assert finished_run.info["runtime_env"]["env_vars"].items() >= SETTINGS.items()
    assert finished_run.info["metadata"][RUN_KEY] == "tiny"


@pytest.mark.slow
def test_a_failing_entrypoint_fails_the_command_with_the_jobs_error(cluster: Cluster) -> None:
    result = cluster.eerpipe(*submit_args(cluster, "broken", f"data.shards={cluster.root / 'missing'}"), "--wait")
    assert result.returncode == 1
    assert "FAILED" in result.stderr and "broken-" in result.stderr


@pytest.mark.slow
def test_relative_paths_are_refused_before_anything_is_submitted(cluster: Cluster) -> None:
    result = cluster.eerpipe(*submit_args(cluster, "relative", "run.storage=runs"))
    assert result.returncode == 1 and "run.storage='runs' is relative" in result.stderr
    assert not [job for job in cluster.client().list_jobs() if (job.metadata or {}).get(RUN_KEY) == "relative"]


@pytest.mark.slow
def test_unknown_jobs_and_wrong_addresses_are_clear_errors(cluster: Cluster) -> None:
    unknown = cluster.eerpipe("status", "no-such-run")
    assert unknown.returncode == 1 and "no job or run named 'no-such-run'" in unknown.stderr

    closed = f"http://127.0.0.1:{free_port()}"
    unreachable = cluster.eerpipe("list", "--address", closed, address=False)
    assert unreachable.returncode == 1 and f"cannot reach a Ray job API at {closed}" in unreachable.stderr

    wrong_token = cluster.eerpipe("list", env={**cluster.env(), "RAY_AUTH_TOKEN": "not-the-token"})
    assert wrong_token.returncode == 1 and "refused the token" in wrong_token.stderr


@pytest.mark.slow
def test_the_address_may_be_ray_client_or_come_from_RAY_ADDRESS(cluster: Cluster, finished_run: Submitted) -> None:
    via_client = cluster.eerpipe("status", "tiny", "--address", cluster.client_address, address=False)
    assert via_client.returncode == 0 and "tiny-" in via_client.stdout, via_client.stderr

    via_env = cluster.eerpipe("status", "tiny", env=cluster.env(RAY_ADDRESS=cluster.address), address=False)
    assert via_env.returncode == 0 and "tiny-" in via_env.stdout

    explicit_wins = cluster.eerpipe("list", env=cluster.env(RAY_ADDRESS="http://127.0.0.1:1"))
    assert explicit_wins.returncode == 0


@pytest.mark.slow
def test_a_running_job_can_be_stopped_and_its_run_cannot_be_doubled(cluster: Cluster) -> None:
    submitted = cluster.eerpipe(*submit_args(cluster, "long", "train.epochs=1000"))
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.split("submitted ", 1)[1].split()[0]

    doubled = cluster.eerpipe(*submit_args(cluster, "long", "train.epochs=1000"))
    assert doubled.returncode == 1 and f"already has job {job_id}" in doubled.stderr

    lock = cluster.root / "runs" / "long" / "_lock.json"
    deadline = time.monotonic() + 120
    while "step " not in cluster.client().get_job_logs(job_id) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert lock.exists()  # training, its run locked
    stopped = cluster.eerpipe("stop", "long", "--wait")
    assert stopped.returncode == 0 and f"stopping {job_id}" in stopped.stdout
    assert str(cluster.client().get_job_status(job_id)) == "STOPPED"
    assert not lock.exists()  # released on SIGTERM: resumable at once, not after the lease


@pytest.mark.slow  # last: the resume has run in the background since run tiny's first job ended
def test_resume_continues_the_run_from_its_checkpoint(cluster: Cluster, tiny_run: TinyRun) -> None:
    result = tiny_run.resume.result()

    assert result.returncode == 0, result.stderr + result.stdout
    assert "step 4/5" in result.stdout and "step 1/5" not in result.stdout
    resumed = cluster.client().get_job_info(result.stdout.split("submitted ", 1)[1].split()[0])
    assert resumed.metadata[RESUMED_KEY] == tiny_run.first.submission_id
    first = TrainConfig.from_dict(yaml.safe_load(tiny_run.first.info["metadata"][CONFIG_KEY]))
    second = TrainConfig.from_dict(yaml.safe_load(resumed.metadata[CONFIG_KEY]))
    first.train.max_steps = 5
    assert second == first

    logs = cluster.eerpipe("logs", "tiny")  # a run name finds its latest job
    assert logs.returncode == 0 and "step 5/5" in logs.stdout
