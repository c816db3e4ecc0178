"""Read back what a W&B offline run logged, from its ``run-<id>.wandb`` transaction log; and
make an offline relaunch resume as an online one does.

wandb 0.31 ships no reader: the file is a LevelDB-style log (32 KiB blocks; each record a
7-byte header — crc32, length, type — then a chunk of a serialised ``wandb_internal_pb2.Record``).
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from wandb.proto import wandb_internal_pb2

_BLOCK, _HEADER = 32768, 7
_WHOLE, _LAST = 1, 4


def records(path: Path) -> Iterator[wandb_internal_pb2.Record]:
    """Every whole record; a log copied while W&B was writing it may end inside one."""
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B transaction log")
    position, chunks = 7, []
    while position + _HEADER <= len(data):
        left_in_block = _BLOCK - position % _BLOCK
        if left_in_block < _HEADER:
            position += left_in_block
            continue
        crc, length, kind = struct.unpack("<IHB", data[position : position + _HEADER])
        if length == 0 and kind == 0:  # zero padding up to the block's end
            position += left_in_block
            continue
        payload = data[position + _HEADER : position + _HEADER + length]
        if len(payload) < length:  # the rest was not written yet
            return
        if zlib.crc32(bytes([kind]) + payload) & 0xFFFFFFFF != crc:
            raise ValueError(f"{path}: bad checksum at byte {position}")
        position += _HEADER + length
        chunks.append(payload)
        if kind in (_WHOLE, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            yield record


def history(path: Path) -> list[dict[str, Any]]:
    """Every ``run.log`` row: ``{key: value}``."""
    return [
        {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in record.history.item}
        for record in records(path)
        if record.WhichOneof("record_type") == "history"
    ]


def run_config(path: Path) -> dict[str, Any]:
    """The run's config as logged by ``wandb.init(config=...)``."""
    config: dict[str, Any] = {}
    for record in records(path):
        if record.WhichOneof("record_type") == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif record.WhichOneof("record_type") == "run":
            config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
    return config


def metric_axes(path: Path) -> dict[str, str]:
    """``define_metric``'s x-axes: ``{metric name or glob: its step metric}``."""
    return {
        record.metric.name or record.metric.glob_name: record.metric.step_metric
        for record in records(path)
        if record.WhichOneof("record_type") == "metric" and record.metric.step_metric
    }


def last_step(path: Path) -> int:
    """W&B's own step (``_step``) of the run's last row."""
    return max(row["_step"] for row in history(path))


def resume_as_online(monkeypatch: pytest.MonkeyPatch, after_step: int) -> None:
    """Make ``wandb.init(resume=...)`` resume as an online run would after ``after_step``.

    Offline W&B cannot resume (no server says where the run stopped): a relaunch would count
    from 0 and drop nothing. An online resume counts on from the run's last step + 1, and so
    does ``resume_from="<id>?_step=<after_step>"``, which works offline.
    """
    import wandb

    init = wandb.init

    def resumed_init(*args: Any, resume: str | None = None, **kwargs: Any) -> Any:
        return init(*args, resume_from=f"{kwargs['id']}?_step={after_step}", **kwargs)

    monkeypatch.setattr(wandb, "init", resumed_init)
