"""Declared bounds of settings, checked when a value is set (before any work starts).

A config field declares its bounds in its metadata (`msd.config._f(..., ge=0, lt=1)`); an
option of the command line uses the same keywords (`check("--judge-timeout", v, gt=0)`):

    ge / gt   the value is >= / > this
    le / lt   the value is <= / < this
    nonempty  a text value may not be empty or blank
    path      a template setting: text or an existing file (msd.textsetting)
    template  a teacher template: only its known fields
    note      what breaking the bound would mean, added to the message

Numbers must also be finite (nan and inf are never a valid setting).
"""

from __future__ import annotations

import math

from msd.errors import MsdError
from msd.limits import short_repr

KEYS = ("ge", "gt", "le", "lt", "nonempty", "path", "template", "note")
_OPS = {"ge": (">=", lambda v, b: v >= b), "gt": (">", lambda v, b: v > b),
        "le": ("<=", lambda v, b: v <= b), "lt": ("<", lambda v, b: v < b)}


def describe(bounds: dict) -> str:
    """'>= 0 and < 1' for the help text."""
    return " and ".join(f"{_OPS[k][0]} {bounds[k]}" for k in _OPS if k in bounds)


def check(key: str, value, where: str | None = None, **bounds) -> None:
    """Raise a one-line MsdError when `value` breaks a declared bound (None passes: it means
    'off' for the optional settings that allow it)."""
    where = where or key
    if value is None:
        return
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            raise MsdError(f"field '{key}' must be a finite number, got {value}", where)
        broken = [k for k in _OPS if k in bounds and not _OPS[k][1](value, bounds[k])]
        if broken:
            note = f" ({bounds['note']})" if "note" in bounds else ""
            raise MsdError(f"field '{key}' must be {describe(bounds)}, got {short_repr(value)}{note}", where)
    if isinstance(value, str):
        if "\x00" in value:  # no file name can hold one (fixed bug: a traceback deep in os)
            raise MsdError(f"field '{key}' holds a NUL byte", where)
        if bounds.get("nonempty") and not value.strip():
            raise MsdError(f"field '{key}' may not be empty", where)
        if bounds.get("path") or bounds.get("template"):
            from msd.textsetting import check_teacher_template, read_text_setting

            loc = key if where == key else f"{where}: {key}"
            text = read_text_setting(value, loc)
            if bounds.get("template"):
                check_teacher_template(text, loc)
