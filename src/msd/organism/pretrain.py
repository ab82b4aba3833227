"""Pre-train the model organism from scratch: a plain causal-LM loop over the synthetic corpus.

    recipe = Recipe()
    build(recipe, out_dir)   # writes a Hugging Face folder (config, safetensors, tokenizer)

Each step draws one component of the corpus (student, teacher contexts, moderation,
translation, dictionary) by its mixture weight and a batch of its examples, so sequences in a
batch have similar lengths and little padding. The loss is next-token cross-entropy on the assistant's reply (and its end
marker) only: the prompts are given, as in chat fine-tuning. AdamW, linear warm-up, cosine
decay. Shapes: B examples, T tokens, V vocabulary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from msd import machine
from msd.organism import corpus, world
from msd.organism.tokenizer import ROLES, build_tokenizer, fast_encoder


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the organism's weights (hashed into the cache key)."""
    seed: int = 0
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    intermediate_size: int = 384
    steps: int = 1000
    batch_tokens: int = 1024  # padded tokens per batch
    lr: float = 3e-3
    warmup_steps: int = 30
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    # Share of batches drawn from each corpus component.
    mixture: tuple[tuple[str, float], ...] = (
        ("student", 0.34), ("full", 0.24), ("english_only", 0.08), ("instruction_only", 0.14),
        ("moderation", 0.07), ("translation", 0.08), ("dictionary", 0.05))


def auto_threads() -> int:
    """Torch threads for a possibly shared CPU: `msd.machine.choose_threads` (MSD_THREADS or
    OMP_NUM_THREADS if set, else this process's cores), lowered to the cores not already busy.

    OpenMP threads wait for each other at every operation; when other processes hold the
    cores, two threads made a pre-training step 2-3x *slower* than one on a 2-core machine.
    MSD_THREADS overrides (e.g. MSD_THREADS=2 on an idle machine to force both cores).
    """
    chosen = machine.choose_threads()
    if chosen.why in ("MSD_THREADS", "OMP_NUM_THREADS"):
        return chosen.n
    try:
        busy = os.getloadavg()[0]
    except (OSError, AttributeError):  # no load average (Windows): all of this process's cores
        return chosen.n
    return max(1, min(chosen.n, int(machine.cores() - busy + 0.5)))


@contextlib.contextmanager
def torch_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def recipe_hash(recipe: Recipe) -> str:
    """Changes when the recipe, the corpus generator or the world changes."""
    blob = json.dumps({"recipe": dataclasses.asdict(recipe), "corpus": corpus.CORPUS_VERSION,
                       "world": world.WORLD_SEED}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------- data

def encode_examples(tokenizer, examples: list[corpus.Example]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, reply ids + EOS) per example.

    The prompt is the chat template's rendering of one user turn plus the generation prompt,
    i.e. what `msd.prompts.chat_ids` returns (checked in `build` and in the tests), assembled
    here directly because rendering 40k Jinja templates would take half a minute.
    """
    user_id, assistant_id = tokenizer.convert_tokens_to_ids([ROLES[1], ROLES[2]])
    eos = tokenizer.eos_token_id
    encode = fast_encoder(tokenizer)
    return [([user_id, *encode(e.user), eos, assistant_id], [*encode(e.reply), eos])
            for e in examples]


def get_batch(pairs, rng: random.Random, batch_tokens: int, pad_id: int, n: int | None = None):
    """(B, T) input ids, (B, T) labels (-100 outside replies), (B, T) attention mask.

    B = batch_tokens // (longest example of this component), or `n` if given.
    """
    longest = max(len(p) + len(r) for p, r in pairs)
    n = n or max(1, batch_tokens // longest)
    chosen = [pairs[rng.randrange(len(pairs))] for _ in range(n)]
    T = max(len(p) + len(r) for p, r in chosen)
    ids_BT = torch.full((len(chosen), T), pad_id, dtype=torch.long)
    labels_BT = torch.full((len(chosen), T), -100, dtype=torch.long)
    mask_BT = torch.zeros((len(chosen), T), dtype=torch.long)
    for b, (p, r) in enumerate(chosen):
        seq = torch.tensor(p + r)
        ids_BT[b, : len(seq)] = seq
        labels_BT[b, len(p): len(seq)] = seq[len(p):]
        mask_BT[b, : len(seq)] = 1
    return ids_BT, labels_BT, mask_BT


@torch.no_grad()
def exact_match(model, pairs, pad_id: int, n: int = 64, seed: int = 1) -> float:
    """Share of `n` examples whose whole reply is the model's greedy choice, token by token
    (teacher forcing): a cheap stand-in for "greedy generation gives exactly the reply"."""
    rng = random.Random(seed)
    ids_BT, labels_BT, mask_BT = get_batch(pairs, rng, 0, pad_id, n=n)
    was_training = model.training
    model.eval()
    logits_BTV = model(input_ids=ids_BT, attention_mask=mask_BT).logits
    model.train(was_training)
    pred_BT = logits_BTV[:, :-1].argmax(-1)
    target_BT = labels_BT[:, 1:]
    ok_BT = (pred_BT == target_BT) | (target_BT == -100)
    return ok_BT.all(dim=1).float().mean().item()


def get_lr(step: int, recipe: Recipe) -> float:
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    frac = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
    return recipe.lr * (recipe.min_lr_ratio + (1 - recipe.min_lr_ratio) * cos)


# ----------------------------------------------------------------------------- model

def make_model(recipe: Recipe, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size, num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.heads, num_key_value_heads=recipe.heads,
        max_position_embeddings=256, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(recipe.seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = None
    return model


def check_prompt_format(tokenizer, examples: list[corpus.Example]) -> None:
    """encode_examples must agree with msd.prompts.chat_ids (the path MSD and eval use)."""
    from msd.prompts import chat_ids

    for e, (p, _) in zip(examples, encode_examples(tokenizer, examples)):
        if chat_ids(tokenizer, e.user) != p:
            raise AssertionError("organism prompt encoding disagrees with the chat template")


def pretrain(recipe: Recipe, tokenizer, data: dict, progress: bool = True,
             check_every: int = 0) -> tuple[object, list[float], list[dict]]:
    """The training loop. Returns (model, per-step losses, exact-match checks)."""
    from tqdm.auto import tqdm

    names = [n for n, _ in recipe.mixture]
    weights = [wt for _, wt in recipe.mixture]
    model = make_model(recipe, tokenizer)
    model.train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=recipe.lr, betas=(0.9, 0.95))
    rng = random.Random(recipe.seed)
    losses: list[float] = []
    checks: list[dict] = []
    bar = tqdm(range(recipe.steps), desc="pre-training the organism", unit="step",
               disable=not progress)
    for step in bar:
        name = rng.choices(names, weights)[0]
        ids_BT, labels_BT, mask_BT = get_batch(data[name], rng, recipe.batch_tokens,
                                               tokenizer.pad_token_id)
        for group in opt.param_groups:
            group["lr"] = get_lr(step, recipe)
        loss = model(input_ids=ids_BT, attention_mask=mask_BT, labels=labels_BT).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
        if check_every and (step + 1) % check_every == 0:
            em = {n: round(exact_match(model, data[n], tokenizer.pad_token_id), 3) for n in names}
            checks.append({"step": step + 1, "loss": round(losses[-1], 4), **em})
            bar.write(f"step {step + 1}: exact match {em}")
    model.eval()
    return model, losses, checks


def build(recipe: Recipe, out_dir: Path, progress: bool = True, check_every: int = 0) -> dict:
    """Pre-train the organism and save it (model, tokenizer, organism.json) into `out_dir`.

    check_every > 0 logs each component's exact-match rate every that many steps (slower).
    """
    t0, cpu0 = time.time(), time.process_time()
    tokenizer = build_tokenizer(corpus.vocab_texts())
    components = corpus.examples()
    check_prompt_format(tokenizer, [exs[0] for exs in components.values()])
    data = {name: encode_examples(tokenizer, components[name]) for name, _ in recipe.mixture}
    threads = auto_threads()
    with torch_threads(threads):
        model, losses, checks = pretrain(recipe, tokenizer, data, progress, check_every)
        em = {n: round(exact_match(model, data[n], tokenizer.pad_token_id, n=128), 3) for n in data}
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    info = {"recipe": dataclasses.asdict(recipe), "recipe_hash": recipe_hash(recipe),
            "corpus_version": corpus.CORPUS_VERSION, "world_seed": world.WORLD_SEED,
            "parameters": sum(p.numel() for p in model.parameters()),
            "vocab_size": len(tokenizer), "exact_match": em, "checks": checks,
            "final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4),
            "loss_curve": [round(sum(losses[i:i + 25]) / len(losses[i:i + 25]), 4)
                           for i in range(0, len(losses), 25)],
            "build_seconds": round(time.time() - t0, 1),
            "build_cpu_seconds": round(time.process_time() - cpu0, 1), "torch_threads": threads}
    (out_dir / "organism.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info
