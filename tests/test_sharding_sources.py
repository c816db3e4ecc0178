"""Readers of the raw corpora: the restricted unpickler, KVC files, Aalto files, bad sessions."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import numpy.lib.format as npy_format
import pytest
from click.testing import Result
from typer.testing import CliRunner

from pipeline.cli import app
from sharding.aalto import AaltoDesktopSource, read_desktop_file
from sharding.format import load_manifest
from sharding.kvc import KVCFileError, load_npy, read_comparisons, read_dev_set, read_test_sessions
from sharding.output import MAX_LISTED_REJECTS, REJECTS_NAME
from sharding.participants import read_participant_lists, read_participants
from sharding.plan import ShardingError, plan_shards, split_subjects
from sharding.source_spec import parse_source
from sharding.sources import SourceError
from sharding.validate import clean_subject
from sharding.verify import read_shard
from sharding.writer import rerun_command, write_shards

runner = CliRunner()


def keystrokes(n: int = 5, start: int = 1_470_000_000_000) -> np.ndarray:
    press = start + 150 * np.arange(n)
    return np.stack([press, press + 90, np.full(n, 65)], axis=1).astype(np.int64)


def save_pickle_npy(path: Path, value: object, protocol: int) -> None:
    """An object .npy written with a chosen pickle protocol (np.save always uses 4)."""
    array = np.empty((), dtype=object)
    array[()] = value
    with open(path, "wb") as stream:
        npy_format.write_array_header_1_0(stream, npy_format.header_data_from_array_1_0(array))
        pickle.dump(array, stream, protocol=protocol)


DEV_SET = {"u1": {"s1": keystrokes(), "s2": keystrokes(7)}, "u2": {3: keystrokes(4)}}


def assert_same_dev_set(read: list, expected: dict) -> None:
    assert [u for u, _ in read] == list(expected)
    for (_, sessions), want in zip(read, expected.values()):
        assert list(sessions) == list(want)
        for got, arr in zip(sessions.values(), want.values()):
            np.testing.assert_array_equal(got, arr)
            assert got.dtype == arr.dtype


# --- restricted unpickler -------------------------------------------------------------------

@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_dev_set_loads_under_every_pickle_protocol(tmp_path: Path, protocol: int) -> None:
    path = tmp_path / "desktop_dev_set.npy"
    save_pickle_npy(path, DEV_SET, protocol)
    assert_same_dev_set(read_dev_set(path), DEV_SET)


def test_dev_set_written_by_numpy_1_loads(tmp_path: Path) -> None:
    """numpy 1.x pickles name ``numpy.core.multiarray``; numpy 2 renamed it ``numpy._core``."""
    save_pickle_npy(tmp_path / "x.npy", {"u": {"s": keystrokes(), "t": np.float64(2.5)}}, 2)
    legacy = (tmp_path / "x.npy").read_bytes().replace(b"numpy._core.", b"numpy.core.")
    assert b"numpy.core.multiarray\n_reconstruct" in legacy
    (tmp_path / "legacy.npy").write_bytes(legacy)
    [(user, sessions)] = read_dev_set(tmp_path / "legacy.npy")
    np.testing.assert_array_equal(sessions["s"], keystrokes())
    assert sessions["t"] == 2.5


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "desktop_dev_set.npy"
    np.save(path, {"u1": {"s1": _Exploit(marker)}}, allow_pickle=True)
    with pytest.raises(KVCFileError, match=r"desktop_dev_set\.npy.*refused.*system"):
        read_dev_set(path)
    assert not marker.exists()


def test_pickle_smuggling_a_callable_through_builtins_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "mobile_test_sessions.npy"
    np.save(path, {"a": getattr}, allow_pickle=True)  # a classic gadget of pickle exploits
    with pytest.raises(KVCFileError, match="builtins.getattr"):
        read_test_sessions(path)


def test_truncated_npy_is_a_clear_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "desktop_dev_set.npy"
    np.save(path, DEV_SET, allow_pickle=True)
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(KVCFileError, match=r"desktop_dev_set\.npy: truncated or corrupt"):
        read_dev_set(path)


@pytest.mark.parametrize("content", [b"", b"\x93NUMPY", os.urandom(300), b"PK\x03\x04zipzip"])
def test_corrupt_npy_is_a_clear_error_naming_the_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "desktop_dev_set.npy"
    path.write_bytes(content)
    with pytest.raises(KVCFileError, match=r"desktop_dev_set\.npy: not a valid \.npy"):
        load_npy(path)


def test_npy_that_is_not_a_dict_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "desktop_dev_set.npy"
    np.save(path, np.zeros((3, 3)))
    with pytest.raises(KVCFileError, match="expected a pickled dict of users, found ndarray"):
        read_dev_set(path)


# --- comparisons ----------------------------------------------------------------------------

@pytest.mark.parametrize("text, pairs", [
    ("[('a', 'b'), (3, 'c')]\n", [("a", "b"), ("3", "c")]),
    ('[ ( "0001" ,"0002" ) ,\n["x", 7],]', [("0001", "0002"), ("x", "7")]),  # any spacing, lists, a final comma
    ("[]", []),
])
def test_comparisons_are_a_list_of_string_pairs(tmp_path: Path, text: str, pairs: list) -> None:
    path = tmp_path / "desktop_comparisons.txt"
    path.write_text(text)
    assert read_comparisons(path) == pairs


def test_comparisons_of_kvc_s_size_are_read_without_a_syntax_tree(tmp_path: Path) -> None:
    """The evaluation set's 1.5 M pairs: the memory is the pairs' own (ast.literal_eval's tree of
    them took 4.9 GB), measured here as Python allocations per pair on 100,000 of them."""
    import tracemalloc

    path = tmp_path / "desktop_comparisons.txt"
    path.write_text(str([(f"{i:08d}", f"{i + 7:08d}") for i in range(100_000)]))
    tracemalloc.start()
    pairs = read_comparisons(path)
    peak = tracemalloc.get_traced_memory()[1] - len(path.read_bytes())  # the text itself is read whole
    tracemalloc.stop()
    assert len(pairs) == 100_000 and pairs[-1] == ("00099999", "00100006")
    assert peak / len(pairs) < 400


@pytest.mark.parametrize("text", [
    "[('a', 'b')] + [__import__('os').system('touch pwned')]",
    "[('a', 'b'), ('c',)]",
    "{'a': 'b'}",
    "[('a', 'b')",
    "[('a', 'b') ('c', 'd')]",
    "[('a\\'', 'b')]",
])
def test_comparisons_that_are_not_a_pair_literal_are_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "desktop_comparisons.txt"
    path.write_text(text)
    with pytest.raises(KVCFileError, match=r"desktop_comparisons\.txt"):
        read_comparisons(path)
    assert not Path("pwned").exists()


# --- per-session and per-subject validation -------------------------------------------------

def _with(column: int, row: int, value: float) -> np.ndarray:
    array = keystrokes().astype(np.float64)
    array[row, column] = value
    return array


@pytest.mark.parametrize(("session", "reason"), [
    (np.zeros((0, 3)), "session:empty"),
    ([], "session:empty"),
    (keystrokes()[:, :2], "session:bad_shape"),
    ("not keys", "session:bad_shape"),
    (_with(1, 2, 1_469_999_999_999), "session:release_before_press"),
    (_with(0, 1, np.nan), "session:non_finite_time"),
    (_with(1, 4, np.inf), "session:non_finite_time"),
    (_with(0, 0, -5), "session:negative_time"),
    (_with(2, 3, 256), "session:keycode_out_of_range"),
    (_with(2, 3, -1), "session:keycode_out_of_range"),
    (_with(2, 3, 65.5), "session:keycode_out_of_range"),
])
def test_a_bad_session_is_dropped_and_counted_and_the_rest_kept(session, reason: str) -> None:
    kept, dropped = clean_subject({"a": keystrokes(), "bad": session, "b": keystrokes(9)})
    assert list(kept) == ["a", "b"]
    np.testing.assert_array_equal(kept["b"], keystrokes(9))
    assert dropped == Counter({reason: 1})


def test_kvc_bad_subjects_are_counted_and_nothing_else_is_lost(tmp_path: Path) -> None:
    good = {f"g{i}": {"s1": keystrokes(5, 10**12 + i), "s2": keystrokes(6, 2 * 10**12 + i)}
            for i in range(8)}
    users = {
        **good,
        "few": {"s1": keystrokes(), "s2": _with(0, 1, np.nan)},  # 1 valid session left
        7: {"a": keystrokes(), "b": keystrokes()},
        "7": {"a": keystrokes(), "b": keystrokes()},  # same id once made a string
        "list": [keystrokes(), keystrokes()],
    }
    folder = tmp_path / "desktop"
    folder.mkdir()
    np.save(folder / "desktop_dev_set.npy", users, allow_pickle=True)
    manifest = write_shards(f"kvc:{tmp_path}", str(tmp_path / "out"), subjects_per_shard=3,
                            val_subjects=1, test_subjects=1)
    assert manifest.rejected == {"session:non_finite_time": 1, "subject:duplicate_id": 1,
                                 "subject:not_a_session_dict": 1, "subject:too_few_sessions": 1}
    assert sorted(manifest.subjects) == sorted([*good, "7"])
    for info in manifest.shards:
        for subject in read_shard(str(tmp_path / "out"), info.name):
            if subject.subject_id in good:
                want = good[subject.subject_id]
                assert subject.session_ids == list(want)
                for got, arr in zip(subject.sessions, want.values()):
                    np.testing.assert_array_equal(got, arr)


# --- Aalto desktop --------------------------------------------------------------------------

DESKTOP_HEADER = ("PARTICIPANT_ID\tTEST_SECTION_ID\tSENTENCE\tUSER_INPUT\tKEYSTROKE_ID\t"
                  "PRESS_TIME\tRELEASE_TIME\tLETTER\tKEYCODE\n")


def desktop_file(folder: Path, participant: str, sections: dict[str, np.ndarray],
                 extra: str = "") -> None:
    lines = [DESKTOP_HEADER]
    for section, table in sections.items():
        for k, (press, release, code) in enumerate(table):
            lines.append(f"{participant}\t{section}\tHi there.\tHi there.\t{k}\t{press}\t{release}"
                         f"\t{chr(code)}\t{code}\n")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{participant}_keystrokes.txt").write_text("".join(lines) + extra)


def test_aalto_desktop_reads_sessions_and_drops_only_the_sentence_of_a_malformed_row(tmp_path: Path) -> None:
    data = tmp_path / "Keystrokes" / "files"
    sections = {f"{100 + s}": keystrokes(4 + s, 10**12 * (s + 1)) for s in range(3)}
    for p in ("11", "12", "13"):
        desktop_file(data, p, sections)
    desktop_file(data, "20", sections, extra="20\t999\tbroken row\n")  # too few fields
    desktop_file(data, "21", sections, extra="21\t999\tx\tx\t1\tsoon\t5\ta\t65\n")  # not a time
    desktop_file(data / "copy", "11", sections)  # the same participant again
    (data / "22_keystrokes.txt").write_text("")

    source = AaltoDesktopSource(tmp_path)
    ids, rejected = source.open()
    assert ids == ["11", "12", "13", "20", "21", "22"] and rejected == {"subject:duplicate_id": 1}
    loaded = source.load("12")
    assert list(loaded) == ["100", "101", "102"]
    for got, want in zip(loaded.values(), sections.values()):
        np.testing.assert_array_equal(got, want)

    manifest = write_shards(source, str(tmp_path / "out"), val_subjects=0, test_subjects=1)
    assert manifest.rejected == {"file:malformed": 1, "session:malformed_rows": 2, "subject:duplicate_id": 1}
    assert sorted(manifest.subjects) == ["11", "12", "13", "20", "21"]


# --- Aalto mobile ---------------------------------------------------------------------------

def mobile_files(folder: Path, *, header: bool, delimiter: str) -> dict[str, dict[str, np.ndarray]]:
    """Two participants × 3 sections, one malformed row, one orphan section, one bad id row."""
    expected = {p: {f"{p}{s}": keystrokes(3 + s, 10**12 * (s + 1)) for s in range(3)}
                for p in ("501", "502")}
    d = delimiter
    rows = [f"KEYSTROKE_ID{d}PRESS_TIME{d}RELEASE_TIME{d}LETTER{d}TEST_SECTION_ID{d}KEYCODE{d}IKI"]
    for sessions in expected.values():
        for section, table in sessions.items():
            rows += [f"{k}{d}{p}{d}{r}{d}a{d}{section}{d}{c}{d}0" for k, (p, r, c) in enumerate(table)]
    rows += [f"1{d}{10**12}{d}oops{d}a{d}9990{d}65{d}0",  # drops section 9990
             f"2{d}{10**12}{d}{10**12}{d}a{d}9990{d}65{d}0",
             f"3{d}{10**12}{d}{10**12 + 5}{d}a{d}7777{d}65{d}0",  # section nobody owns
             f"4{d}{10**12}"]  # not even a section id
    sections = [f"TEST_SECTION_ID{d}SENTENCE_ID{d}PARTICIPANT_ID{d}USER_INPUT"]
    sections += [f"{s}{d}1{d}{p}{d}hello" for p in expected for s in expected[p]]
    sections += [f"9990{d}1{d}501{d}hello"]
    folder.mkdir()
    (folder / "keystrokes.csv").write_text("\n".join(rows[0 if header else 1:]) + "\n")
    (folder / "test_sections.csv").write_text("\n".join(sections[0 if header else 1:]) + "\n")
    return expected


@pytest.mark.parametrize("header", [True, False])
@pytest.mark.parametrize("delimiter", [",", "\t"])
def test_aalto_mobile_joins_sections_with_or_without_header(tmp_path: Path, header: bool,
                                                            delimiter: str) -> None:
    expected = mobile_files(tmp_path / "typing37k", header=header, delimiter=delimiter)
    source = parse_source(f"aalto-mobile:{tmp_path / 'typing37k'}")
    ids, rejected = source.open()
    assert ids == ["501", "502"]
    assert +rejected == {"session:malformed_rows": 1, "session:unknown_test_section": 1,
                         "row:malformed": 1}
    for participant, sessions in expected.items():
        loaded = source.load(participant)
        assert list(loaded) == list(sessions)
        for got, want in zip(loaded.values(), sessions.values()):
            np.testing.assert_array_equal(got, want)


def test_aalto_mobile_file_with_unknown_columns_is_a_clear_error(tmp_path: Path) -> None:
    folder = tmp_path / "typing37k"
    folder.mkdir()
    (folder / "keystrokes.csv").write_text("what,is,this\n1,2,3\n")
    (folder / "test_sections.csv").write_text("1,1,501,hello\n")
    with pytest.raises(SourceError, match=r"keystrokes\.csv: no header and the first row"):
        parse_source(f"aalto-mobile:{folder}").open()


@pytest.mark.parametrize("spec", ["synth", "synth:ten", "synth:10:0:1.0:tablet", "tape:/x",
                                  "aalto-mobile:/nonexistent"])
def test_bad_source_specs_are_clear_errors(spec: str) -> None:
    with pytest.raises(SourceError):
        parse_source(spec)


def _aalto_corpus(folder: Path, good: tuple[str, ...] = ("11", "12", "13"),
                  bad: tuple[str, ...] = ("20",)) -> None:
    sections = {f"{100 + s}": keystrokes(4 + s, 10**12 * (s + 1)) for s in range(3)}
    for p in good:
        desktop_file(folder, p, sections)
    for p in bad:
        desktop_file(folder, p, sections, extra=f"9{p}\t999\tx\tx\t1\t5\t6\ta\t65\n")  # another participant's row


def test_rejected_aalto_files_are_listed_with_file_line_and_reason(tmp_path: Path) -> None:
    _aalto_corpus(tmp_path / "raw", bad=("20", "21"))
    out = tmp_path / "out"
    result = runner.invoke(app, ["shard", "--source", f"aalto-desktop:{tmp_path / 'raw'}",
                                 "--out", str(out), "--val-subjects", "0", "--test-subjects", "1",
                                 "--workers", "1", "--no-progress"])
    assert result.exit_code == 0, result.output
    rejects = json.loads((out / REJECTS_NAME).read_text())
    assert rejects["rejected_subjects"] == 2 and rejects["counts"] == {"file:malformed": 2}
    by_subject = {entry["subject"]: entry for entry in rejects["listed"]}
    assert by_subject["20"]["reason"] == "file:malformed"
    assert "20_keystrokes.txt: PARTICIPANT_ID '920' differs" in by_subject["20"]["detail"]
    assert "2 subjects rejected" in result.stdout and "21_keystrokes.txt" in result.stdout


def test_the_rejects_list_is_capped_but_counts_every_rejected_subject(tmp_path: Path) -> None:
    users = {f"u{i:03d}": {"s1": keystrokes()} for i in range(MAX_LISTED_REJECTS + 5)}  # 1 session
    users.update({f"g{i}": {"a": keystrokes(), "b": keystrokes(6)} for i in range(4)})
    (tmp_path / "desktop").mkdir()
    np.save(tmp_path / "desktop" / "desktop_dev_set.npy", users, allow_pickle=True)
    write_shards(f"kvc:{tmp_path}", str(tmp_path / "out"), val_subjects=1, test_subjects=1)
    rejects = json.loads((tmp_path / "out" / REJECTS_NAME).read_text())
    assert rejects["rejected_subjects"] == MAX_LISTED_REJECTS + 5
    assert len(rejects["listed"]) == MAX_LISTED_REJECTS
    assert rejects["listed"][0]["detail"] == "1 valid of 1 sessions"


def test_a_corpus_whose_every_file_is_malformed_fails_in_one_line_and_writes_nothing(
        tmp_path: Path) -> None:
    _aalto_corpus(tmp_path / "raw", good=(), bad=("20", "21", "22"))
    out = tmp_path / "out"
    result = runner.invoke(app, ["shard", "--source", f"aalto-desktop:{tmp_path / 'raw'}",
                                 "--out", str(out), "--val-subjects", "0", "--test-subjects", "1",
                                 "--workers", "1", "--no-progress"])
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "no valid subject" in result.stderr and "file:malformed 3" in result.stderr
    assert "20_keystrokes.txt: PARTICIPANT_ID" in result.stderr
    assert not out.exists()


# --- participant lists ------------------------------------------------------------------------

def test_a_participant_list_restricts_the_aalto_desktop_source(tmp_path: Path) -> None:
    _aalto_corpus(tmp_path / "raw", good=("11", "12", "13", "14"), bad=("20",))
    listed = tmp_path / "participants.txt"
    listed.write_text("# a benchmark subset\n\n12\n14   # trailing comment\n 11 \n")
    out = tmp_path / "out"
    result = runner.invoke(app, ["shard", "--source", f"aalto-desktop:{tmp_path / 'raw'}",
                                 "--participants", str(listed), "--out", str(out),
                                 "--val-subjects", "0", "--test-subjects", "1", "--workers", "1",
                                 "--no-progress"])
    assert result.exit_code == 0, result.output
    manifest = load_manifest(str(out))
    assert sorted(manifest.subjects) == ["11", "12", "14"] and manifest.rejected == {}
    assert manifest.source["participants"]["count"] == 3
    listed.write_text("12\n14\n")  # another list: another job, never mixed into this set
    with pytest.raises(ShardingError, match="already holds a different shard set"):
        write_shards(parse_source(f"aalto-desktop:{tmp_path / 'raw'}", listed), str(out),
                     val_subjects=0, test_subjects=1)


def test_a_listed_participant_without_a_file_is_an_error_naming_it(tmp_path: Path) -> None:
    _aalto_corpus(tmp_path / "raw")
    listed = tmp_path / "participants.txt"
    listed.write_text("11\n404\n12\n")
    result = runner.invoke(app, ["shard", "--source", f"aalto-desktop:{tmp_path / 'raw'}",
                                 "--participants", str(listed), "--out", str(tmp_path / "out"),
                                 "--no-progress"])
    assert result.exit_code == 1
    assert "participants.txt: participant '404' has no 404_keystrokes.txt" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("text", "message"), [
    ("11\n12 13\n", r"participants\.txt:2: expected one participant id per line"),
    ("11\n12\n11\n", r"participants\.txt:3: participant '11' is already listed on line 1"),
    ("# only comments\n\n", r"participants\.txt: the participant list names no participant"),
])
def test_a_malformed_participant_list_is_refused_naming_the_line(tmp_path: Path, text: str,
                                                                 message: str) -> None:
    (tmp_path / "participants.txt").write_text(text)
    with pytest.raises(SourceError, match=message):
        read_participants(tmp_path / "participants.txt")


def test_a_participant_list_applies_to_aalto_desktop_sources_only(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("1\n")
    with pytest.raises(SourceError, match="aalto-desktop sources only"):
        parse_source("synth:10", tmp_path / "p.txt")


def test_the_benchmark_participant_list_names_1522_distinct_participants() -> None:
    path = Path(__file__).parent.parent / "bench" / "aalto-desktop-participants.txt"
    ids = read_participants(path)
    assert len(ids) == 1522 == len(set(ids)) and all(i.isdigit() for i in ids)
    assert ids == sorted(ids, key=int)


def test_a_carriage_return_inside_a_field_is_data_not_a_row_break(tmp_path: Path) -> None:
    """A few public files end rows with CRLF and log the Enter key's LETTER as a lone CR."""
    desktop_file(tmp_path, "11", {f"{100 + s}": keystrokes(4 + s, 10**12 * (s + 1)) for s in range(3)})
    path = tmp_path / "11_keystrokes.txt"
    text = path.read_text().replace("\tA\t65\n", "\t\r\t13\n", 1).replace("\n", "\r\n")
    path.write_bytes(text.encode())
    sessions, dropped = read_desktop_file(path, "11")
    assert list(sessions) == ["100", "101", "102"] and dropped == Counter()
    assert sessions["100"][0, 2] == 13


# --- combined participant lists (one per public source) ------------------------------------------

BENCH = Path(__file__).parent.parent / "bench"


def _shard_listed(tmp_path: Path, *lists: str) -> Result:
    """``eerpipe shard`` of a six-participant corpus restricted to ``lists`` (files in tmp_path)."""
    _aalto_corpus(tmp_path / "raw", good=("11", "12", "13", "14", "15", "16"), bad=())
    arguments = [arg for name in lists for arg in ("--participants", str(tmp_path / name))]
    return runner.invoke(app, ["shard", "--source", f"aalto-desktop:{tmp_path / 'raw'}", *arguments,
                               "--out", str(tmp_path / "out"), "--val-subjects", "1",
                               "--test-subjects", "1", "--workers", "1", "--no-progress"])


def test_participant_lists_combine_and_each_is_named_by_the_manifest(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("11\n12\n13\n")
    (tmp_path / "b.txt").write_text("# another source\n14\n15\n")
    result = _shard_listed(tmp_path, "a.txt", "b.txt")
    assert result.exit_code == 0, result.output
    manifest = load_manifest(str(tmp_path / "out"))
    assert sorted(manifest.subjects) == ["11", "12", "13", "14", "15"]
    assert [(entry["file"], entry["count"]) for entry in manifest.source["participants"]] == [
        (str(tmp_path / "a.txt"), 3), (str(tmp_path / "b.txt"), 2)]
    assert (f"--participants {tmp_path / 'a.txt'} --participants {tmp_path / 'b.txt'}"
            in rerun_command(manifest, str(tmp_path / "out")))
    again = _shard_listed(tmp_path, "a.txt", "b.txt")  # the same command keeps the set
    assert again.exit_code == 0 and "match the manifest" in again.stdout


@pytest.mark.parametrize(("second", "message"), [
    ("14\n12\n", "b.txt: participant '12' is already listed in {a}"),
    ("14\n404\n", "b.txt: participant '404' has no 404_keystrokes.txt under"),
    (None, "b.txt: cannot read the participant list (No such file or directory)"),
])
def test_a_bad_participant_list_is_one_line_naming_it(tmp_path: Path, second: str | None,
                                                       message: str) -> None:
    (tmp_path / "a.txt").write_text("11\n12\n13\n")
    if second is not None:
        (tmp_path / "b.txt").write_text(second)
    result = _shard_listed(tmp_path, "a.txt", "b.txt")
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert message.format(a=tmp_path / "a.txt") in result.stderr
    assert not (tmp_path / "out").exists()


def test_one_participant_list_is_described_as_before_lists_could_be_combined(tmp_path: Path) -> None:
    """Sets sharded with one list (the 1,522-participant benchmark) keep their identity."""
    _aalto_corpus(tmp_path / "raw", bad=())
    (tmp_path / "p.txt").write_text("13\n11\n")
    described = parse_source(f"aalto-desktop:{tmp_path / 'raw'}", tmp_path / "p.txt").describe()
    assert described["participants"] == {
        "file": str(tmp_path / "p.txt"), "count": 2,
        "sha256": "0fef8e8e509cc45fc80a827ba3403eba92c8610bef9b92eb2fd2eb4720a6e4d4"}


def test_the_1522_participant_benchmark_plan_is_unchanged() -> None:
    """The subjects of each shard of docs/results.md's Reproduce command, pinned."""
    ids = read_participants(BENCH / "aalto-desktop-participants.txt")
    plan = plan_shards(ids, seed=0, val_subjects=150, test_subjects=300, subjects_per_shard=64)
    layout = json.dumps([[shard.name, shard.subjects] for shard in plan]).encode()
    assert hashlib.sha256(layout).hexdigest() == (
        "7bd9c4890eb68f9abf31c6088a1bf7d56d4d8b749459037af92da3bfdf955f0c")


def test_the_8068_participant_benchmark_split_is_proportional_to_its_sources() -> None:
    """bench/README.md: seed 204 draws val 600 and test 1,200 in the sources' proportions."""
    typelikeu, typability = read_participant_lists(
        [BENCH / "aalto-desktop-participants.txt", BENCH / "typability-index-participants.txt"])
    assert (len(typelikeu), len(typability)) == (1522, 6546)
    split = split_subjects([*typelikeu, *typability], seed=204, val_subjects=600, test_subjects=1200)
    first = set(typelikeu)
    assert [sum(p in first for p in split[name]) for name in ("val", "test", "train")] == [
        113, 226, 1183]
