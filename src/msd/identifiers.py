"""Identifiers: query ids, benchmark names, language codes, and the text of messages.

Each kind of identifier is checked by one function, called both where msd accepts it (a query
file, a benchmark file name, a language column) and where msd reads it back (records.jsonl, in
`msd eval` reruns and `msd report`): what is accepted always reads back.
Fixed bugs: a query id over 200 characters, or a benchmark file name with a tab, was accepted,
evaluated and judged, and then every rerun refused the records; a language column " jv" (with
a leading space) passed as "jv" and then failed.

Messages show such text through `msd.errors.printable` (control characters escaped).
"""

from __future__ import annotations

import re
import unicodedata

from msd.errors import CONTROL, MsdError, printable

MAX_NAME = 200  # names end up in tables, titles and file names
LANG_CODE = re.compile(r"^[A-Za-z0-9_-]{1,32}$")


def _control(text: str) -> str | None:
    """The first control or format character of `text`, escaped ('\\x1b'), or None."""
    for c in text:
        if unicodedata.category(c) in CONTROL:
            return ascii(c)[1:-1]
    return None


def check_name(value, what: str, where: str | None) -> str:
    """A name msd writes into records, tables and file names: 1 to 200 characters, not blank,
    no control characters (tab, newline, escape codes)."""
    text = str(value)
    if not text.strip():
        raise MsdError(f"{what} is empty", where)
    if len(text) > MAX_NAME:
        raise MsdError(f"{what} is {len(text)} characters long; at most {MAX_NAME} are allowed", where)
    bad = _control(text)
    if bad:
        raise MsdError(f"{what} {printable(text[:40])!r} holds a control character ({bad}); remove it", where)
    return text


def check_query_id(value, where: str | None) -> str:
    return check_name(value, "query id", where)


def check_benchmark(value, where: str | None) -> str:
    return check_name(value, "benchmark name", where)


def check_lang(code, where: str | None, *, registered: bool = True) -> str:
    """A language code exactly as written (no surrounding spaces); with `registered`, one msd
    knows (`msd.languages`). Reading records back checks the form only."""
    if not isinstance(code, str) or not LANG_CODE.match(code):
        raise MsdError(f"language code {printable(str(code)[:40])!r} is malformed (letters, digits, "
                       "'-' or '_', nothing around them)", where)
    if registered:
        from msd import languages

        languages.parse_codes([code], where)
    return code


def check_path(value, where: str | None) -> str:
    """A folder msd writes to or reads runs from: no NUL and no control characters (a newline
    in a folder name would split messages, tables and labels made from it)."""
    text = str(value)
    bad = "\\x00" if "\x00" in text else _control(text)
    if bad:
        raise MsdError(f"the path {printable(text[:80])!r} holds a control character ({bad}); "
                       "rename it", where)
    return text
