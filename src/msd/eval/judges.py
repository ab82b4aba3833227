"""Judges: turn (query, response) pairs into safe / unsafe / invalid verdicts.

A judge has a `name`, a `version` (stored in every record, so a report can tell verdicts of
different judges apart) and `judge(items) -> verdicts`, one verdict per item, same order.
A verdict whose judge failed carries `error` and no label; it is never guessed.

    judge = get_judge("keyword")
    verdicts = judge.judge([JudgeItem(query, response, "jv", {})])

Built-in judges (see docs/EVALUATION.md for what each can and cannot see):
    oracle   the model organism's exact classifier (msd.organism.oracle)
    keyword  multilingual refusal lexicon: refusal -> safe, else unsafe (a weak proxy)
    llm      an OpenAI-compatible chat endpoint with our three-way prompt
    guard    a Hugging Face guard classifier (Qwen3Guard-Gen, Llama Guard)
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

from msd.errors import MsdError, closest

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


class Judge:
    """Base class. Subclasses set `name` and `version` and implement `judge`."""

    name: str = "judge"
    version: str = "0"

    def judge(self, items: list[JudgeItem]) -> list[Verdict]:  # pragma: no cover - interface
        raise NotImplementedError

    def describe(self) -> dict:
        """What to save next to a run (never secrets)."""
        return {"name": self.name, "version": self.version}


class OracleJudge(Judge):
    """The model organism's exact judge: its synthetic languages have known refusal and harm
    markers, so `msd.organism.oracle.classify` labels a response with certainty."""

    name = "oracle"

    def __init__(self):
        try:
            from msd.organism import oracle  # written alongside; imported only when used
        except ImportError as e:
            raise MsdError(f"the oracle judge needs msd.organism.oracle ({e})") from None
        self._oracle = oracle
        self.version = str(getattr(oracle, "VERSION", "1"))

    def judge(self, items: list[JudgeItem]) -> list[Verdict]:
        out = []
        for item in items:
            d = self._oracle.classify(item.response, item.meta, item.lang)
            out.append(Verdict(label=d.get("label"), refused=d.get("refused"),
                               helpful=d.get("helpful"), response_lang=d.get("response_lang"),
                               error=None if d.get("label") else "oracle gave no label"))
        return out


def _registry() -> dict[str, type[Judge]]:
    # Imported here: judge modules import this one for the base types.
    from msd.eval.guard import GuardJudge
    from msd.eval.keyword import KeywordJudge
    from msd.eval.llm_judge import LLMJudge

    return {"oracle": OracleJudge, "keyword": KeywordJudge, "llm": LLMJudge, "guard": GuardJudge}


JUDGE_NAMES = ("oracle", "keyword", "llm", "guard")


def get_judge(name: str, **options) -> Judge:
    """Build a judge by name. Options that are None are dropped (the CLI passes every flag)."""
    registry = _registry()
    if name not in registry:
        hint = closest(name, registry)
        raise MsdError(f"unknown judge {name!r}; choose from {', '.join(JUDGE_NAMES)}"
                       + (f" (did you mean {hint!r}?)" if hint else ""), "--judge")
    cls = registry[name]
    options = {k: v for k, v in options.items() if v is not None}
    accepted = inspect.signature(cls.__init__).parameters
    unknown = [k for k in options if k not in accepted]
    if unknown:
        raise MsdError(f"judge {name!r} takes no option(s) {', '.join(sorted(unknown))}", "--judge")
    return cls(**options)
