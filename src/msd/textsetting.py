"""Settings that hold template text or the path of a file with it (model.chat_template,
prompt.teacher_template, --chat-template): one rule, so a mistyped path is never taken as text.

- `text:` followed by the template -> that text, exactly.
- A value with a newline or a brace (`{`, as in `{query}` or `{% ... %}`) -> the template text
  itself (how templates are written inline in YAML).
- Anything else is a file path, and the file must exist.

Fixed bug: a mistyped path fell back to being the template text, so every prompt became the
literal path (and training ran with a divergence of 0).
"""

from __future__ import annotations

import string
from pathlib import Path

from msd.errors import MsdError

TEXT_PREFIX = "text:"
MAX_TEMPLATE_BYTES = 1 * 2**20
TEACHER_FIELDS = ("query", "english", "language")


def is_inline_text(value: str) -> bool:
    return value.startswith(TEXT_PREFIX) or "\n" in value or "{" in value


def read_text_setting(value: str, key: str) -> str:
    """The template text a setting stands for (see the module docstring for the rule)."""
    if value.startswith(TEXT_PREFIX):
        return value[len(TEXT_PREFIX):]
    if is_inline_text(value):
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise MsdError(f"file not found: {value!r} (a value without a newline or a brace is a file "
                       f"path; to give the template text itself, write '{TEXT_PREFIX}...')", key)
    try:
        if path.stat().st_size > MAX_TEMPLATE_BYTES:
            raise MsdError(f"template file larger than {MAX_TEMPLATE_BYTES // 2**20} MiB", str(path))
        return path.read_bytes().decode("utf-8-sig")
    except OSError as e:
        raise MsdError(f"cannot read template file ({e.strerror or e})", str(path)) from None
    except UnicodeDecodeError:
        raise MsdError("template file is not UTF-8 text", str(path)) from None


def check_teacher_template(text: str, key: str = "prompt.teacher_template") -> str:
    """A teacher template uses only {query}, {english}, {language} (and {{ }} for braces)."""
    try:
        fields = [f for _, f, spec, conv in string.Formatter().parse(text) if f is not None]
    except ValueError as e:  # a lone { or }
        raise MsdError(f"malformed template ({e}); write a literal brace as {{{{ or }}}}", key) from None
    unknown = sorted({f for f in fields if f not in TEACHER_FIELDS})
    if unknown:
        raise MsdError(f"unknown template field(s) {', '.join('{' + f + '}' for f in unknown)}; "
                       f"use {', '.join('{' + f + '}' for f in TEACHER_FIELDS)}", key)
    if "query" not in fields:
        raise MsdError("teacher template must contain {query}", key)
    return text
