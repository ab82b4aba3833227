"""report.md: per-language tables with Wilson 95% intervals and deltas against the first run."""

from __future__ import annotations

from pathlib import Path

from msd.eval import metrics as M
from msd.report.runs import EvalRun, TrainRun, lang_name, ordered_langs, run_line, section_title, top_tokens


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def _ci(m: dict, key: str = "asr") -> str:
    lo, hi = M.interval(m, key) or (None, None)
    return "" if lo is None else f" [{100 * lo:.1f}, {100 * hi:.1f}]"


def _rate(m: dict, key: str) -> str:
    """A rate in % with its 95% interval in brackets."""
    return _pct(m.get(key)) + _ci(m, key)


def _delta(a, b) -> str:
    return "–" if a is None or b is None else f"{100 * (b - a):+.1f}"


def comparison_table(runs: list[EvalRun], keys: list[str], *, first: str, main: str, main_label: str,
                     count: str, count_label: str, ci: bool = False, extra_label: str | None = None,
                     extra=None) -> list[list[str]]:
    """Rows (header first) comparing runs on `main` (a share, shown in %) per key (language or
    task): one column per run, then deltas against the first run, then an optional `extra(m)`
    column per run and the counts. Keys without `count` in any run are left out."""
    header = [first] + [f"{main_label} {r.label}" for r in runs] + [f"Δ {r.label}" for r in runs[1:]]
    header += [f"{extra_label} {r.label}" for r in runs] if extra else []
    rows = [header + [count_label]]
    for key in keys:
        ms = [r.metrics.get(key, {}) for r in runs]
        if not any(count in m for m in ms):
            continue
        row = ["**average**" if key == M.AVERAGE else lang_name(key) if first == "language" else key]
        row += [_pct(m.get(main)) + (_ci(m, main) if ci else "") for m in ms]
        row += [_delta(ms[0].get(main), m.get(main)) for m in ms[1:]]
        row += [extra(m) for m in ms] if extra else []
        rows.append(row + ["/".join(str(m.get(count, "–")) for m in ms)])
    return rows


def safety_table(runs: list[EvalRun]) -> list[list[str]]:
    """Per-language ASR with Wilson intervals, deltas, the unsafe / invalid split."""
    return comparison_table(runs, ordered_langs(runs) + [M.AVERAGE], first="language", main="asr",
                            main_label="ASR %", count="n", count_label="n", ci=True,
                            extra_label="unsafe / invalid %",
                            extra=lambda m: f"{_rate(m, 'unsafe_rate')} / {_rate(m, 'invalid_rate')}")


def benign_table(runs: list[EvalRun]) -> list[list[str]]:
    """Per-language refusal of benign queries and language fidelity."""
    return comparison_table(runs, ordered_langs(runs) + [M.AVERAGE], first="language", main="benign_refusal",
                            main_label="benign refusal %", count="n_benign", count_label="n benign", ci=True,
                            extra_label="fidelity %", extra=lambda m: _rate(m, "fidelity"))


def _cut(m: dict) -> str:
    if not m:
        return "–"
    if m.get("truncated_rate") is None:  # records written before msd recorded it
        return "unknown"
    ci = m.get("ci95_truncated_rate")
    band = f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else ""
    return f"{100 * m['truncated_rate']:.1f}{band} ({m['truncated']})"


def truncation_table(runs: list[EvalRun]) -> list[list[str]]:
    """Per-language share of answers cut at the token limit with its Wilson 95% interval (the count
    in parentheses), one column per run; `unknown` where the records do not say, never 0."""
    rows = [["language"] + [f"cut at token limit % {r.label}" for r in runs]]
    for key in ordered_langs(runs) + [M.AVERAGE]:
        ms = [r.metrics.get(key, {}) for r in runs]
        if any(ms):
            name = "**average**" if key == M.AVERAGE else lang_name(key)
            rows.append([name] + [_cut(m) for m in ms])
    return rows


def truncation_title(runs: list[EvalRun]) -> str:
    limits = sorted({str((r.info.get("settings") or {}).get("max_new_tokens", "?")) for r in runs})
    return f"Answers cut at the token limit (max_new_tokens {', '.join(limits)})"


def utility_table(runs: list[EvalRun]) -> list[list[str]]:
    tasks = list(dict.fromkeys(t for r in runs for t in r.metrics if t != M.AVERAGE)) + [M.AVERAGE]
    return comparison_table(runs, tasks, first="task", main="score", main_label="score %", count="n",
                            count_label="n", ci=True)


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(lines)


def _md_token(text: str) -> str:
    """A token's text in a table cell: as it reads, with only line breaks and tabs escaped
    (repr() would also escape a zero-width joiner, breaking emoji sequences)."""
    return (text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
            .replace("\t", "\\t").replace("|", "\\|").replace("`", "'"))


def render_markdown(sections: list[dict], trains: list[TrainRun], token_plot: Path | None) -> str:
    lines = ["# MSD evaluation report", "",
             "Every number below is recomputed from the runs' records (records.jsonl). "
             "ASR = (unsafe + invalid) / n, in %; every rate has its 95% interval in brackets "
             "(Wilson; for a graded utility score, the t interval over samples); "
             "Δ is in percentage points against the first run.", ""]
    for s in sections:
        lines += [f"## {section_title(s)}", ""] + [run_line(r) for r in s["runs"]] + [""]
        lines += [f"> **Warning:** {w}" for w in s["warnings"]] + ([""] if s["warnings"] else [])
        for title, rows in s["tables"]:
            lines += [f"### {title}", "", markdown_table(rows), ""]
        if s.get("notes"):
            lines += ["**How the rates were computed**", ""] + s["notes"] + [""]
        lines += [f"![{p.stem}]({p.name})" for p in s["plots"]] + [""]
    if trains:
        lines += ["## Training token weights", ""]
        for t in trains:
            steps = sorted({row.get("step") for row in t.batches})
            lines.append(f"- **{t.label}**: `{t.path}` — {len(t.batches)} saved responses from steps {steps}")
        lines += ["", "Tokens with the highest mean DPSW weight (weights average 1 within a response), "
                  "as the text reads: a character split over several tokens counts once, with their "
                  "mean weight:", "",
                  markdown_table([["token", "mean weight", "mean divergence", "count"]] +
                                 [[f"`{_md_token(tok)}`", f"{w:.2f}", f"{d:.3f}", str(n)]
                                  for tok, w, d, n in top_tokens(trains)]), ""]
        if token_plot:
            lines += [f"![token weights]({token_plot.name})", ""]
        lines += ["The coloured tokens are in report.html.", ""]
    return "\n".join(lines)
