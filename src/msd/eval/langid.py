"""Offline language identification of responses (language fidelity).

`detect(text)` returns one of our language codes (msd.languages), using py3langid's bundled
model (97 languages, covers jv, sw, bn, th). Codes for varieties it separates but we do not are
folded in (yue/wuu -> zh, arz/ary -> ar, ...). Empty or symbol-only text gives "und".
Per-language accuracy on the vendored parallel text is in docs/EVALUATION.md; Javanese is the
weakest (often read as Indonesian or Malay), so treat jv fidelity as a lower bound.

For the model organism's synthetic languages this module is not used: the oracle reports the
response language itself.
"""

from __future__ import annotations

from functools import lru_cache

UNDETERMINED = "und"

# py3langid codes -> ours, where they differ.
FOLD = {"yue": "zh", "wuu": "zh", "arz": "ar", "ary": "ar", "nn": "no", "uzs": "uz", "zxx": UNDETERMINED}


@lru_cache(maxsize=16)
def _identifier(candidates: tuple[str, ...] | None = None):
    """Our own identifier instance (py3langid's global one is left alone), optionally limited
    to `candidates` (py3langid codes)."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    ident = LanguageIdentifier.from_model_file(MODEL_FILE)
    if candidates:
        ident.set_languages(list(candidates))
    return ident


def detect(text: str, candidates: list[str] | tuple[str, ...] | None = None) -> str:
    """The language code of `text`, or "und" when it has no letters.

    `candidates` limits the answer to a set of codes (e.g. the languages of a benchmark); by
    default all of py3langid's languages are possible.
    """
    if not text or not any(ch.isalpha() for ch in text):
        return UNDETERMINED
    ident = _identifier(tuple(sorted(set(candidates))) if candidates else None)
    code, _ = ident.classify(text)
    return FOLD.get(code, code)


# ----------------------------------------------------------------------------- accuracy check

def vendored_parallel_text() -> dict[str, dict[str, list[str]]]:
    """source -> language -> texts: MultiJail (10 languages), PolyRefuse harmless test
    (13 languages, machine-translated), MGSM questions (11 languages)."""
    import csv
    import json

    from msd.data import RESOURCES, load_dataset

    out: dict[str, dict[str, list[str]]] = {"multijail": {}, "polyrefuse": {}, "mgsm": {}}
    multijail = load_dataset("multijail")
    tuples = multijail.tuples
    for lang in multijail.langs:
        out["multijail"][lang] = [t.texts[lang] for t in tuples]
    for path in sorted((RESOURCES / "polyrefuse").glob("harmless_test_translated_*.json")):
        lang = path.stem.rsplit("_", 1)[1]
        rows = json.loads(path.read_text(encoding="utf-8"))
        out["polyrefuse"][lang] = [r.get("instruction_translated") or r["instruction"] for r in rows]
    for path in sorted((RESOURCES / "mgsm").glob("mgsm_*.tsv")):
        lang = path.stem.split("_", 1)[1]
        with open(path, encoding="utf-8", newline="") as f:
            out["mgsm"][lang] = [row[0] for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if row]
    return out


def accuracy_table(candidates: list[str] | None = None) -> dict[str, dict[str, dict]]:
    """source -> language -> {"accuracy", "n", "top_confusion"} of `detect` on vendored text."""
    from collections import Counter

    table: dict[str, dict[str, dict]] = {}
    for source, by_lang in vendored_parallel_text().items():
        for lang, texts in by_lang.items():
            preds = Counter(detect(t, candidates) for t in texts)
            wrong = [(code, k) for code, k in preds.most_common() if code != lang]
            table.setdefault(source, {})[lang] = {
                "accuracy": preds[lang] / len(texts), "n": len(texts),
                "top_confusion": f"{wrong[0][0]} ({wrong[0][1]})" if wrong else "-"}
    return table


if __name__ == "__main__":  # python -m msd.eval.langid: the table in docs/EVALUATION.md
    for source, by_lang in accuracy_table().items():
        print(f"\n{source}\n| lang | accuracy | n | most frequent error |\n|---|---|---|---|")
        for lang, row in by_lang.items():
            print(f"| {lang} | {row['accuracy']:.3f} | {row['n']} | {row['top_confusion']} |")
