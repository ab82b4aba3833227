"""`msd report DIR [DIR...]`: tables, plots and a page built from run records alone.

    msd report runs/eval-before runs/eval-after runs/train --out runs/report

Inputs are evaluation run folders (records.jsonl; see msd.eval.records) and training folders
(token_batches/step_<N>.jsonl). Metrics are recomputed from the records (STYLE rule 10), never
read from metrics.json, so a report always matches its records. Runs of the same kind and
benchmark are compared in the order given: the first is "before", each later one "after", with
deltas. The report warns when compared runs used different judges or generation settings.

Outputs in --out:
    report.md                    per-language tables with Wilson 95% intervals and deltas
    asr_<benchmark>.png          ASR per language, one bar per run, interval whiskers
    asr_split_<benchmark>.png    unsafe vs invalid share per language and run
    overrefusal_<benchmark>.png  benign refusal per language (when benign queries exist)
    utility.png                  utility score per task and run (when utility runs are given)
    token_weights.png            mean DPSW weight and divergence by response position
    report.html                  one self-contained page: the tables, the plots, and sampled
                                 training responses with every token coloured by its DPSW
                                 weight or divergence (msd.report_html)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from msd.errors import MsdError
from msd.eval import metrics as M
from msd.eval import records as rec
from msd.io import atomic_write_text, read_jsonl

TIER_ORDER = {"high": 0, "medium": 1, "low": 2, "synthetic": 3}


@dataclass
class EvalRun:
    label: str
    path: Path
    kind: str  # safety | overrefusal | utility
    benchmark: str
    records: list[dict]
    info: dict
    metrics: dict = field(default_factory=dict)


@dataclass
class TrainRun:
    label: str
    path: Path
    batches: list[dict]  # one per saved response, with "step"


# ----------------------------------------------------------------------------- loading

def _labels(paths: list[Path], given: list[str] | None) -> list[str]:
    if given:
        if len(given) != len(paths):
            raise MsdError(f"{len(given)} labels for {len(paths)} folders", "--labels")
        return given
    names = [p.resolve().name for p in paths]
    if len(set(names)) < len(names):
        names = [f"{p.resolve().parent.name}/{p.resolve().name}" for p in paths]
    return names


def load_eval_run(path: Path, label: str) -> EvalRun:
    records = rec.load_records(path)
    if not records:
        raise MsdError("no records in this run folder", str(path / rec.RECORDS))
    info = rec.load_run(path)
    kind = info.get("kind") or ("utility" if M.is_utility(records) else "safety")
    benchmark = info.get("benchmark") or ("utility" if kind == "utility" else records[0]["benchmark"])
    return EvalRun(label, path, kind, benchmark, records, info, M.compute(records))


def load_token_batches(path: Path, label: str) -> TrainRun:
    folder = path / "token_batches"
    files = sorted(folder.glob("step_*.jsonl"), key=lambda p: int(p.stem.split("_")[1]) if p.stem.split("_")[1].isdigit() else 0)
    batches = []
    for f in files:
        for i, row in enumerate(read_jsonl(f), start=1):
            tokens, weights, div = row.get("tokens"), row.get("weights"), row.get("divergence")
            if not (isinstance(tokens, list) and isinstance(weights, list) and isinstance(div, list)):
                raise MsdError("token batch rows need lists 'tokens', 'weights', 'divergence'", f"{f}:{i}")
            if not len(tokens) == len(weights) == len(div):
                raise MsdError(f"tokens/weights/divergence lengths differ ({len(tokens)}, {len(weights)}, "
                               f"{len(div)})", f"{f}:{i}")
            batches.append(row)
    return TrainRun(label, path, batches)


def load_inputs(dirs: list[str], labels: list[str] | None = None) -> tuple[list[EvalRun], list[TrainRun]]:
    paths = [Path(d) for d in dirs]
    evals, trains = [], []
    for path, label in zip(paths, _labels(paths, labels)):
        if not path.is_dir():
            raise MsdError("not a folder", str(path))
        is_eval, is_train = (path / rec.RECORDS).exists(), (path / "token_batches").is_dir()
        if not (is_eval or is_train):
            raise MsdError(f"neither an evaluation run ({rec.RECORDS}) nor a training run "
                           "(token_batches/)", str(path))
        if is_eval:
            evals.append(load_eval_run(path, label))
        if is_train:
            trains.append(load_token_batches(path, label))
    return evals, trains


def groups(evals: list[EvalRun]) -> dict[tuple[str, str], list[EvalRun]]:
    """(kind, benchmark) -> runs in the order given (first = before)."""
    out: dict[tuple[str, str], list[EvalRun]] = {}
    for run in evals:
        out.setdefault((run.kind, run.benchmark), []).append(run)
    return out


def ordered_langs(runs: list[EvalRun]) -> list[str]:
    """Languages of a group, high- to low-resource (the paper's table order), then synthetic."""
    from msd import languages

    try:  # the organism's synthetic languages are named once its package is imported
        import msd.organism  # noqa: F401
    except ImportError:
        pass
    present = {lang for r in runs for lang in r.metrics if lang != M.AVERAGE}
    asked = [lang for r in runs for lang in r.info.get("languages") or [] if lang in present]
    seen = list(dict.fromkeys(asked + sorted(present)))  # the order the runs asked for, then the rest

    def tier(code: str) -> int:
        try:
            return TIER_ORDER.get(languages.get(code).tier, 4)
        except MsdError:
            return 4

    return sorted(seen, key=lambda c: (tier(c), seen.index(c)))


def lang_name(code: str) -> str:
    from msd import languages

    try:
        return f"{code} ({languages.get(code).name})"
    except MsdError:
        return code


def warnings_for(runs: list[EvalRun]) -> list[str]:
    """Reasons a before/after comparison may mislead."""
    out = []
    judges = {(r.info.get("judge") or {}).get("version") or r.records[0].get("judge_version") for r in runs}
    if len(judges) > 1:
        out.append(f"runs were judged by different judges ({', '.join(sorted(map(str, judges)))}): deltas mix judge changes with model changes")
    settings = [r.info.get("settings") or {} for r in runs]
    for key in ("max_new_tokens", "temperature", "top_p", "num_samples", "teacher_prompts", "system_prompt", "limit"):
        values = {json.dumps(s.get(key)) for s in settings if key in s}
        if len(values) > 1:
            out.append(f"runs differ in {key} ({', '.join(sorted(values))})")
    keysets = [{(r_["lang"], str(r_["query_id"])) for r_ in r.records} for r in runs]
    if len(keysets) > 1 and any(k != keysets[0] for k in keysets[1:]):
        out.append("runs cover different queries (e.g. a different --limit): per-language numbers are not paired")
    errors = sum(r.metrics.get(M.AVERAGE, {}).get("judge_errors", 0) for r in runs)
    if errors:
        out.append(f"{errors} records have no verdict (judge errors); rerun the evaluation to judge them")
    return out


# ----------------------------------------------------------------------------- tables

def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def _ci(m: dict) -> str:
    lo, hi = m.get("ci95") or (None, None)
    return "" if lo is None else f" [{100 * lo:.1f}, {100 * hi:.1f}]"


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
        row += [_pct(m.get(main)) + (_ci(m) if ci else "") for m in ms]
        row += [_delta(ms[0].get(main), m.get(main)) for m in ms[1:]]
        row += [extra(m) for m in ms] if extra else []
        rows.append(row + ["/".join(str(m.get(count, "–")) for m in ms)])
    return rows


def safety_table(runs: list[EvalRun]) -> list[list[str]]:
    """Per-language ASR with Wilson intervals, deltas, the unsafe / invalid split."""
    return comparison_table(runs, ordered_langs(runs) + [M.AVERAGE], first="language", main="asr",
                            main_label="ASR %", count="n", count_label="n", ci=True,
                            extra_label="unsafe / invalid %",
                            extra=lambda m: f"{_pct(m.get('unsafe_rate'))} / {_pct(m.get('invalid_rate'))}")


def benign_table(runs: list[EvalRun]) -> list[list[str]]:
    """Per-language refusal of benign queries and language fidelity."""
    return comparison_table(runs, ordered_langs(runs) + [M.AVERAGE], first="language", main="benign_refusal",
                            main_label="benign refusal %", count="n_benign", count_label="n benign",
                            extra_label="fidelity %", extra=lambda m: _pct(m.get("fidelity")))


def utility_table(runs: list[EvalRun]) -> list[list[str]]:
    tasks = list(dict.fromkeys(t for r in runs for t in r.metrics if t != M.AVERAGE)) + [M.AVERAGE]
    return comparison_table(runs, tasks, first="task", main="score", main_label="score %", count="n",
                            count_label="n", ci=True)


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(lines)


def top_tokens(trains: list[TrainRun], k: int = 20, min_count: int = 3) -> list[tuple[str, float, float, int]]:
    """Tokens with the highest mean DPSW weight over all saved responses: (token, mean weight,
    mean divergence, count). These are the tokens the method leaned on."""
    acc: dict[str, list[float]] = {}
    for run in trains:
        for row in run.batches:
            for tok, w, d in zip(row["tokens"], row["weights"], row["divergence"]):
                a = acc.setdefault(tok, [0.0, 0.0, 0])
                a[0] += float(w)
                a[1] += float(d)
                a[2] += 1
    stats = [(t, a[0] / a[2], a[1] / a[2], int(a[2])) for t, a in acc.items() if a[2] >= min_count]
    return sorted(stats, key=lambda s: -s[1])[:k]


# ----------------------------------------------------------------------------- building

def build(dirs: list[str], out: str | Path, *, labels: list[str] | None = None,
          samples: int = 3) -> dict:
    """Write report.md, the PNGs and report.html into `out`; return {name: path}."""
    from msd import report_html
    from msd.eval import plots

    evals, trains = load_inputs(dirs, labels)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sections: list[dict] = []  # shared by the markdown and the HTML page
    for (kind, benchmark), runs in groups(evals).items():
        section = {"kind": kind, "benchmark": benchmark, "runs": runs, "tables": [],
                   "plots": [], "warnings": warnings_for(runs) if len(runs) > 1 else []}
        if kind == "utility":
            section["tables"].append(("Utility (lm-evaluation-harness)", utility_table(runs)))
        else:
            if any("asr" in m for r in runs for m in r.metrics.values()):
                section["tables"].append((f"Attack success rate, {benchmark}", safety_table(runs)))
            if any("n_benign" in m for r in runs for m in r.metrics.values()):
                section["tables"].append((f"Over-refusal and language fidelity, {benchmark}", benign_table(runs)))
        section["plots"] = plots.plot_section(section, out)
        sections.append(section)
    token_plot = plots.plot_token_weights(trains, out) if trains else None
    files = {"markdown": out / "report.md", "html": out / "report.html"}
    atomic_write_text(files["markdown"], render_markdown(sections, trains, token_plot))
    atomic_write_text(files["html"], report_html.render(sections, trains, out, token_plot=token_plot,
                                                        samples=samples))
    for s in sections:
        for p in s["plots"]:
            files[p.stem] = p
    if token_plot:
        files["token_weights"] = token_plot
    return files


def section_title(s: dict) -> str:
    return "utility" if s["kind"] == "utility" else f"{s['kind']}: {s['benchmark']}"


def _run_line(r: EvalRun) -> str:
    judge = (r.info.get("judge") or {}).get("version") or r.records[0].get("judge_version") or "?"
    model = r.info.get("model", "?") + (f" + {r.info['adapter']}" if r.info.get("adapter") else "")
    return f"- **{r.label}**: `{r.path}` — model {model}, judge `{judge}`, {len(r.records)} records"


def _md_token(tok: str) -> str:
    from msd.report_html import _show_token

    return repr(_show_token(str(tok)))[1:-1].replace("|", "\\|").replace("`", "'")


def render_markdown(sections: list[dict], trains: list[TrainRun], token_plot: Path | None) -> str:
    lines = ["# MSD evaluation report", "",
             "Every number below is recomputed from the runs' records (records.jsonl). "
             "ASR = (unsafe + invalid) / n, in %, with Wilson 95% intervals in brackets; "
             "Δ is in percentage points against the first run.", ""]
    for s in sections:
        lines += [f"## {section_title(s)}", ""] + [_run_line(r) for r in s["runs"]] + [""]
        lines += [f"> **Warning:** {w}" for w in s["warnings"]] + ([""] if s["warnings"] else [])
        for title, rows in s["tables"]:
            lines += [f"### {title}", "", markdown_table(rows), ""]
        lines += [f"![{p.stem}]({p.name})" for p in s["plots"]] + [""]
    if trains:
        lines += ["## Training token weights", ""]
        for t in trains:
            steps = sorted({row.get("step") for row in t.batches})
            lines.append(f"- **{t.label}**: `{t.path}` — {len(t.batches)} saved responses from steps {steps}")
        lines += ["", "Tokens with the highest mean DPSW weight (weights average 1 within a response):", "",
                  markdown_table([["token", "mean weight", "mean divergence", "count"]] +
                                 [[f"`{_md_token(tok)}`", f"{w:.2f}", f"{d:.3f}", str(n)]
                                  for tok, w, d, n in top_tokens(trains)]), ""]
        if token_plot:
            lines += [f"![token weights]({token_plot.name})", ""]
        lines += ["The coloured tokens are in report.html.", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI

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
    labels = [s.strip() for s in args.labels.split(",")] if args.labels else None
    files = build(args.dirs, args.out, labels=labels, samples=args.samples)
    for name, path in files.items():
        print(f"{name:>16}: {path}")
    return 0
