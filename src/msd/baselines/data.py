"""Baseline training examples: where they come from (BASELINE_DATA) and the rows TRL reads.

Two kinds of example, as users have them:
- `Pair`: prompt, chosen, rejected (DPO, ORPO, SimPO; SFT learns `chosen`; KTO reads chosen as
  desirable and rejected as undesirable);
- `Labeled`: prompt, completion, label (KTO; SFT learns the desirable ones; the pairwise
  methods pair a desirable with an undesirable completion of the same prompt).

`baseline.data` names a registered source (one module each in `msd.baselines.sources`, or
`BASELINE_DATA.register` from a plugin: the organism adds "organism") or a JSONL/CSV file.
A source is `source(cfg, model, tokenizer, progress) -> list[Pair | Labeled]`.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union

from msd import languages
from msd.errors import MsdError
from msd.io import read_jsonl_numbered
from msd.registry import Registry


@dataclass(frozen=True)
class Pair:
    prompt: str  # the user's request (the student prompt's message)
    chosen: str
    rejected: str
    lang: str | None = None


@dataclass(frozen=True)
class Labeled:
    prompt: str
    completion: str
    label: bool  # True: desirable
    lang: str | None = None


Example = Union[Pair, Labeled]
BASELINE_DATA: Registry[Callable[..., list[Example]]] = Registry(
    "baseline data source", where="baseline.data", discover="msd.baselines.sources")
SUFFIXES = (".jsonl", ".json", ".csv")
LABELS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def load_examples(cfg, model, tokenizer, progress: bool = True) -> list[Example]:
    """baseline.data's examples, restricted to data.languages when it is set."""
    name = cfg.baseline.data
    if Path(name).suffix in SUFFIXES and name not in BASELINE_DATA:
        examples = load_file(Path(name))
    else:
        examples = BASELINE_DATA.get(name)(cfg, model, tokenizer, progress)
    keep = set(cfg.data.languages)
    if keep:
        examples = [e for e in examples if e.lang is None or e.lang in keep]
    if not examples:
        raise MsdError("no baseline examples (after keeping data.languages)", name)
    return examples


# ----------------------------------------------------------------------------- user files

def _text(row: dict, key: str, where: str) -> str:
    value = row.get(key)
    if value is None or value == "":
        raise MsdError(f"missing field '{key}'", where)
    if not isinstance(value, str):
        raise MsdError(f"field '{key}' must be a string, got {type(value).__name__}", where)
    if not value.strip():
        raise MsdError(f"field '{key}' is blank", where)
    return value


def parse_row(row: dict, where: str) -> Example:
    """One file row: {prompt, chosen, rejected} or {prompt, completion, label}, optional lang."""
    lang = row.get("lang") or None
    if lang is not None:
        lang = languages.parse_codes([str(lang)], f"{where}, field 'lang'")[0]
    prompt = _text(row, "prompt", where)
    paired = "chosen" in row or "rejected" in row
    if paired and "completion" in row:
        raise MsdError("a row has either chosen + rejected or completion + label, not both", where)
    if paired:
        return Pair(prompt, _text(row, "chosen", where), _text(row, "rejected", where), lang)
    if "completion" not in row:
        raise MsdError("missing field 'chosen' (prompt, chosen, rejected) or 'completion' "
                       "(prompt, completion, label)", where)
    label = row.get("label")
    if isinstance(label, str):
        label = LABELS.get(label.strip().lower(), label)
    if not isinstance(label, bool):
        raise MsdError(f"field 'label' must be true or false, got {label!r}", where)
    return Labeled(prompt, _text(row, "completion", where), label, lang)


def load_file(path: Path) -> list[Example]:
    """Validated examples of a .jsonl or .csv file; errors name file:line and the field."""
    if not path.is_file():
        raise MsdError("baseline data file not found (or name a registered source: "
                       f"{', '.join(BASELINE_DATA.names())})", str(path))
    if path.suffix == ".csv":
        out = _load_csv(path)
    else:
        out = [parse_row(row, f"{path}:{i}") for i, row in read_jsonl_numbered(path, tolerate_torn_tail=False)]
    if not out:
        raise MsdError("no examples in file", str(path))
    return out


def _load_csv(path: Path) -> list[Example]:
    out = []
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f, strict=True)
            if not reader.fieldnames or "prompt" not in reader.fieldnames:
                raise MsdError("CSV needs a header row: prompt,chosen,rejected or "
                               "prompt,completion,label (optional lang)", f"{path}:1")
            for row in reader:
                where = f"{path}:{reader.line_num}"
                if None in row:
                    raise MsdError("row has more fields than the header", where)
                out.append(parse_row({k: v for k, v in row.items() if v != ""}, where))
    except csv.Error as e:
        raise MsdError(f"malformed CSV ({e})", f"{path}:{reader.line_num + 1}") from None
    except UnicodeDecodeError as e:
        raise MsdError(f"not UTF-8 text ({e.reason})", str(path)) from None
    return out


# ----------------------------------------------------------------------------- TRL rows

def messages(prompt: str, system_prompt: str | None) -> list[dict]:
    """The student prompt as a conversation: the same chat template msd evaluates with."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return system + [{"role": "user", "content": prompt}]


def _answer(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def to_pairs(examples: list[Example]) -> list[Pair]:
    """Pairs for the pairwise methods. A Pair whose chosen equals its rejected carries no
    preference and is left out; Labeled rows pair each desirable completion with an
    undesirable one of the same prompt (in turn)."""
    out = [e for e in examples if isinstance(e, Pair) and e.chosen != e.rejected]
    bad: dict[tuple, list[str]] = {}
    for e in examples:
        if isinstance(e, Labeled) and not e.label:
            bad.setdefault((e.prompt, e.lang), []).append(e.completion)
    good = [e for e in examples if isinstance(e, Labeled) and e.label]
    for i, e in enumerate(good):
        rejected = bad.get((e.prompt, e.lang))
        if rejected:
            out.append(Pair(e.prompt, e.completion, rejected[i % len(rejected)], e.lang))
    return out


def to_labeled(examples: list[Example]) -> list[Labeled]:
    """Desirable/undesirable examples for KTO: a Pair gives its chosen (desirable) and, when it
    differs, its rejected (undesirable)."""
    out = []
    for e in examples:
        if isinstance(e, Labeled):
            out.append(e)
            continue
        out.append(Labeled(e.prompt, e.chosen, True, e.lang))
        if e.rejected != e.chosen:
            out.append(Labeled(e.prompt, e.rejected, False, e.lang))
    return out


def trl_rows(kind: str, examples: list[Example], system_prompt: str | None = None) -> list[dict]:
    """Conversational rows in the format TRL's trainers read for `kind` (methods.KINDS)."""
    if kind == "sft":
        return [{"prompt": messages(e.prompt, system_prompt), "completion": _answer(e.completion)}
                for e in to_labeled(examples) if e.label]
    if kind == "labeled":
        return [{"prompt": messages(e.prompt, system_prompt), "completion": _answer(e.completion),
                 "label": e.label} for e in to_labeled(examples)]
    return [{"prompt": messages(e.prompt, system_prompt), "chosen": _answer(e.chosen),
             "rejected": _answer(e.rejected)} for e in to_pairs(examples)]
