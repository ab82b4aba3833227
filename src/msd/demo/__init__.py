"""`msd demo`: MSD end to end on the model organism, in a few minutes on a CPU.

    msd demo                      # build/reuse the organism, evaluate, train, evaluate, report
    msd demo --ablations          # plus the paper's comparisons, one table
    msd demo --baselines          # plus MSD against SFT, DPO, KTO, ORPO, SimPO (baselines.md)

Steps: (1) build or reuse the organism (`msd.organism.ensure_organism`); (2) evaluate it with
the student prompt on both organism splits in every language, and with the teacher prompt
("teacher_before"); (3) run on-policy MSD with DPSW and reverse KL on the low-resource training
languages, with LoRA (`msd.train.train`); (4) evaluate again; (5) write summary.json,
report.md and plots into --out. Every number comes from the records of `msd.eval.safety`
judged by the oracle, so `msd report <out>/after/...` can rebuild them.

Layout of --out: organism.json (which organism), before/<split>/, teacher_before/<split>/,
after/<split>/ (evaluation run folders), train/ (MSD run), summary.json, report.md,
asr_before_after.png, and with --ablations: ablations/<variant>/, ablations.json,
ablations.md.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from msd.demo.ablations import ABLATIONS, ablation_row, ablation_table, run_ablations
from msd.demo.steps import (DEMO_CONFIG, METRIC_KEYS, check_acceptance, demo_config, evaluate_splits,
                            summarize, train_variant)

__all__ = ["ABLATIONS", "DEMO_CONFIG", "METRIC_KEYS", "ablation_row", "ablation_table", "add_parser",
           "check_acceptance", "demo_config", "evaluate_splits", "run", "run_ablations", "run_demo",
           "summarize", "train_variant"]
from msd.demo.real import REAL_DEMOS
from msd.demo.summary import plot, print_table, write_report
from msd.errors import MsdError

def run_demo(out: str | Path = "runs/demo", ablations: bool = False, seed: int = 0,
             overrides=(), eval_limit: int | None = None, cache_dir: str | None = None,
             progress: bool = True, baselines: bool = False) -> dict:
    """Run the demo; returns summary.json's content. `eval_limit` caps harmful and benign
    queries per split (tests); `overrides` are dotted config overrides for the MSD run.
    Torch uses the cores not busy with other work (`auto_threads`; MSD_THREADS overrides)."""
    from msd import machine
    from msd.organism.pretrain import auto_threads, torch_threads

    # bfloat16 asked for by the overrides: a warning on a CPU that would emulate it
    machine.check_bf16(machine.bf16_asked(demo_config(Path(out) / "train", seed, overrides)))
    threads = auto_threads()
    with torch_threads(threads):
        summary = _run_demo(Path(out), ablations, seed, overrides, eval_limit, cache_dir, progress)
        if baselines:
            from msd.demo.baselines import demo_baselines

            summary["baselines"] = demo_baselines(Path(out), seed, overrides, eval_limit, progress, summary)
    return summary


def _run_demo(out: Path, ablations: bool, seed: int, overrides, eval_limit, cache_dir,
              progress: bool) -> dict:
    import torch

    from msd import organism
    from msd.io import atomic_write_json, ensure_writable_dir
    from msd.models import load_model_and_tokenizer

    t_start = time.time()
    out = ensure_writable_dir(out)
    for sub in ("before", "teacher_before", "after", "train", "ablations"):
        shutil.rmtree(out / sub, ignore_errors=True)  # a demo is always a fresh run
    seconds: dict[str, float] = {}
    torch.manual_seed(seed)

    t = time.time()
    path = organism.ensure_organism(cache_dir, progress=progress)
    seconds["organism"] = time.time() - t
    shutil.copyfile(path / "organism.json", out / "organism.json")
    cfg = demo_config(out / "train", seed, overrides)
    cfg.model.name_or_path = str(path)

    t = time.time()
    model, tokenizer = load_model_and_tokenizer(cfg.model)
    before = evaluate_splits(model, tokenizer, out / "before", limit=eval_limit, seed=seed, progress=progress)
    teacher = evaluate_splits(model, tokenizer, out / "teacher_before", teacher=True,
                              context=cfg.prompt.teacher_context, limit=eval_limit, seed=seed,
                              progress=progress)
    seconds["eval_before"] = time.time() - t
    del model

    tuples = organism.training_queries()
    result, seconds["msd_training"] = train_variant(cfg, tuples, progress)

    t = time.time()
    after = evaluate_splits(result.model, result.tokenizer, out / "after", limit=eval_limit,
                            seed=seed, progress=progress)
    seconds["eval_after"] = time.time() - t

    summary = {"before": summarize(before), "after": summarize(after),
               "teacher_before": summarize(teacher), "languages": organism.LANGUAGES,
               "wall_seconds": 0.0, "seconds": {k: round(v, 1) for k, v in seconds.items()},
               "organism": str(path), "config": f"{out / 'train' / 'config.yaml'}",
               "torch_threads": torch.get_num_threads()}
    summary["wall_seconds"] = round(time.time() - t_start, 1)
    checks = check_acceptance(summary)
    summary["checks"] = checks
    atomic_write_json(out / "summary.json", summary)
    plot(summary, out / "asr_before_after.png")
    write_report(out, summary, checks)
    print_table(summary)
    failed = [c["claim"] for c in checks if not c["pass"]]
    print(f"\nchecks: {len(checks) - len(failed)}/{len(checks)} pass" +
          (f"; failing: {'; '.join(failed)}" if failed else ""))
    print(f"wall time: {summary['wall_seconds']:.0f} s "
          f"({', '.join(f'{k} {v:.0f} s' for k, v in summary['seconds'].items())}); report: {out / 'report.md'}")

    if ablations:
        t = time.time()
        row = ablation_row(next(iter(ABLATIONS)), summary["after"], organism.LANGUAGES,
                           seconds["msd_training"])
        rows = run_ablations(out, seed, tuples, row, overrides, eval_limit, progress)
        print("\n" + ablation_table(rows))
        print(f"ablations: {time.time() - t:.0f} s; table: {out / 'ablations.md'}")
        summary["ablations"] = rows
        atomic_write_json(out / "summary.json", summary)
    return summary


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="run MSD end to end on the built-in model organism (CPU, minutes)",
        description="Build (or reuse) the model organism, a small chat model that is safe in "
                    "English but not in its low-resource languages; evaluate it; run on-policy "
                    "MSD with DPSW on the low-resource training languages; evaluate again; write "
                    "summary.json, report.md and a plot into --out.")
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--model", default="organism", choices=["organism", *REAL_DEMOS],
                   help="organism (default: the embedded model organism) or a real pretrained chat "
                        "model: smollm2 (SmolLM2-135M-Instruct, MSD on Javanese MultiJail queries; docs/REAL_MODEL.md)")
    p.add_argument("--ablations", action="store_true",
                   help="also rerun the paper's comparisons (on/off-policy, DPSW/uniform, "
                        "rkl/fkl/jsd, teacher contexts, top-K) and write ablations.md")
    p.add_argument("--baselines", action="store_true",
                   help="also train SFT, DPO (sigmoid, robust, ipo), KTO, ORPO, SimPO (TRL) and "
                        "off-policy MSD with the same steps and LoRA; write baselines.json/.md/.png")
    p.add_argument("--seed", type=int, default=0, help="seed of MSD sampling and training (default: 0)")
    p.add_argument("--seeds", type=int, default=None, metavar="N",
                   help="run seeds --seed .. --seed+N-1 and write the seed table: per-seed values, means "
                        "with intervals over seeds, paired tests (seeds.json, seeds.md); finished runs "
                        "are kept. Organism: one build and evaluation, each variant per seed; --model: "
                        "one real-model demo per seed in seed_<S>/")
    p.add_argument("--variants", default=None,
                   help="with --seeds: comma-separated variants to train (default: on-policy MSD, plus "
                        "the ablations' and baselines' variants with --ablations / --baselines)")
    p.add_argument("--eval-limit", type=int, default=None,
                   help="evaluate at most this many harmful and this many benign queries per "
                        "split (default: all, 48 + 48)")
    p.add_argument("--cache-dir", default=None,
                   help="where the organism is cached (default: $MSD_CACHE/organism or "
                        "~/.cache/msd/organism)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--strict", action="store_true",
                   help="exit with code 1 when a check of the report fails")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="MSD config overrides for the demo's run (e.g. train.max_steps=30)")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.eval_limit is not None and args.eval_limit < 1:
        raise MsdError("--eval-limit must be at least 1")
    if not args.out.strip():
        raise MsdError("may not be empty (name the demo folder)", "--out")
    from msd.lock import output_lock

    if args.model != "organism":
        if args.ablations or args.eval_limit is not None or args.cache_dir or args.variants is not None:
            raise MsdError("--ablations, --variants, --eval-limit and --cache-dir are options of the "
                           "organism demo", "--model")
        if args.seeds is not None:
            return _run_real_seeds(args)
        from msd.demo.real import run_real_demo

        with output_lock(args.out, "demo"):  # one writer per folder
            summary = run_real_demo(args.model, Path(args.out), seed=args.seed, overrides=args.overrides,
                                    progress=not args.quiet, baselines=args.baselines)
        failed = not all(c["pass"] for c in summary["checks"])
        return 1 if args.strict and failed else 0
    if args.seeds is not None or args.variants is not None:
        return _run_seeds(args)
    with output_lock(args.out, "demo"):  # one writer per folder
        summary = run_demo(args.out, ablations=args.ablations, seed=args.seed, overrides=args.overrides,
                           eval_limit=args.eval_limit, cache_dir=args.cache_dir, progress=not args.quiet,
                           baselines=args.baselines)
    failed = not all(c["pass"] for c in summary["checks"])
    return 1 if args.strict and failed else 0


def _run_real_seeds(args) -> int:
    from msd.demo.real_seeds import run_real_seeds
    from msd.lock import output_lock

    if args.seeds < 1:
        raise MsdError("--seeds must be at least 1", "--seeds")
    seeds = list(range(args.seed, args.seed + args.seeds))
    with output_lock(args.out, "demo"):
        run_real_seeds(args.model, Path(args.out), seeds, args.overrides, progress=not args.quiet,
                       baselines=args.baselines)
    print(f"seed table: {Path(args.out) / 'seeds.md'}")
    return 0


def _run_seeds(args) -> int:
    from pathlib import Path

    from msd.demo.seeds import parse_variants, run_seeds
    from msd.lock import output_lock
    from msd.organism.pretrain import auto_threads, torch_threads

    if args.seeds is None or args.seeds < 1:
        raise MsdError("--seeds must be at least 1 (--variants needs --seeds)", "--seeds")
    names = parse_variants(args.variants, args.ablations, args.baselines)
    seeds = list(range(args.seed, args.seed + args.seeds))
    with output_lock(args.out, "demo"), torch_threads(auto_threads()):
        table = run_seeds(Path(args.out), seeds, names, args.overrides, args.eval_limit,
                          args.cache_dir, progress=not args.quiet)
    from msd.demo.seedtable import print_table

    print_table(table)
    print(f"seed table: {Path(args.out) / 'seeds.md'} ({len(table['variants'])} variants)")
    return 0
