"""Exported models: the one layout, saving, finding and loading.

A training run exports to ``{storage}/{name}/export/{best,final}/model.pt`` (:func:`export_path`);
evaluation, prediction and fine-tuning find those files from whatever path a user gives
(:func:`find_export`). An export holds the weights and what is needed to rebuild and feed the
model (its features, ``max_len``, evaluation settings, and the precision its forward was
validated at, so evaluation scores what validation scored); it is plain tensors and builtins,
loaded with ``torch.load(weights_only=True)``, so a tampered file is refused, never executed.
"""

from __future__ import annotations

import io
from typing import Any, Literal

import torch
from torch import nn

from common.atomic import write_atomic
from pipeline.safe_load import UnsafeFileError, load_weights_only

EXPORT_FORMAT = 1
MODEL_FILE = "model.pt"
EXPORT_DIR = "export"
Which = Literal["best", "final"]


def export_path(run_dir: str, which: Which) -> str:
    """Where a run keeps its ``best`` (by validation EER) or ``final`` model."""
    return f"{run_dir}/{EXPORT_DIR}/{which}/{MODEL_FILE}"


def save_model(path: str, model: nn.Module, config: dict[str, Any]) -> None:
    """Write an inference export (weights + model/data/eval config) to a path or URL, atomically."""
    from sharding.storage import open_fs

    buffer = io.BytesIO()
    torch.save(
        {
            "format": EXPORT_FORMAT,
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "model": config["model"],
            "data": {"features": list(config["data"]["features"]), "max_len": config["data"]["max_len"]},
            "eval": config["eval"],
            "precision": config["train"]["precision"],
        },
        buffer,
    )
    fs, target = open_fs(path)
    write_atomic(fs, target, buffer.getvalue())


def find_export(path: str) -> str:
    """The ``model.pt`` that ``path`` names: the file, a folder holding it, or a training run folder.

    A run folder resolves to its best export, so ``--checkpoint`` takes whatever ``eerpipe train``
    printed.
    """
    from sharding.storage import StorageError, open_fs

    run_export = export_path("", "best").lstrip("/")
    fs, target = open_fs(path)
    try:
        if fs.isfile(target):
            return path
        for inner in (MODEL_FILE, run_export):
            if fs.isfile(f"{target}/{inner}"):
                return f"{path.rstrip('/')}/{inner}"
    except Exception as error:  # noqa: BLE001 - any backend error means "cannot read here"
        raise StorageError(f"cannot read {path!r}: {first_line(error)}") from error
    raise FileNotFoundError(
        f"no exported model at {path!r}: expected a {MODEL_FILE} file, a folder holding one, "
        f"or a training run folder with {run_export}"
    )


def load_model(path: str, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild an exported model (eval mode, on ``device``) and return it with its export metadata."""
    from pipeline.models import build_model
    from sharding.storage import open_fs

    url = find_export(path)
    fs, target = open_fs(url)
    payload = _read_export(url, fs.cat_file(target))
    try:
        spec, data = payload["model"], payload["data"]
        model = build_model(
            spec["name"],
            features=tuple(data["features"]),
            embedding_size=spec["embedding_size"],
            **spec.get("options", {}),
        )
        model.load_state_dict(payload["state_dict"])
    except (KeyError, TypeError, RuntimeError) as error:
        raise ValueError(f"{url}: the export does not rebuild its model ({first_line(error)})") from error
    return model.to(device).eval(), payload


def _read_export(url: str, data: bytes) -> dict[str, Any]:
    """The export's payload, by a weights-only load (:mod:`pipeline.safe_load`)."""
    try:
        payload = load_weights_only(data, url, map_location="cpu")
    except UnsafeFileError as error:
        raise ValueError(f"{url}: not an eerpipe model export ({str(error).removeprefix(url + ': ')})") from None
    found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
    if found != EXPORT_FORMAT:
        raise ValueError(f"{url}: unsupported export format {found!r} (this eerpipe reads {EXPORT_FORMAT})")
    return payload


def first_line(error: BaseException) -> str:
    """``Type: first line`` of an error, for one-line messages (torch's run to many lines)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
