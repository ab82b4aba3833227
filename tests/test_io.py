"""Atomic writes and crash-tolerant JSONL (msd.io)."""

from __future__ import annotations

import json
import os
import warnings

import pytest

from msd import io
from msd.errors import MsdError


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("write, payload, read", [
    (io.atomic_write_text, "héllo\nwörld\n", lambda p: p.read_text(encoding="utf-8")),
    (io.atomic_write_bytes, b"\x00\x01bytes", lambda p: p.read_bytes()),
    (io.atomic_write_json, {"a": [1, 2], "b": "ü"}, lambda p: json.loads(p.read_text())),
])
def test_atomic_write_creates_parents_and_leaves_no_temp_files(tmp_path, write, payload, read):
    path = tmp_path / "sub" / "dir" / "out.x"
    write(path, payload)
    write(path, payload)  # overwriting works the same way
    assert read(path) == payload
    assert leftovers(path.parent) == []


@pytest.mark.parametrize("write, payload", [
    (io.atomic_write_text, "new text"),
    (io.atomic_write_bytes, b"new bytes"),
    (io.atomic_write_json, {"new": 1}),
])
def test_a_failed_write_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch, write, payload):
    path = tmp_path / "out.x"
    path.write_text("old\n")

    def fail(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail)  # the write fails after some bytes went to the temp file
    with pytest.raises(OSError, match="No space"):
        write(path, payload)
    assert path.read_text() == "old\n"
    assert leftovers(tmp_path) == []


def test_a_write_that_raises_midway_never_leaves_a_partial_file(tmp_path):
    path = tmp_path / "out.txt"
    with pytest.raises(TypeError):
        io.atomic_write_text(path, 12345)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        io.atomic_write_json(path, {"not json": object()})
    assert not path.exists() and leftovers(tmp_path) == []


def test_atomic_replace_dir(tmp_path):
    final = tmp_path / "final"
    for content in ("one", "two"):
        tmp = tmp_path / ".final.tmp"
        tmp.mkdir()
        (tmp / "f.txt").write_text(content)
        io.atomic_replace_dir(tmp, final)
        assert (final / "f.txt").read_text() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


# ------------------------------------------------------------------------------ JSONL


def write_raw(path, text: str):
    path.write_bytes(text.encode("utf-8"))
    return path


def test_read_jsonl_reads_objects_and_skips_blank_lines(tmp_path):
    path = write_raw(tmp_path / "a.jsonl", '\ufeff{"a": 1}\n\n{"a": 2}\n   \n')
    assert list(io.read_jsonl(path)) == [{"a": 1}, {"a": 2}]


def test_read_jsonl_drops_a_torn_tail_with_a_warning(tmp_path):
    path = write_raw(tmp_path / "a.jsonl", '{"a": 1}\n{"a": 2}\n{"a": 3, "b')
    with pytest.warns(UserWarning, match=r"a\.jsonl:3: dropped a partly written last line"):
        assert list(io.read_jsonl(path)) == [{"a": 1}, {"a": 2}]
    with pytest.raises(MsdError, match=r"a\.jsonl:3: malformed JSON"):
        list(io.read_jsonl(path, tolerate_torn_tail=False))


def test_read_jsonl_complete_last_line_without_newline_is_kept(tmp_path):
    path = write_raw(tmp_path / "a.jsonl", '{"a": 1}\n{"a": 2}')
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert list(io.read_jsonl(path)) == [{"a": 1}, {"a": 2}]


@pytest.mark.parametrize("text, line, problem", [
    ('{"a": 1}\n{"a": 2,,}\n{"a": 3}\n', 2, "malformed JSON"),
    ('{"a": 1}\n{"a": 2\n', 2, "malformed JSON"),  # ends with a newline: not a torn write
    ('{"a": 1}\n[1, 2]\n', 2, "expected a JSON object"),
])
def test_read_jsonl_bad_middle_line_names_file_and_line(tmp_path, text, line, problem):
    path = write_raw(tmp_path / "a.jsonl", text)
    with pytest.raises(MsdError) as err:
        list(io.read_jsonl(path))
    assert str(err.value).startswith(f"{path}:{line}: {problem}")
    assert "\n" not in str(err.value)


def test_read_jsonl_missing_or_undecodable_file(tmp_path):
    with pytest.raises(MsdError, match="file not found"):
        list(io.read_jsonl(tmp_path / "nope.jsonl"))
    path = tmp_path / "bin.jsonl"
    path.write_bytes(b'{"a": "\xff\xfe"}\n')
    with pytest.raises(MsdError, match="cannot read file"):
        list(io.read_jsonl(path))


def test_repair_jsonl(tmp_path):
    torn = write_raw(tmp_path / "torn.jsonl", '{"a": 1}\n{"a": 2')
    assert io.repair_jsonl(torn) == len('{"a": 2')
    assert torn.read_text() == '{"a": 1}\n'
    whole = write_raw(tmp_path / "whole.jsonl", '{"a": 1}\n{"a": 2}')
    assert io.repair_jsonl(whole) == 0
    assert whole.read_text() == '{"a": 1}\n{"a": 2}\n'
    assert io.repair_jsonl(tmp_path / "missing.jsonl") == 0
    empty = write_raw(tmp_path / "empty.jsonl", "")
    assert io.repair_jsonl(empty) == 0


def test_jsonl_writer_repairs_a_torn_last_line_then_appends(tmp_path):
    path = write_raw(tmp_path / "log.jsonl", '{"step": 1}\n{"step": 2, "lo')
    with io.JsonlWriter(path) as w:
        w.write_many([{"step": 2}, {"step": 3, "text": "ü"}])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing torn is left to warn about
        assert [r["step"] for r in io.read_jsonl(path)] == [1, 2, 3]
    assert path.read_text(encoding="utf-8").endswith('"ü"}\n')


def test_jsonl_writer_flushes_each_batch(tmp_path):
    path = tmp_path / "log.jsonl"
    w = io.JsonlWriter(path)
    w.write_many([{"step": 1}])
    assert path.read_text() == '{"step": 1}\n'  # on disk before close: a crash keeps it
    w.close()
    w.close()  # closing twice is harmless


def test_ensure_writable_dir(tmp_path):
    assert io.ensure_writable_dir(tmp_path / "a" / "b").is_dir()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(MsdError) as err:
        io.ensure_writable_dir(blocker / "run")
    msg = str(err.value)
    assert msg.startswith(f"{blocker / 'run'}: output folder is not writable") and "\n" not in msg
    assert leftovers(tmp_path / "a" / "b") == []
