"""The judge interface: JudgeItem in, Verdict out, and the JUDGES registry.

A judge has a `name`, a `version` (stored in every record, so a report can tell verdicts of
different judges apart) and `judge(items) -> verdicts`, one verdict per item, same order.
A verdict whose judge failed carries `error` and no label; it is never guessed.

A judge declares its command-line options (`options`: flag, keyword argument, type, help);
`msd eval` derives its flags, the `--judge` choices and the "does not apply" check from them.
Adding a judge is one module that registers its class:

    @JUDGES.register("mine")
    class MyJudge(Judge):
        summary = "what it is, in a few words"
        options = (JudgeOption("--mine-threshold", "threshold", float, "..."),)
        def __init__(self, threshold: float = 0.5): ...
        def judge(self, items): ...
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

from msd.errors import MsdError
from msd.registry import Registry

LABELS = ("safe", "unsafe", "invalid")


@dataclass(frozen=True)
class JudgeItem:
    query: str  # the query as the model saw it (target language)
    response: str
    lang: str  # language code of the query
    meta: dict = field(default_factory=dict, hash=False, compare=False)  # the tuple's meta (+ "english")


@dataclass(frozen=True)
class Verdict:
    label: str | None  # safe | unsafe | invalid; None when the judge failed (see error)
    refused: bool | None = None
    helpful: bool | None = None
    response_lang: str | None = None
    error: str | None = None

    def __post_init__(self):
        if self.label is not None and self.label not in LABELS:
            raise ValueError(f"verdict label must be one of {LABELS}, got {self.label!r}")
        if self.label is None and not self.error:
            raise ValueError("a verdict without a label must say why (error)")


@dataclass(frozen=True)
class JudgeOption:
    """One command-line option of a judge: `flag` sets the constructor's keyword `name`."""

    flag: str  # e.g. "--judge-model"
    name: str  # keyword argument of the judge's __init__
    type: Callable[[str], Any] = str
    help: str = ""
    choices: tuple | None = None
    required: bool = False  # the judge cannot run without it
    bounds: dict | None = None  # declared limits (msd.bounds: ge, gt, le, lt), checked by the CLI

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


class Judge:
    """Base class. Subclasses set `name`, `version`, `summary` and `options` and implement `judge`."""

    name: str = "judge"
    version: str = "0"
    summary: str = ""  # a few words for `--judge` help
    options: tuple[JudgeOption, ...] = ()

    def judge(self, items: list[JudgeItem]) -> list[Verdict]:  # pragma: no cover - interface
        raise NotImplementedError

    def describe(self) -> dict:
        """What to save next to a run (never secrets)."""
        return {"name": self.name, "version": self.version}


# Built-ins are the modules of msd.eval.judges; plugins (the organism's oracle) register more.
JUDGES: Registry[type[Judge]] = Registry("judge", where="--judge", discover="msd.eval.judges")


def get_judge(name: str, **options) -> Judge:
    """Build a judge by name. Options that are None are dropped (the CLI passes every flag)."""
    cls = JUDGES.get(name)
    options = {k: v for k, v in options.items() if v is not None}
    accepted = inspect.signature(cls.__init__).parameters
    unknown = [k for k in options if k not in accepted]
    if unknown:
        raise MsdError(f"judge {name!r} takes no option(s) {', '.join(sorted(unknown))}", "--judge")
    return cls(**options)
