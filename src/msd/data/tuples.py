"""Parallel query tuples: one id, one text per language, English required; the train/held-out split.

The split is deterministic by id and seed, so it never changes when files are reordered.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from msd.errors import MsdError
from msd.identifiers import check_lang, check_query_id


@dataclass(frozen=True)
class QueryTuple:
    id: str
    texts: dict[str, str]  # language code -> query text
    meta: dict = field(default_factory=dict, hash=False, compare=False)

    def langs(self) -> list[str]:
        return list(self.texts)


def check_text(text, where: str, lang: str) -> str:
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
        check_query_id(t.id, where)
        for lang, text in t.texts.items():
            check_lang(lang, f"{where}, field {lang!r}")
            check_text(text, where, lang)
    return tuples


def stripped(tuples: list[QueryTuple]) -> list[QueryTuple]:
    """Tuples whose texts carry no leading or trailing whitespace (the one place it is removed:
    `msd.data.load_dataset`, for registered sets and query files alike). Fixed bug: 12,078 of
    XSafety's 27,999 texts carried spaces or line breaks into the prompt."""
    return [t if all(v == v.strip() for v in t.texts.values())
            else QueryTuple(t.id, {lang: v.strip() for lang, v in t.texts.items()}, t.meta)
            for t in tuples]


def is_heldout(tuple_id: str, fraction: float, seed: int) -> bool:
    digest = hashlib.sha256(f"{seed}:{tuple_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split(tuples: list[QueryTuple], fraction: float, seed: int,
          by: str | None = None) -> tuple[list[QueryTuple], list[QueryTuple]]:
    """(train, heldout), deterministic by id and seed; with `by`, by the meta field `by`
    instead (a list counts by its first entry, e.g. MultiJail's primary harm tag), so whole
    groups (intents) are held out and no held-out query shares its group with a training one."""
    def key(t: QueryTuple) -> str:
        if by is None:
            return t.id
        value = t.meta.get(by)
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is None or value == "":
            raise MsdError(f"query {t.id!r} has no {by!r} to split by", "data.heldout_by")
        return f"{by}={value}"

    held = [is_heldout(key(t), fraction, seed) for t in tuples]
    return [t for t, h in zip(tuples, held) if not h], [t for t, h in zip(tuples, held) if h]


def benign(tuples: list[QueryTuple]) -> list[QueryTuple]:
    """The tuples whose meta says harmful=false (harmful is the default)."""
    return [t for t in tuples if not t.meta.get("harmful", True)]
