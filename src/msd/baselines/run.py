"""`msd baseline METHOD`: one baseline run on TRL's own trainer, laid out like `msd train`.

    from msd.baselines.run import train_baseline
    result = train_baseline(load_config("x.yaml", ["baseline.method=dpo"]))

Same model loading (`msd.models`), LoRA (`msd.models.apply_lora`; with LoRA the reference
model of DPO/KTO is the adapter-disabled base, like MSD's teacher) or full fine-tuning, and
the same outputs: `config.yaml` (resolved), `logs.jsonl` (one record per logged step),
`checkpoints/checkpoint-N` (TRL's own, with msd's `state.json` holding the config
fingerprint, so a resumed run with other settings is refused) and `final/` (model or
adapter in Hugging Face format, via `msd.train.checkpoint.save_final`).
"""

from __future__ import annotations

import json
from pathlib import Path

from msd.baselines.data import load_examples, trl_rows
from msd import fingerprint
from msd.baselines.methods import METHODS
from msd.config import to_dict, to_yaml
from msd.errors import MsdError
from msd.io import JsonlWriter, atomic_write_json, atomic_write_text, ensure_writable_dir
from msd.models import apply_lora, is_peft, load_model_and_tokenizer
from msd.train import checkpoint, logs
from msd.train.loop import TrainResult
from msd.train.schedule import make_scheduler

CHECKPOINTS = "checkpoints"


def trl_args(cfg, out_dir: Path, progress: bool) -> dict:
    """TrainingArguments fields from msd's train section (the names msd train uses)."""
    import torch

    tc = cfg.train
    return dict(
        output_dir=str(out_dir / CHECKPOINTS), learning_rate=tc.lr, weight_decay=tc.weight_decay,
        max_grad_norm=tc.max_grad_norm,  # warm-up and schedule: msd's own (use_msd_schedule)
        per_device_train_batch_size=tc.batch_size, gradient_accumulation_steps=tc.grad_accum,
        num_train_epochs=tc.epochs, max_steps=tc.max_steps or -1, seed=tc.seed, data_seed=tc.seed,
        bf16=tc.mixed_precision == "bf16", fp16=tc.mixed_precision == "fp16",
        gradient_checkpointing=tc.gradient_checkpointing, logging_steps=tc.log_every,
        save_strategy="steps" if tc.save_every else "no", save_steps=tc.save_every or 500,
        save_total_limit=tc.keep_checkpoints, report_to=_trackers(tc), disable_tqdm=not progress,
        max_length=cfg.baseline.max_length, use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0)


def use_msd_schedule(trainer, tc) -> None:
    """Make `trainer` step msd's schedule (msd.train.schedule), the one `msd train` steps.
    Fixed bug: TRL got the warm-up as a share of the steps, which transformers rounds up and
    starts at rate 0, so a 2-step DPO run trained its first step at lr 0 (adapter unchanged)."""
    def create_scheduler(num_training_steps: int, optimizer=None):
        if trainer.lr_scheduler is None:  # once per run, as transformers' own does
            trainer.lr_scheduler = make_scheduler(optimizer or trainer.optimizer, tc, num_training_steps)
        return trainer.lr_scheduler

    trainer.create_scheduler = create_scheduler  # transformers' hook for its scheduler


def _trackers(tc) -> list[str]:
    return (["tensorboard"] if tc.tensorboard else []) + (["wandb"] if tc.wandb else [])


def make_callback(cfg, out_dir: Path):
    """logs.jsonl records (msd's names: step, loss, lr) and state.json in each checkpoint."""
    from transformers import TrainerCallback

    keys = resume_keys(cfg)

    class MsdCallback(TrainerCallback):
        def __init__(self):
            self.log = None

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs or "train_runtime" in logs:
                return
            if self.log is None:
                self.log = JsonlWriter(out_dir / LOGS)
            rec = {"step": state.global_step, "method": cfg.baseline.method}
            rec.update({("lr" if k == "learning_rate" else k): v for k, v in logs.items()
                        if isinstance(v, (int, float))})
            self.log.write(rec)
            self.log.flush()

        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                atomic_write_json(ckpt / "state.json", {**checkpoint.run_state(
                    keys, state.global_step, cfg.train.grad_accum, None), "step": state.global_step})

        def on_train_end(self, args, state, control, **kwargs):
            if self.log is not None:
                self.log.close()

    return MsdCallback()


LOGS = logs.LOGS


def resume_keys(cfg) -> dict:
    """What a baseline checkpoint must match: the config, and the content of the files it was
    trained from (MSD's data identity plus the baseline's own data file).
    Fixed bug: a baseline resumed after its pair file was edited in place."""
    source = Path(cfg.baseline.data).expanduser()
    identity = {**fingerprint.training_identity(cfg),
                "baseline_data_content": fingerprint.file_sha(source) if source.is_file() else cfg.baseline.data}
    return {**checkpoint.resume_keys(to_dict(cfg)), "identity": identity}


def resume_point(cfg, out_dir: Path, resume: bool | None) -> tuple[str | None, int | None]:
    """TRL's latest checkpoint to resume from (None: start fresh), config checked first, and
    the step of a finished run (None: there is training to do)."""
    from transformers.trainer_utils import get_last_checkpoint

    root = out_dir / CHECKPOINTS
    ckpt = get_last_checkpoint(str(root)) if resume is not False and root.is_dir() else None
    if resume and ckpt is None:
        raise MsdError("--resume given but the output folder holds no checkpoint", str(out_dir))
    from accelerate import PartialState

    step = 0
    if ckpt is not None:
        checkpoint.check_config(Path(ckpt), resume_keys(cfg))
        step = checkpoint.read_state(Path(ckpt))["step"]
        # Fixed bug: TRL resumed from the last step trains one more, so every rerun of a
        # finished baseline added a step. A finished run (final/ saved) trains nothing.
        if checkpoint.check_resume_step(Path(ckpt), step, _last_step(cfg, Path(ckpt))) \
                and (out_dir / "final").is_dir():
            print(f"msd: the run is finished (step {step}); nothing to train, outputs in {out_dir}")
            return ckpt, step
        print(f"msd: resuming from {ckpt} (step {step})")
    if PartialState().is_main_process:
        logs.drop_logs_after(out_dir, step)  # the steps after it are about to be redone
    return ckpt, None


def _last_step(cfg, ckpt: Path) -> int:
    """train.max_steps, else the total TRL computed from the epochs (its trainer_state.json)."""
    if cfg.train.max_steps:
        return cfg.train.max_steps
    try:
        total = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))["max_steps"]
    except (OSError, ValueError, KeyError, TypeError):
        total = None
    return total if type(total) is int and total > 0 else 2**62  # unknown: not finished


def train_baseline(cfg, *, model=None, tokenizer=None, progress: bool = True,
                   resume: bool | None = None) -> TrainResult:
    """Run `cfg.baseline.method` on TRL's trainer; returns msd's TrainResult (output_dir/final)."""
    from datasets import Dataset

    method = METHODS.get(cfg.baseline.method)
    out_dir = ensure_writable_dir(cfg.train.output_dir)
    ckpt, finished = resume_point(cfg, out_dir, resume)
    if finished is not None:  # nothing trained: no model in memory (final/ holds it)
        return TrainResult(None, tokenizer, out_dir, finished)
    if model is None:
        model, tokenizer = load_model_and_tokenizer(cfg.model)
    examples = load_examples(cfg, model, tokenizer, progress)
    rows = trl_rows(method.kind, examples, cfg.prompt.system_prompt)
    if not rows:
        raise MsdError(f"{cfg.baseline.method} needs {method.kind} examples and {cfg.baseline.data} "
                       "gave none (pairs need a rejected answer that differs from the chosen one)",
                       "baseline.data")
    atomic_write_text(out_dir / "config.yaml", to_yaml(cfg))
    atomic_write_text(out_dir / "baseline_data.jsonl",  # what the trainer saw, for inspection
                      "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    if cfg.lora.enabled and not is_peft(model):
        model = apply_lora(model, cfg.lora)
    model.train()
    trainer = method.build(model, tokenizer, trl_args(cfg, out_dir, progress), cfg.baseline,
                           Dataset.from_list(rows), [make_callback(cfg, out_dir)])
    use_msd_schedule(trainer, cfg.train)
    output = trainer.train(resume_from_checkpoint=ckpt)
    tokenizer.padding_side = "left"  # TRL may change it; msd's generation reads left-padded prompts
    final = checkpoint.save_final(trainer.model, tokenizer, out_dir, to_yaml(cfg), trainer.accelerator)
    print(f"msd: saved {final}")
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    unwrapped.eval()
    return TrainResult(unwrapped, tokenizer, out_dir, output.global_step)
