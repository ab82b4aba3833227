"""Generation backends: the registry `BACKENDS` (config key `rollout.backend`).

- `auto` (not an entry; `resolve_backend`): `compiled` on CUDA, `loop` elsewhere.
- `loop`: msd's own decode loop (`msd.generation.sampler`); models it cannot run go through `hf`.
- `hf`: plain `model.generate` with a dynamic KV cache (the reference path).
- `compiled`: `model.generate` with a static KV cache; on CUDA transformers compiles the decode
  step. Shapes are kept to a few so it compiles a few times per run, not per step: a batch of n
  prompts is padded to `row_bucket(n, batch_size)` rows (the next power of two: a training step
  of 8 prompts runs 8 rows, not `rollout.batch_size`) and the cache length is pinned to a bucketed ceiling
  (prompt length rounded up to `PROMPT_BUCKET`, plus `max_new_tokens`), which transformers only
  ever raises.
- `vllm`: a vLLM engine in this process, with the merged student weights pushed into it before
  each rollout. Untested here (no GPU); see docs/PERFORMANCE.md.

A backend is one function

    backend(model, prompts: list[list[int]], sampling: Sampling) -> (tokens, logprobs)

with tokens[i][j] the new ids of sample j of prompt i, cut after the first EOS (kept), and
logprobs[i][j][g] the log-prob of token g at temperature 1 under the sampling weights, or None
when `sampling.return_logprobs` is False. Adding one is one call:

    BACKENDS.register("mine", my_backend)

`in_batches` does the batching shared by the transformers-based backends (length-sorted,
left-padded batches, seeded per batch, LoRA folded in by `rollout_weights`); such a backend only
supplies the decoding of one padded batch. Shapes: B rows, P prompt columns, G generated
tokens, V vocabulary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import torch

import msd.generation.bf16head as bf16head
from msd.generation.sampler import cut_after_eos, decode_loop, split_head
from msd.generation.weights import is_peft, merged_state, rollout_state, rollout_weights
from msd.padding import left_pad
from msd.registry import Registry

PROMPT_BUCKET = 64  # `compiled`: prompt widths are rounded up to a multiple of this


def row_bucket(n: int, cap: int) -> int:
    """Rows a compiled batch of n prompts is padded to: the next power of two, at most `cap`.
    Fixed bug: every call was padded to `cap` (rollout.batch_size, 32), so a training step of 8
    prompts spent three quarters of its rows on padding."""
    return min(max(cap, n), 1 << max(0, (n - 1).bit_length()))

BACKENDS = Registry("generation backend", where="rollout.backend")


@dataclasses.dataclass(frozen=True)
class Sampling:
    """What to sample (the keyword arguments of `msd.generation.generate`, resolved)."""

    max_new_tokens: int
    temperature: float  # 0 = greedy
    top_p: float
    top_k: int  # 0 = no top-k filtering
    num_samples: int  # responses per prompt
    batch_size: int  # prompts per batch
    seed: int
    eos: frozenset[int]
    pad_id: int
    progress: bool = False
    merge_lora: bool = True
    return_logprobs: bool = False
    sharded: bool = False  # FSDP / ZeRO-3: every process steps until all are done


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend `auto` stands for on `device`; any other name unchanged."""
    if backend == "auto":
        return "compiled" if device.type == "cuda" else "loop"
    return backend


def _progress_bar(total: int, on: bool):
    if not on:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="generate", unit="prompt", leave=False)


def in_batches(model, prompts, s: Sampling, decode, *, fixed_rows: bool = False):
    """Run `decode(model, ids_BP, mask_BP, s, seed)` -> ((B*num_samples, G) ids, log-probs or
    None) over length-sorted batches; results come back in the caller's order. Seeding is per
    batch (s.seed + batch index), so results do not depend on what ran before or on how the
    caller's prompts were ordered. fixed_rows pads every batch to `row_bucket` rows."""
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    tokens: list = [None] * len(prompts)
    logprobs: list = [None] * len(prompts)
    batches = [order[i: i + s.batch_size] for i in range(0, len(order), s.batch_size)]
    bar = _progress_bar(len(prompts), s.progress)
    was_training = model.training
    model.eval()
    try:
        with rollout_weights(model, s.merge_lora):
            for b, idx in enumerate(batches):
                rows = [prompts[i] for i in idx]
                if fixed_rows:  # one compiled shape
                    rows += [rows[0]] * (row_bucket(len(rows), s.batch_size) - len(rows))
                ids_BP, mask_BP = left_pad(rows, s.pad_id, device)
                new_BG, logp_BG = decode(model, ids_BP, mask_BP, s, s.seed + b)
                for k, i in enumerate(idx):
                    span = slice(k * s.num_samples, (k + 1) * s.num_samples)
                    tokens[i] = [cut_after_eos(r, s.eos) for r in new_BG[span]]
                    if s.return_logprobs:
                        logprobs[i] = [lp[:len(t)] for lp, t in zip(logp_BG[span], tokens[i])]
                if bar:
                    bar.update(len(idx))
    finally:
        model.train(was_training)
        if bar:
            bar.close()
    return tokens, logprobs if s.return_logprobs else None


# ----------------------------------------------------------------------------- transformers

@contextlib.contextmanager
def clean_generation_config(model, s: Sampling):
    """Generate under a generation config holding only the token ids: transformers fills every
    setting the call leaves unset from `model.generation_config`, so a published one's
    repetition_penalty (Qwen2.5: 1.05), top_k, min_p ... would change what is sampled.
    Fixed bug: on-policy samples were then not drawn from the student's distribution, and
    greedy evaluation depended on the backend."""
    from transformers import GenerationConfig

    lm = model.get_base_model() if is_peft(model) else model
    saved = lm.generation_config
    lm.generation_config = GenerationConfig(pad_token_id=s.pad_id, eos_token_id=sorted(s.eos) or None,
                                            bos_token_id=getattr(saved, "bos_token_id", None))
    try:
        yield
    finally:
        lm.generation_config = saved


def hf_batch(model, ids_BP, mask_BP, s: Sampling, seed: int, *, static: bool = False):
    """One batch through `model.generate` with msd's own sampling settings only (nothing from
    the model's generation_config); static=True pins a static KV cache (see `compiled`)."""
    torch.manual_seed(seed)
    kwargs = dict(max_new_tokens=s.max_new_tokens, num_return_sequences=s.num_samples,
                  pad_token_id=s.pad_id, eos_token_id=sorted(s.eos) or None)
    if s.sharded:
        kwargs["synced_gpus"] = True
    if s.temperature > 0:
        kwargs.update(do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=max(s.top_k, 0))
    else:
        kwargs.update(do_sample=False)
    if static:
        # A fixed cache length: transformers keeps the largest seen, so the compiled decode
        # step sees one shape per run (batch rows are padded by the caller).
        ceiling = -(-ids_BP.shape[1] // PROMPT_BUCKET) * PROMPT_BUCKET + s.max_new_tokens
        kwargs.update(cache_implementation="static", max_cache_len=ceiling)
    if s.return_logprobs:
        kwargs.update(output_logits=True, return_dict_in_generate=True)
    with clean_generation_config(model, s):
        out = model.generate(input_ids=ids_BP, attention_mask=mask_BP, **kwargs)
    seqs = out.sequences if s.return_logprobs else out
    new_BG = seqs[:, ids_BP.shape[1]:]
    logp = None
    if s.return_logprobs:
        logits_BGV = torch.stack(out.logits, 1).float()
        logp = logits_BGV.log_softmax(-1).gather(-1, new_BG[..., None]).squeeze(-1).tolist()
    return new_BG.tolist(), logp


def loop_batch(model, ids_BP, mask_BP, s: Sampling, seed: int, *, split, fast_head=None):
    """One batch through msd's decode loop, with its own generator seeded by `seed`."""
    generator = torch.Generator(device=ids_BP.device).manual_seed(seed)
    return decode_loop(model, split, ids_BP, mask_BP, max_new_tokens=s.max_new_tokens,
                       temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                       num_samples=s.num_samples, eos=s.eos, pad_id=s.pad_id, generator=generator,
                       logprobs=s.return_logprobs, fast_head=fast_head)


@BACKENDS.register("loop")
def loop(model, prompts, s: Sampling):
    split = split_head(model)
    if split is None:
        return hf(model, prompts, s)
    head, fast_head = split[1], None
    if bf16head.usable_for(head, s.temperature, s.top_p, s.top_k, s.return_logprobs):
        # Made once per call: the head may train between calls.
        fast_head = bf16head.Bf16Head(head, rows=min(len(prompts), s.batch_size) * s.num_samples)
    return in_batches(model, prompts, s, functools.partial(loop_batch, split=split, fast_head=fast_head))


@BACKENDS.register("hf")
def hf(model, prompts, s: Sampling):
    return in_batches(model, prompts, s, hf_batch)


@BACKENDS.register("compiled")
def compiled(model, prompts, s: Sampling):
    return in_batches(model, prompts, s, functools.partial(hf_batch, static=True), fixed_rows=True)


# ----------------------------------------------------------------------------- vLLM (untested here)

def _vllm_engine(model):
    """One in-process vLLM engine per model, built from the base checkpoint on disk."""
    state = rollout_state(model)
    if state.engine is not None:
        return state.engine
    import os

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # keep the engine in this process
    from vllm import LLM

    lm = model.get_base_model() if is_peft(model) else model
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    state.engine = LLM(model=lm.config._name_or_path, dtype=str(lm.dtype).removeprefix("torch."),
                       gpu_memory_utilization=float(os.environ.get("MSD_VLLM_GPU_MEMORY", "0.3")),
                       max_model_len=int(os.environ.get("MSD_VLLM_MAX_LEN", "4096")),
                       enable_prefix_caching=False, seed=0,
                       distributed_executor_backend="external_launcher" if dist else None)
    return state.engine


def _vllm_load(engine, weights) -> None:
    try:
        runner_model = engine.llm_engine.model_executor.driver_worker.model_runner.model
    except AttributeError:  # newer vLLM: run the loader on the worker
        engine.collective_rpc(lambda self: self.model_runner.model.load_weights(list(weights)))
        return
    runner_model.load_weights(weights)


@BACKENDS.register("vllm")
def vllm(model, prompts, s: Sampling):
    """Sample through vLLM after pushing the current merged student weights into it (seeded per
    prompt: s.seed + prompt index)."""
    from vllm import SamplingParams

    engine = _vllm_engine(model)
    _vllm_load(engine, merged_state(model))
    if hasattr(engine, "reset_prefix_cache"):
        engine.reset_prefix_cache()
    params = [SamplingParams(n=s.num_samples, temperature=max(s.temperature, 0.0), top_p=s.top_p,
                             top_k=s.top_k if s.top_k > 0 else -1, max_tokens=s.max_new_tokens,
                             seed=s.seed + i, stop_token_ids=sorted(s.eos), detokenize=False,
                             logprobs=0 if s.return_logprobs else None)
              for i in range(len(prompts))]
    outs = engine.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    tokens = [[cut_after_eos(list(o.token_ids), s.eos) for o in out.outputs] for out in outs]
    if not s.return_logprobs:
        return tokens, None
    logprobs = [[[step[t].logprob for step, t in zip(o.logprobs, toks)]
                 for o, toks in zip(out.outputs, per)] for out, per in zip(outs, tokens)]
    return tokens, logprobs
