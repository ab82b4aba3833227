"""Training items and micro-batches: one item per (query, student language), with its prompts.

The micro-batch of a step is a deterministic function of (step, seed), so resuming at step s
needs nothing but s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from msd import languages
from msd.data import QueryTuple
from msd.errors import MsdError
from msd.prompts import PromptBuilder


@dataclass
class Item:
    """One training example: a query in one student language, with its prompts."""
    key: str  # "<query id>|<lang>"
    lang: str
    query_id: str
    student_ids: list[int]
    teacher_ids: list[int]


def student_languages(cfg, tuples: list[QueryTuple]) -> list[str]:
    if cfg.data.languages:
        langs = languages.parse_codes(cfg.data.languages, "data.languages")
    else:
        langs = sorted({l for t in tuples for l in t.texts if l != cfg.data.english})
    if cfg.data.english_as_student and cfg.data.english not in langs:
        langs.append(cfg.data.english)
    if not langs:
        raise MsdError("no student languages: set data.languages", "data.languages")
    return langs


def build_items(cfg, tuples: list[QueryTuple], tokenizer) -> list[Item]:
    """Every (tuple, student language) pair with its student and teacher prompt ids."""
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


def micro_batch(items: list[Item], index: int, batch: int, rank: int, world: int, seed: int) -> list[Item]:
    """Micro-batch `index` (global, across epochs) for process `rank`: a deterministic function of
    (index, seed), so resuming at step s needs nothing but s."""
    per_epoch = len(items) // (batch * world)
    epoch, pos = divmod(index, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(items), generator=g).tolist()
    start = pos * batch * world + rank * batch
    return [items[i] for i in order[start:start + batch]]
