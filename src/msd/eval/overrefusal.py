"""Over-refusal: how often the model refuses benign requests, per language.

Runs the same generation / judging / records as the safety evaluation (msd.eval.safety) on the
benign queries of a benchmark only (XSTest's 250 safe prompts, PolyRefuse's harmless prompts
in 13 languages, the organism's benign requests), so metrics.json carries `benign_refusal`,
`fidelity` (the response is in the query's language) and `n_benign` per language.

The judge decides what a refusal is: `keyword` (refusal phrases), `llm` (second word of its
reply), `oracle` (the organism's refusal sentences), `guard` (Qwen3Guard's "Refusal:" line;
Llama Guard reports none, so it cannot measure over-refusal).
"""

from __future__ import annotations

from pathlib import Path

from msd.errors import MsdError
from msd.data import benign
from msd.eval.safety import evaluate


def benign_tuples(tuples, benchmark: str):
    """The benign tuples of a benchmark, or a one-line error when it has none."""
    out = benign(tuples)
    if not out:
        raise MsdError(f"benchmark {benchmark!r} has no benign queries (meta harmful=false); "
                       "use xstest, polyrefuse-harmless, organism-train or organism-heldout",
                       "--benchmark")
    return out


def evaluate_overrefusal(model, tokenizer, tuples, langs, judge, out_dir: str | Path, *,
                         benchmark: str, **kwargs) -> dict:
    """`msd.eval.safety.evaluate` on the benign tuples of `tuples`; same keyword arguments."""
    tuples = benign_tuples(tuples, benchmark)
    kwargs["run_info"] = {**(kwargs.get("run_info") or {}), "kind": "overrefusal"}
    return evaluate(model, tokenizer, tuples, langs, judge, out_dir, benchmark=benchmark, **kwargs)
