"""Utility: lm-evaluation-harness on the in-memory model (adapter applied), offline.

    metrics = run(model, tokenizer, ["msd_mgsm"], "runs/utility", limit=5)

Shipped tasks (src/msd/resources/lm_eval_tasks/) read the vendored files through
`custom_dataset`, so they need no hub and no network:
    msd_mgsm_<lang>   MGSM, 0-shot chain of thought (the paper's setting), 11 languages;
                      score = exact match of the last number in the reply with the answer
    msd_xcopa_<lang>  XCOPA, log-likelihood choice between two alternatives, 11 languages
`msd_mgsm` / `msd_xcopa` expand to every language (or to --langs). Any other lm-eval task name
is passed through for users who have the hub.

Results land in the usual run folder: one record per (task, doc) with its score
(`records.jsonl`), `metrics.json` recomputed from the records (msd.eval.metrics), lm-eval's own
aggregate in `lm_eval_results.json` for cross-checking, and `run.json`.
"""

from __future__ import annotations

import csv
import json
import re
import time
from functools import lru_cache
from pathlib import Path

from msd.data import RESOURCES
from msd.errors import MsdError
from msd.eval import records as rec
from msd.io import JsonlWriter, atomic_write_json, ensure_writable_dir

TASK_DIR = Path(__file__).resolve().parent.parent / "resources" / "lm_eval_tasks"
MGSM_LANGS = ["en", "bn", "de", "es", "fr", "ja", "ru", "sw", "te", "th", "zh"]
XCOPA_LANGS = ["et", "ht", "id", "it", "qu", "sw", "ta", "th", "tr", "vi", "zh"]
GROUPS = {"msd_mgsm": MGSM_LANGS, "msd_xcopa": XCOPA_LANGS}
_TASK_LANG = re.compile(r"^msd_(mgsm|xcopa)_([a-z]{2,3})$")


# ----------------------------------------------------------------------------- datasets

def load_mgsm(lang: str, **_):
    """MGSM test set of one language as a datasets.DatasetDict: question, answer (an integer
    as a string, thousands separators removed)."""
    import datasets

    path = RESOURCES / "mgsm" / f"mgsm_{lang}.tsv"
    with open(path, encoding="utf-8", newline="") as f:
        rows = [r for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if r]
    docs = {"question": [r[0] for r in rows], "answer": [r[1].replace(",", "") for r in rows]}
    return datasets.DatasetDict({"test": datasets.Dataset.from_dict(docs)})


def load_xcopa(lang: str, **_):
    """XCOPA test/validation of one language. The cause/effect `question` is taken from the
    Italian file by idx: in some languages' files it disagrees with the others (246 rows in th)."""
    import datasets

    def read(folder: str, split: str) -> list[dict]:
        path = RESOURCES / "xcopa" / "data" / folder / f"{split}.{folder}.jsonl"
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    out = {}
    for split, name in (("test", "test"), ("val", "validation")):
        reference = {r["idx"]: r["question"] for r in read("it", split)}
        rows = read(lang, split)
        out[name] = datasets.Dataset.from_list([
            {"premise": r["premise"], "choice1": r["choice1"], "choice2": r["choice2"],
             "question": reference.get(r["idx"], r["question"]), "label": int(r["label"]), "idx": r["idx"]}
            for r in rows])
    return datasets.DatasetDict(out)


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_number(text: str) -> str | None:
    """The last number in `text`, without thousands separators or a trailing '.0'."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    num = found[-1].replace(",", "")
    if "." in num:
        num = num.rstrip("0").rstrip(".")
    return num


def mgsm_process_results(doc: dict, results: list[str]) -> dict:
    return {"exact_match": float(last_number(results[0] if results else "") == doc["answer"])}


# ----------------------------------------------------------------------------- running

def expand_tasks(tasks: list[str], langs: list[str] | None = None) -> list[str]:
    """'msd_mgsm' -> msd_mgsm_<lang> for each language (all, or those in `langs`)."""
    out: list[str] = []
    for task in tasks:
        if task in GROUPS:
            chosen = [lang for lang in GROUPS[task] if not langs or lang in langs]
            if not chosen:
                raise MsdError(f"{task} has none of the languages {', '.join(langs or [])}; "
                               f"it has {', '.join(GROUPS[task])}", "--langs")
            out += [f"{task}_{lang}" for lang in chosen]
        else:
            out.append(task)
    return list(dict.fromkeys(out))


@lru_cache(maxsize=2)
def _manager(include_defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASK_DIR), include_defaults=include_defaults)


def task_manager(tasks: list[str]):
    """An lm-eval TaskManager that knows `tasks`, or a one-line error. lm-eval's own ~10k task
    configs are indexed only when a task is not one of ours (that takes tens of seconds)."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise MsdError("msd eval utility needs lm-evaluation-harness: pip install 'msd[utility]'") from None
    manager = _manager(include_defaults=not all(t.startswith("msd_") for t in tasks))
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise MsdError(f"unknown lm-eval task(s) {', '.join(unknown)}", "--tasks")
    return manager


def task_lang(task: str, config: dict | None = None) -> str | None:
    m = _TASK_LANG.match(task)
    if m:
        return m.group(2)
    meta = (config or {}).get("metadata") or {}
    return meta.get("lang")


def _records_of(task: str, samples: list[dict], config: dict) -> list[dict]:
    metric = next(iter(m["metric"] for m in config.get("metric_list") or [] if "metric" in m), None)
    out = []
    for s in samples:
        metric = metric if metric in s else next((k for k in ("exact_match", "acc") if k in s), metric)
        resp = s.get("filtered_resps") or s.get("resps") or []
        if config.get("output_type") == "multiple_choice":
            lls = [r[0] if isinstance(r, (list, tuple)) else r for r in resp]
            response = f"choice {max(range(len(lls)), key=lambda i: lls[i])}" if lls else ""
        else:
            first = resp[0] if resp else ""
            response = first[0] if isinstance(first, list) and first else str(first)
        args = s.get("arguments") or []
        prompt = args[0][0] if args and isinstance(args[0], (list, tuple)) else ""
        value = s.get(metric)
        out.append({"benchmark": task, "lang": task_lang(task, config), "query_id": str(s["doc_id"]),
                    "sample": 0, "prompt": prompt, "response": response, "target": str(s.get("target")),
                    "metric": metric, "score": None if value is None else float(value)})
    return out


def run(model, tokenizer, tasks: list[str], out_dir: str | Path, *, langs: list[str] | None = None,
        limit: int | None = None, batch_size: int = 8, num_fewshot: int | None = None,
        max_gen_toks: int | None = None, apply_chat_template: bool = False, seed: int = 0,
        run_info: dict | None = None, identity: dict | None = None) -> dict:
    """Run lm-eval tasks on the in-memory model; write records, metrics.json and run.json.
    Tasks already in the folder's records are skipped (resume at task granularity)."""
    out_dir = ensure_writable_dir(out_dir)
    tasks = expand_tasks(tasks, langs)
    manager = task_manager(tasks)
    settings = {"limit": limit, "num_fewshot": num_fewshot, "max_gen_toks": max_gen_toks,
                "apply_chat_template": apply_chat_template, "seed": seed,
                **rec.identity(model, tokenizer, None, identity)}
    info = rec.check_settings(out_dir, settings)
    info.update(kind="utility", tasks=tasks, settings=settings, **(run_info or {}))
    rec.write_run(out_dir, info)
    done = {r["benchmark"] for r in rec.load_records(out_dir)}
    todo = [t for t in tasks if t not in done]
    t0 = time.time()
    if todo:
        import lm_eval
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        results = lm_eval.simple_evaluate(
            model=lm, tasks=todo, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
            log_samples=True, bootstrap_iters=0, apply_chat_template=apply_chat_template,
            gen_kwargs={"max_gen_toks": max_gen_toks} if max_gen_toks else None,
            random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
        with JsonlWriter(Path(out_dir) / rec.RECORDS) as writer:
            for task in todo:
                config = results["configs"].get(task, {})
                writer.write_many(_records_of(task, results["samples"].get(task, []), config))
        previous = _read_json(Path(out_dir) / "lm_eval_results.json")
        atomic_write_json(Path(out_dir) / "lm_eval_results.json",
                          {**previous, **json.loads(json.dumps(results["results"], default=str))})
    records = rec.load_records(out_dir)
    rec.compact(out_dir, records)
    metrics = rec.write_metrics(out_dir, records)
    info["last_call"] = {"tasks_run": todo, "seconds": round(time.time() - t0, 3)}
    rec.write_run(out_dir, info)
    return metrics


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
