"""The MSD training loop, read top to bottom: resume -> responses -> step -> log -> save.

    result = train(load_config("configs/x.yaml"))

Per optimizer step: take the next micro-batch of (query, language) items, get responses (on-policy:
the current student samples them; off-policy: the frozen teacher's cached samples), score them
under the student and teacher prompts, and minimise the DPSW-weighted divergence (Eq. 8).
On-policy and off-policy share everything but where the responses come from (`responses`).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from msd.config import chunk_size_for, to_dict, to_yaml
from msd.data import QueryTuple, load_tuples, split
from msd import fingerprint, limits
from msd.errors import MsdError
from msd.io import atomic_write_text, ensure_writable_dir
from msd.losses import LossSpec
from msd.memory import steady_heap, trim_heap
from msd.models import load_model_and_tokenizer
from msd.scoring import msd_batch_loss
from msd.train import checkpoint, dist_checkpoint, launch, logs, responses, sharding
from msd.train.items import Item, build_items, micro_batch
from msd.train.setup import Run, make_accelerator, prepare


@dataclass
class TrainResult:
    model: object
    tokenizer: object
    output_dir: Path
    steps: int
    history: list[dict] = field(default_factory=list)
    main_process: bool = True  # the process that wrote the shared outputs


def train(cfg, *, model=None, tokenizer=None, tuples: list[QueryTuple] | None = None,
          progress: bool = True, resume: bool | None = None,
          refusal_check: Callable[[str, str], bool] | None = None,
          loss_fn: Callable = msd_batch_loss) -> TrainResult:
    """Run MSD with `cfg` (a `msd.config.Config`). `resume=None` resumes automatically when
    output_dir holds a checkpoint. `loss_fn` has `msd.scoring.msd_batch_loss`'s signature.
    The output folder's writer lock is held for the whole run (`msd.train.launch.writer_lock`)."""
    tc = cfg.train
    accelerator = make_accelerator(tc)  # refuses a launch that is not what it claims
    # Ranks agree or stop: before any other collective (the lock's, model sharding, batches).
    sharding.same_everywhere({**resume_keys(cfg), "train": to_dict(cfg)["train"]},
                             "the config (with its data and model files)", checkpoint.changes)
    with launch.writer_lock(tc.output_dir, accelerator, "train", fresh=resume is False), \
            launch.peer_loss_reported(accelerator):
        return _train(cfg, accelerator, model, tokenizer, tuples, progress, resume,
                      refusal_check, loss_fn)


def _train(cfg, accelerator, model, tokenizer, tuples, progress, resume, refusal_check,
           loss_fn) -> TrainResult:
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    tc = cfg.train
    out_dir = ensure_writable_dir(tc.output_dir)
    set_seed(tc.seed)
    if model is None:
        model, tokenizer = load_model_and_tokenizer(cfg.model)
    items = training_items(cfg, tuples, tokenizer, accelerator.num_processes)
    limits.check_context([(f"query {it.key}", max(len(it.student_ids), len(it.teacher_ids))) for it in items],
                         limits.context_window(model, tokenizer), cfg.rollout.max_new_tokens, "data.source")
    run = prepare(cfg, model, accelerator, len(items))
    start = resume_from_checkpoint(cfg, run, out_dir, resume)
    if accelerator.is_main_process:
        atomic_write_text(out_dir / "config.yaml", to_yaml(cfg))
    cached = None
    if tc.mode == "off_policy":
        cache_dir = Path(cfg.rollout.cache_dir or out_dir / "offpolicy_cache")
        cached = responses.teacher_samples(cfg, run, tokenizer, items, cache_dir, progress)

    logger = logs.Logger(cfg, out_dir, accelerator.is_main_process)
    step_fn = Stepper(cfg, run, items, tokenizer, cached, refusal_check or logs.default_refusal_check(),
                      loss_fn)
    bar = tqdm(total=run.total_steps, initial=start, desc=f"msd {tc.mode}", unit="step",
               disable=not (progress and accelerator.is_local_main_process))
    history: list[dict] = []
    for step in range(start, run.total_steps):
        record = step_fn(step)
        history.append(record)
        if accelerator.is_main_process:
            report_step(cfg, run, logger, step_fn, record, out_dir)
        bar.set_postfix(loss=f"{record['loss']:.4f}", refuse=f"{record['refusal_rate']:.2f}")
        bar.update(1)
        done = step + 1
        if tc.save_every and done % tc.save_every == 0 and done < run.total_steps:
            save(cfg, run, out_dir, done, cached)  # every process: each saves its shards
    bar.close()

    save(cfg, run, out_dir, run.total_steps, cached)
    final = dist_checkpoint.save_final(run, tokenizer, out_dir, to_yaml(cfg))
    logger.close()
    accelerator.print(f"msd: saved {final}")
    return TrainResult(run.unwrapped, tokenizer, out_dir, run.total_steps, history,
                       accelerator.is_main_process)


# ----------------------------------------------------------------------------- the parts

def training_items(cfg, tuples, tokenizer, world: int) -> list[Item]:
    """The training split of the data as items, enough for one micro-batch per process."""
    if tuples is None:
        tuples = load_tuples(cfg.data.source, cfg.data.english)
    train_tuples, _ = split(tuples, cfg.data.heldout_fraction, cfg.data.seed, cfg.data.heldout_by)
    if not train_tuples:  # Fixed bug: this was reported as a data.languages problem
        raise MsdError(f"data.heldout_fraction={cfg.data.heldout_fraction} holds out all {len(tuples)} "
                       "queries; lower it", "data.heldout_fraction")
    if cfg.data.limit:
        train_tuples = train_tuples[: cfg.data.limit]
    items = build_items(cfg, train_tuples, tokenizer)
    if len(items) < cfg.train.batch_size * world:
        raise MsdError(f"only {len(items)} training items, fewer than train.batch_size x processes "
                       f"({cfg.train.batch_size * world})", "train.batch_size")
    return items


def resume_keys(cfg) -> dict:
    return {**checkpoint.resume_keys(to_dict(cfg)), "identity": fingerprint.training_identity(cfg)}


def resume_from_checkpoint(cfg, run: Run, out_dir: Path, resume: bool | None) -> int:
    """The step to start from: 0, or the latest checkpoint's (weights, optimizer, RNG restored)."""
    ckpt = checkpoint.latest_checkpoint(out_dir) if resume is not False else None
    if resume and ckpt is None:
        raise MsdError("--resume given but the output folder holds no checkpoint", str(out_dir))
    if ckpt is None:
        if run.accelerator.is_main_process:  # a run killed before its first checkpoint: its
            logs.drop_logs_after(out_dir, 0)  # log lines are not this run's (as for a baseline)
        return 0
    # Fixed bug: the config was compared only after loading the weights, so a changed shape
    # (lora.r) failed with a tensor-size error instead of naming what changed.
    checkpoint.check_config(ckpt, resume_keys(cfg))
    finished = checkpoint.check_resume_step(ckpt, checkpoint.read_state(ckpt)["step"], run.total_steps)
    step = dist_checkpoint.load_checkpoint(run, ckpt)["step"]
    run.accelerator.print(f"msd: the run is finished (step {step} of {run.total_steps}); nothing to train, "
                          "final/ is saved again" if finished else
                          f"msd: resuming from {ckpt} (step {step} of {run.total_steps})")
    if run.accelerator.is_main_process:
        logs.drop_logs_after(out_dir, step)
    return step


def save(cfg, run: Run, out_dir: Path, step: int, cached) -> None:
    state = checkpoint.run_state(resume_keys(cfg), step, cfg.train.grad_accum,
                                 len(cached) if cached is not None else None)
    dist_checkpoint.save_checkpoint(run, out_dir, step, state, cfg.train.keep_checkpoints)


class Stepper:
    """One optimizer step: micro-batches -> responses -> scored loss -> backward -> update."""

    def __init__(self, cfg, run: Run, items, tokenizer, cached, refusal_check, loss_fn):
        self.cfg, self.run, self.items, self.tokenizer = cfg, run, items, tokenizer
        self.cached, self.refusal_check, self.loss_fn = cached, refusal_check, loss_fn
        self.spec = LossSpec.of(run.loss_cfg)
        self.chunk_size = chunk_size_for(run.loss_cfg, run.accelerator.device.type,
                                         shared_head=run.teacher.frozen is None)
        self.on_cpu = run.accelerator.device.type == "cpu"
        if self.on_cpu:
            steady_heap()
        self.bad_in_row = 0
        self.last = None  # (rows, responses, loss output) of the step's last micro-batch

    def responses(self, batch: list[Item], step: int, micro: int) -> list[list[int]]:
        if self.cached is not None:
            return responses.off_policy(self.cached, batch)
        tc, acc = self.cfg.train, self.run.accelerator
        seed = (tc.seed * 1_000_003 + step * tc.grad_accum + micro) * acc.num_processes + acc.process_index
        return responses.on_policy(self.run, self.tokenizer, batch, self.cfg.rollout, seed)

    def __call__(self, step: int) -> dict:
        tc, run = self.cfg.train, self.run
        t0 = time.perf_counter()
        stats, batch_ids, finite = logs.new_stats(), [], True
        for micro in range(tc.grad_accum):
            batch = micro_batch(self.items, step * tc.grad_accum + micro, tc.batch_size,
                                run.accelerator.process_index, run.accelerator.num_processes, tc.seed)
            batch_ids += [it.key for it in batch]
            tg = time.perf_counter()
            if self.on_cpu:
                trim_heap()  # the last step's freed blocks would sit under the rollout's peak
            resp = self.responses(batch, step, micro)
            stats["gen_s"] += time.perf_counter() - tg
            if self.on_cpu:
                trim_heap()  # the rollout's freed blocks would sit under the loss's peak
            rows = [it for it in batch for _ in range(len(resp) // len(batch))]
            resp = [r if r else [self.tokenizer.eos_token_id] for r in resp]
            with run.accelerator.accumulate(run.model):
                out = self.loss_fn(run.model, run.teacher, [it.student_ids for it in rows],
                                   [it.teacher_ids for it in rows], resp, self.tokenizer.pad_token_id,
                                   self.spec, self.chunk_size)
                run.accelerator.backward(out.loss)
                if run.accelerator.sync_gradients:
                    finite = self.update(out.loss)
            logs.accumulate_stats(stats, out, resp, rows, self.tokenizer, self.refusal_check, tc.grad_accum)
            self.last = (rows, resp, out)
        self.count_nonfinite(finite, step, batch_ids)
        # Fixed bug: the rate was read after the scheduler stepped, so logs.jsonl showed the
        # next step's rate (a 3-step cosine run at 1e-4 logged 7.5e-5, 2.5e-5, 0).
        lr = run.scheduler.get_last_lr()[0]  # the rate this step's update used
        run.scheduler.step()
        elapsed = time.perf_counter() - t0
        return {"step": step + 1, "lr": lr, **stats,
                "tokens_per_s": stats["tokens"] / elapsed, "step_s": elapsed, "skipped": not finite}

    def update(self, loss) -> bool:
        """Clip and step unless the loss or a gradient is non-finite; returns whether it stepped."""
        run = self.run
        norm = sharding.grad_norm(run.params) if run.engine == "fsdp2" else grad_norm(run.params)
        # Fixed bug: each process decided alone (from its local loss and shards), so one could
        # step while another skipped, and their next collective call hung.
        finite = sharding.all_agree(math.isfinite(norm) and bool(torch.isfinite(loss)))
        if finite and self.cfg.train.max_grad_norm > 0 and run.engine == "fsdp2":
            sharding.clip_grad(run.params, self.cfg.train.max_grad_norm, norm)
        elif finite and self.cfg.train.max_grad_norm > 0:
            run.accelerator.clip_grad_norm_(run.params, self.cfg.train.max_grad_norm)
        if finite:
            run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        return finite

    def count_nonfinite(self, finite: bool, step: int, batch_ids: list[str]) -> None:
        """Warn about a skipped step; stop (with a checkpoint) after too many in a row."""
        if finite:
            self.bad_in_row = 0
            return
        self.bad_in_row += 1
        warnings.warn(f"step {step + 1}: non-finite loss or gradient, step skipped "
                      f"(batch ids: {', '.join(batch_ids[:8])}{' ...' if len(batch_ids) > 8 else ''})")
        if self.bad_in_row >= self.cfg.train.max_nonfinite:
            out_dir = Path(self.cfg.train.output_dir)
            save(self.cfg, self.run, out_dir, step, self.cached)
            raise MsdError(f"{self.bad_in_row} non-finite steps in a row (last at step {step + 1}); "
                           f"checkpoint saved in {out_dir / 'checkpoints'}; lower train.lr")


def report_step(cfg, run: Run, logger: logs.Logger, stepper: Stepper, record: dict, out_dir: Path) -> None:
    """Log the step's record and, on the steps that keep one, its token batch."""
    tc, done = cfg.train, record["step"]
    if done % tc.log_every == 0 or done == run.total_steps:
        logger.write(record, done)
    if done == 1 or (tc.save_batch_every and done % tc.save_batch_every == 0):
        rows, resp, out = stepper.last
        logs.save_token_batch(out_dir / "token_batches" / f"step_{done}.jsonl", done, tc.mode,
                              rows, resp, out, stepper.tokenizer)


def grad_norm(params) -> float:
    norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    if not norms:
        return 0.0
    return float(torch.stack(norms).norm())
