"""Limits on what msd parses and builds, so a hostile or damaged input fails fast with one line
instead of hanging or exhausting memory.

- YAML: size, nesting depth and alias limits (a 400-byte "billion laughs" file expands to
  gigabytes when its aliases are followed).
- JSON: nesting depth (Python's parser recurses; 200,000 brackets is a RecursionError).
- Error messages show values through `short_repr`, which never builds the full repr of a huge
  or deeply shared value.
- Prompts are checked against the model's context window before anything is generated.
"""

from __future__ import annotations

import reprlib

import yaml

from msd.errors import MsdError

MAX_YAML_BYTES = 1 * 2**20
MAX_ALIASES = 32
MAX_DEPTH = 64

_repr = reprlib.Repr()
_repr.maxstring, _repr.maxother, _repr.maxlevel = 60, 60, 3
_repr.maxlist = _repr.maxdict = _repr.maxtuple = _repr.maxset = 6


def short_repr(value) -> str:
    """A repr cut to a few dozen characters, built without expanding the whole value."""
    return _repr.repr(value)


def depth(obj, limit: int = MAX_DEPTH) -> int:
    """Nesting depth of a parsed JSON/YAML value, walked iteratively (stops past `limit`)."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        node, d = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, d)
            if deepest > limit:
                return deepest
            stack.extend((v, d + 1) for v in (node.values() if isinstance(node, dict) else node))
    return deepest


def loads_json(text: str | bytes, where: str, limit: int = MAX_DEPTH):
    """json.loads with a nesting limit; malformed or too deep JSON is a one-line MsdError."""
    import json

    try:
        obj = json.loads(text)
    except RecursionError:
        raise MsdError(f"JSON nested too deeply (more than {limit} levels)", where) from None
    except ValueError as e:
        raise MsdError(f"malformed JSON ({getattr(e, 'msg', e)})", where) from None
    if depth(obj, limit) > limit:
        raise MsdError(f"JSON nested too deeply (more than {limit} levels)", where)
    return obj


class _LimitedLoader(yaml.SafeLoader):
    """SafeLoader that counts aliases and nesting while composing (before anything expands)."""

    def __init__(self, stream):
        super().__init__(stream)
        self._aliases = 0
        self._depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise yaml.YAMLError(f"more than {MAX_ALIASES} YAML aliases (*name): refused, "
                                     "an alias bomb expands without bound")
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.YAMLError(f"YAML nested more than {MAX_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        """A key given twice in one mapping is an error naming both lines. Fixed bug: a YAML
        section or key given twice silently dropped the first (merge keys `<<` may still be
        overridden, as YAML intends)."""
        seen: dict = {}
        for key_node, _ in getattr(node, "value", []):
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = (key_node.tag, key_node.value)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key_node.value!r} is given twice (first on line {seen[key] + 1}); "
                    "keep one", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def read_text(path, what: str = "file") -> str:
    """A small text file: UTF-8, or UTF-16/32 when it starts with a byte-order mark."""
    try:
        data = open(path, "rb").read(MAX_YAML_BYTES + 1)
    except OSError as e:
        raise MsdError(f"cannot read {what} ({e.strerror or e})", str(path)) from None
    encoding = "utf-16" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig"
    if data[:4] in (b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff"):
        encoding = "utf-32"
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        raise MsdError(f"{what} is not UTF-8 text (byte {e.start}); save it as UTF-8", str(path)) from None


def safe_yaml(text: str, where: str):
    """yaml.safe_load with size, depth and alias limits; errors are one line naming `where`."""
    if len(text) > MAX_YAML_BYTES:
        raise MsdError(f"YAML larger than {MAX_YAML_BYTES // 2**20} MiB: refused", where)
    try:
        return yaml.load(text, Loader=_LimitedLoader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        raise MsdError(f"YAML nested more than {MAX_DEPTH} levels deep", where) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        loc = f"{where}:{mark.line + 1}" if mark else where
        raise MsdError(f"invalid YAML ({getattr(e, 'problem', None) or e})", loc) from None


# ----------------------------------------------------------------------------- context window

def context_window(model, tokenizer) -> int | None:
    """Longest sequence the model takes: max_position_embeddings (or n_positions), else the
    tokenizer's model_max_length when it is a real number (transformers uses 1e30 for 'unset')."""
    cfg = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    return value if isinstance(value, int) and 0 < value < 10**7 else None


def check_context(lengths: list[tuple[str, int]], window: int | None, max_new_tokens: int,
                  where: str) -> None:
    """Each (name, prompt length) plus max_new_tokens must fit the context window."""
    if window is None:
        return
    for name, n in lengths:
        if n + max_new_tokens > window:
            raise MsdError(f"prompt of {name} is {n} tokens; with {max_new_tokens} new tokens it exceeds "
                           f"the model's context window of {window} tokens (shorten the query or "
                           "lower the token limit)", where)
