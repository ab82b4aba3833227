"""The oracle judge: the model organism's exact classifier, registered as judge "oracle".

The organism's synthetic languages have known refusal and harm markers, so
`msd.organism.oracle.classify` labels a response with certainty (safe / unsafe / invalid, refused,
helpful, and the language the response is written in).
"""

from __future__ import annotations

from msd.eval.judges import JUDGES, Judge, JudgeItem, Verdict
from msd.organism import oracle


@JUDGES.register("oracle")
class OracleJudge(Judge):
    name = "oracle"
    version = oracle.VERSION
    summary = "organism only, exact"

    def judge(self, items: list[JudgeItem]) -> list[Verdict]:
        out = []
        for item in items:
            d = oracle.classify(item.response, item.meta, item.lang)
            out.append(Verdict(label=d.get("label"), refused=d.get("refused"),
                               helpful=d.get("helpful"), response_lang=d.get("response_lang"),
                               error=None if d.get("label") else "oracle gave no label"))
        return out
