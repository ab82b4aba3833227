"""The inputs of `msd report`: evaluation runs and training runs, loaded from their folders.

Evaluation run folders hold records.jsonl (see msd.eval.records); training folders hold
token_batches/step_<N>.jsonl. Metrics are recomputed from the records (STYLE rule 10), never
read from metrics.json, so a report always matches its records.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from msd import identifiers, languages, tokentext
from msd.errors import MsdError
from msd.eval import metrics as M
from msd.eval import records as rec
from msd.io import read_jsonl

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
        return [identifiers.check_name(label, "label", "--labels") for label in given]
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


def _check_batch_row(row, where: str) -> None:
    """A token batch row: ids (or, in runs saved before spans were, raw `tokens`), weights and
    divergence of one length, and spans that cover the tokens in order."""
    if not isinstance(row, dict):
        raise MsdError("token batch rows must be JSON objects", where)
    tokens = row.get("ids", row.get("tokens"))
    weights, div = row.get("weights"), row.get("divergence")
    if not (isinstance(tokens, list) and isinstance(weights, list) and isinstance(div, list)):
        raise MsdError("token batch rows need lists 'ids' (or 'tokens'), 'weights', 'divergence'", where)
    if not len(tokens) == len(weights) == len(div):
        raise MsdError(f"tokens/weights/divergence lengths differ ({len(tokens)}, {len(weights)}, "
                       f"{len(div)})", where)
    if "spans" in row:
        spans, pos = row["spans"], 0
        for s in spans if isinstance(spans, list) else [None]:
            if not (isinstance(s, list) and len(s) == 3 and isinstance(s[0], str) and s[1] == pos
                    and isinstance(s[2], int) and s[2] > pos):
                raise MsdError("'spans' must be [text, start, end] lists covering the tokens in order", where)
            pos = s[2]
        if pos != len(tokens):
            raise MsdError(f"'spans' cover {pos} of {len(tokens)} tokens", where)


def row_spans(row: dict) -> list[tuple[str, int, int]]:
    """(text, start, end) of a saved response: the spans saved with it, or for rows saved before
    spans were, rebuilt from its raw pieces (msd.tokentext.piece_spans). Every token view
    (report.html, report.md) reads them here."""
    if "spans" in row:
        return [(str(t), int(a), int(b)) for t, a, b in row["spans"]]
    return tokentext.piece_spans(row["tokens"])


def load_token_batches(path: Path, label: str) -> TrainRun:
    folder = path / "token_batches"
    files = sorted(folder.glob("step_*.jsonl"), key=lambda p: int(p.stem.split("_")[1]) if p.stem.split("_")[1].isdigit() else 0)
    batches = []
    for f in files:
        for i, row in enumerate(read_jsonl(f), start=1):
            _check_batch_row(row, f"{f}:{i}")
            batches.append(row)
    return TrainRun(label, path, batches)


TRAINING_FILES = ("config.yaml", "logs.jsonl", "final", "baseline_data.jsonl")
SEARCH_DIRS = 2000  # folders looked at for a training run's evaluations


def evaluations_of(train_dir: Path) -> list[Path]:
    """Evaluation run folders (records.jsonl + run.json) whose adapter lies in `train_dir`,
    looked for in it and next to it (two levels down from its parent)."""
    root, parent = train_dir.resolve(), train_dir.resolve().parent
    found, seen = [], 0
    for depth in ("*", "*/*"):
        for d in sorted(parent.glob(depth)):
            seen += 1
            if seen > SEARCH_DIRS:
                return found
            if not (d / rec.RECORDS).is_file():
                continue
            try:
                info = rec.load_run(d)
            except MsdError:
                continue
            adapter = (info.get("settings") or {}).get("adapter") or info.get("adapter")
            adapter = adapter.get("path") if isinstance(adapter, dict) else adapter
            if isinstance(adapter, str) and adapter and root in (Path(adapter).resolve(), *Path(adapter).resolve().parents):
                found.append(d)
    return found


def _shown(path: Path) -> str:
    """A path as the user would type it: relative to the working folder when inside it."""
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _not_a_run(path: Path) -> str:
    """Why a folder cannot be reported on; for a training run without token batches (every
    baseline's output), the evaluation folders to pass instead."""
    plain = f"neither an evaluation run ({rec.RECORDS}) nor a training run (token_batches/)"
    if not any((path / name).exists() for name in TRAINING_FILES):
        return plain
    evals = evaluations_of(path)
    why = ("a training run without token_batches/ (a baseline's has none: there is no per-token "
           "DPSW weight or teacher divergence to show); msd report takes its evaluation runs")
    if evals:
        return f"{why}: pass {' '.join(_shown(e) for e in evals)} instead"
    return (f"{why}, and none was found next to it: run msd eval safety ... --adapter {path / 'final'} "
            "--out FOLDER, then pass FOLDER")


def load_inputs(dirs: list[str], labels: list[str] | None = None) -> tuple[list[EvalRun], list[TrainRun]]:
    paths = [Path(identifiers.check_path(d, "msd report")) for d in dirs]  # as writers checked them
    evals, trains = [], []
    for path, label in zip(paths, _labels(paths, labels)):
        if not path.is_dir():
            raise MsdError("not a folder", str(path))
        is_eval, is_train = (path / rec.RECORDS).exists(), (path / "token_batches").is_dir()
        if not (is_eval or is_train):
            raise MsdError(_not_a_run(path), str(path))
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


def span_means(row: dict) -> list[tuple[str, float, float, int]]:
    """(text, mean weight, mean divergence, tokens) per span of a saved response: a character
    split over several tokens carries the mean of their weights and divergences."""
    out = []
    for text, a, b in row_spans(row):
        w, d = row["weights"][a:b], row["divergence"][a:b]
        out.append((text, sum(map(float, w)) / len(w), sum(map(float, d)) / len(d), b - a))
    return out


def top_tokens(trains: list[TrainRun], k: int = 20, min_count: int = 3) -> list[tuple[str, float, float, int]]:
    """Tokens (spans of whole characters, as the text reads) with the highest mean DPSW weight
    over all saved responses: (text, mean weight, mean divergence, count). These are the tokens
    the method leaned on."""
    acc: dict[str, list[float]] = {}
    for run in trains:
        for row in run.batches:
            for text, w, d, _ in span_means(row):
                a = acc.setdefault(text, [0.0, 0.0, 0])
                a[0] += w
                a[1] += d
                a[2] += 1
    stats = [(t, a[0] / a[2], a[1] / a[2], int(a[2])) for t, a in acc.items() if a[2] >= min_count]
    return sorted(stats, key=lambda s: -s[1])[:k]


def section_title(s: dict) -> str:
    return "utility" if s["kind"] == "utility" else f"{s['kind']}: {s['benchmark']}"


def run_line(r: EvalRun) -> str:
    judge = (r.info.get("judge") or {}).get("version") or r.records[0].get("judge_version") or "?"
    model = r.info.get("model", "?") + (f" + {r.info['adapter']}" if r.info.get("adapter") else "")
    return f"- **{r.label}**: `{r.path}` — model {model}, judge `{judge}`, {len(r.records)} records"
