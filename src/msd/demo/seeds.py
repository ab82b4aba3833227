"""`msd demo --seeds N`: the organism demo over N seeds, for intervals and paired tests.

One organism build and one evaluation of it (greedy decoding does not depend on the seed);
then, for each seed and each variant, one training run (the seed sets LoRA initialisation, the
order of queries and MSD's sampling) and its oracle-judged evaluation on both splits.

Layout of --out:
    organism.json, before/<split>/, teacher_before/<split>/     the organism, evaluated once
    seed_<S>/<variant>/eval/<split>/                          records of each trained variant
    seed_<S>/<variant>/done.json                              its overrides and training seconds
    seeds.json, seeds.md                                      the seed table (msd.demo.seedtable)

A (seed, variant) whose done.json records the same overrides is kept, so a rerun with more seeds
or more variants trains only what is missing; the training folder of a finished run is removed
(its adapter is not needed by the table, and 100 of them fill a disk).
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

from msd.demo.ablations import ABLATIONS, pairs
from msd.demo.baselines import METHODS, train_baseline_variant
from msd.demo.steps import demo_config, evaluate_splits, train_variant
from msd.errors import MsdError

DEFAULT_VARIANT = "msd_on_policy"


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def variants() -> dict[str, tuple[str, dict]]:
    """Every trainable variant: name -> ("msd" | "baseline", overrides). The baselines' METHODS
    (on- and off-policy MSD among them) and the ablations of ABLATIONS, named by their slug;
    the ablations' default and off-policy rows are METHODS' two MSD runs."""
    out = dict(METHODS)
    known = [extra for kind, extra in METHODS.values() if kind == "msd"]
    for name, extra in ABLATIONS.items():
        if extra and extra not in known:
            out[_slug(name)] = ("msd", dict(extra))
    return out


def ablation_names() -> list[str]:
    """Variant names of the ablations table, in ABLATIONS' order (default first)."""
    by_overrides = {repr(sorted(extra.items())): name for name, (kind, extra) in variants().items()
                    if kind == "msd"}
    by_overrides[repr(sorted({}.items()))] = DEFAULT_VARIANT
    return [by_overrides[repr(sorted(extra.items()))] for extra in ABLATIONS.values()]


def parse_variants(text: str | None, ablations: bool, baselines: bool) -> list[str]:
    """--variants a,b (names of `variants()`, as given: a folder's table compares them with
    on-policy MSD when it holds its runs too), or on-policy MSD and the tables' variants."""
    known = variants()
    if text:
        names = [s.strip() for s in text.split(",") if s.strip()]
        bad = [n for n in names if n not in known]
        if bad or not names:
            raise MsdError(f"unknown variant {bad[0] if bad else text!r}; known: {', '.join(known)}",
                           "--variants")
        return list(dict.fromkeys(names))
    names = (ablation_names() if ablations else []) + (list(METHODS) if baselines else [])
    return list(dict.fromkeys([DEFAULT_VARIANT] + names))


def run_seeds(out: Path, seeds: list[int], names: list[str], overrides=(), eval_limit=None,
              cache_dir=None, progress: bool = True) -> dict:
    """Train and evaluate each (seed, variant) still missing; then write the seed table."""
    from msd import organism
    from msd.io import atomic_write_json, ensure_writable_dir

    out = ensure_writable_dir(out)
    path = organism.ensure_organism(cache_dir, progress=progress)
    shutil.copyfile(path / "organism.json", out / "organism.json")
    _evaluate_organism(out, path, eval_limit, progress)
    table = variants()
    extra = dict(pairs(overrides))
    for seed in seeds:
        for name in names:
            kind, own = table[name]
            vdir = out / f"seed_{seed}" / name
            wanted = {"overrides": {**extra, **own}, "eval_limit": eval_limit}
            if _done(vdir, wanted):
                continue
            shutil.rmtree(vdir, ignore_errors=True)
            cfg_over = {**extra, **own} | ({"baseline.data": "organism"} if kind == "baseline" else {})
            cfg = demo_config(vdir / "train", seed, cfg_over)
            cfg.model.name_or_path = str(path)
            print(f"msd demo: seed {seed}, {name}", flush=True)
            t = time.time()
            trained, seconds = (train_variant(cfg, organism.training_queries(), progress)
                                if kind == "msd" else train_baseline_variant(cfg, progress))
            evaluate_splits(trained.model, trained.tokenizer, vdir / "eval", limit=eval_limit,
                            seed=seed, progress=progress)
            shutil.rmtree(vdir / "train", ignore_errors=True)
            atomic_write_json(vdir / "done.json", {**wanted, "seed": seed, "variant": name,
                                                   "train_seconds": round(seconds, 1),
                                                   "seconds": round(time.time() - t, 1)})
    from msd.demo.seedtable import write_seed_table

    return write_seed_table(out, list(variants()))


def _done(vdir: Path, wanted: dict) -> bool:
    import json

    try:
        done = json.loads((vdir / "done.json").read_text())
    except (OSError, ValueError):
        return False
    return {k: done.get(k) for k in wanted} == wanted


def _evaluate_organism(out: Path, path: Path, eval_limit, progress: bool) -> None:
    """before/ and teacher_before/: the organism under the student and the teacher prompt."""
    from msd.models import load_model_and_tokenizer

    import json

    mark = json.dumps({"eval_limit": eval_limit})
    if all(_read(out / stage / "done") == mark for stage in ("before", "teacher_before")):
        return
    cfg = demo_config(out / "train", 0)
    cfg.model.name_or_path = str(path)
    model, tokenizer = load_model_and_tokenizer(cfg.model)
    evaluate_splits(model, tokenizer, out / "before", limit=eval_limit, progress=progress)
    evaluate_splits(model, tokenizer, out / "teacher_before", teacher=True,
                    context=cfg.prompt.teacher_context, limit=eval_limit, progress=progress)
    for stage in ("before", "teacher_before"):
        (out / stage / "done").write_text(mark)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None
