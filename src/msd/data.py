"""Parallel query tuples: one id, one text per language, English required.

Sources: JSONL ({"id": .., "en": .., "jv": .., ...} or {"id": .., "texts": {...}, "meta": {...}}),
CSV (header `id,en,jv,...`), and the vendored XSafety and MultiJail files. The train/held-out
split is deterministic by id and seed, so it never changes when files are reordered.
"""

from __future__ import annotations

import ast
import csv
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from msd import languages
from msd.errors import MsdError
from msd.io import read_jsonl_numbered

RESOURCES = Path(__file__).parent / "resources" / "data"


@dataclass(frozen=True)
class QueryTuple:
    id: str
    texts: dict[str, str]  # language code -> query text
    meta: dict = field(default_factory=dict, hash=False, compare=False)

    def langs(self) -> list[str]:
        return list(self.texts)


def _check_text(text, where: str, lang: str) -> str:
    if not isinstance(text, str):
        raise MsdError(f"field '{lang}' must be a string", where)
    if not text.strip():
        raise MsdError(f"field '{lang}' is empty or whitespace-only", where)
    return text


def validate(tuples: list[QueryTuple], english: str = "en", source: str = "queries") -> list[QueryTuple]:
    seen: dict[str, int] = {}
    for i, t in enumerate(tuples):
        where = t.meta.get("_where", f"{source}: tuple {i + 1}")
        if t.id in seen:
            raise MsdError(f"duplicate id {t.id!r} (first seen in tuple {seen[t.id] + 1})", where)
        seen[t.id] = i
        if english not in t.texts:
            raise MsdError(f"tuple {t.id!r} has no English ('{english}') text", where)
        for lang, text in t.texts.items():
            languages.parse_codes([lang], where)
            _check_text(text, where, lang)
    return tuples


def _row_to_tuple(row: dict, where: str) -> QueryTuple:
    if "id" not in row or row["id"] in (None, ""):
        raise MsdError("missing field 'id'", where)
    meta = dict(row.get("meta") or {})
    if "texts" in row:
        texts = row["texts"]
        if not isinstance(texts, dict):
            raise MsdError("field 'texts' must map language codes to strings", where)
    else:
        texts = {k: v for k, v in row.items() if k not in ("id", "meta") and v not in (None, "")}
    for lang in texts:
        languages.parse_codes([lang], where + f", field '{lang}'")
        _check_text(texts[lang], where, lang)
    meta["_where"] = where
    return QueryTuple(str(row["id"]), dict(texts), meta)


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


MULTIJAIL_LANGS = ["en", "zh", "it", "vi", "ar", "ko", "th", "bn", "sw", "jv"]


def load_multijail() -> list[QueryTuple]:
    path = RESOURCES / "multijail" / "MultiJail.csv"
    out = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        for row in csv.DictReader(f):
            tags = ast.literal_eval(row["tags"]) if row.get("tags") else []
            out.append(QueryTuple(f"multijail-{row['id']}", {k: row[k] for k in MULTIJAIL_LANGS},
                                  {"source": row["source"], "tags": tags, "harmful": True}))
    return out


XSAFETY_TYPES = [
    "Crimes_And_Illegal_Activities", "Ethics_And_Morality", "Insult", "Mental_Health",
    "Physical_Harm", "Privacy_And_Property", "Unfairness_And_Discrimination", "Goal_Hijacking",
    "Inquiry_With_Unsafe_Opinion", "Prompt_Leaking", "Reverse_Exposure", "Role_Play_Instruction",
    "Unsafe_Instruction_Topic", "commonsense",
]
XSAFETY_LANGS = ["en", "zh", "ar", "bn", "de", "fr", "hi", "ja", "ru", "es"]


def _xsafety_file(lang: str, issue: str) -> Path | None:
    folder = RESOURCES / "xsafety" / ("sp" if lang == "es" else lang)
    # Upstream file names are inconsistent (_n, _en suffixes, a missing final 's').
    for name in (issue, f"{issue}_n", f"{issue}_en", issue.rstrip("s")):
        path = folder / f"{name}.csv"
        if path.exists():
            return path
    return None


def load_xsafety() -> list[QueryTuple]:
    """XSafety as parallel tuples (rows align across languages by index within each type)."""
    columns: dict[str, dict[str, list[str]]] = {}
    for issue in XSAFETY_TYPES:
        for lang in XSAFETY_LANGS:
            path = _xsafety_file(lang, issue)
            if path is None:
                continue
            with open(path, encoding="utf-8-sig", newline="") as f:
                rows = [r[0] if r else "" for r in csv.reader(f)]
            columns.setdefault(issue, {})[lang] = rows
    out = []
    for issue, by_lang in columns.items():
        n = len(by_lang.get("en", []))
        for i in range(n):
            texts = {lang: rows[i] for lang, rows in by_lang.items() if i < len(rows) and rows[i].strip()}
            if "en" in texts:
                out.append(QueryTuple(f"xsafety-{issue}-{i}", texts, {"type": issue}))
    return out


BUILTIN_SOURCES = {"multijail": load_multijail, "xsafety": load_xsafety}


def load_tuples(source: str, english: str = "en") -> list[QueryTuple]:
    """Load and validate tuples from a built-in name, a JSONL file or a CSV file."""
    if source == "organism":
        from msd.organism import training_queries  # built on first use
        return validate(training_queries(), english, source)
    if source in BUILTIN_SOURCES:
        return BUILTIN_SOURCES[source]()
    path = Path(source)
    if not path.is_file():
        raise MsdError("query file not found (expected a .jsonl or .csv file, or one of "
                       f"{sorted(BUILTIN_SOURCES) + ['organism']})", source)
    _check_readable_text(path)
    if path.suffix == ".csv":
        tuples = load_csv(path)
    elif path.suffix in (".jsonl", ".json"):
        tuples = load_jsonl(path)
    else:
        raise MsdError("unsupported query file type (use .jsonl or .csv)", source)
    if not tuples:
        raise MsdError("no queries in file", source)
    return validate(tuples, english, str(path))


def is_heldout(tuple_id: str, fraction: float, seed: int) -> bool:
    digest = hashlib.sha256(f"{seed}:{tuple_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split(tuples: list[QueryTuple], fraction: float, seed: int) -> tuple[list[QueryTuple], list[QueryTuple]]:
    """(train, heldout), deterministic by id and seed."""
    train = [t for t in tuples if not is_heldout(t.id, fraction, seed)]
    held = [t for t in tuples if is_heldout(t.id, fraction, seed)]
    return train, held
