"""Rank 0's W&B run: its mode, where its files go, and logging that survives a relaunch.

Rows carry the training step as the metric ``step``, the x-axis of every other metric
(``define_metric``), and are logged without W&B's own ``step=``: a relaunch resumes the W&B run
after the last step it logged, and W&B drops every row logged with a lower ``step=``, so the
steps between the last checkpoint and the death of a run would be lost for good.

W&B's files go to ``{wandb.dir or run_dir}/wandb``. W&B writes to a local disk only, so for a
remote folder (``s3://``) it writes to a local temporary one, whose new and changed files rank 0
copies to the remote folder at each checkpoint and at the end. A pod's death then loses the rows
logged after the last checkpoint and, before it, those W&B had not yet written out: while a run
lives, its transaction log grows by whole 32 KiB blocks (tens of rows).

W&B never costs the training: an online run whose ``wandb.init`` fails (a W&B server that does not
answer within ``WANDB_INIT_TIMEOUT`` seconds, refuses the connection, or rejects the key) logs
offline into the same folder instead, and a run whose W&B service fails mid-run goes on without
W&B; each warns once.
"""

from __future__ import annotations

import contextlib
import math
import os
import shlex
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pipeline.config import TrainConfig

if TYPE_CHECKING:
    from wandb import Run

    from pipeline.training.state import StageContext

INIT_TIMEOUT_VARIABLE = "WANDB_INIT_TIMEOUT"  # wandb's own variable for its ``init_timeout`` setting
# W&B's default is 90 s. A healthy server starts a run in a few seconds; during an outage every
# launch of a run waits this long (plus wandb's two account lookups, 5 s each) before logging
# offline, while the other ranks wait for rank 0 at their first collective.
DEFAULT_INIT_TIMEOUT_S = 30.0


def check_wandb(config: TrainConfig) -> str | None:
    """The driver's W&B check, before launch: ``wandb.mode=online`` without a login is refused
    (rank 0 would fail only once Ray has started); ``auto`` without one returns the notice to show
    once, since that run reaches W&B only when someone syncs its files."""
    mode = config.wandb.mode
    if config.wandb.enabled and mode != "disabled":
        init_timeout()  # a bad value would fail rank 0 twice (online, then the offline fallback)
    if not config.wandb.enabled or mode in ("offline", "disabled") or has_wandb_login():
        return None
    if mode == "online":
        raise ValueError(
            "wandb.mode=online needs a W&B login: set WANDB_API_KEY (or run `wandb login`), "
            "or use wandb.mode=auto or offline"
        )
    return f"W&B: no login (WANDB_API_KEY or `wandb login`), so wandb.mode=auto {_logs_offline(wandb_folder(config))}"


def init_timeout() -> float:
    """Seconds ``wandb.init`` waits for the server: ``WANDB_INIT_TIMEOUT``, else 30; read here,
    since a setting passed to ``wandb.init`` outranks the variable."""
    text = os.environ.get(INIT_TIMEOUT_VARIABLE, str(DEFAULT_INIT_TIMEOUT_S))
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not seconds > 0 or math.isinf(seconds):
        raise ValueError(f"{INIT_TIMEOUT_VARIABLE} must be a positive number of seconds, got {text!r}")
    return seconds


def has_wandb_login() -> bool:
    """Whether ``wandb.init`` finds credentials without asking, where wandb 0.31 looks:
    ``WANDB_API_KEY``, ``WANDB_IDENTITY_TOKEN_FILE``, or a ``wandb login`` entry in the netrc
    file for the W&B server (``WANDB_BASE_URL``, else W&B's default)."""
    from wandb.sdk.lib.wbauth import read_netrc_auth

    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    return read_netrc_auth(host=wandb_server()) is not None


def wandb_server() -> str:
    """The W&B server an online run talks to: ``WANDB_BASE_URL``, else W&B's default."""
    import wandb

    return os.environ.get("WANDB_BASE_URL") or wandb.Settings().base_url


def wandb_mode(config: TrainConfig) -> Literal["online", "offline", "disabled"]:
    """``wandb.mode`` with ``auto`` decided: online when W&B has a login, else offline."""
    if config.wandb.mode != "auto":
        return config.wandb.mode
    return "online" if has_wandb_login() else "offline"


def wandb_folder(config: TrainConfig) -> str:
    """Where a run's W&B files end up, local or remote: ``{wandb.dir or run_dir}/wandb``."""
    return f"{config.wandb.dir or config.run_dir}/wandb"


def _logs_offline(folder: str) -> str:
    """The end of a notice that a run logs offline: where its files go and how to upload them."""
    return f"logs this run offline to {folder}; upload it later with {_sync_command(folder)}"


def _sync_command(folder: str) -> str:
    """How to upload offline runs: ``wandb sync`` reads local folders only."""
    if "://" not in folder:
        return f"`wandb sync {shlex.quote(folder)}`"
    local = shlex.quote(f"wandb-{Path(folder).parent.name}")
    return f"`aws s3 cp --recursive {shlex.quote(folder)} {local}` (or any S3 client), then `wandb sync {local}`"


class WandbRun:
    """The W&B run of rank 0, continued by every relaunch of the run (its id follows the run's
    storage and name) and, for a stage of a staged run, by every stage (the id, name and config
    are the staged run's). ``run`` is None once W&B has failed mid-run."""

    def __init__(self, config: TrainConfig, stage: StageContext | None = None) -> None:
        self.stage = stage
        self.folder = wandb_folder(config)
        remote = "://" in self.folder
        # W&B's ``dir``: it writes into ``{dir}/wandb``
        self.init_dir = Path(tempfile.mkdtemp(prefix="eerpipe-wandb-") if remote else Path(self.folder).parent)
        self.init_dir.mkdir(parents=True, exist_ok=True)
        self.mirror = FolderMirror(self.init_dir / "wandb", self.folder) if remote else None
        self.run: Run | None = self._start(config)
        try:
            self.run.define_metric("step")
            self.run.define_metric("*", step_metric="step")
        except Exception as error:  # noqa: BLE001 - any W&B failure: monitoring must not stop training
            self._lose_wandb(error)

    def _start(self, config: TrainConfig) -> Run:
        """The run in ``wandb.mode``; an online run that cannot start (the server does not answer
        in time, refuses the connection or rejects the key) warns and starts offline instead. The
        failed attempt leaves a ``run-*`` folder of logs beside the offline run, which
        ``wandb sync`` skips."""
        from pipeline.exports import first_line

        mode = wandb_mode(config)
        try:
            return self._init(config, mode)
        except Exception as error:  # noqa: BLE001 - any failure to go online: monitoring must not stop training
            if mode != "online":
                raise
            warnings.warn(f"W&B: could not start the run on {wandb_server()} ({first_line(error)}), so rank 0 "
                          f"{_logs_offline(self.folder)}", stacklevel=3)
            _teardown_wandb()  # W&B's service holds the failed run's id until it stops
            return self._init(config, "offline")

    def _init(self, config: TrainConfig, mode: Literal["online", "offline", "disabled"]) -> Run:
        """``wandb.init`` of the run (of the staged run, for a stage), waiting :func:`init_timeout`
        for the server."""
        import wandb

        from pipeline.cluster import wandb_run_id

        timeout = init_timeout()
        stage = self.stage
        name, storage = (stage.run_name, stage.run_storage) if stage else (config.run.name, config.run.storage)
        return wandb.init(
            project=config.wandb.project, name=name, id=wandb_run_id(storage, name), resume="allow", mode=mode,
            dir=str(self.init_dir), config=stage.config if stage else config.to_dict(),
            settings=wandb.Settings(init_timeout=timeout),
        )

    def log(self, row: dict[str, Any]) -> None:
        """One row; its ``step`` is the training step. Logging only queues the row for W&B's
        service process, which uploads it: an unreachable server never fails it, a dead service
        process does."""
        if self.run is None:
            return
        try:
            self.run.log(row)
        except Exception as error:  # noqa: BLE001 - any W&B failure: monitoring must not stop training
            self._lose_wandb(error)

    def _lose_wandb(self, error: Exception) -> None:
        """Training goes on without W&B, after one warning; what W&B wrote so far stays in the folder."""
        from pipeline.exports import first_line

        warnings.warn(f"W&B failed ({first_line(error)}); the run goes on without it, and what it logged so far "
                      f"is in {self.folder}", stacklevel=3)
        self.run = None
        _teardown_wandb()

    def copy_to_storage(self) -> bool:
        """What W&B has written so far reaches a remote folder (a local one has it already).
        A failed copy warns and training goes on: the next copy takes the files again. Returns
        whether the copy succeeded."""
        from pipeline.exports import first_line

        if self.mirror is None:
            return True
        try:
            self.mirror.copy_changed()
        except Exception as error:  # noqa: BLE001 - any storage error: monitoring must not stop training
            warnings.warn(f"W&B files not copied to {self.folder}, they stay in {self.mirror.local} for now: "
                          f"{first_line(error)}", stacklevel=2)
            return False
        return True

    def finish(self) -> None:
        """End the run and copy its files a last time; ``teardown`` waits for W&B to write its last
        records, which ``finish`` does not. A local copy that failed to reach the storage is kept."""
        import wandb

        if self.run is not None:
            try:
                self.run.finish()
                wandb.teardown()
            except Exception as error:  # noqa: BLE001 - any W&B failure: monitoring must not stop training
                self._lose_wandb(error)
        if self.mirror is not None and self.copy_to_storage():
            shutil.rmtree(self.init_dir, ignore_errors=True)


def _teardown_wandb() -> None:
    """Stop W&B's service process, so that the next ``wandb.init`` starts afresh; wandb forgets the
    old one even when stopping it fails (it raises when the process has died)."""
    import wandb

    with contextlib.suppress(Exception):
        wandb.teardown()


class FolderMirror:
    """Copies a local folder's new and changed files into a folder at any fsspec URL, each file
    whole (``common.atomic.write_atomic``: one upload on S3), so a reader never sees half a file."""

    def __init__(self, local: Path, url: str) -> None:
        self.local, self.url = local, url.rstrip("/")
        self.copied: dict[Path, tuple[int, int]] = {}  # file → (size, mtime) when last copied

    def copy_changed(self) -> None:
        from common.atomic import write_atomic
        from sharding.storage import open_fs

        fs, root = open_fs(self.url)
        for path in self._files():
            try:
                stat = path.stat()  # before reading: a write after it is copied next time
                version = (stat.st_size, stat.st_mtime_ns)
                if self.copied.get(path) == version:
                    continue
                data = path.read_bytes()
            except FileNotFoundError:  # W&B removed it meanwhile
                continue
            write_atomic(fs, f"{root}/{path.relative_to(self.local).as_posix()}", data)
            self.copied[path] = version

    def _files(self) -> list[Path]:
        """Regular files: W&B's links (``latest-run``, ``debug.log``) point into run folders that
        are copied themselves."""
        return sorted(path for path in self.local.rglob("*") if path.is_file() and not path.is_symlink())
