"""`baseline.data: self_generated`: baseline data with no paid data (the "self-generated" variant).

For each training item (query x student language, exactly MSD's items): the frozen model's
sample under MSD's teacher prompt (target query + English query + instruction) is the chosen
answer / SFT target, and the model's own sample under the student prompt is the rejected one.
The teacher samples are MSD's off-policy cache (`msd.train.responses.teacher_samples`, same
file and fingerprint, so an off-policy MSD run and a baseline share them); the student samples
are cached beside them the same way (resumable, one record per item). [ours: the paper's
baselines use translated response data; this variant needs none.]
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from msd import families
from msd.baselines.data import BASELINE_DATA, Pair
from msd.data import load_tuples
from msd.generation import generate
from msd.io import JsonlWriter, read_jsonl
from msd.models import Teacher
from msd.train import responses
from msd.train.checkpoint import fingerprint
from msd.train.loop import training_items


def student_cache_path(cfg, cache_dir: Path, items, model) -> Path:
    """The teacher cache's fingerprint (model, prompts, rollout, seed) plus the student prompts."""
    teacher = responses.cache_path(cfg, cache_dir, items, model).name.split(".")[1]
    fp = fingerprint([teacher, [(it.key, it.student_ids) for it in sorted(items, key=lambda it: it.key)]])
    return Path(cache_dir) / f"student_samples.{fp}.jsonl"


def student_samples(cfg, state, model, tokenizer, items, path: Path, progress: bool) -> dict:
    """Sample every item once from the model under the student prompt; cached, resumable."""
    r = cfg.rollout
    if state.is_main_process:
        done = {rec["key"] for rec in read_jsonl(path)} if path.exists() else set()
        chunk = max(1, r.batch_size)
        todo = [c for c in range(0, len(items), chunk) if any(it.key not in done for it in items[c:c + chunk])]
        if todo:
            with JsonlWriter(path) as out:
                for c in todo:
                    part = items[c:c + chunk]
                    samples = generate(model, tokenizer, [it.student_ids for it in part],
                                       max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                                       top_p=r.top_p, top_k=r.top_k, num_samples=r.num_samples,
                                       batch_size=r.batch_size, seed=cfg.train.seed + 7919 + c,
                                       progress=progress, merge_lora=False, backend=r.backend)
                    out.write_many({"key": it.key, "samples": s} for it, s in zip(part, samples))
    state.wait_for_everyone()
    return {rec["key"]: rec["samples"] for rec in read_jsonl(path)}


@BASELINE_DATA.register("self_generated")
def self_generated(cfg, model, tokenizer, progress: bool = True) -> list[Pair]:
    from accelerate import PartialState

    tuples = load_tuples(cfg.data.source, cfg.data.english)
    texts = {t.id: t.texts for t in tuples}
    items = training_items(cfg, tuples, tokenizer, 1)
    cache_dir = Path(cfg.baseline.cache_dir or Path(cfg.train.output_dir) / "baseline_cache")
    state = PartialState()
    # What teacher_samples needs of a prepared run: the frozen model as MSD's teacher (theta_0;
    # no copy: nothing trains while it samples) and the processes, the model unwrapped.
    acc = SimpleNamespace(is_main_process=state.is_main_process, num_processes=state.num_processes,
                          process_index=state.process_index, wait_for_everyone=state.wait_for_everyone,
                          unwrap_model=lambda m: m)
    run = SimpleNamespace(accelerator=acc, teacher=Teacher(model, frozen_copy=model), sharded=False,
                          unwrapped=model)
    chosen = responses.teacher_samples(cfg, run, tokenizer, items, cache_dir, progress)
    rejected = student_samples(cfg, state, model, tokenizer, items,
                               student_cache_path(cfg, cache_dir, items, model), progress)
    out, config = [], families.model_config(model)
    for it in items:
        for good, bad in zip(chosen[it.key], rejected[it.key]):
            # The answers as msd eval judges them: no special or added token, no U+FFFD where a
            # sample was cut inside a character.
            good_text = families.decode_answer(tokenizer, good, config)[0].strip()
            bad_text = families.decode_answer(tokenizer, bad, config)[0].strip()
            if good_text and bad_text:  # an empty sample (EOS first) teaches nothing
                out.append(Pair(texts[it.query_id][it.lang], good_text, bad_text, it.lang))
    return out
