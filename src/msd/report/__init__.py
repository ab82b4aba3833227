"""`msd report DIR [DIR...]`: tables, plots and a page built from run records alone.

    msd report runs/eval-before runs/eval-after runs/train --out runs/report

Inputs are evaluation run folders (records.jsonl; see msd.eval.records) and training folders
(token_batches/step_<N>.jsonl). Metrics are recomputed from the records (STYLE rule 10), never
read from metrics.json, so a report always matches its records. Runs of the same kind and
benchmark are compared in the order given: the first is "before", each later one "after", with
deltas. The report warns when compared runs used different judges or generation settings.

Modules: runs (loading run folders), markdown (report.md), plots (the PNGs), html (report.html).

Outputs in --out:
    report.md                    per-language tables with Wilson 95% intervals and deltas; how
                                 each rate was computed (n, judge, split, share cut at the token
                                 limit); with two or more runs of a safety benchmark, the paired
                                 change in ASR per language against the first run (exact McNemar,
                                 paired bootstrap interval, Holm over languages)
    paired.json                  those paired comparisons, per language (msd.report.paired)
    asr_<benchmark>.png          ASR per language, one bar per run, interval whiskers
    asr_split_<benchmark>.png    unsafe vs invalid share per language and run
    overrefusal_<benchmark>.png  benign refusal per language (when benign queries exist)
    utility.png                  utility score per task and run (when utility runs are given)
    token_weights.png            mean DPSW weight and divergence by response position
    report.html                  one self-contained page: the tables, the plots, and sampled
                                 training responses with every token coloured by its DPSW
                                 weight or divergence (msd.report.html)
"""

from __future__ import annotations

from pathlib import Path

from msd.errors import MsdError
from msd.io import atomic_write_json, atomic_write_text
from msd.report import plots
from msd.report.html import render
from msd.report.markdown import (benign_table, render_markdown, safety_table, truncation_table,
                                 truncation_title, utility_table)
from msd.report.paired import OUTCOMES, paired_note, paired_rows, paired_sections, provenance
from msd.report.runs import groups, load_inputs, top_tokens, warnings_for

__all__ = ["add_parser", "build", "load_inputs", "safety_table", "top_tokens"]


def build(dirs: list[str], out: str | Path, *, labels: list[str] | None = None,
          samples: int = 3) -> dict:
    """Write report.md, the PNGs and report.html into `out`; return {name: path}."""
    evals, trains = load_inputs(dirs, labels)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sections: list[dict] = []  # shared by the markdown and the HTML page
    for (kind, benchmark), runs in groups(evals).items():
        section = {"kind": kind, "benchmark": benchmark, "runs": runs, "tables": [],
                   "plots": [], "warnings": warnings_for(runs) if len(runs) > 1 else [],
                   "notes": [], "paired": []}
        if kind == "utility":
            section["tables"].append(("Utility (lm-evaluation-harness)", utility_table(runs)))
        else:
            if any("asr" in m for r in runs for m in r.metrics.values()):
                section["tables"].append((f"Attack success rate, {benchmark}", safety_table(runs)))
            if any("n_benign" in m for r in runs for m in r.metrics.values()):
                section["tables"].append((f"Over-refusal and language fidelity, {benchmark}", benign_table(runs)))
            section["tables"].append((truncation_title(runs), truncation_table(runs)))
            _add_paired(section)
        section["plots"] = plots.plot_section(section, out)
        sections.append(section)
    token_plot = plots.plot_token_weights(trains, out) if trains else None
    files = {"markdown": out / "report.md", "html": out / "report.html"}
    atomic_write_text(files["markdown"], render_markdown(sections, trains, token_plot))
    atomic_write_text(files["html"], render(sections, trains, out, token_plot=token_plot,
                                                        samples=samples))
    paired = [cmp for s in sections for cmp in s["paired"]]
    if paired:
        files["paired"] = out / "paired.json"
        atomic_write_json(files["paired"], paired)
    for s in sections:
        for p in s["plots"]:
            files[p.stem] = p
    if token_plot:
        files["token_weights"] = token_plot
    return files


def _add_paired(section: dict) -> None:
    """How each safety run's rates were computed, and the paired tests of later runs against
    the first (msd.report.paired)."""
    section["notes"] += [provenance(r) for r in section["runs"]]
    for cmp in paired_sections(section["runs"]):
        section["paired"].append(cmp)
        section["tables"].append((f"Paired change in ASR, {cmp['a']} → {cmp['b']}, {cmp['benchmark']}",
                                  paired_rows(cmp)))
        section["notes"].append("- " + paired_note(cmp))


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "report", help="tables, plots and an HTML page from evaluation and training runs",
        description="Build a report from run folders: evaluation runs (records.jsonl) and training "
                    "runs (token_batches/). Runs of the same benchmark are compared in the order given "
                    "(first = before). Everything is recomputed from the records.")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="evaluation run folders and/or training folders")
    p.add_argument("--out", default="msd-report", help="output folder (default: ./msd-report)")
    p.add_argument("--labels", help="comma-separated names for the folders, in order (default: folder names)")
    p.add_argument("--samples", type=int, default=3,
                   help="responses shown per language and step in the HTML page (default: 3)")
    p.set_defaults(func=run_report)


def run_report(args) -> int:
    if args.samples < 0:
        raise MsdError(f"must be at least 0, got {args.samples}", "--samples")
    if not args.out.strip():
        raise MsdError("may not be empty (name the report folder)", "--out")
    from msd.lock import output_lock

    labels = [s.strip() for s in args.labels.split(",")] if args.labels else None
    with output_lock(args.out, "report"):  # one writer per folder, as for eval and train
        files = build(args.dirs, args.out, labels=labels, samples=args.samples)
    for name, path in files.items():
        print(f"{name:>16}: {path}")
    if "paired" in files:
        import json

        for cmp in json.loads(files["paired"].read_text()):
            _print_paired(cmp)
    return 0


def _print_paired(cmp: dict) -> None:
    """The paired table of one comparison on the terminal, as report.md has it."""
    rows = paired_rows(cmp)
    widths = [max(len(r[j]) for r in rows) for j in range(len(rows[0]))]
    what = OUTCOMES[cmp.get("outcome", "asr")][1]
    print(f"\npaired change in {what}, {cmp['a']} -> {cmp['b']} ({cmp['benchmark']}, {cmp['pairs']} pairs; "
          f"McNemar exact, Holm over {len(cmp['languages'])} languages):")
    for r in rows:
        print("  " + "  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))))
