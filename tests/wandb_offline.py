"""Read back what a W&B offline run logged, from its ``run-<id>.wandb`` transaction log.

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

from wandb.proto import wandb_internal_pb2

_BLOCK, _HEADER = 32768, 7
_WHOLE, _LAST = 1, 4


def records(path: Path) -> Iterator[wandb_internal_pb2.Record]:
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
