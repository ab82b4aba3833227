"""`msd baseline METHOD --config X.yaml [section.key=value ...]`: a baseline on TRL's trainer."""

from __future__ import annotations

import argparse
import importlib.util

from msd.baselines.methods import METHODS
from msd.machine import STRICT_HELP

if importlib.util.find_spec("trl") is None:  # cli.py then lists the command as unavailable
    raise ImportError("needs TRL: pip install 'msd[baselines]'")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "baseline", help="train a baseline (sft, dpo, kto, orpo, simpo) on TRL's own trainer",
        description="Train a baseline the paper compares MSD with, on TRL's own trainer, from the "
                    "same YAML as `msd train` plus its `baseline` section (method options, data "
                    "source). Outputs are laid out like `msd train`'s (final/, logs.jsonl, "
                    "config.yaml), so `msd eval` and `msd report` read them the same way. "
                    "Methods: " + "; ".join(f"{n}: {m.description}" for n, m in METHODS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("method", choices=METHODS.names(), help="baseline method")
    p.add_argument("--config", "-c", help="experiment YAML (default: built-in defaults)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="dotted config overrides (e.g. baseline.loss_type=robust baseline.data=x.jsonl)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", default=None,
                   help="continue from the latest checkpoint in train.output_dir (error if none)")
    g.add_argument("--no-resume", dest="resume", action="store_false",
                   help="start fresh even if train.output_dir holds a checkpoint")
    p.add_argument("--strict", action="store_true", help=STRICT_HELP)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    from msd import config
    from msd.baselines.run import train_baseline
    from msd.train.setup import start_line

    from msd.lock import output_lock

    cfg = config.load_config(args.config, [*args.overrides, f"baseline.method={args.method}"])
    start_line(f"baseline {args.method}", cfg, args.strict)
    # One writer, one owner, as for msd train; --no-resume discards only a baseline's own files.
    with output_lock(cfg.train.output_dir, "baseline", fresh=args.resume is False):
        result = train_baseline(cfg, progress=not args.quiet, resume=args.resume)
    print(f"msd: {args.method} trained {result.steps} steps; outputs in {result.output_dir}")
    return 0
