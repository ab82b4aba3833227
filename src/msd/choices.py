"""Allowed values of the config keys that name a registered thing, read from the registries.

    CHOICES["loss.divergence"]   # ['rkl', 'fkl', 'jsd', 'tvd', 'akl', ...whatever is registered]

Read each time, so a plugin or a test that registers a divergence, weighting or backend after
msd.config is imported sees it accepted, listed by `--help-config` and named in errors. A package
that registers a config section (`msd.config.SECTIONS`) registers its keys' choices here too
(`CHOICES.register("baseline.method", ...)`, from msd.baselines).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Callable

from msd.registry import load_plugins


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


class Choices(Mapping):
    """config key -> its allowed values, read from the registries each time (a plugin or a
    test may register a divergence, weighting or backend after this module is imported).
    Plugins are loaded first: they may add keys (a registered config section's)."""

    def __init__(self, sources: dict[str, Callable[[], list[str]]]):
        self._sources = sources

    def register(self, key: str, source: Callable[[], list[str]]) -> None:
        """Add the choices of `key` (a key of a registered config section)."""
        if key in self._sources and self._sources[key] is not source:
            raise ValueError(f"choices of {key!r} are registered already")
        self._sources[key] = source

    def __getitem__(self, key: str) -> list[str]:
        load_plugins()
        return list(self._sources[key]())

    def __iter__(self):
        load_plugins()
        return iter(list(self._sources))

    def __len__(self) -> int:
        load_plugins()
        return len(self._sources)


# Keys that take a registered name or something else (a file, a hub id): listed, not enforced.
REGISTERED = Choices({"data.source": _datasets, "model.name_or_path": _model_sources})


CHOICES = Choices({
    "model.dtype": lambda: ["auto", "float32", "bfloat16", "float16"],
    "prompt.teacher_context": _teacher_contexts,
    "rollout.backend": _backends,
    "loss.divergence": _divergences,
    "loss.weighting": _weightings,
    "train.mode": lambda: ["on_policy", "off_policy"],
    "train.schedule": lambda: ["cosine", "linear", "constant"],
    "train.mixed_precision": lambda: ["no", "bf16", "fp16"],
})
