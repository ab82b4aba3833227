"""MultiJail: 315 harmful prompts, parallel in 10 languages."""

from __future__ import annotations

import ast
import csv

from msd.data import DATASETS, RESOURCES, DatasetSpec
from msd.data.tuples import QueryTuple

LANGS = ["en", "zh", "it", "vi", "ar", "ko", "th", "bn", "sw", "jv"]


def load() -> list[QueryTuple]:
    path = RESOURCES / "multijail" / "MultiJail.csv"
    out = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        for row in csv.DictReader(f):
            tags = ast.literal_eval(row["tags"]) if row.get("tags") else []
            out.append(QueryTuple(f"multijail-{row['id']}", {k: row[k] for k in LANGS},
                                  {"source": row["source"], "tags": tags, "harmful": True}))
    return out


DATASETS.register("multijail", DatasetSpec(load, lambda: list(LANGS),
                                           "MultiJail: 315 harmful prompts x 10 languages"))
