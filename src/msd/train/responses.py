"""Where a batch's responses come from: the only difference between on- and off-policy MSD.

- on-policy: the current student samples them, y ~ p_S(. | x_tgt);
- off-policy: the frozen teacher's samples, y ~ p_T(. | x_tgt, x*, C), drawn once for every
  item, cached on disk (resumable) and reused.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from msd.config import to_dict
from msd.generation import full_weights, generate
from msd.io import JsonlWriter, read_jsonl
from msd.train import sharding
from msd.train.checkpoint import fingerprint


def on_policy(run, tokenizer, batch, r, seed: int) -> list[list[int]]:
    """One sample per (item, sample index) from the current student, flattened item-major."""
    with full_weights(run.model) as local:  # sharded: gathered once, then sampled at full speed
        samples = generate(run.unwrapped, tokenizer, [it.student_ids for it in batch],
                           max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                           top_p=r.top_p, top_k=r.top_k, num_samples=r.num_samples,
                           batch_size=r.batch_size, seed=seed, merge_lora=r.merge_lora,
                           backend=r.backend, sharded=run.sharded and not local)
    return [s for per_query in samples for s in per_query]


def off_policy(cached: dict[str, list[list[int]]], batch) -> list[list[int]]:
    return [s for it in batch for s in cached[it.key]]


def cache_path(cfg, cache_dir: Path, items=None, model=None) -> Path:
    """The cache file of one set of teacher samples. Its key covers whatever changes a teacher
    prompt or the sampling: the model and its settings (dtype, chat template, thinking), the
    prompt section, the pivot language, the sampling settings and, given `items`, the teacher
    prompt ids themselves (so any other change to the prompts, e.g. a new tokenizer template
    or other queries under the same ids, is caught too) and, given `model`, its architecture
    (another model saved under the same path). Fixed bug: the chat template,
    enable_thinking, dtype and data.english were left out, so samples drawn under another
    prompt were reused."""
    r = cfg.rollout
    prompts = None
    if items is not None:
        digest = hashlib.sha256()
        for it in sorted(items, key=lambda it: it.key):
            digest.update(f"{it.key}:{it.teacher_ids}\n".encode())
        prompts = digest.hexdigest()
    config = getattr(model, "config", None)
    arch = config.to_json_string(use_diff=False) if hasattr(config, "to_json_string") else None
    fp = fingerprint({"model": to_dict(cfg)["model"], "architecture": arch, "prompt": to_dict(cfg)["prompt"],
                      "english": cfg.data.english, "teacher_prompts": prompts,
                      "rollout": [r.max_new_tokens, r.temperature, r.top_p, r.top_k, r.num_samples,
                                  r.backend, r.batch_size],
                      "seed": cfg.train.seed})
    return Path(cache_dir) / f"teacher_samples.{fp}.jsonl"


def teacher_samples(cfg, run, tokenizer, items, cache_dir: Path, progress: bool) -> dict[str, list[list[int]]]:
    """Sample every item once from the frozen teacher; cached on disk, resumable, reused.

    The items are cut into fixed chunks of rollout.batch_size, each sampled with its own seed
    (train.seed + its first index), so the samples do not depend on how many processes share the
    work or on an interruption. The processes take the chunks left to do in turns (one each per
    round, the teacher's weights gathered once if sharded); process 0 appends each round's
    results to the cache."""
    acc = run.accelerator
    path = cache_path(cfg, cache_dir, items, run.unwrapped)
    chunk = max(1, cfg.rollout.batch_size)
    writer, todo = None, None
    try:
        if acc.is_main_process:
            done = {rec["key"] for rec in read_jsonl(path)} if path.exists() else set()
            writer = JsonlWriter(path)  # cuts a torn last line (read_jsonl warned about it)
            # Fixed bug: chunks were slices of the items *left to do*, so after an interruption
            # they (and their seeds) shifted and the samples differed from an uninterrupted run.
            todo = [c for c in range(0, len(items), chunk)
                    if any(it.key not in done for it in items[c:c + chunk])]
        todo = sharding.broadcast_object(todo)
        if todo:
            with run.teacher.scope() as t_model, full_weights(t_model) as local:
                for first in range(0, len(todo), acc.num_processes):
                    mine = todo[first:first + acc.num_processes][acc.process_index:][:1]
                    sharded = run.sharded and not local
                    # Weights gathered layer by layer: every process must take part in every
                    # forward, so one without a chunk samples the last one again and drops it.
                    c = mine[0] if mine else todo[-1] if sharded else None
                    recs = [] if c is None else _sample_chunk(
                        cfg, acc.unwrap_model(t_model), tokenizer, items[c:c + chunk], c,
                        progress and acc.is_main_process, sharded)
                    for part in sharding.gather_objects(recs if mine else []):
                        if writer is not None:
                            writer.write_many(part)
    finally:
        if writer is not None:
            writer.close()
    acc.wait_for_everyone()
    return {rec["key"]: rec["samples"] for rec in read_jsonl(path)}


def _sample_chunk(cfg, model, tokenizer, part, first: int, progress: bool, sharded: bool) -> list[dict]:
    r = cfg.rollout
    samples = generate(model, tokenizer, [it.teacher_ids for it in part],
                       max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                       top_k=r.top_k, num_samples=r.num_samples, batch_size=r.batch_size,
                       seed=cfg.train.seed + first, progress=progress, merge_lora=False,
                       backend=r.backend, sharded=sharded)
    return [{"key": it.key, "samples": s} for it, s in zip(part, samples)]
