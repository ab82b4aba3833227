"""PolyRefuse test splits: harmful (572 x 14 languages) and harmless (500 x 13), machine-translated."""

from __future__ import annotations

import json

from msd.data import DATASETS, RESOURCES, DatasetSpec
from msd.data.tuples import QueryTuple

HARMFUL_LANGS = ["en", "ar", "de", "es", "fr", "it", "ja", "ko", "nl", "pl", "ru", "th", "yo", "zh"]
HARMLESS_LANGS = ["en", "ar", "de", "es", "fr", "it", "ja", "ko", "nl", "pl", "ru", "th", "yo"]


def load(kind: str, langs: list[str]) -> list[QueryTuple]:
    """`<kind>_test_translated_<lang>.json`, aligned by row index (the English source
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


DATASETS.register("polyrefuse-harmful", DatasetSpec(
    lambda: load("harmful", HARMFUL_LANGS), lambda: list(HARMFUL_LANGS),
    "PolyRefuse harmful test: 572 prompts x 14 languages (machine-translated)"))
DATASETS.register("polyrefuse-harmless", DatasetSpec(
    lambda: load("harmless", HARMLESS_LANGS), lambda: list(HARMLESS_LANGS),
    "PolyRefuse harmless test: 500 benign prompts x 13 languages (over-refusal)"))
DATASETS.register("polyrefuse", DatasetSpec(
    lambda: load("harmful", HARMFUL_LANGS) + load("harmless", HARMLESS_LANGS), lambda: list(HARMLESS_LANGS),
    "PolyRefuse harmful + harmless test prompts (meta 'harmful' tells which), for training on both"))
