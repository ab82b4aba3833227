"""XSafety: 2,800 prompts in 14 safety types, parallel in 10 languages."""

from __future__ import annotations

import csv
from pathlib import Path

from msd.data import DATASETS, RESOURCES, DatasetSpec
from msd.data.tuples import QueryTuple

TYPES = [
    "Crimes_And_Illegal_Activities", "Ethics_And_Morality", "Insult", "Mental_Health",
    "Physical_Harm", "Privacy_And_Property", "Unfairness_And_Discrimination", "Goal_Hijacking",
    "Inquiry_With_Unsafe_Opinion", "Prompt_Leaking", "Reverse_Exposure", "Role_Play_Instruction",
    "Unsafe_Instruction_Topic", "commonsense",
]
LANGS = ["en", "zh", "ar", "bn", "de", "fr", "hi", "ja", "ru", "es"]


def file_of(lang: str, issue: str) -> Path | None:
    folder = RESOURCES / "xsafety" / ("sp" if lang == "es" else lang)
    # Upstream file names are inconsistent (_n, _en suffixes, a missing final 's').
    for name in (issue, f"{issue}_n", f"{issue}_en", issue.rstrip("s")):
        path = folder / f"{name}.csv"
        if path.exists():
            return path
    return None


def load() -> list[QueryTuple]:
    """XSafety as parallel tuples (rows align across languages by index within each type)."""
    columns: dict[str, dict[str, list[str]]] = {}
    for issue in TYPES:
        for lang in LANGS:
            path = file_of(lang, issue)
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


DATASETS.register("xsafety", DatasetSpec(
    load, lambda: list(LANGS),
    "XSafety: 2,800 prompts x 10 languages; many are not requests, so it measures unsafe responses"))
