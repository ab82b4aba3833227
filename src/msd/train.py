"""The MSD training loop: one plain function, read top to bottom.

    result = train(load_config("configs/x.yaml"))

Per optimizer step: take the next micro-batch of (query, language) items, get responses (on-policy:
the current student samples them; off-policy: the frozen teacher's cached samples), score them
under the student and teacher prompts, and minimise the DPSW-weighted divergence (Eq. 8).
On-policy and off-policy share everything but where the responses come from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from msd import checkpoint, languages
from msd.config import Config, chunk_size_for, to_dict, to_yaml
from msd.data import QueryTuple, load_tuples, split
from msd.errors import MsdError
from msd.io import JsonlWriter, atomic_write_text, ensure_writable_dir, read_jsonl
from msd.losses import LossSpec
from msd.memory import trim_heap
from msd.models import Teacher, apply_lora, is_peft, load_model_and_tokenizer
from msd.prompts import PromptBuilder
from msd.rollout import full_weights, generate
from msd.scoring import msd_batch_loss


@dataclass
class Item:
    """One training example: a query in one student language, with its prompts."""
    key: str  # "<query id>|<lang>"
    lang: str
    query_id: str
    student_ids: list[int]
    teacher_ids: list[int]


@dataclass
class TrainResult:
    model: object
    tokenizer: object
    output_dir: Path
    steps: int
    history: list[dict] = field(default_factory=list)


def student_languages(cfg: Config, tuples: list[QueryTuple]) -> list[str]:
    if cfg.data.languages:
        langs = languages.parse_codes(cfg.data.languages, "data.languages")
    else:
        langs = sorted({l for t in tuples for l in t.texts if l != cfg.data.english})
    if cfg.data.english_as_student and cfg.data.english not in langs:
        langs.append(cfg.data.english)
    if not langs:
        raise MsdError("no student languages: set data.languages", "data.languages")
    return langs


def build_items(cfg: Config, tuples: list[QueryTuple], tokenizer) -> list[Item]:
    builder = PromptBuilder(tokenizer, cfg.prompt.teacher_context, cfg.prompt.teacher_template,
                            cfg.prompt.system_prompt, cfg.model.enable_thinking)
    items = []
    for lang in student_languages(cfg, tuples):
        for t in tuples:
            if lang not in t.texts:
                continue
            query, english = t.texts[lang], t.texts[cfg.data.english]
            items.append(Item(f"{t.id}|{lang}", lang, t.id, builder.student(query),
                              builder.teacher(query, english, lang)))
    if not items:
        raise MsdError("no training items: the student languages have no queries in data.source",
                       "data.languages")
    return items


def make_scheduler(optimizer, cfg: Config, total_steps: int):
    warmup = int(round(cfg.train.warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.train.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if cfg.train.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def micro_batch(items: list[Item], index: int, batch: int, rank: int, world: int, seed: int) -> list[Item]:
    """Micro-batch `index` (global, across epochs) for process `rank`: a deterministic function of
    (index, seed), so resuming at step s needs nothing but s."""
    per_epoch = len(items) // (batch * world)
    epoch, pos = divmod(index, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(items), generator=g).tolist()
    start = pos * batch * world + rank * batch
    return [items[i] for i in order[start:start + batch]]


def fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def offpolicy_samples(cfg: Config, model, teacher: Teacher, tokenizer, items: list[Item],
                      cache_dir: Path, accelerator, progress: bool) -> dict[str, list[list[int]]]:
    """Sample every item once from the frozen teacher; cached on disk, resumable, reused."""
    r = cfg.rollout
    fp = fingerprint({"model": cfg.model.name_or_path, "prompt": to_dict(cfg)["prompt"],
                      "rollout": [r.max_new_tokens, r.temperature, r.top_p, r.top_k, r.num_samples],
                      "seed": cfg.train.seed})
    path = Path(cache_dir) / f"teacher_samples.{fp}.jsonl"
    if _shards_weights(accelerator) and not path.exists():  # rank 0 alone cannot run a sharded model
        raise MsdError("off-policy under FSDP / ZeRO-3: build the teacher-sample cache first in one "
                       "process with the same rollout settings (see docs/PERFORMANCE.md)", str(path))
    if accelerator.is_main_process:
        done = {rec["key"]: rec["samples"] for rec in read_jsonl(path)} if path.exists() else {}
        # Fixed bug: chunks were slices of the items *left to do*, so after an interruption
        # they (and their seeds) shifted and the samples differed from an uninterrupted run.
        chunk = max(1, r.batch_size)
        todo = [c for c in range(0, len(items), chunk)
                if any(it.key not in done for it in items[c:c + chunk])]
        if todo:
            with JsonlWriter(path) as out, teacher.scope() as t_model:
                for c in todo:
                    part = items[c:c + chunk]
                    samples = generate(t_model, tokenizer, [it.teacher_ids for it in part],
                                       max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                                       top_p=r.top_p, top_k=r.top_k, num_samples=r.num_samples,
                                       batch_size=r.batch_size, seed=cfg.train.seed + c,
                                       progress=progress, merge_lora=False, backend=r.backend)
                    out.write_many({"key": it.key, "samples": s} for it, s in zip(part, samples))
    accelerator.wait_for_everyone()
    return {rec["key"]: rec["samples"] for rec in read_jsonl(path)}


def default_refusal_check() -> Callable[[str, str], bool]:
    try:
        from msd.eval.keyword import is_refusal
        return is_refusal
    except ImportError:  # evaluation extras missing: log no refusal rate
        return lambda text, lang: False


def save_token_batch(path: Path, step: int, mode: str, batch: list[Item], responses, out, tokenizer) -> None:
    """One record per response: tokens with their DPSW weight and divergence (for `msd report`)."""
    rows = []
    for i, (it, resp) in enumerate(zip(batch, responses)):
        n = len(resp)
        rows.append({"step": step, "mode": mode, "lang": it.lang, "query_id": it.query_id,
                     "tokens": tokenizer.convert_ids_to_tokens(resp),
                     "weights": [round(float(x), 5) for x in out.w_BT[i, :n].tolist()],
                     "divergence": [round(float(x), 6) for x in out.div_BT[i, :n].tolist()]})
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def save_final(model, tokenizer, out_dir: Path, cfg: Config, accelerator) -> Path:
    final = out_dir / "final"
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        tmp = out_dir / ".final.tmp"
        unwrapped.save_pretrained(tmp, safe_serialization=True,
                                  state_dict=accelerator.get_state_dict(model))
        tokenizer.save_pretrained(tmp)
        atomic_write_text(tmp / "msd_config.yaml", to_yaml(cfg))
        from msd.io import atomic_replace_dir
        atomic_replace_dir(tmp, final)
    accelerator.wait_for_everyone()
    return final


def train(cfg: Config, *, model=None, tokenizer=None, tuples: list[QueryTuple] | None = None,
          progress: bool = True, resume: bool | None = None,
          refusal_check: Callable[[str, str], bool] | None = None) -> TrainResult:
    """Run MSD. `resume=None` resumes automatically when output_dir holds a checkpoint."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    tc, r = cfg.train, cfg.rollout
    world_vars = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true" and "MASTER_ADDR" in os.environ \
            and not any(v in os.environ for v in world_vars):  # --cpu without mpirun: one process
        raise MsdError("`accelerate launch --cpu --num_processes N` starts a single process; for N "
                       "CPU processes use `accelerate launch --multi_gpu --num_processes N` (gloo "
                       "without GPUs) or --config_file configs/accelerate/cpu_ddp.yaml")
    # Several processes without a GPU (torchrun / accelerate's --multi_gpu launcher): accelerate
    # picks DDP over gloo only when told cpu=True; otherwise every process trains alone.
    cpu_ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    accelerator = Accelerator(mixed_precision=tc.mixed_precision, gradient_accumulation_steps=tc.grad_accum,
                              cpu=cpu_ddp)
    rank, world = accelerator.process_index, accelerator.num_processes
    out_dir = ensure_writable_dir(tc.output_dir)
    set_seed(tc.seed)

    # --- model, teacher, data ------------------------------------------------------------
    if model is None:
        model, tokenizer = load_model_and_tokenizer(cfg.model)
    if tuples is None:
        tuples = load_tuples(cfg.data.source, cfg.data.english)
    train_tuples, _ = split(tuples, cfg.data.heldout_fraction, cfg.data.seed)
    if cfg.data.limit:
        train_tuples = train_tuples[: cfg.data.limit]
    items = build_items(cfg, train_tuples, tokenizer)
    if len(items) < tc.batch_size * world:
        raise MsdError(f"only {len(items)} training items, fewer than train.batch_size x processes "
                       f"({tc.batch_size * world})", "train.batch_size")
    if cfg.lora.enabled:
        if not is_peft(model):
            model = apply_lora(model, cfg.lora)
    else:
        model.requires_grad_(True)
    model.to(accelerator.device)
    teacher = Teacher.for_model(model)  # frozen now: theta_0
    if tc.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if is_peft(model):
            model.enable_input_require_grads()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    micro_per_epoch = len(items) // (tc.batch_size * world)
    total_steps = tc.max_steps or max(1, tc.epochs * micro_per_epoch // tc.grad_accum)
    scheduler = make_scheduler(optimizer, cfg, total_steps)
    model.train()
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    sharded, loss_cfg = _shards_weights(accelerator), cfg.loss
    if sharded:  # FSDP / ZeRO-3: weights exist only inside the wrapper's forward
        teacher.wrapped = model if teacher.frozen is None else None
        if loss_cfg.chunk_size:  # the chunked loss calls lm_head outside forward
            warnings.warn("FSDP / ZeRO-3: loss.chunk_size set to 0 (full logits)")
            loss_cfg = dataclasses.replace(loss_cfg, chunk_size=0)

    # --- resume ---------------------------------------------------------------------------
    start_step = 0
    ckpt = checkpoint.latest_checkpoint(out_dir) if resume is not False else None
    if resume and ckpt is None:
        raise MsdError("--resume given but the output folder holds no checkpoint", str(out_dir))
    if ckpt is not None:
        # Fixed bug: the config was compared only after loading the weights, so a changed shape
        # (lora.r) failed with a tensor-size error instead of naming what changed.
        saved = checkpoint.read_state(ckpt)
        if saved.get("config_fingerprint") not in (None, fingerprint(_resume_keys(cfg))):
            raise MsdError("checkpoint was made with a different config"
                           f"{_changes(saved.get('config'), _resume_keys(cfg))}; use a new "
                           "train.output_dir", str(ckpt))
        state = checkpoint.load_checkpoint(ckpt, unwrapped, optimizer, scheduler)
        start_step = state["step"]
        accelerator.print(f"msd: resuming from {ckpt} (step {start_step} of {total_steps})")
        if accelerator.is_main_process and (out_dir / "logs.jsonl").exists():
            # Drop log lines of steps after the checkpoint: they are about to be redone.
            kept = [rec for rec in read_jsonl(out_dir / "logs.jsonl") if rec.get("step", 0) <= start_step]
            atomic_write_text(out_dir / "logs.jsonl", "".join(json.dumps(rec) + "\n" for rec in kept))
    if accelerator.is_main_process:
        atomic_write_text(out_dir / "config.yaml", to_yaml(cfg))

    cached = None
    if tc.mode == "off_policy":
        cache_dir = Path(r.cache_dir or out_dir / "offpolicy_cache")
        cached = offpolicy_samples(cfg, unwrapped, teacher, tokenizer, items, cache_dir,
                                   accelerator, progress)

    refusal_check = refusal_check or default_refusal_check()
    log = JsonlWriter(out_dir / "logs.jsonl") if accelerator.is_main_process else None
    tb = _tensorboard(out_dir) if tc.tensorboard and accelerator.is_main_process else None
    wb = _wandb(cfg) if tc.wandb and accelerator.is_main_process else None
    history: list[dict] = []
    bad_in_row = 0
    from tqdm.auto import tqdm
    bar = tqdm(total=total_steps, initial=start_step, desc=f"msd {tc.mode}", unit="step",
               disable=not (progress and accelerator.is_local_main_process))

    on_cpu = accelerator.device.type == "cpu"

    # --- the loop -------------------------------------------------------------------------
    for step in range(start_step, total_steps):
        t0 = time.perf_counter()
        stats = {"loss": 0.0, "divergence": 0.0, "dpsw_weight": 0.0, "weight_max": 0.0, "response_len": 0.0,
                 "refusal_rate": 0.0, "tokens": 0, "gen_s": 0.0}
        batch_ids: list[str] = []
        for micro in range(tc.grad_accum):
            batch = micro_batch(items, step * tc.grad_accum + micro, tc.batch_size, rank, world, tc.seed)
            batch_ids += [it.key for it in batch]
            tg = time.perf_counter()
            if on_cpu:
                trim_heap()  # the last step's freed blocks would sit under the rollout's peak
            if cached is not None:
                responses = [s for it in batch for s in cached[it.key]]
            else:
                with full_weights(model):
                    samples = generate(unwrapped, tokenizer, [it.student_ids for it in batch],
                                       max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                                       top_p=r.top_p, top_k=r.top_k, num_samples=r.num_samples,
                                       batch_size=r.batch_size,
                                       seed=(tc.seed * 1_000_003 + step * tc.grad_accum + micro) * world + rank,
                                       merge_lora=r.merge_lora, backend=r.backend, sharded=sharded)
                responses = [s for per_query in samples for s in per_query]
            stats["gen_s"] += time.perf_counter() - tg
            if on_cpu:
                trim_heap()  # the rollout's freed blocks would sit under the loss's peak
            rows = [it for it in batch for _ in range(len(responses) // len(batch))]
            responses = [resp if resp else [tokenizer.eos_token_id] for resp in responses]
            with accelerator.accumulate(model):
                out = msd_batch_loss(model, teacher, [it.student_ids for it in rows],
                                     [it.teacher_ids for it in rows], responses,
                                     tokenizer.pad_token_id, LossSpec.of(loss_cfg),
                                     chunk_size_for(loss_cfg, accelerator.device.type))
                accelerator.backward(out.loss)
                if accelerator.sync_gradients:
                    grad_norm = _grad_norm(params)
                    finite = math.isfinite(grad_norm) and bool(torch.isfinite(out.loss))
                    if finite and tc.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(params, tc.max_grad_norm)
                    if finite:
                        optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            _accumulate_stats(stats, out, responses, rows, tokenizer, refusal_check, tc.grad_accum)
        if not finite:
            bad_in_row += 1
            warnings.warn(f"step {step + 1}: non-finite loss or gradient, step skipped "
                          f"(batch ids: {', '.join(batch_ids[:8])}{' ...' if len(batch_ids) > 8 else ''})")
            if bad_in_row >= tc.max_nonfinite:
                checkpoint.save_checkpoint(out_dir, step, unwrapped, optimizer, scheduler,
                                           _state(cfg, step, cached), tc.keep_checkpoints)
                raise MsdError(f"{bad_in_row} non-finite steps in a row (last at step {step + 1}); "
                               f"checkpoint saved in {out_dir / 'checkpoints'}; lower train.lr")
        else:
            bad_in_row = 0
        scheduler.step()
        done = step + 1
        elapsed = time.perf_counter() - t0
        record = {"step": done, "lr": scheduler.get_last_lr()[0], **stats,
                  "tokens_per_s": stats["tokens"] / elapsed, "step_s": elapsed, "skipped": not finite}
        history.append(record)
        if accelerator.is_main_process:
            if done % tc.log_every == 0 or done == total_steps:
                log.write_many([record])
                if tb:
                    for k, v in record.items():
                        if isinstance(v, (int, float)):
                            tb.add_scalar(f"train/{k}", v, done)
                if wb:
                    wb.log(record, step=done)
            if done == 1 or (tc.save_batch_every and done % tc.save_batch_every == 0):
                save_token_batch(out_dir / "token_batches" / f"step_{done}.jsonl", done, tc.mode,
                                 rows, responses, out, tokenizer)
        bar.set_postfix(loss=f"{record['loss']:.4f}", refuse=f"{record['refusal_rate']:.2f}")
        bar.update(1)
        if tc.save_every and done % tc.save_every == 0 and done < total_steps:
            if accelerator.is_main_process:
                checkpoint.save_checkpoint(out_dir, done, unwrapped, optimizer, scheduler,
                                           _state(cfg, done, cached), tc.keep_checkpoints)
            accelerator.wait_for_everyone()
    bar.close()

    if accelerator.is_main_process:
        checkpoint.save_checkpoint(out_dir, total_steps, unwrapped, optimizer, scheduler,
                                   _state(cfg, total_steps, cached), tc.keep_checkpoints)
    final = save_final(model, tokenizer, out_dir, cfg, accelerator)
    if log:
        log.close()
    if tb:
        tb.close()
    if wb:
        wb.finish()
    accelerator.print(f"msd: saved {final}")
    return TrainResult(unwrapped, tokenizer, out_dir, total_steps, history)


def _resume_keys(cfg: Config) -> dict:
    d = to_dict(cfg)
    d["train"] = {k: v for k, v in d["train"].items()
                  if k not in ("save_every", "keep_checkpoints", "log_every", "tensorboard", "wandb",
                               "max_steps", "output_dir")}
    return d


def _changes(old: dict | None, new: dict) -> str:
    """' (train.lr: 0.001 -> 0.002)': the resume-relevant keys that differ from `old`."""
    diff = [f"{s}.{k}: {old.get(s, {}).get(k)!r} -> {v!r}" for s, sec in new.items()
            for k, v in sec.items() if old and old.get(s, {}).get(k) != v]
    return f" ({', '.join(diff)})" if diff else ""


def _state(cfg: Config, step: int, cached) -> dict:
    return {"micro_batches_done": step * cfg.train.grad_accum,
            "offpolicy_cache_entries": len(cached) if cached is not None else None,
            "config_fingerprint": fingerprint(_resume_keys(cfg)), "config": _resume_keys(cfg)}


def _shards_weights(accelerator) -> bool:
    """FSDP or DeepSpeed ZeRO-3: parameters are sharded outside the wrapper's forward."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return accelerator.distributed_type == DistributedType.DEEPSPEED and getattr(plugin, "zero_stage", 0) == 3


def _grad_norm(params) -> float:
    norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    if not norms:
        return 0.0
    return float(torch.stack(norms).norm())


def _accumulate_stats(stats, out, responses, rows, tokenizer, refusal_check, accum) -> None:
    mask = out.mask_BT
    n_tok = float(mask.sum())
    stats["loss"] += float(out.loss.detach()) / accum
    stats["divergence"] += float((out.div_BT * mask).sum() / max(n_tok, 1.0)) / accum
    stats["weight_max"] += float(out.w_BT.max(dim=-1).values.mean()) / accum
    if out.w_raw_BT is not None:  # mean unnormalised DPSW weight w^T * w^S over response tokens
        stats["dpsw_weight"] += float((out.w_raw_BT * mask).sum() / max(n_tok, 1.0)) / accum
    stats["response_len"] += n_tok / len(responses) / accum
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    stats["refusal_rate"] += sum(refusal_check(t, it.lang) for t, it in zip(texts, rows)) / len(rows) / accum
    stats["tokens"] += int(n_tok)


def _tensorboard(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise MsdError("train.tensorboard needs the tensorboard package (pip install tensorboard)") from None
    return SummaryWriter(str(out_dir / "tb"))


def _wandb(cfg: Config):
    try:
        import wandb
    except ImportError:
        raise MsdError("train.wandb needs the wandb package (pip install wandb)") from None
    return wandb.init(config=to_dict(cfg), dir=cfg.train.output_dir)
