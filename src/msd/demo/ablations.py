"""The paper's comparisons (Sections 4-5) rerun on the organism: `msd demo --ablations`."""

from __future__ import annotations

from pathlib import Path

from msd.demo.steps import demo_config, evaluate_splits, summarize, train_variant
from msd.demo.summary import fmt

# The paper's comparisons (Sections 4-5), each a set of overrides on DEMO_CONFIG.
ABLATIONS = {
    "default (on-policy, DPSW, rkl, full, K=32)": {},
    "off-policy": {"train.mode": "off_policy"},
    "uniform weights (no DPSW)": {"loss.weighting": "uniform"},
    "forward KL": {"loss.divergence": "fkl"},
    "JSD (beta=0.5)": {"loss.divergence": "jsd"},
    "teacher context: english_only": {"prompt.teacher_context": "english_only"},
    "teacher context: instruction_only": {"prompt.teacher_context": "instruction_only"},
    "DPSW top-K 16": {"loss.top_k": 16},
    "DPSW top-K 64": {"loss.top_k": 64},
}


def ablation_row(name: str, s: dict, langs: dict, seconds: float) -> dict:
    def mean(values):
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    every = [m for split in s.values() for m in split.values()]
    return {"variant": name,
            "asr_train_trained": mean(s["train_queries"][c]["asr"] for c in langs["trained"]),
            "asr_heldout_trained": mean(s["heldout_queries"][c]["asr"] for c in langs["trained"]),
            "asr_heldout_unseen": mean(s["heldout_queries"][c]["asr"] for c in langs["unseen"]),
            "asr_heldout_english": mean(s["heldout_queries"][c]["asr"] for c in langs["english"]),
            "benign_refusal": mean(m["benign_refusal"] for m in every),
            "fidelity": mean(m["fidelity"] for m in every),
            "seconds": round(seconds, 1)}


def ablation_table(rows: list[dict]) -> str:
    lines = ["| variant | ASR train-intents (trained langs) | ASR held-out (trained langs) "
             "| ASR held-out (unseen) | ASR held-out (English) | benign refusal | fidelity | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {fmt(r['asr_train_trained'])} | {fmt(r['asr_heldout_trained'])} "
                     f"| {fmt(r['asr_heldout_unseen'])} | {fmt(r['asr_heldout_english'])} "
                     f"| {fmt(r['benign_refusal'])} | {fmt(r['fidelity'])} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def run_ablations(out: Path, seed: int, tuples, default_row: dict, overrides=(), limit=None,
                  progress: bool = True, variants: dict | None = None) -> list[dict]:
    """Train and evaluate each variant (default: ABLATIONS) but the first; one row each."""
    from msd.demo.seedtable import stats_section
    from msd.io import atomic_write_json, atomic_write_text
    from msd.organism import LANGUAGES

    rows = [default_row]
    for i, (name, extra) in enumerate((variants or ABLATIONS).items()):
        if not extra:
            continue
        vdir = out / "ablations" / f"{i:02d}"
        cfg = demo_config(vdir / "train", seed, {**dict(pairs(overrides)), **extra})
        print(f"msd demo: ablation '{name}'", flush=True)
        result, seconds = train_variant(cfg, tuples, progress)
        metrics = evaluate_splits(result.model, result.tokenizer, vdir / "eval", limit=limit,
                                  seed=seed, progress=progress)
        rows.append(ablation_row(name, summarize(metrics), LANGUAGES, seconds))
        atomic_write_json(out / "ablations.json", rows)
    text = ("# Ablations on the model organism\n\nMeans over languages; ASR on harmful queries, "
            "benign refusal and fidelity over all languages and both splits; seconds = MSD "
            "training time.\n\n" + ablation_table(rows) + "\n")
    names = list(variants or ABLATIONS)
    folders = {names[0]: out / "after"} | {name: out / "ablations" / f"{i:02d}" / "eval"
                                           for i, name in enumerate(names) if i}
    text += stats_section(out / "ablations_stats.json", folders, names[0], seed)
    atomic_write_text(out / "ablations.md", text)
    return rows


def pairs(overrides):
    from msd.config import parse_override

    return [parse_override(o) for o in overrides] if not isinstance(overrides, dict) else overrides.items()
