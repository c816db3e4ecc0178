"""The manifest reader: malformed or hostile manifests are one clear error naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from sharding.format import MANIFEST_NAME, ManifestError, load_manifest
from sharding.writer import write_shards

runner = CliRunner()


@pytest.fixture(scope="module")
def manifest_text(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("set")
    write_shards("synth:12:1", str(out), val_subjects=2, test_subjects=2)
    return (out / MANIFEST_NAME).read_text()


def _edited(text: str, edit) -> str:
    data = json.loads(text)
    edit(data)
    return json.dumps(data)


def _rename_first_shard(data: dict, name: str) -> None:
    old = data["shards"][0]["name"]
    data["shards"][0]["name"] = name
    data["subjects"] = {s: (name if n == old else n) for s, n in data["subjects"].items()}


BROKEN = {
    "invalid JSON": (lambda t: t[:-20], "not valid JSON"),
    "a list": (lambda t: "[]", "expected a JSON object, found a JSON array"),
    "no shards": (lambda t: _edited(t, lambda d: d.pop("shards")), "lacks 'shards'"),
    "shards not a list": (lambda t: _edited(t, lambda d: d.update(shards={})),
                          "'shards' must be a JSON array"),
    "a shard without sha256": (lambda t: _edited(t, lambda d: d["shards"][1].pop("sha256")),
                               "shard 1: 'sha256' must be a JSON string"),
    "an unknown split": (lambda t: _edited(t, lambda d: d["shards"][0].update(split="dev")),
                         "unknown split 'dev'"),
    "a subject in an unlisted shard": (
        lambda t: _edited(t, lambda d: d["subjects"].update(x="nowhere.tar")),
        "subject 'x' maps to 'nowhere.tar', which is not a listed shard"),
    "a future version": (lambda t: _edited(t, lambda d: d.update(schema_version=2)),
                         "schema version 2 is not supported"),
    "not UTF-8": (lambda t: t.replace('"seed"', '"s\udce9ed"'), "not UTF-8"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_a_malformed_manifest_is_one_error_naming_the_file_and_the_problem(
        manifest_text: str, tmp_path: Path, case: str) -> None:
    edit, problem = BROKEN[case]
    (tmp_path / MANIFEST_NAME).write_bytes(edit(manifest_text).encode("utf-8", "surrogateescape"))
    with pytest.raises(ManifestError, match=problem) as caught:
        load_manifest(str(tmp_path))
    assert str(caught.value).startswith(f"{tmp_path}/{MANIFEST_NAME}: ")
    assert isinstance(caught.value, ValueError)  # printed cleanly by every command

    result = runner.invoke(app, ["shards", "verify", str(tmp_path)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.count("\n") == 1 and f"{tmp_path}/{MANIFEST_NAME}" in result.stderr


@pytest.mark.parametrize("name", ["../other/x.tar", "/etc/passwd", "sub/x.tar", "..", "",
                                  "a\\b.tar"])
def test_a_shard_name_that_is_not_a_plain_file_name_is_refused(manifest_text: str,
                                                               tmp_path: Path, name: str) -> None:
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.tar").write_bytes(b"outside the set")
    shard_set = tmp_path / "set"
    shard_set.mkdir()
    (shard_set / MANIFEST_NAME).write_text(_edited(manifest_text,
                                                   lambda d: _rename_first_shard(d, name)))
    with pytest.raises(ManifestError, match="is not a plain file name"):
        load_manifest(str(shard_set))
    with pytest.raises(ManifestError, match="is not a plain file name"):  # nor written by a re-run
        write_shards("synth:12:1", str(shard_set), val_subjects=2, test_subjects=2)
    assert (tmp_path / "other" / "x.tar").read_bytes() == b"outside the set"


def test_a_manifest_without_the_newer_optional_fields_still_loads(manifest_text: str,
                                                                  tmp_path: Path) -> None:
    def strip(data: dict) -> None:
        for key in ("rejected", "feature_spec"):
            data.pop(key)
        data["written_by"] = "a later version"  # unknown additive keys are ignored

    (tmp_path / MANIFEST_NAME).write_text(_edited(manifest_text, strip))
    manifest = load_manifest(str(tmp_path))
    assert manifest.rejected == {} and len(manifest.shards) == 12
