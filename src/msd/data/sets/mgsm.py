"""MGSM's grade-school maths questions as benign prompts (11 languages, parallel by row).

Used where a benign prompt set is needed in a language that PolyRefuse's harmless set and XSTest
lack (Bengali, Swahili, Telugu, Thai): a model asked a maths word problem should answer it,
never refuse. Accuracy on MGSM is measured by `msd eval utility` (lm-evaluation-harness).
"""

from __future__ import annotations

import csv

from msd.data import DATASETS, RESOURCES, DatasetSpec
from msd.data.tuples import QueryTuple

LANGS = ["en", "bn", "de", "es", "fr", "ja", "ru", "sw", "te", "th", "zh"]


def load() -> list[QueryTuple]:
    """`mgsm_<lang>.tsv` (question TAB answer, no header), aligned by row index."""
    rows = {}
    for lang in LANGS:
        with open(RESOURCES / "mgsm" / f"mgsm_{lang}.tsv", encoding="utf-8", newline="") as f:
            rows[lang] = [r[0] for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if r]
    n = min(len(v) for v in rows.values())
    return [QueryTuple(f"mgsm-{i}", {lang: rows[lang][i] for lang in LANGS}, {"harmful": False})
            for i in range(n)]


DATASETS.register("mgsm-prompts", DatasetSpec(
    load, lambda: list(LANGS), "MGSM maths questions as benign prompts: 250 x 11 languages (over-refusal)"))
