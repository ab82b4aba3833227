"""The run folder every evaluation writes, and resuming into it.

    <out>/records.jsonl   one JSON record per (benchmark, lang, query_id, sample), appended per
                          batch and flushed; a later line with the same key replaces an earlier
                          one (a re-judged sample); compacted at the end of each run
    <out>/metrics.json    recomputed from records.jsonl only (msd.eval.metrics.compute)
    <out>/run.json        what produced the records: kind, benchmark, model, generation
                          settings, judge name/version (never secrets), throughput

Rerunning into the same folder keeps finished records and produces only missing ones. A torn
last line (a crash mid-write) is dropped, never fatal. Generation settings that differ from the
saved ones are an error (mixing them would make the numbers meaningless); a different judge is
not: the saved responses are judged again without generating anything.
"""

from __future__ import annotations

import json
from pathlib import Path

from msd.errors import MsdError
from msd.eval import metrics as metrics_mod
from msd.eval.metrics import latest
from msd.io import atomic_write_json, atomic_write_text, read_jsonl, repair_jsonl

RECORDS = "records.jsonl"
METRICS = "metrics.json"
RUN = "run.json"

REQUIRED = ("benchmark", "lang", "query_id", "sample")


def load_records(run_dir: str | Path) -> list[dict]:
    """Records of a run folder, one per key (last wins), in file order. A torn tail is cut."""
    path = Path(run_dir) / RECORDS
    if not path.exists():
        return []
    repair_jsonl(path)
    rows = list(read_jsonl(path))
    for i, r in enumerate(rows, start=1):
        missing = [k for k in REQUIRED if k not in r]
        if missing:
            raise MsdError(f"record lacks field(s) {', '.join(missing)}", f"{path}:{i}")
    return latest(rows)


def compact(run_dir: str | Path, records: list[dict]) -> None:
    """Rewrite records.jsonl with one line per key (atomic)."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    atomic_write_text(Path(run_dir) / RECORDS, text)


def write_metrics(run_dir: str | Path, records: list[dict] | None = None) -> dict:
    """Recompute metrics.json from the run's records and return it."""
    if records is None:
        records = load_records(run_dir)
    m = metrics_mod.compute(records)
    atomic_write_json(Path(run_dir) / METRICS, m)
    return m


def load_run(run_dir: str | Path) -> dict:
    path = Path(run_dir) / RUN
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise MsdError(f"malformed JSON ({e.msg})", str(path)) from None


def check_settings(run_dir: str | Path, settings: dict) -> dict:
    """Compare `settings` with those saved in run.json; an existing run with different
    generation settings is an error. Returns the saved run info ({} for a new folder)."""
    saved = load_run(run_dir)
    old = saved.get("settings")
    if old and (Path(run_dir) / RECORDS).exists():
        for key, value in settings.items():
            if key in old and old[key] != value:
                raise MsdError(f"this folder holds a run with {key}={old[key]!r}, not {value!r}; "
                               "use another --out (or delete the folder)", str(run_dir))
    return saved


def write_run(run_dir: str | Path, info: dict) -> None:
    atomic_write_json(Path(run_dir) / RUN, info)
