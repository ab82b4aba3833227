"""The inputs of `msd report`: evaluation runs and training runs, loaded from their folders.

Evaluation run folders hold records.jsonl (see msd.eval.records); training folders hold
token_batches/step_<N>.jsonl. Metrics are recomputed from the records (STYLE rule 10), never
read from metrics.json, so a report always matches its records.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from msd import identifiers, languages
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
    paths = [Path(identifiers.check_path(d, "msd report")) for d in dirs]  # as writers checked them
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


def section_title(s: dict) -> str:
    return "utility" if s["kind"] == "utility" else f"{s['kind']}: {s['benchmark']}"


def run_line(r: EvalRun) -> str:
    judge = (r.info.get("judge") or {}).get("version") or r.records[0].get("judge_version") or "?"
    model = r.info.get("model", "?") + (f" + {r.info['adapter']}" if r.info.get("adapter") else "")
    return f"- **{r.label}**: `{r.path}` — model {model}, judge `{judge}`, {len(r.records)} records"
