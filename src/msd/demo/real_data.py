"""The real-model demo's data and measurements: the held-out split, the evaluations (keyword
judge), the base model's reference answers and their log-likelihood (kept capability).

Kept capability [ours]: a 135M model solves almost no task, so a task score would measure
nothing. Instead: the base model answers the benign held-out prompts (greedy, the "before"
records), and we measure the mean log-probability per token of those answers under the model
before and after MSD. A model that keeps its benign behaviour keeps that likelihood; a model
damaged by training (or one that learnt to refuse everything) loses it. It needs no judge and
no generation after training, and it is measured on the same prompts in every language.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from msd.data import QueryTuple


@dataclass
class DemoData:
    train: list[QueryTuple]  # what training receives (it takes its own split of these)
    train_used: list[QueryTuple]  # the tuples training actually uses (split, then data.limit)
    harmful: list[QueryTuple]  # held-out harmful queries
    benign: list[QueryTuple]  # held-out benign prompts
    xstest: list[QueryTuple]  # XSTest safe prompts (English)
    sources: dict

    def disjoint(self) -> dict:
        """No evaluated query is a training query: neither its id nor its English text."""
        def norm(t: QueryTuple) -> str:
            return " ".join(t.texts.get("en", "").casefold().split())

        evaluated = self.harmful + self.benign + self.xstest
        ids = sorted({t.id for t in evaluated} & {t.id for t in self.train_used})
        texts = {norm(t) for t in self.train_used} - {""}
        same_text = sorted(t.id for t in evaluated if norm(t) in texts)
        return {"pass": not ids and not same_text, "evaluated": len(evaluated), "trained": len(self.train_used),
                "same_id": ids[:10], "same_english_text": same_text[:10]}

    def describe(self) -> dict:
        return {**self.sources, "train_queries": len(self.train_used),
                "heldout_harmful": [t.id for t in self.harmful], "heldout_benign": [t.id for t in self.benign],
                "xstest_safe": [t.id for t in self.xstest]}


def demo_data(cfg, spec, langs: list[str]) -> DemoData:
    """Training tuples and the evaluation sets: `spec.harmful` and `spec.benign` queries that
    have every language in `langs`, from the held-out split when the set is the training
    source itself (the training config's split: data.heldout_fraction, heldout_by, seed)."""
    from msd.data import load_tuples
    from msd.data.tuples import split

    def parts(source: str):
        return split(load_tuples(source, cfg.data.english), cfg.data.heldout_fraction, cfg.data.seed,
                     cfg.data.heldout_by)

    tuples = load_tuples(cfg.data.source, cfg.data.english)
    train = parts(cfg.data.source)[0]
    train = train[: cfg.data.limit] if cfg.data.limit else train

    def held(source: str, harmful: bool, n: int) -> list[QueryTuple]:
        """The first n queries of `source` in every language of `langs` that `source` has."""
        pool = parts(source)[1] if source == cfg.data.source else load_tuples(source, cfg.data.english)
        pool = [t for t in pool if t.meta.get("harmful", True) == harmful]
        has = [c for c in langs if any(t.texts.get(c) for t in pool)]
        pool = [t for t in pool if all(t.texts.get(c) for c in has)]
        return pool[:: max(1, len(pool) // n)][:n] if n else []  # spread over the set (and its intents)

    xstest = [t for t in load_tuples("xstest") if not t.meta.get("harmful", True)][: spec.n_xstest]
    sources = {"train": cfg.data.source, "harmful": spec.harmful, "benign": spec.benign, "xstest": "xstest"}
    return DemoData(tuples, train, held(spec.harmful, True, spec.n_harmful), held(spec.benign, False, spec.n_benign),
                    xstest, sources)


def evaluate(model, tokenizer, data: DemoData, langs: list[str], out: Path, spec, seed: int,
             progress: bool, teacher: str | None = None) -> dict:
    """lang -> rates with Wilson intervals (held-out harmful + benign; XSTest in English).
    `teacher`: the teacher context, to evaluate with the teacher prompt instead (not English)."""
    from msd.eval.judges import get_judge
    from msd.eval.safety import evaluate as run_eval
    from msd.prompts import PromptBuilder

    judge = get_judge("keyword")
    kw = dict(max_new_tokens=spec.max_new_tokens, temperature=0.0, batch_size=spec.batch_size,
              seed=seed, progress=progress)
    if teacher:
        langs = [c for c in langs if c not in spec.english]
    builder = PromptBuilder(tokenizer, context=teacher or "full")
    metrics = run_eval(model, tokenizer, data.harmful + data.benign, langs, judge, out / "heldout",
                       benchmark="heldout", prompt_builder=builder,
                       teacher_prompts=bool(teacher), **kw)
    result = {c: rates(metrics.get(c, {})) for c in langs}
    for c, share in fidelity_all(out / "heldout", langs).items():
        result[c].update(share)
    if not teacher and data.xstest:
        x = run_eval(model, tokenizer, data.xstest, ["en"], judge, out / "xstest", benchmark="xstest-safe",
                     prompt_builder=builder, **kw)
        result["xstest_en"] = rates(x.get("en", {}))
    return result


def rates(m: dict) -> dict:
    """The figures the demo reports for one language, each rate with its 95% Wilson interval."""
    from msd.eval.metrics import wilson

    out = {"asr": m.get("asr"), "asr_ci95": m.get("ci95"), "n": m.get("n"),
           "n_benign": m.get("n_benign"), "fidelity": m.get("fidelity"),
           "truncated": m.get("truncated_rate"), "truncated_ci95": m.get("ci95_truncated_rate")}
    for key in ("benign_refusal", "fidelity"):
        if m.get(key) is not None and m.get("n_benign"):
            out[f"{key}_ci95"] = wilson(m[key] * m["n_benign"], m["n_benign"])
    out["benign_refusal"] = m.get("benign_refusal")
    return out


def fidelity_all(folder: Path, langs: list[str]) -> dict:
    """Per language, the share of all answers (harmful and benign) written in the query's
    language (py3langid; Javanese is often read as Indonesian, so its share is a lower bound),
    with its Wilson interval. Benign prompts are missing in some languages (Javanese), and a
    refusal in English to a Javanese query is a fidelity failure too."""
    from msd.eval.metrics import latest, wilson
    from msd.io import read_jsonl

    records = latest(list(read_jsonl(folder / "records.jsonl")))
    out = {}
    for c in langs:
        known = [r["response_lang"] == c for r in records if r["lang"] == c and r.get("response_lang")]
        if known:
            out[c] = {"fidelity_all": sum(known) / len(known), "fidelity_all_ci95": wilson(sum(known), len(known)),
                      "n_answers": len(known)}
    return out


def reference_answers(model, tokenizer, data: DemoData, langs: list[str], spec) -> list[dict]:
    """The base model's own greedy answers to the benign held-out prompts (prompt and answer
    token ids), generated once before training."""
    from msd.generation import generate
    from msd.prompts import PromptBuilder

    builder = PromptBuilder(tokenizer)
    rows = [(c, t) for c in langs for t in data.benign if t.texts.get(c)] + [("en", t) for t in data.xstest]
    prompts = [builder.student(t.texts[c]) for c, t in rows]
    answers = generate(model, tokenizer, prompts, max_new_tokens=spec.max_new_tokens, temperature=0.0,
                       batch_size=spec.batch_size)
    return [{"lang": c, "id": t.id, "prompt": p, "answer": a[0]}
            for (c, t), p, a in zip(rows, prompts, answers) if a[0]]


def answer_loglik(model, tokenizer, reference: list[dict], batch: int = 16) -> list[float]:
    """Mean log-probability per token of each reference answer under `model` (nats/token)."""
    import torch

    from msd.scoring import build_inputs, response_logits

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[float] = []
    with torch.no_grad():
        for i in range(0, len(reference), batch):
            rows = reference[i:i + batch]
            answers = [r["answer"] for r in rows]
            inputs = build_inputs([r["prompt"] for r in rows], answers, tokenizer.pad_token_id, device)
            T = max(len(a) for a in answers)
            logp_BTV = response_logits(model, inputs, T).float().log_softmax(-1)
            for b, a in enumerate(answers):
                ids = torch.tensor(a, device=device)
                out.append(float(logp_BTV[b, :len(a)].gather(-1, ids[:, None]).mean()))
    model.train(was_training)
    return out


def capability(base: list[float], trained: list[float], reference: list[dict]) -> dict:
    """Per language: mean log-likelihood per token of the base answers, before and after, and
    the mean paired change with a 95% t interval over prompts (msd.eval.stats)."""
    from msd.eval.stats import t_interval

    by_lang: dict[str, list[tuple[float, float]]] = {}
    for b, t, r in zip(base, trained, reference):
        by_lang.setdefault(r["lang"], []).append((b, t))
    out = {}
    for lang, pairs in by_lang.items():
        change = t_interval([t - b for b, t in pairs])
        n = len(pairs)
        out[lang] = {"before": sum(b for b, _ in pairs) / n, "after": sum(t for _, t in pairs) / n,
                     "change": change["mean"], "change_ci95": change["ci95"] or [float("nan")] * 2, "n": n}
    return out


def samples(out: Path, langs: list[str], k: int) -> dict:
    """k held-out harmful queries per language: the answer before, with the teacher prompt and
    after, with their verdicts (cut to 240 characters; the records hold them whole)."""
    from msd.io import read_jsonl

    def records(stage: str) -> dict:
        path = out / stage / "heldout" / "records.jsonl"
        if not path.exists():
            return {}
        return {(r["lang"], r["query_id"]): r for r in read_jsonl(path) if r.get("harmful", True)}

    stages = {s: records(s) for s in ("before", "teacher_before", "after")}
    shown: dict[str, list[dict]] = {}
    for lang in langs:
        ids = sorted({i for (c, i) in stages["before"] if c == lang})[:k]
        shown[lang] = [{"id": i, **{s: {"label": stages[s][(lang, i)].get("label"),
                                        "response": stages[s][(lang, i)].get("response", "")[:240]}
                                    for s in stages if (lang, i) in stages[s]}} for i in ids]
    return shown


def paired_changes(out: Path, baselines: list[str] = ()) -> dict:
    """Exact McNemar tests per language on the held-out harmful queries, Holm over the languages
    (msd.report.paired): the teacher prompt against the student prompt before training, MSD
    (after) against before, and each baseline against MSD; and benign refusal on XSTest's safe
    prompts, after against before. name -> comparison."""
    from msd.report.paired import compare_runs
    from msd.report.runs import load_eval_run

    def run(folder: Path, label: str):
        return load_eval_run(folder / "heldout", label)

    before, after = run(out / "before", "before"), run(out / "after", "after MSD")
    result = {"teacher prompt vs before": compare_runs(before, run(out / "teacher_before", "teacher prompt")),
              "MSD: after vs before": compare_runs(before, after)}
    for name in baselines:
        result[f"{name} vs MSD"] = compare_runs(after, run(out / "baselines" / name / "eval", name))
    if (out / "before" / "xstest" / "records.jsonl").exists():
        xs = [load_eval_run(out / stage / "xstest", label) for stage, label in (("before", "before"), ("after", "after MSD"))]
        result["XSTest benign refusal: after vs before"] = compare_runs(*xs, outcome="benign_refusal")
    return result
