"""Query files: JSONL ({"id": .., "en": .., "jv": .., ...} or {"id": .., "texts": {...}, "meta":
{...}}) and CSV (header `id,en,jv,...`), read into validated parallel query tuples."""

from __future__ import annotations

import csv
from pathlib import Path

from msd.data.tuples import QueryTuple, check_text, validate
from msd.errors import MsdError
from msd.identifiers import check_query_id
from msd.io import read_jsonl_numbered

SUFFIXES = (".jsonl", ".json", ".csv")


def _row_to_tuple(row: dict, where: str) -> QueryTuple:
    if "id" not in row or row["id"] in (None, ""):
        raise MsdError("missing field 'id'", where)
    if isinstance(row["id"], (dict, list, bool)):
        raise MsdError("field 'id' must be a string or a number", where)
    meta = row.get("meta") or {}
    if not isinstance(meta, dict):  # Fixed bug: a meta of another type raised a traceback
        raise MsdError(f"field 'meta' must be a JSON object, got {type(meta).__name__}", where)
    if not isinstance(meta.get("harmful", True), bool):  # "false" (a string) would count as true
        raise MsdError("field 'meta.harmful' must be true or false (not quoted)", where)
    meta = dict(meta)
    if "texts" in row:
        texts = row["texts"]
        if not isinstance(texts, dict):
            raise MsdError("field 'texts' must map language codes to strings", where)
    else:
        texts = {k: v for k, v in row.items() if k not in ("id", "meta") and v not in (None, "")}
    for lang in texts:
        check_text(texts[lang], where, lang)
    meta["_where"] = where
    return QueryTuple(check_query_id(row["id"], f"{where}: field 'id'"), dict(texts), meta)


def load_jsonl(path: Path) -> list[QueryTuple]:
    return [_row_to_tuple(row, f"{path}:{i}")
            for i, row in read_jsonl_numbered(path, tolerate_torn_tail=False)]


def load_csv(path: Path) -> list[QueryTuple]:
    out = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, strict=True)  # strict: an unclosed quote is an error
        try:
            if not reader.fieldnames or "id" not in reader.fieldnames:
                raise MsdError("CSV needs a header row with an 'id' column and one column per language", f"{path}:1")
            twice = sorted({n for n in reader.fieldnames if reader.fieldnames.count(n) > 1})
            if twice:  # Fixed bug: DictReader silently kept the last of the columns
                raise MsdError(f"column {twice[0]!r} appears more than once in the header", f"{path}:1")
            for row in reader:
                line = reader.line_num
                if None in row:
                    raise MsdError("row has more fields than the header", f"{path}:{line}")
                out.append(_row_to_tuple({k: v for k, v in row.items()}, f"{path}:{line}"))
        except csv.Error as e:
            # line_num counts the lines of the rows read whole; the bad row starts after them
            raise MsdError(f"malformed CSV ({e})", f"{path}:{reader.line_num + 1}") from None
    return out


def _check_readable_text(path: Path) -> None:
    """Fixed bug: an unreadable or non-UTF-8 query file raised a bare traceback."""
    try:
        data = path.read_bytes()
        data.decode("utf-8")
    except OSError as e:
        raise MsdError(f"cannot read query file ({e.strerror or e})", str(path)) from None
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise MsdError(f"not UTF-8 text (byte {data[e.start]:#04x})", f"{path}:{line}") from None


def load_file(path: Path, english: str = "en") -> list[QueryTuple]:
    """Validated tuples of a .jsonl or .csv query file."""
    _check_readable_text(path)
    if path.suffix == ".csv":
        tuples = load_csv(path)
    elif path.suffix in (".jsonl", ".json"):
        tuples = load_jsonl(path)
    else:
        raise MsdError("unsupported query file type (use .jsonl or .csv)", str(path))
    if not tuples:
        raise MsdError("no queries in file", str(path))
    return validate(tuples, english, str(path))
