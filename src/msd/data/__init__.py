"""Query data: parallel query tuples, query files, and ONE dataset registry for training and
evaluation (`msd train data.source=NAME`, `msd eval ... --benchmark NAME`).

    ds = load_dataset("multijail")           # .name, .tuples, .langs, .description, .default_judge
    tuples = load_tuples("queries.jsonl")    # a file or a registered name

Built-in datasets live in `msd.data.sets`, one module per family, each registering itself:

    @DATASETS.register("advbench")
    def _advbench(): return DatasetSpec(load=..., langs=lambda: ["en"], description="...")

Plugins (the model organism) register theirs the same way. Each tuple's meta says whether the
query is harmful (`harmful`, default True): safety metrics use the harmful ones (ASR),
over-refusal metrics the benign ones. Every text is stripped of leading and trailing whitespace
when loaded, whatever its source (`stripped`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from msd.data.files import SUFFIXES, load_file
from msd.data.tuples import QueryTuple, benign, is_heldout, split, stripped, validate
from msd.identifiers import check_benchmark, check_query_id
from msd.errors import MsdError, closest
from msd.registry import Registry

RESOURCES = Path(__file__).resolve().parent.parent / "resources" / "data"


@dataclass(frozen=True)
class DatasetSpec:
    """How to load a named dataset."""
    load: Callable[[], list[QueryTuple]]
    langs: Callable[[], list[str]]  # default languages, in table order
    description: str
    default_judge: str | None = None  # the judge `msd eval` uses unless told (None: keyword)
    validate: bool = False  # check ids, languages and texts like a user's file


@dataclass
class Dataset:
    """A loaded dataset."""
    name: str
    tuples: list[QueryTuple]
    langs: list[str]
    description: str
    default_judge: str | None = None


DATASETS: Registry[DatasetSpec] = Registry("dataset", discover="msd.data.sets")


def _looks_like_file(name: str) -> bool:
    return name.endswith(SUFFIXES) or "/" in name or Path(name).exists()


def load_dataset(name: str, english: str = "en", where: str | None = None) -> Dataset:
    """A registered dataset by name, or a JSONL/CSV file of parallel queries (named by its stem),
    every text stripped of leading and trailing whitespace."""
    if name in DATASETS:
        spec = DATASETS.get(name)
        tuples = stripped(spec.load())
        if spec.validate:
            tuples = validate(tuples, english, name)
        for t in tuples:  # ids go into records: they must read back (msd.identifiers)
            check_query_id(t.id, f"{name}: query {t.id!r}"[:80])
        return Dataset(name, tuples, spec.langs(), spec.description, spec.default_judge)
    if not _looks_like_file(name):
        hint = closest(name, DATASETS.names())
        raise MsdError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS.names())} or give "
                       "a .jsonl/.csv file of parallel queries" + (f" (did you mean {hint!r}?)" if hint else ""),
                       where)
    path = Path(name)
    if not path.is_file():
        raise MsdError("query file not found (expected a .jsonl or .csv file, or one of "
                       f"{sorted(DATASETS.names())})", name)
    bench = check_benchmark(path.stem, f"{where or '--benchmark'}: the file name")  # before any work
    tuples = stripped(load_file(path, english))
    langs = list(dict.fromkeys(lang for t in tuples for lang in t.texts))
    return Dataset(bench, tuples, langs, f"queries from {name}")


def load_tuples(source: str, english: str = "en") -> list[QueryTuple]:
    """Tuples of a registered dataset or a query file (training's `data.source`)."""
    return load_dataset(source, english, where="data.source").tuples


def describe() -> str:
    """One line per registered dataset (for --help texts)."""
    return "; ".join(f"{name}: {spec.description}" for name, spec in DATASETS.items())


__all__ = ["RESOURCES", "DATASETS", "Dataset", "DatasetSpec", "QueryTuple", "benign", "describe",
           "is_heldout", "load_dataset", "load_tuples", "split", "validate"]
