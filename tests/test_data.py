"""Parallel query tuples: JSONL/CSV loading, validation, the id-based split, and the vendored
MultiJail and XSafety loaders."""

from __future__ import annotations

import csv
import json
import random

import pytest

from msd import data
from msd.data.sets import multijail, xsafety as xsafety_set
from msd.data import QueryTuple, is_heldout, load_tuples, split
from msd.errors import MsdError


def write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_jsonl_flat_and_nested_rows(tmp_path):
    rows = [{"id": 1, "en": "how to cook", "jv": "carane masak"},
            {"id": "b", "texts": {"en": "fire", "sw": "moto"}, "meta": {"harmful": True}},
            {"id": "c", "en": "water", "jv": "", "sw": None}]  # empty = not available
    path = write(tmp_path / "q.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    got = load_tuples(path)
    assert [t.id for t in got] == ["1", "b", "c"]
    assert got[0].texts == {"en": "how to cook", "jv": "carane masak"}
    assert got[1].texts == {"en": "fire", "sw": "moto"} and got[1].meta["harmful"] is True
    assert got[2].texts == {"en": "water"}
    assert got[0].meta["_where"] == f"{path}:1"


def test_csv_with_bom_quotes_and_empty_cells(tmp_path):
    path = tmp_path / "q.csv"
    path.write_text('\ufeffid,en,jv,sw\nq1,"how, to ""cook""",carane masak,\n'
                    'q2,"two\nlines",loro,mbili\n', encoding="utf-8")
    got = load_tuples(str(path))
    assert got[0].texts == {"en": 'how, to "cook"', "jv": "carane masak"}
    assert got[1].texts == {"en": "two\nlines", "jv": "loro", "sw": "mbili"}
    assert got[1].meta["_where"] == f"{path}:4"  # the line the row ends on


@pytest.mark.parametrize("name, text, where, problem", [
    ("q.jsonl", '{"id": 1, "en": "a"}\n{"id": 2, "en": "b"\n', ":2", "malformed JSON"),
    ("q.jsonl", '{"id": 1, "en": "a"}\n["x"]\n', ":2", "expected a JSON object"),
    ("q.jsonl", '{"en": "a"}\n', ":1", "missing field 'id'"),
    ("q.jsonl", '{"id": 1, "jv": "a"}\n', ":1", "tuple '1' has no English ('en') text"),
    ("q.jsonl", '{"id": 1, "en": "a", "jv": " \\t "}\n', ":1", "field 'jv' is empty or whitespace-only"),
    ("q.jsonl", '{"id": 1, "en": "a", "jv": 3}\n', ":1", "field 'jv' must be a string"),
    ("q.jsonl", '{"id": 1, "en": "a"}\n{"id": 1, "en": "b"}\n', ":2", "duplicate id '1'"),
    ("q.jsonl", '{"id": 1, "en": "a", "xx": "b"}\n', ":1, field 'xx'", "unknown language code 'xx'; known: ar, bn"),
    ("q.jsonl", '{"id": 1, "texts": ["a"]}\n', ":1", "field 'texts' must map"),
    ("q.csv", "id,en\nq1,a,b\n", ":2", "row has more fields than the header"),
    ("q.csv", "en,jv\na,b\n", ":1", "CSV needs a header row with an 'id' column"),
    ("q.csv", 'id,en\nq1,a\nq2,"open\nq3,c\n', ":3", "malformed CSV"),
    ("q.jsonl", "\n\n", "", "no queries in file"),
    ("q.txt", "id,en\n", "", "unsupported query file type"),
])
def test_bad_query_files(tmp_path, name, text, where, problem):
    path = write(tmp_path / name, text)
    with pytest.raises(MsdError) as err:
        load_tuples(path)
    assert str(err.value).startswith(f"{path}{where}: {problem}")
    assert "\n" not in str(err.value)


def test_non_utf8_file_names_the_line(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_bytes(b'{"id": 1, "en": "a"}\n{"id": 2, "en": "\xff"}\n')
    with pytest.raises(MsdError, match=r"q\.jsonl:2: not UTF-8 text"):
        load_tuples(str(path))


def test_missing_file_lists_builtin_sources(tmp_path):
    with pytest.raises(MsdError, match="query file not found.*multijail.*xsafety"):
        load_tuples(str(tmp_path / "nope.jsonl"))


# ----------------------------------------------------------------------------- the split


def tuples(n: int) -> list[QueryTuple]:
    return [QueryTuple(f"q{i}", {"en": f"e{i}"}) for i in range(n)]


def test_split_is_deterministic_by_id_and_seed_not_file_order():
    ts = tuples(500)
    train, held = split(ts, 0.2, seed=7)
    shuffled = ts[:]
    random.Random(1).shuffle(shuffled)
    train2, held2 = split(shuffled, 0.2, seed=7)
    assert {t.id for t in held2} == {t.id for t in held}
    assert {t.id for t in train2} == {t.id for t in train}
    assert {t.id for t in train} | {t.id for t in held} == {t.id for t in ts}
    assert not {t.id for t in train} & {t.id for t in held}
    assert 60 <= len(held) <= 140  # about 20%
    # Adding queries never moves an existing one across the split.
    train3, held3 = split(ts + tuples(600)[500:], 0.2, seed=7)
    assert {t.id for t in held} <= {t.id for t in held3}
    # Another seed gives another split.
    assert {t.id for t in split(ts, 0.2, seed=8)[1]} != {t.id for t in held}


def test_split_edges():
    ts = tuples(50)
    assert split(ts, 0.0, 0) == (ts, [])
    assert split(ts, 1.0, 0) == ([], ts)
    assert is_heldout("q1", 0.3, 5) == is_heldout("q1", 0.3, 5)


# ----------------------------------------------------------------------------- vendored data


def test_multijail_is_315_tuples_in_10_languages():
    mj = load_tuples("multijail")
    assert len(mj) == 315 and len({t.id for t in mj}) == 315
    assert all(t.langs() == multijail.LANGS for t in mj)
    assert all(t.texts[l].strip() for t in mj for l in t.langs())
    assert sum(t.meta["source"] == "anthropics" for t in mj) == 300
    assert all(isinstance(t.meta["tags"], list) and t.meta["tags"] for t in mj)


@pytest.fixture(scope="module")
def xsafety():
    return load_tuples("xsafety")


def test_xsafety_is_2800_parallel_tuples(xsafety):
    assert len(xsafety) == 2800 and len({t.id for t in xsafety}) == 2800
    per_lang = {l: sum(l in t.texts for t in xsafety) for l in xsafety_set.LANGS}
    assert per_lang == {**{l: 2800 for l in xsafety_set.LANGS}, "ru": 2799}  # ru/Insult row 164 is empty
    per_type = {}
    for t in xsafety:
        per_type[t.meta["type"]] = per_type.get(t.meta["type"], 0) + 1
    assert per_type == {issue: 200 for issue in xsafety_set.TYPES}
    assert "ru" not in next(t for t in xsafety if t.id == "xsafety-Insult-164").texts


@pytest.mark.parametrize("lang", ["en", "zh", "bn", "es"])
def test_xsafety_rows_align_by_index(xsafety, lang):
    """Tuple `xsafety-<type>-<i>` holds row i of that type's file in every language."""
    by_id = {t.id: t for t in xsafety}
    for issue in ("Physical_Harm", "commonsense", "Crimes_And_Illegal_Activities"):
        with open(xsafety_set.file_of(lang, issue), encoding="utf-8-sig", newline="") as f:
            rows = [r[0] for r in csv.reader(f)]
        for i in (0, 99, 199):
            assert by_id[f"xsafety-{issue}-{i}"].texts[lang] == rows[i].strip()  # stripped at load


def test_xsafety_texts_are_stripped_at_load(xsafety):
    """Fixed bug: 12,078 of XSafety's 27,999 texts carried leading or trailing whitespace into
    the prompt."""
    raw = xsafety_set.load()
    assert sum(v != v.strip() for t in raw for v in t.texts.values()) == 12078
    assert sum(len(t.texts) for t in xsafety) == 27999
    assert not [v for t in xsafety for v in t.texts.values() if v != v.strip()]


@pytest.mark.parametrize("name, text", [
    ("q.jsonl", json.dumps({"id": 1, "en": "  how to cook\n", "jv": "\tcarane masak "}) + "\n"),
    ("q.csv", 'id,en,jv\nq1,"  how to cook\n",\tcarane masak \n'),
])
def test_query_files_are_stripped_at_load(tmp_path, name, text):
    path = write(tmp_path / name, text)
    assert load_tuples(path)[0].texts == {"en": "how to cook", "jv": "carane masak"}
    assert data.load_dataset(path).tuples[0].texts == {"en": "how to cook", "jv": "carane masak"}


def test_every_registered_dataset_is_stripped_at_load():
    spec = data.DatasetSpec(lambda: [QueryTuple("a", {"en": " padded \n", "jv": "ok"}, {"harmful": False})],
                            lambda: ["en", "jv"], "a plugin's set")
    data.DATASETS.register("padded-test", spec)
    try:
        got = data.load_dataset("padded-test").tuples[0]
    finally:
        data.DATASETS.unregister("padded-test")
    assert got.texts == {"en": "padded", "jv": "ok"} and got.meta == {"harmful": False}
