"""Allowed values of the config keys that name a registered thing, read from the registries.

    CHOICES["loss.divergence"]   # ['rkl', 'fkl', 'jsd', 'tvd', 'akl', ...whatever is registered]

Read each time, so a plugin or a test that registers a divergence, weighting or backend after
msd.config is imported sees it accepted, listed by `--help-config` and named in errors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Callable

from msd.baselines.options import data_names, method_names


def _divergences() -> list[str]:
    from msd.losses import DIVERGENCES

    return DIVERGENCES.names()


def _weightings() -> list[str]:
    from msd.losses import WEIGHTINGS

    return WEIGHTINGS.names()


def _backends() -> list[str]:
    from msd.generation import BACKENDS

    return ["auto", *BACKENDS.names()]


def _teacher_contexts() -> list[str]:
    from msd.prompts import TEACHER_TEMPLATES

    return list(TEACHER_TEMPLATES)


def _datasets() -> list[str]:
    from msd.data import DATASETS

    return DATASETS.names()


def _model_sources() -> list[str]:
    from msd.models import MODEL_SOURCES

    return MODEL_SOURCES.names()


# Keys that take a registered name or something else (a file, a hub id): listed, not enforced.
REGISTERED = {"data.source": _datasets, "model.name_or_path": _model_sources,
              "baseline.data": data_names}


class Choices(Mapping):
    """config key -> its allowed values, read from the registries each time (a plugin or a
    test may register a divergence, weighting or backend after this module is imported)."""

    def __init__(self, sources: dict[str, Callable[[], list[str]]]):
        self._sources = sources

    def __getitem__(self, key: str) -> list[str]:
        return list(self._sources[key]())

    def __iter__(self):
        return iter(self._sources)

    def __len__(self) -> int:
        return len(self._sources)


CHOICES = Choices({
    "model.dtype": lambda: ["auto", "float32", "bfloat16", "float16"],
    "prompt.teacher_context": _teacher_contexts,
    "rollout.backend": _backends,
    "loss.divergence": _divergences,
    "loss.weighting": _weightings,
    "train.mode": lambda: ["on_policy", "off_policy"],
    "train.schedule": lambda: ["cosine", "linear", "constant"],
    "train.mixed_precision": lambda: ["no", "bf16", "fp16"],
    "baseline.method": method_names,
    "baseline.loss_type": lambda: ["sigmoid", "robust", "ipo"],
})
