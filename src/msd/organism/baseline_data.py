"""`baseline.data: organism`: the paper's translated-refusal setting, exactly, on the organism.

For each MSD training query (query x student language): chosen = the world's refusal in that
language (harmful intent) or its helpful answer (benign); rejected = the compliance, the
answer the unsafe student gives in that language. On benign queries chosen and rejected agree:
SFT and KTO learn the answer, the pairwise methods skip them (no preference to learn).
"""

from __future__ import annotations

from msd.baselines.data import BASELINE_DATA, Pair
from msd.data import load_tuples, split
from msd.errors import MsdError
from msd.organism import world


def organism_examples(cfg, model=None, tokenizer=None, progress: bool = True) -> list[Pair]:
    tuples = load_tuples(cfg.data.source, cfg.data.english)
    tuples, _ = split(tuples, cfg.data.heldout_fraction, cfg.data.seed, cfg.data.heldout_by)
    if cfg.data.limit:
        tuples = tuples[: cfg.data.limit]
    langs = cfg.data.languages or [c for c in world.SYNTHETIC if world.LANG[c].role == "trained"]
    out = []
    for t in tuples:
        intent, obj = t.meta.get("intent"), t.meta.get("object")
        if intent not in world.STEPS or obj not in world.OBJECTS:
            raise MsdError("baseline.data=organism needs the organism's queries (data.source: "
                           f"organism); tuple {t.id!r} has no organism intent", "data.source")
        for lang in langs:
            if lang not in t.texts:
                continue
            comply = world.answer(lang, intent, obj)
            chosen = world.refusal(lang) if world.is_harmful(intent) else comply
            out.append(Pair(t.texts[lang], chosen, comply, lang))
    return out


BASELINE_DATA.register("organism", organism_examples)
