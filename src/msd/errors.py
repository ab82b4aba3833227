"""User-facing errors.

An `MsdError` is a problem with the user's input or environment (a file, a line, a field, a
config key). The CLI prints it as one line and exits with code 2, with no traceback unless
`--debug` is given. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import unicodedata

CONTROL = ("Cc", "Cf", "Zl", "Zp")  # Unicode categories a message never prints raw


class MsdError(Exception):
    """A one-line, user-facing error. `where` names the file (and line/field) at fault."""

    def __init__(self, message: str, where: str | None = None):
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


def closest(name: str, options) -> str | None:
    """The option closest to `name` (for 'did you mean' hints), or None."""
    import difflib

    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return match[0] if match else None


def printable(text: str) -> str:
    """`text` with every control or format character escaped (`\\x1b`, `\\u202e`): a message
    shows the input it names, never a terminal escape sequence hidden in it.
    Fixed bug: escape codes in query ids were printed raw in messages."""
    return "".join(ascii(c)[1:-1] if unicodedata.category(c) in CONTROL else c for c in text)
