"""A W&B outage never costs a training run: an online run whose W&B server is down starts within
a bounded time and logs offline, and a run whose W&B service dies mid-run trains on without W&B;
each warns once, and no W&B process outlives the run.

The W&B server is a port on 127.0.0.1 that never answers or refuses connections; nothing leaves
the machine (wandb's error reporting is off, and no proxy is in the way).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

from pipeline.training.metrics_sink import MetricsSink
from pipeline.training.wandb_run import WandbRun
from tests.loopback import free_port, server_that_never_answers
from tests.test_wandb_cluster import API_KEY, config_of, logged_steps, metrics

INIT_TIMEOUT_S = 1  # WANDB_INIT_TIMEOUT here: the default would make each test wait 30 s
# wandb.init first asks the server twice who the key belongs to, waiting 5 s each time (wandb's
# constant, no setting): here 0.5 s
ACCOUNT_LOOKUP_S = 0.5
SLACK_S = 10  # a loaded machine
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


@pytest.fixture
def logged_in(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A W&B login (a dummy key) whose requests can only reach 127.0.0.1; short waits for the server."""
    monkeypatch.setenv("WANDB_API_KEY", API_KEY)
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", str(INIT_TIMEOUT_S))
    monkeypatch.setattr("wandb.sdk.lib.identity._RESOLVE_TIMEOUT_SECONDS", ACCOUNT_LOOKUP_S)
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")  # wandb-core reports its errors to W&B's Sentry otherwise
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    for name in ("WANDB_MODE", "WANDB_IDENTITY_TOKEN_FILE", *PROXY_VARIABLES):
        monkeypatch.delenv(name, raising=False)


@contextmanager
def port_that_refuses_connections() -> Iterator[str]:
    yield f"http://127.0.0.1:{free_port()}"


def wandb_processes() -> list[psutil.Process]:
    """This process's W&B service (``wandb-core``) and the system monitor it starts (``wandb-symon``)."""
    return [process for process in psutil.Process().children(recursive=True) if process.name().startswith("wandb-")]


def left_running(processes: list[psutil.Process]) -> list[psutil.Process]:
    """Those of ``processes`` still running after up to 10 s: a ``wandb-symon`` ends a moment after
    its ``wandb-core``."""
    return psutil.wait_procs(processes, timeout=10)[1]


@pytest.mark.usefixtures("logged_in")
@pytest.mark.parametrize("down_server", [server_that_never_answers, port_that_refuses_connections],
                         ids=["never answers", "refuses connections"])
def test_an_online_run_whose_w_and_b_server_is_down_starts_in_bounded_time_warns_once_and_logs_offline(
    tmp_path, monkeypatch, down_server
):
    config = config_of(str(tmp_path), "outage", "wandb.mode=online")
    folder = Path(config.run_dir, "wandb")
    with down_server() as server, warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        monkeypatch.setenv("WANDB_BASE_URL", server)
        started = time.monotonic()
        sink = MetricsSink(config, rank=0)
        took = time.monotonic() - started
        processes = wandb_processes()
        for step in range(1, 4):
            sink.log(metrics(step), step)
        sink.finish()
    assert took < INIT_TIMEOUT_S + 2 * ACCOUNT_LOOKUP_S + SLACK_S
    notices = [str(warning.message) for warning in warned if "W&B" in str(warning.message)]
    assert len(notices) == 1 and notices[0].startswith(f"W&B: could not start the run on {server} (CommError: ")
    assert notices[0].endswith(f"logs this run offline to {folder}; upload it later with `wandb sync {folder}`")
    (log,) = folder.glob("offline-run-*/run-*.wandb")
    assert logged_steps(log) == [1, 2, 3]
    assert not left_running(processes) and not wandb_processes()


@pytest.mark.parametrize("rows_after", [3, 0], ids=["then logs", "then finishes"])
def test_a_run_whose_w_and_b_service_dies_mid_run_warns_once_and_trains_on_without_w_and_b(tmp_path, rows_after):
    config = config_of(str(tmp_path), "service-dies", "wandb.mode=offline")
    sink = MetricsSink(config, rank=0)
    sink.log(metrics(1), 1)
    for process in wandb_processes():  # W&B's service and its monitor die (say, killed for memory)
        process.kill()
        process.wait()
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        for step in range(2, 2 + rows_after):
            sink.log(metrics(step), step)
        sink.finish()
    notices = [str(warning.message) for warning in warned if "W&B" in str(warning.message)]
    assert len(notices) == 1 and notices[0].startswith("W&B failed (ConnectionResetError: ")
    assert notices[0].endswith(f"is in {Path(config.run_dir, 'wandb')}")
    assert sink.wandb is not None and sink.wandb.run is None
    assert not wandb_processes()  # none started again


class InitCalled(Exception):
    """Raised by a stand-in ``wandb.init`` with the settings it was given."""


@pytest.mark.parametrize(("variable", "timeout"), [(None, 30.0), ("7.5", 7.5)])
def test_wandb_init_waits_for_the_server_as_long_as_wandb_init_timeout_says_else_30_s(tmp_path, monkeypatch,
                                                                                      variable, timeout):
    def init(**kwargs: object) -> None:
        raise InitCalled(kwargs["settings"])

    monkeypatch.setattr("wandb.init", init)
    if variable is None:
        monkeypatch.delenv("WANDB_INIT_TIMEOUT", raising=False)
    else:
        monkeypatch.setenv("WANDB_INIT_TIMEOUT", variable)
    with pytest.raises(InitCalled) as called:
        WandbRun(config_of(str(tmp_path), "timeout", "wandb.mode=offline"))
    assert called.value.args[0].init_timeout == timeout


@pytest.mark.parametrize("value", ["abc", "0", "-3", "inf"])
def test_a_wandb_init_timeout_that_is_not_a_positive_number_is_refused_on_the_driver(tmp_path, monkeypatch, value):
    from pipeline.training.wandb_run import check_wandb

    monkeypatch.setenv("WANDB_INIT_TIMEOUT", value)
    with pytest.raises(ValueError, match=f"WANDB_INIT_TIMEOUT must be a positive number of seconds, got '{value}'"):
        check_wandb(config_of(str(tmp_path), "bad-timeout", "wandb.mode=offline"))
