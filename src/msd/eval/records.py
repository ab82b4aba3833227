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
import warnings
from pathlib import Path

from msd import fingerprint, identifiers
from msd.errors import MsdError
from msd.eval import metrics as metrics_mod
from msd.eval.judges.base import LABELS
from msd.eval.metrics import BENIGN_LABELS, latest
from msd.io import atomic_write_json, atomic_write_text, read_jsonl, repair_jsonl
from msd.limits import loads_json, short_repr

RECORDS = "records.jsonl"
METRICS = "metrics.json"
RUN = "run.json"

REQUIRED = ("benchmark", "lang", "query_id", "sample")
# The type of each field a record may hold (None allowed where listed): a record of another
# shape is named with its file and line, not met later as a traceback in metrics or a report.
_N = type(None)
FIELD_TYPES = {"benchmark": str, "lang": str, "query_id": (str, int), "sample": int,
               "prompt": str, "response": str, "label": (str, _N), "harmful": bool,
               "refused": (bool, _N), "helpful": (bool, _N), "response_lang": (str, _N),
               "judge": (str, _N), "judge_error": (str, _N), "score": (int, float, _N),
               "response_tokens": int, "truncated": bool}



# The fields of run.json that msd reads back (eval reruns, msd report), with their types; a
# run.json of another shape is one line naming the field. Fixed bug: a run.json with wrong
# field types crashed the report.
RUN_TYPES = {"kind": str, "benchmark": str, "model": str, "adapter": (str, _N), "dtype": (str, _N),
             "judge": dict, "settings": dict, "languages": list, "last_call": dict, "throughput": dict}
RUN_NESTED = {"judge": {"name": str, "version": (str, _N), "stale_records": int, "stale_judges": list},
              "last_call": {"generated": int, "rejudged": int},
              "throughput": {"responses": int, "generate_seconds": (int, float), "tokens": int,
                             "tokens_per_s": (int, float), "backend": (str, _N)}}


def _is(value, types) -> bool:
    """isinstance, except that true/false is no number."""
    types = types if isinstance(types, tuple) else (types,)
    return isinstance(value, types) and not (isinstance(value, bool) and bool not in types)


def check_run(info: dict, where: str) -> dict:
    """run.json's fields have the types msd wrote (see RUN_TYPES)."""
    for key, types in RUN_TYPES.items():
        value = info.get(key)
        if key in info and not _is(value, types):
            raise MsdError(f"field '{key}' has the wrong type ({type(value).__name__}); this is not "
                           "a run.json written by msd: remove it or use another folder", where)
        for sub, sub_types in RUN_NESTED.get(key, {}).items():
            if isinstance(value, dict) and sub in value and not _is(value[sub], sub_types):
                raise MsdError(f"field '{key}.{sub}' has the wrong type ({type(value[sub]).__name__}); "
                               "this is not a run.json written by msd", where)
    if not all(isinstance(x, str) for x in info.get("languages", [])):
        raise MsdError("field 'languages' must list language codes", where)
    if "benchmark" in info:
        identifiers.check_benchmark(info["benchmark"], f"{where}: field 'benchmark'")
    return info


def check_record(r: dict, where: str) -> None:
    missing = [k for k in REQUIRED if k not in r]
    if missing:
        raise MsdError(f"record lacks field(s) {', '.join(missing)}", where)
    for key, types in FIELD_TYPES.items():
        if key in r and not _is(r[key], types):
            raise MsdError(f"record field '{key}' has the wrong type ({type(r[key]).__name__}); "
                           "this is not a records.jsonl written by msd", where)
    if r["sample"] < 0 or (r.get("label") is not None and r["label"] not in LABELS + BENIGN_LABELS):
        raise MsdError("record has a negative sample or an unknown label", where)
    # Names end up in tables, titles and file names: checked by the functions that accepted
    # them when the benchmark was read (msd.identifiers), so what was accepted reads back.
    identifiers.check_lang(r["lang"], f"{where}: field 'lang'", registered=False)
    identifiers.check_benchmark(r["benchmark"], f"{where}: field 'benchmark'")
    identifiers.check_query_id(r["query_id"], f"{where}: field 'query_id'")


def load_records(run_dir: str | Path) -> list[dict]:
    """Records of a run folder, one per key (last wins), in file order. A torn tail is cut."""
    path = Path(run_dir) / RECORDS
    if not path.exists():
        return []
    repair_jsonl(path)
    rows = list(read_jsonl(path))
    for i, r in enumerate(rows, start=1):
        check_record(r, f"{path}:{i}")
    return latest(rows)


def compact(run_dir: str | Path, records: list[dict]) -> None:
    """Rewrite records.jsonl with one line per key (atomic)."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    try:
        atomic_write_text(Path(run_dir) / RECORDS, text)
    except OSError as e:  # a full disk: the old file is intact and valid (later lines win)
        warnings.warn(f"{Path(run_dir) / RECORDS}: not compacted ({e.strerror or e}); "
                      "the file stays valid as it is")


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
        info = loads_json(path.read_bytes().decode("utf-8-sig"), str(path))
    except (OSError, UnicodeDecodeError) as e:
        raise MsdError(f"cannot read run.json ({type(e).__name__})", str(path)) from None
    if not isinstance(info, dict):
        raise MsdError("run.json must hold a JSON object; remove it or use another --out", str(path))
    return check_run(info, str(path))


def identity(model, tokenizer, tuples=None, given: dict | None = None) -> dict:
    """What made the records besides the generation settings: the model and adapter (path and
    file hashes), the chat template, and the benchmark's content (not only its name)."""
    params = getattr(model, "parameters", None)
    dtype = next(iter(params()), None) if callable(params) else None
    out = {"model": fingerprint.loaded_model_identity(model), "adapter": None,
           "dtype": str(getattr(dtype, "dtype", None)),  # what --dtype auto became on this machine
           "chat_template_sha": fingerprint.text_sha(getattr(tokenizer, "chat_template", None))}
    if tuples is not None:
        out["benchmark_sha"] = fingerprint.content_sha(tuples)
    out.update(given or {})
    return out


IDENTITY_KEYS = ("model", "adapter", "dtype", "chat_template_sha", "benchmark_sha")
NAMES = {"chat_template_sha": "chat template", "benchmark_sha": "benchmark content",
         "teacher_template_sha": "teacher template", "model": "model", "adapter": "adapter"}


def _change(key: str, old, new) -> str:
    """'model: 'a' -> 'b'', 'adapter x (its files changed)', 'benchmark content'."""
    name = NAMES.get(key, key)
    if key.endswith("_sha"):
        return name
    if isinstance(old, dict) or isinstance(new, dict):
        old, new = (v.get("path") if isinstance(v, dict) else v for v in (old, new))
        if old == new:
            return f"{name} {new} (its files changed)"
    return f"{name}: {short_repr(old)} -> {short_repr(new)}"


def check_settings(run_dir: str | Path, settings: dict) -> dict:
    """Compare `settings` with those saved in run.json; an existing run made otherwise (other
    generation settings, model, adapter, chat template or benchmark content) is an error naming
    what changed. Returns the saved run info ({} for a new folder).
    Fixed bug: model, adapter, template and benchmark content were not compared, so another
    model's evaluation silently reused the old responses and relabelled them."""
    saved = load_run(run_dir)
    old = saved.get("settings")
    if not (Path(run_dir) / RECORDS).exists():
        return saved
    if not isinstance(old, dict):
        old = {}
    changed = [_change(k, old.get(k), v) for k, v in settings.items()
               if (k in old or k in IDENTITY_KEYS) and old.get(k) != v]
    if changed:
        raise MsdError(f"this folder holds records made with a different {'; '.join(changed)}; "
                       "rerun with --fresh to discard them, or use another --out", str(run_dir))
    return saved


def judge_of(records: list[dict], judge: dict) -> dict:
    """run.json's `judge`: the judge of this call, and, while some records still hold another
    judge's verdict, which judges and how many records (`stale_records`, `stale_judges`)."""
    stale = sorted({str(r.get("judge_version")) for r in records
                    if r.get("label") is not None and r.get("judge_version") != judge.get("version")})
    n = sum(r.get("label") is not None and r.get("judge_version") != judge.get("version") for r in records)
    return {**judge, "stale_records": n, "stale_judges": stale} if n else judge


def settle(run_dir: str | Path, info: dict, judge: dict) -> dict:
    """At the end of a call, finished or not: records compacted, metrics.json recomputed, and
    run.json naming the judge of the records as they are (`judge_of`). Returns the metrics.
    Fixed bug: after a re-judge stopped part-way, run.json named the new judge over records
    still judged by the old."""
    records = load_records(run_dir)
    compact(run_dir, records)
    metrics = write_metrics(run_dir, records)
    info["judge"] = judge_of(records, judge)
    write_run(run_dir, info)
    return metrics


def write_run(run_dir: str | Path, info: dict) -> None:
    atomic_write_json(Path(run_dir) / RUN, info)
