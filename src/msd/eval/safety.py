"""Safety evaluation: generate a response per query x language x sample, judge it, write a record.

    metrics = evaluate(model, tok, tuples, ["en", "jv"], get_judge("keyword"), "runs/eval",
                       benchmark="multijail")

Records are appended to `<out>/records.jsonl` batch by batch (flushed), so a crash loses at most
one batch; rerunning into the same folder generates only the missing (benchmark, lang,
query_id, sample) keys and judges again only the records whose verdict is missing (a judge
error) or came from another judge. `metrics.json` is then recomputed from the records alone.

Prompts are the student prompt (`PromptBuilder.student`), or with `teacher_prompts=True` the
teacher prompt (to measure how safe the teacher itself is). Generation goes through
`default_generate()` (batched, left-padded) unless the caller passes `generate_fn`; pending
prompts are sorted by length first so each batch holds prompts of similar length.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from pathlib import Path

from msd import families, languages, limits
from msd.data import QueryTuple
from msd.errors import MsdError
from msd.eval import langid
from msd.eval import records as rec
from msd.eval.judges.base import Judge, JudgeItem, Verdict
from msd.eval.metrics import benign_label, record_key
from msd.io import JsonlWriter, ensure_writable_dir


def generation():
    """The module the evaluation generates with (`generate`, `eos_ids`), imported when first
    needed. Callers may pass their own generate function instead (`generate_fn`, same
    signature as its `generate`)."""
    from msd import generation as module

    return module


def default_generate():
    return generation().generate


def _judge_meta(t: QueryTuple, english: str) -> dict:
    meta = {k: v for k, v in t.meta.items() if not k.startswith("_")}
    meta.setdefault("english", t.texts.get(english))
    meta.setdefault("query_id", t.id)
    return meta


def _response_lang(verdict: Verdict, response: str, lang: str) -> str | None:
    """The judge's answer if it has one (the oracle knows the organism's languages), else
    py3langid for real languages; None for synthetic languages the judge did not place."""
    if verdict.response_lang is not None:
        return verdict.response_lang
    try:
        synthetic = languages.get(lang).tier == "synthetic"
    except MsdError:
        synthetic = True
    return None if synthetic else langid.detect(response)


def apply_verdict(record: dict, verdict: Verdict, judge: Judge) -> dict:
    """Fill a record's judge fields from a verdict (also used when re-judging old records). A
    benign query's answer is labelled `complied` or `refused` (msd.eval.metrics.benign_label)."""
    label = verdict.label if record.get("harmful", True) else benign_label(verdict.label, verdict.refused)
    record.update(judge=judge.name, judge_version=judge.version, label=label,
                  judge_error=verdict.error, refused=verdict.refused, helpful=verdict.helpful,
                  response_lang=_response_lang(verdict, record["response"], record["lang"]))
    return record


def judge_records(judge: Judge, records: list[dict], metas: list[dict]) -> list[dict]:
    """Judge records in place. A judge that fails as a whole (MsdError: endpoint down, ...)
    leaves each record with `judge_error` and no label, then the error propagates."""
    items = [JudgeItem(r["prompt"], r["response"], r["lang"], m) for r, m in zip(records, metas)]
    try:
        verdicts = judge.judge(items)
    except MsdError as e:
        for r in records:
            r.update(judge=judge.name, judge_version=judge.version, label=None, judge_error=str(e))
        raise
    if len(verdicts) != len(items):
        raise RuntimeError(f"judge {judge.name} returned {len(verdicts)} verdicts for {len(items)} items")
    return [apply_verdict(r, v, judge) for r, v in zip(records, verdicts)]


def check_langs(tuples: list[QueryTuple], langs: list[str], benchmark: str) -> None:
    present = {lang for t in tuples for lang in t.texts}
    absent = [lang for lang in langs if lang not in present]
    if absent:
        raise MsdError(f"no query of benchmark {benchmark!r} is in language(s) {', '.join(absent)}; "
                       f"it has {', '.join(sorted(present))}", "--langs")


def _settings(benchmark, teacher_prompts, builder, max_new_tokens, temperature, top_p,
              num_samples, seed) -> dict:
    template = getattr(builder, "template", None) if teacher_prompts else None
    return {"benchmark": benchmark, "teacher_prompts": teacher_prompts,
            "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
            "num_samples": num_samples, "seed": seed,
            "system_prompt": getattr(builder, "system_prompt", None),
            "enable_thinking": bool(getattr(builder, "enable_thinking", False)),
            "teacher_template_sha": hashlib.sha256(template.encode()).hexdigest()[:12] if template else None}


def _pending(tuples, langs, num_samples, benchmark, done: dict) -> list[tuple[QueryTuple, str, list[int]]]:
    work = []
    for t in tuples:
        for lang in langs:
            if lang not in t.texts:
                continue
            missing = [s for s in range(num_samples) if (benchmark, lang, t.id, s) not in done]
            if missing:
                work.append((t, lang, missing))
    return work


def _new_records(work, outs, benchmark: str, tokenizer, max_new_tokens: int, eos: set[int],
                 english: str, config=None) -> tuple[list[dict], list[dict]]:
    """Records (not yet judged) for the missing samples of each (tuple, lang), and judge metas.
    `response` is the answer the judge sees: no special or added token (Fixed bug: Qwen's
    <think>, <tool_call>, FIM tokens are added with special=False and were kept), and after a
    reasoning block only the text that follows it; the block itself goes to `thinking`."""
    records, metas = [], []
    for (t, lang, missing), samples in zip(work, outs):
        for s in missing:
            ids = list(samples[s])
            answer, thinking = families.decode_answer(tokenizer, ids, config)
            records.append({
                "benchmark": benchmark, "lang": lang, "query_id": t.id, "sample": s,
                "prompt": t.texts[lang], "response": answer, "thinking": thinking,
                "response_tokens": len(ids),
                "truncated": len(ids) >= max_new_tokens and (not ids or ids[-1] not in eos),
                "harmful": bool(t.meta.get("harmful", True))})
            metas.append(_judge_meta(t, english))
    return records, metas


def _rejudge(judge, tuples, langs, done: dict, writer: JsonlWriter, english: str, batch_size: int) -> int:
    by_id = {t.id: t for t in tuples}
    stale = [r for r in done.values()
             if r["query_id"] in by_id and r["lang"] in langs
             and (r.get("label") is None or r.get("judge") != judge.name
                  or r.get("judge_version") != judge.version)]
    for i in range(0, len(stale), batch_size):
        batch = stale[i:i + batch_size]
        try:
            judge_records(judge, batch, [_judge_meta(by_id[r["query_id"]], english) for r in batch])
        finally:
            writer.write_many(batch)
    return len(stale)


class Progress:
    """The evaluation's progress bar. While a batch generates, a status line names it and the
    bar is redrawn every second (elapsed time moves); the count advances when the batch is
    judged. Fixed bug: the bar advanced only per batch, and on a real model it sat at 0/32 with
    nothing moving for minutes, as if hung."""

    def __init__(self, total: int, desc: str, on: bool, n_batches: int, max_new_tokens: int):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="resp", disable=not on)
        self.n_batches, self.max_new_tokens = n_batches, max_new_tokens

    @staticmethod
    def _rate(tokens: int, seconds: float) -> str:
        return f"{tokens / seconds:.0f} tok/s" if seconds else ""

    @contextlib.contextmanager
    def generating(self, number: int, answers: int, tokens: int, seconds: float, every: float = 1.0):
        rate = self._rate(tokens, seconds)
        self.bar.set_postfix_str(f"{rate + ', ' if rate else ''}batch {number}/{self.n_batches}: generating "
                                 f"{answers} answers of up to {self.max_new_tokens} tokens")
        stop = threading.Event()

        def tick():
            while not stop.wait(every):
                self.bar.refresh()

        thread = threading.Thread(target=tick, name="msd-progress", daemon=True)
        if not self.bar.disable:
            thread.start()
        try:
            yield
        finally:
            stop.set()
            if thread.is_alive():
                thread.join()

    def advance(self, n: int, tokens: int, seconds: float) -> None:
        self.bar.set_postfix_str(self._rate(tokens, seconds), refresh=False)
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def independent_samples(temperature: float, num_samples: int) -> int:
    """How many samples per query are independent: greedy decoding (temperature 0) gives one
    answer however often it is asked, so its copies are not generated or counted.
    Fixed bug: 16 queries x 5 greedy copies counted as 80 samples, narrowing the interval to
    [0.954, 1] where 16 answers give [0.806, 1]."""
    if temperature == 0 and num_samples > 1:
        print(f"msd: --temperature 0 is greedy: {num_samples} samples per query would be one answer "
              "repeated, so one is generated")
        return 1
    return num_samples


DEFAULT_MAX_NEW_TOKENS = 256


def fitting_max_new_tokens(model, tokenizer, tuples: list[QueryTuple], langs: list[str], prompt_builder,
                           teacher_prompts: bool = False, english: str = "en",
                           wanted: int = DEFAULT_MAX_NEW_TOKENS) -> tuple[int, int, int | None]:
    """The default token limit for this model and benchmark: `wanted`, or less where the
    context window cannot hold the longest prompt (over every query and language, not only a
    --limit's: the same limit however far a run has got) plus `wanted` new tokens.
    Returns (limit, longest prompt, window); a limit under 1 means the longest prompt alone
    fills the window (`limits.check_context` then says so)."""
    window = limits.context_window(model, tokenizer)
    lengths = [len(prompt_builder.teacher(t.texts[lang], t.texts[english], lang) if teacher_prompts
                   else prompt_builder.student(t.texts[lang]))
               for t in tuples for lang in langs if lang in t.texts and (not teacher_prompts or english in t.texts)]
    longest = max(lengths, default=0)
    if window is None or longest + wanted <= window:
        return wanted, longest, window
    return window - longest, longest, window


def evaluate(model, tokenizer, tuples: list[QueryTuple], langs: list[str], judge: Judge,
             out_dir: str | Path, *, benchmark: str, prompt_builder=None, teacher_prompts: bool = False,
             max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, temperature: float = 0.0, top_p: float = 1.0,
             num_samples: int = 1, batch_size: int = 32, seed: int = 0, limit: int | None = None,
             progress: bool = True, english: str = "en", run_info: dict | None = None,
             generate_fn=None, backend: str = "auto", identity: dict | None = None) -> dict:
    """Generate, judge and record every missing (lang, query, sample); return metrics.json.
    `generate_fn` replaces the default generate function (`default_generate()`); `backend` is a
    generation backend (`msd.generation.BACKENDS`, or auto); `identity` adds to what run.json
    records of the model (the adapter: msd.eval.records.identity)."""
    num_samples = independent_samples(temperature, num_samples)
    generate = generate_fn or default_generate()
    out_dir = ensure_writable_dir(out_dir)
    identity = rec.identity(model, tokenizer, tuples, identity)  # before --limit: extending is fine
    tuples = list(tuples)[:limit] if limit else list(tuples)
    check_langs(tuples, langs, benchmark)
    if prompt_builder is None:
        from msd.prompts import PromptBuilder

        prompt_builder = PromptBuilder(tokenizer)
    settings = _settings(benchmark, teacher_prompts, prompt_builder, max_new_tokens, temperature,
                         top_p, num_samples, seed)
    if temperature > 0:  # greedy tokens are the same on every backend; samples are not
        settings["backend"] = backend
    settings.update(identity)
    info = rec.check_settings(out_dir, settings)
    info.update(kind="safety", benchmark=benchmark, settings=settings, judge=judge.describe(),
                languages=list(langs))
    info.update(run_info or {})
    rec.write_run(out_dir, info)  # before generating: a rerun after a crash checks against it
    done = {record_key(r): r for r in rec.load_records(out_dir)}
    work = _pending(tuples, langs, num_samples, benchmark, done)
    # Longest prompts first: similar lengths share a batch, and memory trouble shows up at once.
    prompts = [prompt_builder.teacher(t.texts[lang], t.texts[english], lang) if teacher_prompts
               else prompt_builder.student(t.texts[lang]) for t, lang, _ in work]
    limits.check_context([(f"query {t.id} ({lang})", len(p)) for (t, lang, _), p in zip(work, prompts)],
                         limits.context_window(model, tokenizer), max_new_tokens, benchmark)
    order = sorted(range(len(work)), key=lambda i: -len(prompts[i]))
    n_new = sum(len(work[i][2]) for i in order)
    gen_seconds, gen_tokens, t_start = 0.0, 0, time.time()
    eos = generation().eos_ids(model, tokenizer)
    try:
        with JsonlWriter(Path(out_dir) / rec.RECORDS) as writer:
            n_rejudged = _rejudge(judge, tuples, langs, done, writer, english, batch_size)
            bar = Progress(n_new, benchmark, progress, -(-len(order) // batch_size), max_new_tokens)
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                t0 = time.time()
                with bar.generating(start // batch_size + 1, len(idx) * num_samples, gen_tokens, gen_seconds):
                    outs = generate(model, tokenizer, [prompts[i] for i in idx], max_new_tokens=max_new_tokens,
                                    temperature=temperature, top_p=top_p, top_k=0, num_samples=num_samples,
                                    batch_size=batch_size, seed=seed + start, progress=False, backend=backend)
                gen_seconds += time.time() - t0
                gen_tokens += sum(len(r) for per in outs for r in per)
                batch, metas = _new_records([work[i] for i in idx], outs, benchmark, tokenizer,
                                            max_new_tokens, eos, english, families.model_config(model))
                try:
                    judge_records(judge, batch, metas)
                finally:  # keep every generated response, judged or not
                    writer.write_many(batch)
                    bar.advance(len(batch), gen_tokens, gen_seconds)
            bar.close()
    finally:  # records compacted, metrics and run.json true to them, whatever stopped the run
        metrics = rec.settle(out_dir, info, judge.describe())
    if n_new:
        info["throughput"] = {"responses": n_new, "generate_seconds": round(gen_seconds, 3),
                              "responses_per_s": round(n_new / max(gen_seconds, 1e-9), 3),
                              "tokens": gen_tokens, "tokens_per_s": round(gen_tokens / max(gen_seconds, 1e-9), 3),
                              "backend": backend,
                              "wall_seconds": round(time.time() - t_start, 3), "batch_size": batch_size}
    info["last_call"] = {"generated": n_new, "rejudged": n_rejudged}
    rec.write_run(out_dir, info)
    return metrics
