"""Setting up a training run: the accelerator (launcher quirks), and the student, frozen
teacher, optimizer and schedule, prepared for the engine."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from dataclasses import dataclass

import torch

from msd.errors import MsdError
from msd.losses import check_jsd_beta
from msd import machine
from msd.machine import WORLD_SIZE_VARS
from msd.models import Teacher, apply_lora, dtype_label, is_peft
from msd.train import launch, sharding
from msd.train.schedule import make_scheduler



def start_line(command: str, cfg, strict: bool) -> None:
    """What `msd train` and `msd baseline` do first (msd.machine.start): the bfloat16 check,
    torch's threads (train.threads), and the line naming them with the run's settings."""
    settings = {"model.dtype": dtype_label(cfg.model.dtype),
                "train.mixed_precision": cfg.train.mixed_precision, "lora.enabled": cfg.lora.enabled}
    if command == "train":  # a baseline's data comes from baseline.data, not train.mode
        settings["train.mode"] = cfg.train.mode
    machine.start(command, settings, threads=cfg.train.threads, threads_key="train.threads",
                  bf16=machine.bf16_asked(cfg), strict=strict)


def make_accelerator(tc):
    """An `accelerate.Accelerator` for the launch this process is part of, checked against what
    the launcher claims (`msd.train.launch`): an inconsistent launch stops here, before any
    write."""
    from accelerate import Accelerator

    if os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true" and "MASTER_ADDR" in os.environ \
            and not any(v in os.environ for v in WORLD_SIZE_VARS):  # --cpu without mpirun: one process
        raise MsdError("`accelerate launch --cpu --num_processes N` starts a single process; for N "
                       "CPU processes use `accelerate launch --multi_gpu --num_processes N` (gloo "
                       "without GPUs) or --config_file configs/accelerate/cpu_ddp.yaml")
    claim = launch.claimed()  # before accelerate, which rewrites the variables on CPU
    # Several processes without a GPU (torchrun / accelerate's --multi_gpu launcher): accelerate
    # picks DDP over gloo only when told cpu=True; otherwise every process trains alone.
    # DeepSpeed is the exception: cpu=True would turn it into DDP; it gets gloo by name instead.
    cpu_ddp = claim.world > 1 and not torch.cuda.is_available() and not claim.deepspeed
    if claim.deepspeed and not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed would probe for one and warn
    # FSDP: msd shards (msd.train.sharding) and sets the precision itself; accelerate only
    # starts the processes.
    precision = "no" if sharding.fsdp_requested() else tc.mixed_precision
    reset_precision(precision)
    sharding.die_with_launcher()
    try:
        with sharding.accelerate_fsdp_hidden():
            accelerator = Accelerator(mixed_precision=precision, gradient_accumulation_steps=tc.grad_accum,
                                      cpu=cpu_ddp, kwargs_handlers=launch.process_group_handlers(claim))
    except ImportError as e:  # a DeepSpeed launch without deepspeed installed
        raise MsdError(f"{claim}: {e}") from None
    except (ValueError, RuntimeError) as e:
        if claim.world < 2:
            raise
        # the process group could not be formed (a partner that never came, a bad address)
        raise MsdError(f"{claim}: the processes could not be joined ({str(e).splitlines()[0]})") from None
    launch.check(accelerator, claim)
    if claim.deepspeed:  # msd feeds its own micro-batches: no dataloader for accelerate to read
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = tc.batch_size
    return accelerator


def reset_precision(mixed_precision: str) -> None:
    """accelerate keeps one state per process and refuses another mixed precision in it; a
    second run in the same single process (a notebook, a test session) starts afresh."""
    from accelerate.state import AcceleratorState

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or not AcceleratorState._shared_state:
        return
    if str(AcceleratorState().mixed_precision) != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=True)


def shards_weights(accelerator) -> bool:
    """FSDP or DeepSpeed ZeRO-3: parameters are sharded outside the wrapper's forward."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return accelerator.distributed_type == DistributedType.DEEPSPEED and getattr(plugin, "zero_stage", 0) == 3


def fused_optimizer(params, accelerator, fsdp2: bool) -> bool:
    """Whether AdamW takes torch's fused kernel: one pass over each parameter, where the
    default CPU path makes two parameter-sized temporaries per step (sqrt and division), each
    fresh memory to fault in (for the 43M-parameter benchmark model, 0.45 s of a 3.8 s full
    fine-tuning step). Plain (or DDP) float parameters on CPU or CUDA only: sharded engines
    keep torch's default."""
    from accelerate.utils import DistributedType

    if fsdp2 or accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return False
    return bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)


def master_weights(model, mixed_precision: str, accelerator):
    """Full fine-tuning keeps float32 weights for the optimizer to update. Fixed bug: with
    bfloat16 weights most AdamW updates at lr ~1e-5 round away (after 2 steps 6% of the
    weights had moved, 72% in float32). With bf16/fp16 compute the trained copy is upcast
    (the frozen teacher stays in half precision); without, the run is refused. DeepSpeed keeps
    its own float32 master weights."""
    from accelerate.utils import DistributedType

    half = next(model.parameters()).dtype in (torch.bfloat16, torch.float16)
    if not half:
        return model
    if mixed_precision == "no":  # DeepSpeed too: without bf16/fp16 it keeps no float32 copy
        raise MsdError("full fine-tuning with half-precision weights loses most updates; set "
                       "train.mixed_precision=bf16 (float32 master weights, bf16 compute), "
                       "model.dtype=float32, or lora.enabled=true", "train.mixed_precision")
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return model  # its bf16/fp16 mode keeps float32 master weights itself
    return model.float()


def zero3_gathered_for_copy(model, lora: bool):
    """The full weights while the full fine-tuning teacher copy is made. Under a DeepSpeed
    launch accelerate hands transformers its ZeRO-3 config whatever `zero3_init_flag` says, so
    `from_pretrained` loads each process's partition only; a plain copy of that would hold empty
    tensors. Gathered, the copy is the full, plain theta_0 (one per process)."""
    params = [] if lora else [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


@dataclass
class Run:
    """A prepared run: what the loop needs besides the data."""
    accelerator: object
    model: object  # the engine-wrapped student
    unwrapped: object
    teacher: Teacher
    params: list
    optimizer: object
    scheduler: object
    total_steps: int
    sharded: bool
    loss_cfg: object  # cfg.loss, with chunk_size 0 when the weights are sharded
    engine: str = "plain"  # "fsdp2" (msd shards), "deepspeed" (accelerate's), "plain" (one / DDP)


def prepare(cfg, model, accelerator, n_items: int) -> Run:
    """Adapter or full fine-tuning, the frozen teacher (theta_0, taken before any update), the
    optimizer and schedule, all prepared by accelerate."""
    tc = cfg.train
    check_jsd_beta(cfg.loss, "loss.beta")  # configs built in code skip load_config's check
    if cfg.lora.enabled:
        if not is_peft(model):
            model = apply_lora(model, cfg.lora)
    else:
        model.requires_grad_(True)
    fsdp2 = sharding.fsdp_requested()
    if not fsdp2:  # FSDP2 moves the weights one unit at a time while sharding
        model.to(accelerator.device)
    with zero3_gathered_for_copy(model, cfg.lora.enabled):
        teacher = Teacher.for_model(model)  # frozen now: theta_0
    if not cfg.lora.enabled:
        model = master_weights(model, tc.mixed_precision, accelerator)
    if tc.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if is_peft(model):
            model.enable_input_require_grads()
    if fsdp2:  # before the optimizer: it must hold the shards
        sharding.shard(model, accelerator.device, tc.mixed_precision)
        sharding.shard(teacher.frozen, accelerator.device, tc.mixed_precision)
        print(sharding.share_line(model, accelerator, "FSDP2"), flush=True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay,
                                  fused=fused_optimizer(params, accelerator, fsdp2))
    micro_per_epoch = n_items // (tc.batch_size * accelerator.num_processes)
    total_steps = tc.max_steps or max(1, tc.epochs * micro_per_epoch // tc.grad_accum)
    scheduler = make_scheduler(optimizer, tc, total_steps)
    model.train()
    if not fsdp2:
        model, optimizer = accelerator.prepare(model, optimizer)
    sharded, loss_cfg = fsdp2 or shards_weights(accelerator), cfg.loss
    if sharded:  # FSDP / ZeRO-3: weights exist only inside the wrapper's forward
        teacher.wrapped = model if teacher.frozen is None else None
        if loss_cfg.chunk_size:  # the chunked loss calls lm_head outside forward
            warnings.warn("FSDP / ZeRO-3: loss.chunk_size set to 0 (full logits)")
            loss_cfg = dataclasses.replace(loss_cfg, chunk_size=0)
    engine = "fsdp2" if fsdp2 else "deepspeed" if sharded else "plain"
    if engine == "deepspeed":
        print(sharding.share_line(accelerator.unwrap_model(model), accelerator, "ZeRO-3"), flush=True)
    return Run(accelerator, model, accelerator.unwrap_model(model), teacher, params, optimizer,
               scheduler, total_steps, sharded, loss_cfg, engine)
