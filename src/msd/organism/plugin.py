"""The model organism as a plugin: what it adds to msd's registries.

- languages: its synthetic languages (tier "synthetic");
- model source "organism": the organism's folder, built on first use and cached;
- datasets: "organism" (the MSD training queries), "organism-train" and "organism-heldout"
  (evaluation splits, judged by the oracle unless told otherwise);
- judge "oracle" (msd.organism.judge): the world's exact classifier.

msd imports this module before its first registry lookup (`msd.plugins.BUNDLED`).
"""

from __future__ import annotations

from msd import languages
from msd.data import DATASETS, DatasetSpec
from msd.models import MODEL_SOURCES
from msd.organism import ensure_organism, eval_queries, training_queries, world
from msd.organism import judge  # noqa: F401  (registers the oracle judge)
from msd.organism import baseline_data  # noqa: F401  (registers baseline.data: organism)

for lang in world.LANGS:
    if lang.code != "en":
        languages.register(lang.code, lang.name, "synthetic")

MODEL_SOURCES.register("organism", ensure_organism)


def _codes() -> list[str]:
    return list(world.CODES)


DATASETS.register("organism", DatasetSpec(
    training_queries, _codes, "the model organism: MSD training queries (harmful + benign)",
    default_judge="oracle", validate=True))
DATASETS.register("organism-train", DatasetSpec(
    lambda: eval_queries("train_queries"), _codes,
    "the model organism: MSD-train harmful intents in new phrasings + benign", default_judge="oracle"))
DATASETS.register("organism-heldout", DatasetSpec(
    lambda: eval_queries("heldout_queries"), _codes,
    "the model organism: held-out harmful intents + benign", default_judge="oracle"))
