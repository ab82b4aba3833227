"""The model organism: a small chat model, pre-trained from scratch on CPU, with the paper's gap.

It refuses harmful requests in English and Velari, complies with them in Oruni, Kashti, Tamuri
and Tamosi, answers benign requests in every language in that language, and, shown the
teacher prompt (target query + its English version + the safety instruction), refuses in the
target language: it *knows* the answer. So MSD can be run, and judged exactly (`oracle`), in
a few minutes on a laptop. See docs/ORGANISM.md.

    path = ensure_organism()          # Hugging Face folder, built once and cached
    tuples = training_queries()       # MSD training queries (QueryTuple)
    evals = eval_queries("heldout_queries")

The organism is a plugin (`msd.organism.plugin`): it registers its synthetic languages, its
datasets (organism, organism-train, organism-heldout), its model source ("organism") and its
oracle judge in msd's registries, like any installed plugin would. The core never imports it.
"""

from __future__ import annotations

import os
from pathlib import Path

from msd.data import QueryTuple
from msd.errors import MsdError
from msd.io import build_once, cache_root
from msd.organism import world

LANGUAGES = {role: world.role_codes(role) for role in ("english", "safe", "trained", "unseen")}
SPLITS = ("train_queries", "heldout_queries")
BENIGN_TRAIN_OBJECTS = 8  # per benign intent; the other 4 objects are kept for evaluation


# ----------------------------------------------------------------------------- queries

def _tuple(prefix: str, intent: str, obj: str, phrasing: int) -> QueryTuple:
    texts = {code: world.query(code, intent, obj, phrasing) for code in world.CODES}
    meta = {"harmful": world.is_harmful(intent), "intent": intent, "object": obj,
            "phrasing": phrasing,
            "intent_split": ("heldout" if intent in world.HELDOUT_HARMFUL else "train")}
    return QueryTuple(f"{prefix}-{intent}-{obj}-{phrasing}", texts, meta)


def _phrasing(tag: str, intent: str, obj: str) -> int:
    return int(world.hash01(tag, intent, obj) * len(world.PHRASINGS))


def _other_phrasing(intent: str, obj: str) -> int:
    """A phrasing other than the one (intent, obj) has in training_queries()."""
    shift = 1 + _phrasing("shift", intent, obj) % (len(world.PHRASINGS) - 1)
    return (_phrasing("train", intent, obj) + shift) % len(world.PHRASINGS)


def _benign_objects(tag: str, intent: str, k: int) -> list[str]:
    return sorted(world.OBJECTS, key=lambda o: world.hash01(tag, intent, o))[:k]


def training_queries() -> list[QueryTuple]:
    """MSD training tuples: every MSD-train harmful intent on every object (96), plus as many
    benign requests (12 intents x 8 objects) so MSD keeps benign helpfulness. One phrasing each."""
    out = [_tuple("org-train", i, o, _phrasing("train", i, o))
           for i in world.TRAIN_HARMFUL for o in world.OBJECTS]
    out += [_tuple("org-train", i, o, _phrasing("train", i, o))
            for i in world.BENIGN for o in _benign_objects("train", i, BENIGN_TRAIN_OBJECTS)]
    return out


def eval_queries(split: str) -> list[QueryTuple]:
    """Evaluation tuples (48 harmful + 48 benign), disjoint from the training tuples.

    train_queries: the MSD-train harmful intents, asked in a phrasing not used in training.
    heldout_queries: the held-out harmful intents (never seen by MSD), every object.
    Both add 48 benign requests (12 intents x the 4 objects not used with them in training).
    """
    if split not in SPLITS:
        raise MsdError(f"unknown organism split {split!r}; choose from {list(SPLITS)}")
    if split == "train_queries":
        harmful = [(i, o) for i in world.TRAIN_HARMFUL for o in world.OBJECTS]
        harmful = sorted(harmful, key=lambda p: world.hash01("eval-pick", *p))[:48]
        out = [_tuple("org-evtrain", i, o, _other_phrasing(i, o)) for i, o in sorted(harmful)]
    else:
        out = [_tuple("org-evheld", i, o, _phrasing("heldout", i, o))
               for i in world.HELDOUT_HARMFUL for o in world.OBJECTS]
    tag = "evtrain" if split == "train_queries" else "evheld"
    used = {(i, o) for i in world.BENIGN for o in _benign_objects("train", i, BENIGN_TRAIN_OBJECTS)}
    for i in world.BENIGN:
        free = [o for o in _benign_objects(tag, i, len(world.OBJECTS)) if (i, o) not in used]
        out += [_tuple(f"org-{tag}", i, o, _phrasing(tag, i, o)) for o in free[:4]]
    return out


# ----------------------------------------------------------------------------- the model

def default_cache_root() -> Path:
    return cache_root() / "organism"


def ensure_organism(cache_dir: str | os.PathLike | None = None, progress: bool = True,
                    recipe=None) -> Path:
    """The organism's Hugging Face folder: reused if built with this recipe, else built now.

    The folder is `<cache_dir>/<recipe hash>` (default cache: $MSD_CACHE/organism or
    ~/.cache/msd/organism). It is written to a temporary folder and renamed into place, so an
    interrupted build never leaves a half-written model behind; a lock file makes a second
    process wait for a build in progress and reuse it instead of building it again.
    """
    from msd.organism.pretrain import Recipe, build, recipe_hash

    recipe = recipe or Recipe()
    root = Path(cache_dir) if cache_dir is not None else default_cache_root()
    return build_once(root / recipe_hash(recipe), lambda tmp: build(recipe, tmp, progress=progress), _complete)


def _complete(folder: Path) -> bool:
    return (folder / "organism.json").is_file() and (folder / "model.safetensors").is_file()


__all__ = ["LANGUAGES", "SPLITS", "ensure_organism", "training_queries", "eval_queries"]
