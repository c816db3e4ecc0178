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
"""

from __future__ import annotations

import os
import shlex
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from pipeline.config import TrainConfig


def check_wandb(config: TrainConfig) -> str | None:
    """The driver's W&B check, before launch: ``wandb.mode=online`` without a login is refused
    (rank 0 would fail only once Ray has started); ``auto`` without one returns the notice to show
    once, since that run reaches W&B only when someone syncs its files."""
    mode = config.wandb.mode
    if not config.wandb.enabled or mode in ("offline", "disabled") or has_wandb_login():
        return None
    if mode == "online":
        raise ValueError(
            "wandb.mode=online needs a W&B login: set WANDB_API_KEY (or run `wandb login`), "
            "or use wandb.mode=auto or offline"
        )
    folder = wandb_folder(config)
    return (
        f"W&B: no login (WANDB_API_KEY or `wandb login`), so wandb.mode=auto logs this run offline "
        f"to {folder}; upload it later with {_sync_command(folder)}"
    )


def has_wandb_login() -> bool:
    """Whether ``wandb.init`` finds credentials without asking, where wandb 0.31 looks:
    ``WANDB_API_KEY``, ``WANDB_IDENTITY_TOKEN_FILE``, or a ``wandb login`` entry in the netrc
    file for the W&B server (``WANDB_BASE_URL``, else W&B's default)."""
    import wandb
    from wandb.sdk.lib.wbauth import read_netrc_auth

    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    server = os.environ.get("WANDB_BASE_URL") or wandb.Settings().base_url
    return read_netrc_auth(host=server) is not None


def wandb_mode(config: TrainConfig) -> str:
    """``wandb.mode`` with ``auto`` decided: online when W&B has a login, else offline."""
    if config.wandb.mode != "auto":
        return config.wandb.mode
    return "online" if has_wandb_login() else "offline"


def wandb_folder(config: TrainConfig) -> str:
    """Where a run's W&B files end up, local or remote: ``{wandb.dir or run_dir}/wandb``."""
    return f"{config.wandb.dir or config.run_dir}/wandb"


def _sync_command(folder: str) -> str:
    """How to upload offline runs: ``wandb sync`` reads local folders only."""
    if "://" not in folder:
        return f"`wandb sync {shlex.quote(folder)}`"
    local = shlex.quote(f"wandb-{Path(folder).parent.name}")
    return f"`aws s3 cp --recursive {shlex.quote(folder)} {local}` (or any S3 client), then `wandb sync {local}`"


class WandbRun:
    """The W&B run of rank 0, continued by every relaunch of the run (its id follows the run's
    storage and name)."""

    def __init__(self, config: TrainConfig) -> None:
        import wandb

        from pipeline.cluster import wandb_run_id

        self.folder = wandb_folder(config)
        remote = "://" in self.folder
        # W&B's ``dir``: it writes into ``{dir}/wandb``
        self.init_dir = Path(tempfile.mkdtemp(prefix="eerpipe-wandb-") if remote else Path(self.folder).parent)
        self.init_dir.mkdir(parents=True, exist_ok=True)
        self.mirror = FolderMirror(self.init_dir / "wandb", self.folder) if remote else None
        self.run = wandb.init(
            project=config.wandb.project, name=config.run.name, id=wandb_run_id(config.run.storage, config.run.name),
            resume="allow", mode=wandb_mode(config), dir=str(self.init_dir), config=config.to_dict(),
        )
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def log(self, row: dict[str, Any]) -> None:
        """One row; its ``step`` is the training step."""
        self.run.log(row)

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

        self.run.finish()
        wandb.teardown()
        if self.mirror is not None and self.copy_to_storage():
            shutil.rmtree(self.init_dir, ignore_errors=True)


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
