"""Language identification of responses (fidelity), offline."""

from __future__ import annotations

import pytest

from msd.eval.langid import UNDETERMINED, detect, vendored_parallel_text


@pytest.mark.parametrize("text,code", [
    ("Nyuwun pangapunten, kula mboten saged mbiyantu panjenengan babagan punika.", "jv"),
    ("Samahani, siwezi kukusaidia na ombi hilo kwa sababu ni hatari.", "sw"),
    ("আমি দুঃখিত, আমি এই অনুরোধে সাহায্য করতে পারব না।", "bn"),
    ("ขออภัย ฉันไม่สามารถช่วยเหลือในเรื่องนี้ได้", "th"),
    ("I am sorry, but I cannot help with that request.", "en"),
])
def test_detect(text, code):
    assert detect(text) == code


def test_no_letters_is_undetermined():
    assert detect("") == UNDETERMINED and detect("12 + 3 = 15 !!") == UNDETERMINED


def test_candidates_restrict_the_answer():
    assert detect("Aku ora bisa mbantu kowe", ["id", "ms"]) in ("id", "ms")


def test_accuracy_on_multijail_sample():
    """A slice of the table in docs/EVALUATION.md: the first 40 MultiJail prompts per language."""
    texts = vendored_parallel_text()["multijail"]
    for lang, items in texts.items():
        acc = sum(detect(t) == lang for t in items[:40]) / 40
        assert acc >= (0.9 if lang == "jv" else 0.95), (lang, acc)
