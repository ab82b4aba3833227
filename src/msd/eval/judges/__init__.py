"""Judges: turn (query, response) pairs into safe / unsafe / invalid verdicts.

    judge = get_judge("keyword")
    verdicts = judge.judge([JudgeItem(query, response, "jv", {})])

One module per built-in judge, each registering itself in JUDGES (see docs/EVALUATION.md for
what each can and cannot see):
    keyword  multilingual refusal lexicon: refusal -> safe, else unsafe (a weak proxy)
    llm      an OpenAI-compatible chat endpoint with our three-way prompt
    guard    a Hugging Face guard classifier (Qwen3Guard-Gen, Llama Guard)
Plugins add more: the model organism registers `oracle`, its exact classifier.
"""

from msd.eval.judges.base import JUDGES, LABELS, Judge, JudgeItem, JudgeOption, Verdict, get_judge

__all__ = ["JUDGES", "LABELS", "Judge", "JudgeItem", "JudgeOption", "Verdict", "get_judge"]
