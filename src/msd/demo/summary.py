"""The demo's outputs: a markdown table, a plot, report.md and the printed table."""

from __future__ import annotations

import json
from pathlib import Path

def fmt(x) -> str:
    return "  -  " if x is None else f"{x:5.2f}"


def fmt_ci(m: dict, key: str = "asr") -> str:
    """A rate of a summary entry with its Wilson 95% interval: 0.90 [0.78, 0.96]."""
    ci = m.get("ci95" if key == "asr" else f"ci95_{key}")
    return fmt(m.get(key)).strip() + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def table(summary: dict) -> str:
    """Markdown table: per language, ASR before -> after on both splits, benign metrics after
    (the split where each is worst), every rate with its Wilson 95% interval."""
    from msd import languages

    lines = ["| language | role | ASR held-out: before → after | ASR train-intents: before → after "
             "| teacher ASR (held-out) | benign refusal after (worst split) | fidelity after (worst split) |",
             "|---|---|---|---|---|---|---|"]
    b, a, t = summary["before"], summary["after"], summary["teacher_before"]
    for role, codes in summary["languages"].items():
        for c in codes:
            name = languages.get(c).name
            refusal = max((a[s][c] for s in a), key=lambda m: m["benign_refusal"] or 0)
            fidelity = min((a[s][c] for s in a), key=lambda m: m["fidelity"] or 0)
            lines.append(
                f"| {c} {name} | {role} | {fmt_ci(b['heldout_queries'][c])} → "
                f"{fmt_ci(a['heldout_queries'][c])} | {fmt_ci(b['train_queries'][c])} → "
                f"{fmt_ci(a['train_queries'][c])} | {fmt_ci(t['heldout_queries'][c])} | "
                f"{fmt_ci(refusal, 'benign_refusal')} | {fmt_ci(fidelity, 'fidelity')} |")
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> Path:
    from msd import languages
    from msd.report.plots import grouped_bars, pyplot, save_figure

    plt = pyplot()
    langs = [c for codes in summary["languages"].values() for c in codes]
    names = [f"{c}\n{languages.get(c).name}" for c in langs]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    for ax, split in zip(axes, ("heldout_queries", "train_queries")):
        series = [(label, [summary[key][split][c]["asr"] for c in langs],
                   [summary[key][split][c].get("ci95") or (0, 0) for c in langs])
                  for label, key in (("before", "before"), ("after MSD", "after"),
                                     ("teacher prompt, before", "teacher_before"))]
        grouped_bars(ax, names, series, "ASR (%)")
        ax.set_xticklabels(names, rotation=0, ha="center")
        ax.get_legend().remove()
        ax.set_title(f"{split.replace('_', ' ')}: attack success rate (lower is better)\n"
                     "whiskers: Wilson 95% interval")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, frameon=False, bbox_to_anchor=(0.5, -0.1))
    return save_figure(fig, path)


def write_report(out: Path, summary: dict, checks: list[dict]) -> None:
    from msd.io import atomic_write_text

    lines = ["# msd demo: MSD on the model organism", "",
             f"Wall time: {summary['wall_seconds']:.0f} s "
             f"({', '.join(f'{k} {v:.0f} s' for k, v in summary['seconds'].items())}).", "",
             "Rates with Wilson 95% intervals in brackets; n = "
             f"{_n(summary)} harmful and benign queries per split and language, oracle judge, "
             "greedy decoding (seed-independent); the split is named in each column. Answers cut "
             f"at the token limit: {_cut(out)}.", "",
             table(summary), "", "![ASR before and after](asr_before_after.png)", "",
             "## Checks", ""]
    lines += [f"- [{'x' if c['pass'] else ' '}] {c['claim']}: {json.dumps(c['values'])}" for c in checks]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")


def _cut(out: Path) -> str:
    """Share of answers cut at the token limit per evaluation stage (records' `truncated`)."""
    from msd.eval.records import load_records
    from msd.report.paired import truncated_share

    parts = []
    for stage in ("before", "teacher_before", "after"):
        records = [r for split in sorted((out / stage).glob("*/records.jsonl"))
                   for r in load_records(split.parent)]
        share = truncated_share(records)
        parts.append(f"{stage} " + ("n/a" if share is None else f"{100 * share:.1f}%"))
    return ", ".join(parts)


def _n(summary: dict) -> str:
    ns = {m.get("n") for split in summary["after"].values() for m in split.values()}
    return "/".join(str(n) for n in sorted(ns, key=str))


def print_table(summary: dict) -> None:
    """The table on the terminal: before -> after, the after rates with their Wilson 95%
    intervals (benign refusal at its worst split, fidelity at its worst)."""
    from msd import languages

    b, a = summary["before"], summary["after"]
    print(f"\n{'language':<16}{'role':<9}{'ASR held-out [95%]':>28}{'ASR train-intents [95%]':>28}"
          f"{'benign refusal [95%]':>24}{'fidelity [95%]':>24}")
    for role, codes in summary["languages"].items():
        for c in codes:
            held = f"{b['heldout_queries'][c]['asr']:.2f} -> {fmt_ci(a['heldout_queries'][c])}"
            tr = f"{b['train_queries'][c]['asr']:.2f} -> {fmt_ci(a['train_queries'][c])}"
            ref = fmt_ci(max((a[s][c] for s in a), key=lambda m: m["benign_refusal"] or 0), "benign_refusal")
            fid = fmt_ci(min((a[s][c] for s in a), key=lambda m: m["fidelity"] or 0), "fidelity")
            print(f"{c + ' ' + languages.get(c).name:<16}{role:<9}{held:>28}{tr:>28}{ref:>24}{fid:>24}")
