"""English-only sets: AdvBench (520 harmful behaviours) and XSTest (250 safe + 200 unsafe)."""

from __future__ import annotations

import csv

from msd.data import DATASETS, RESOURCES, DatasetSpec
from msd.data.tuples import QueryTuple


def advbench() -> list[QueryTuple]:
    with open(RESOURCES / "advbench" / "harmful_behaviors.csv", encoding="utf-8", newline="") as f:
        return [QueryTuple(f"advbench-{i}", {"en": row["goal"]}, {"harmful": True})
                for i, row in enumerate(csv.DictReader(f))]


def xstest() -> list[QueryTuple]:
    """All 450 XSTest prompts: 250 safe ones (harmful=False, for over-refusal) and 200 unsafe
    contrast prompts (harmful=True)."""
    with open(RESOURCES / "xstest" / "xstest_prompts.csv", encoding="utf-8", newline="") as f:
        return [QueryTuple(f"xstest-{row['id']}", {"en": row["prompt"]},
                           {"harmful": row["label"] == "unsafe", "type": row["type"]})
                for row in csv.DictReader(f)]


DATASETS.register("advbench", DatasetSpec(advbench, lambda: ["en"],
                                          "AdvBench: 520 harmful behaviours, English"))
DATASETS.register("xstest", DatasetSpec(xstest, lambda: ["en"],
                                        "XSTest: 250 safe + 200 unsafe contrast prompts, English"))
