"""Evaluation benchmarks as parallel query tuples (msd.data.QueryTuple), read offline.

    bench = load("multijail")      # .tuples, .langs (default languages), .description

Each tuple's meta says whether the query is harmful (`harmful`, default True); safety metrics use
the harmful ones (ASR), over-refusal metrics the benign ones. Any other name is read as a user
file of parallel queries (JSONL/CSV, see msd.data.load_tuples).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass

from msd import data
from msd.data import RESOURCES, QueryTuple
from msd.errors import MsdError


@dataclass
class Benchmark:
    name: str
    tuples: list[QueryTuple]
    langs: list[str]  # default languages, in table order
    description: str


POLYREFUSE_HARMFUL_LANGS = ["en", "ar", "de", "es", "fr", "it", "ja", "ko", "nl", "pl", "ru", "th", "yo", "zh"]
POLYREFUSE_HARMLESS_LANGS = ["en", "ar", "de", "es", "fr", "it", "ja", "ko", "nl", "pl", "ru", "th", "yo"]


def _polyrefuse(kind: str, langs: list[str]) -> list[QueryTuple]:
    """PolyRefuse `<kind>_test_translated_<lang>.json`, aligned by row index (the English source
    `instruction` is the same in every file)."""
    folder = RESOURCES / "polyrefuse"
    by_lang = {lang: json.loads((folder / f"{kind}_test_translated_{lang}.json").read_text(encoding="utf-8"))
               for lang in langs}
    english = [r["instruction"] for r in by_lang["en"]]
    out = []
    for i, en in enumerate(english):
        texts = {"en": en}
        for lang, rows in by_lang.items():
            if lang != "en" and i < len(rows) and rows[i].get("instruction") == en:
                text = rows[i].get("instruction_translated")
                if text and text.strip():
                    texts[lang] = text
        out.append(QueryTuple(f"polyrefuse-{kind}-{i}", texts,
                              {"harmful": kind == "harmful", "category": by_lang["en"][i].get("category")}))
    return out


def _advbench() -> list[QueryTuple]:
    with open(RESOURCES / "advbench" / "harmful_behaviors.csv", encoding="utf-8", newline="") as f:
        return [QueryTuple(f"advbench-{i}", {"en": row["goal"]}, {"harmful": True})
                for i, row in enumerate(csv.DictReader(f))]


def _xstest() -> list[QueryTuple]:
    """All 450 XSTest prompts: 250 safe ones (harmful=False, for over-refusal) and 200 unsafe
    contrast prompts (harmful=True)."""
    with open(RESOURCES / "xstest" / "xstest_prompts.csv", encoding="utf-8", newline="") as f:
        return [QueryTuple(f"xstest-{row['id']}", {"en": row["prompt"]},
                           {"harmful": row["label"] == "unsafe", "type": row["type"]})
                for row in csv.DictReader(f)]


def _organism(split: str) -> list[QueryTuple]:
    from msd.organism import eval_queries  # registers the organism's languages

    return eval_queries(split)


def _organism_langs() -> list[str]:
    from msd.organism import world

    return list(world.CODES)


BUILTIN = {
    # name: (loader, default languages, description)
    "multijail": (data.load_multijail, lambda: list(data.MULTIJAIL_LANGS),
                  "MultiJail: 315 harmful prompts x 10 languages"),
    "xsafety": (data.load_xsafety, lambda: list(data.XSAFETY_LANGS),
                "XSafety: 2,800 prompts x 10 languages; many are not requests, so it measures unsafe responses"),
    "advbench": (_advbench, lambda: ["en"], "AdvBench: 520 harmful behaviours, English"),
    "polyrefuse-harmful": (lambda: _polyrefuse("harmful", POLYREFUSE_HARMFUL_LANGS),
                           lambda: list(POLYREFUSE_HARMFUL_LANGS),
                           "PolyRefuse harmful test: 572 prompts x 14 languages (machine-translated)"),
    "polyrefuse-harmless": (lambda: _polyrefuse("harmless", POLYREFUSE_HARMLESS_LANGS),
                            lambda: list(POLYREFUSE_HARMLESS_LANGS),
                            "PolyRefuse harmless test: 500 benign prompts x 13 languages (over-refusal)"),
    "xstest": (_xstest, lambda: ["en"], "XSTest: 250 safe + 200 unsafe contrast prompts, English"),
    "organism-train": (lambda: _organism("train_queries"), _organism_langs,
                       "the model organism: MSD-train harmful intents in new phrasings + benign"),
    "organism-heldout": (lambda: _organism("heldout_queries"), _organism_langs,
                         "the model organism: held-out harmful intents + benign"),
}
SAFETY_DEFAULT = "multijail"
OVERREFUSAL_DEFAULT = "xstest"


def load(name: str) -> Benchmark:
    """A built-in benchmark by name, or a JSONL/CSV file of parallel queries."""
    if name in BUILTIN:
        loader, langs, description = BUILTIN[name]
        return Benchmark(name, loader(), langs(), description)
    if name.endswith((".jsonl", ".json", ".csv")) or "/" in name:
        tuples = data.load_tuples(name)
        langs = list(dict.fromkeys(lang for t in tuples for lang in t.texts))
        from pathlib import Path

        return Benchmark(Path(name).stem, tuples, langs, f"queries from {name}")
    from msd.errors import closest

    hint = closest(name, BUILTIN)
    raise MsdError(f"unknown benchmark {name!r}; choose from {', '.join(BUILTIN)} or give a "
                   ".jsonl/.csv file of parallel queries" + (f" (did you mean {hint!r}?)" if hint else ""),
                   "--benchmark")


def benign(tuples: list[QueryTuple]) -> list[QueryTuple]:
    return [t for t in tuples if not t.meta.get("harmful", True)]
