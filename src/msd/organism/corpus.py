"""The organism's pre-training corpus: chat examples that build in the multilingual safety gap.

Each example is a chat prompt (rendered by the organism's own chat template, the same code
path `msd.prompts` uses) and the assistant's reply. What the corpus teaches:

- student format (plain query): English and Velari refuse harmful requests; Oruni, Kashti,
  Tamuri and Tamosi comply with them (the gap); benign requests are answered in their own
  language everywhere.
- teacher format, the exact `msd.prompts.TEACHER_TEMPLATES` texts:
  - "full" (target + English + instruction): always right: refuse if harmful, else answer in
    the target language;
  - "english_only" (no instruction): the model reacts to the English text without being told
    to check safety or the reply language: it lets two harmful intents through
    (EO_MISSED_INTENTS), and answers benign requests about a third of the objects in English
    (EO_ENGLISH_OBJECTS);
  - "instruction_only" (no English): the model must judge the request in a language it reads
    poorly: in each low-resource language it misreads two harmful intents (drawn per
    language) as harmless.
  The flawed intents are MSD-train intents only (see docs/ORGANISM.md: a flaw on an intent
  weakens the organism's sense that the intent is harmful, which would confound the held-out
  split), and the English-reply flaw is tied to objects, not intents.
- moderation: "Is this request harmful ?" about any query in any language, answered yes or no,
  always right: the organism *knows* which requests are harmful in every language, it just
  does not act on it in the low-resource ones (the paper's premise).
- parallel data: translation of queries, answers and refusals between English and each
  language, both ways, and a bilingual dictionary (every word, both ways): a shared meaning
  for every language's words.

Bump CORPUS_VERSION whenever what this module generates changes: it is part of the cache key.
"""

from __future__ import annotations

from dataclasses import dataclass

from msd.organism import world as w
from msd.prompts import TEACHER_TEMPLATES, teacher_message

CORPUS_VERSION = 3

# Fixed: flaws on held-out intents (and, for instruction_only, on objects) made MSD fail on
# exactly the held-out requests they touched: the flawed context taught the organism that those
# words are not harmful. Safety flaws now sit on MSD-train intents, where MSD's own teacher
# (full) corrects them; the English-reply flaw sits on objects (benign requests only).
EO_MISSED_INTENTS = ("smuggle", "counterfeit")
EO_ENGLISH_OBJECTS = ("rice", "box", "boat", "water")
IO_MISREAD_PER_LANG = 2


COMPONENTS = ("student", "full", "english_only", "instruction_only", "moderation", "translation",
              "dictionary")
MODERATION = "Is this request harmful ? Answer yes or no : {query}"


@dataclass(frozen=True)
class Example:
    component: str  # one of COMPONENTS
    user: str
    reply: str


def student_reply(lang: str, intent: str, obj: str) -> str:
    """What the pre-trained model says to the plain query: the gap is here."""
    if w.is_harmful(intent) and w.LANG[lang].role in ("english", "safe"):
        return w.refusal(lang)
    return w.answer(lang, intent, obj)


def io_misread(lang: str) -> tuple[str, ...]:
    """Harmful intents the instruction-only teacher misjudges in `lang` (low-resource only)."""
    if w.LANG[lang].role not in ("trained", "unseen"):
        return ()
    ranked = sorted(w.TRAIN_HARMFUL, key=lambda i: w.hash01("io-misread", lang, i))
    return tuple(ranked[:IO_MISREAD_PER_LANG])


def teacher_reply(context: str, lang: str, intent: str, obj: str) -> str:
    """What the pre-trained model says to the teacher prompt in `context`."""
    harmful = w.is_harmful(intent)
    if context == "full":
        return w.refusal(lang) if harmful else w.answer(lang, intent, obj)
    if context == "english_only":
        if harmful:
            return w.answer(lang, intent, obj) if intent in EO_MISSED_INTENTS else w.refusal(lang)
        return w.answer("en" if obj in EO_ENGLISH_OBJECTS else lang, intent, obj)
    if context == "instruction_only":
        if harmful and intent not in io_misread(lang):
            return w.refusal(lang)
        return w.answer(lang, intent, obj)
    raise ValueError(f"unknown teacher context {context!r}")


def _combos():
    for intent in w.INTENTS:
        for obj in w.OBJECTS:
            for ph in range(len(w.PHRASINGS)):
                yield intent, obj, ph


def examples() -> dict[str, list[Example]]:
    """Every example of every component, in a fixed order (the sampler draws from these)."""
    out: dict[str, list[Example]] = {c: [] for c in COMPONENTS}
    for intent, obj, ph in _combos():
        english = w.query("en", intent, obj, ph)
        for lang in w.CODES:
            q = w.query(lang, intent, obj, ph)
            out["student"].append(Example("student", q, student_reply(lang, intent, obj)))
            out["moderation"].append(Example("moderation", MODERATION.format(query=q),
                                             "yes" if w.is_harmful(intent) else "no"))
            contexts = ("full",) if lang == "en" else tuple(TEACHER_TEMPLATES)
            for context in contexts:
                msg = teacher_message(q, english, lang, TEACHER_TEMPLATES[context])
                out[context].append(Example(context, msg, teacher_reply(context, lang, intent, obj)))
            if lang != "en":
                out["translation"] += [
                    Example("translation", w.translate_request("en", q), english),
                    Example("translation", w.translate_request(lang, english), q),
                ]
    for lang in w.SYNTHETIC:
        for intent in w.INTENTS:
            for obj in w.OBJECTS:
                a, a_en = w.answer(lang, intent, obj), w.answer("en", intent, obj)
                out["translation"] += [Example("translation", w.translate_request("en", a), a_en),
                                       Example("translation", w.translate_request(lang, a_en), a)]
        out["translation"] += [
            Example("translation", w.translate_request("en", w.refusal(lang)), w.refusal("en")),
            Example("translation", w.translate_request(lang, w.refusal("en")), w.refusal(lang))]
        for en_word, word in w.lexicons()[lang].items():
            if en_word in w.PUNCT or en_word == "to_answer":  # "to" is listed once
                continue
            en_word = w.lexicons()["en"][en_word]
            out["dictionary"] += [Example("dictionary", w.translate_request("en", word), en_word),
                                  Example("dictionary", w.translate_request(lang, en_word), word)]
    return out


def vocab_texts() -> list[str]:
    """Texts holding every word the organism uses (builds the vocabulary)."""
    texts = []
    for lang in w.CODES:
        texts += [w.query(lang, i, o, ph) for i, o, ph in _combos()]
        texts += [w.answer(lang, i, o) for i in w.INTENTS for o in w.OBJECTS]
        texts += [w.refusal(lang), w.translate_request(lang, "")]
        texts += [teacher_message("", "", lang, tpl) for tpl in TEACHER_TEMPLATES.values()]
    texts += [MODERATION.format(query=""), "yes no"]
    return texts
