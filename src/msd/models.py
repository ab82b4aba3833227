"""Loading models and tokenizers, LoRA, and the frozen teacher.

The teacher is frozen at the initial weights (paper: EMA alpha=0 is best). With LoRA it is the
same network with the adapter disabled, so no second copy lives in memory; with full
fine-tuning it is a frozen deep copy made before the first update.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Callable

import torch

from msd.errors import MsdError
from msd.generation.weights import is_peft
from msd.gguf import converted_folder, gguf_in
from msd.prompts import load_chat_template
from msd.registry import Registry
from msd.safeload import check_adapter_folder, check_model_folder

# Named model sources: name -> a function returning a local Hugging Face folder. The model
# organism registers "organism" (built on first use); a plugin can add its own the same way.
MODEL_SOURCES: Registry[Callable[[], str | Path]] = Registry("model source", where="model.name_or_path")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device=None) -> torch.dtype:
    """'auto' = bfloat16 where the model will run on a GPU that supports it, else float32;
    `device`: where it will run (None: a GPU when one is visible)."""
    if name == "auto":
        on_gpu = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
        if on_gpu and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return DTYPES[name]


def dtype_label(name: str, device=None) -> str:
    """A dtype setting as a run's first line shows it: 'auto (float32)', 'bfloat16'."""
    return name if name != "auto" else f"auto ({str(resolve_dtype(name, device)).removeprefix('torch.')})"


def resolve_model_path(name_or_path: str, gguf_file: str | None = None) -> str:
    """A registered model source (e.g. 'organism', 'smollm2') -> its folder; a GGUF file (or a
    folder and `gguf_file`) -> its converted folder (`msd.gguf`); local folders are checked;
    anything else is taken as a hub id."""
    if name_or_path in MODEL_SOURCES and not gguf_file:
        return str(MODEL_SOURCES.get(name_or_path)())
    path = Path(name_or_path).expanduser()
    gguf = gguf_in(path, gguf_file)
    if gguf is not None:
        return str(converted_folder(gguf))
    if path.exists():
        check_model_folder(path)  # safetensors checked per file, JSON files readable
        return str(path)
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_local:
        raise MsdError("model path does not exist", name_or_path)
    return name_or_path  # a hub id


def load_tokenizer(path: str, model_cfg):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code)
    # tokenizers raises a bare Exception for a damaged tokenizer.json
    except Exception as e:  # noqa: BLE001 - any failure of the loader is a problem of the files
        raise MsdError(f"cannot load tokenizer ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})",
                       path) from None
    load_chat_template(tok, model_cfg.chat_template)
    try:  # a broken Jinja template fails here, named, not at the first prompt
        tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 - jinja2 raises many kinds
        raise MsdError(f"the chat template fails on a one-message chat ({type(e).__name__}: "
                       f"{(str(e).splitlines() or [''])[0][:200]})", "model.chat_template") from None
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model_and_tokenizer(model_cfg, adapter: str | None = None, device=None):
    """Load a causal LM (safetensors only, remote code off unless asked) and its tokenizer.
    `model_cfg` is a `msd.config.ModelConfig` (or anything with its fields)."""
    path = resolve_model_path(model_cfg.name_or_path, getattr(model_cfg, "gguf_file", None))
    tokenizer = load_tokenizer(path, model_cfg)
    return load_model(model_cfg, adapter, device, path=path), tokenizer


def load_model(model_cfg, adapter: str | None = None, device=None, *, path: str | None = None):
    """The causal LM of `load_model_and_tokenizer`, without loading a tokenizer (a large
    vocabulary's tokenizer holds tens of MB); `path`: `model_cfg.name_or_path` resolved."""
    from transformers import AutoModelForCausalLM

    path = path or resolve_model_path(model_cfg.name_or_path, getattr(model_cfg, "gguf_file", None))
    kwargs = dict(dtype=resolve_dtype(model_cfg.dtype, device), trust_remote_code=model_cfg.trust_remote_code,
                  use_safetensors=True)
    if model_cfg.attn_implementation:
        kwargs["attn_implementation"] = model_cfg.attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except ImportError as e:  # Fixed bug: flash_attention_2 without its package was a traceback
        first = (str(e).splitlines() or [""])[0][:200]
        if model_cfg.attn_implementation:
            raise MsdError(f"attention kernel {model_cfg.attn_implementation!r} cannot be used here "
                           f"({first}); install its package or choose sdpa or eager",
                           "model.attn_implementation") from None
        raise MsdError(f"cannot load model (a package it needs is missing: {first})", path) from None
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise MsdError(f"cannot load model ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})",
                       path) from None
    if adapter:
        from peft import PeftModel

        check_adapter_folder(Path(adapter))  # the file PEFT will open is safetensors
        try:
            model = PeftModel.from_pretrained(model, adapter)
        except (OSError, ValueError, TypeError, KeyError, RuntimeError) as e:
            raise MsdError(f"cannot load adapter ({type(e).__name__}: "
                           f"{(str(e).splitlines() or [''])[0][:200]})", adapter) from None
    if device is not None:
        model.to(device)
    model.eval()
    return model


def apply_lora(model, lora_cfg):
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    targets = lora_cfg.target_modules
    target = "all-linear" if targets == ["all-linear"] else list(targets)
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if target != "all-linear" and not present.intersection(target):
        raise MsdError(f"none of lora.target_modules {target} exist in the model "
                       f"(e.g. {sorted(present)[:8]})", "lora.target_modules")
    dims = [min(m.in_features, m.out_features) for name, m in model.named_modules()
            if hasattr(m, "in_features") and (target == "all-linear" or name.rsplit(".", 1)[-1] in target)]
    if dims and lora_cfg.r > min(dims):  # a rank above a layer's width only wastes memory
        raise MsdError(f"lora.r={lora_cfg.r} is larger than the smallest adapted layer ({min(dims)})", "lora.r")
    peft_cfg = PeftLoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                              target_modules=target, task_type="CAUSAL_LM", bias="none")
    return get_peft_model(model, peft_cfg)


class Teacher:
    """The frozen teacher p_theta0: the adapter-disabled base (LoRA) or a frozen copy (full FT)."""

    def __init__(self, model, frozen_copy=None):
        self.model = model
        self.frozen = frozen_copy
        # FSDP / ZeRO-3 shard the weights: forward through the engine's wrapper, which gathers
        # them, with the adapter disabled on the inner model (set by train after prepare).
        self.wrapped = None

    @classmethod
    def for_model(cls, model) -> "Teacher":
        if is_peft(model):
            return cls(model)
        frozen = copy.deepcopy(model)
        frozen.requires_grad_(False)
        frozen.eval()
        return cls(model, frozen)

    @contextlib.contextmanager
    def scope(self):
        """Yields the module that computes teacher outputs (in eval mode, no grad)."""
        if self.frozen is not None:
            with torch.no_grad():
                yield self.frozen
            return
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), self.model.disable_adapter():
                yield self.wrapped if self.wrapped is not None else self.model
        finally:
            self.model.train(was_training)
