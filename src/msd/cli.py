"""The `msd` command: train, eval, demo, report.

Errors in the user's input print one line (`msd: error: <file:line: problem>`) and exit with
code 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

from msd.errors import MsdError, printable
from msd.machine import STRICT_HELP

# Failures of the machine, not of msd: a full disk, a read-only or forbidden folder.
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EMFILE,
                      errno.ENAMETOOLONG, errno.ELOOP}

COMMANDS = [  # (module providing add_parser, fallback help when its extras are missing)
    ("msd.eval.cli", "eval"),
    ("msd.demo", "demo"),
    ("msd.report", "report"),
    ("msd.baselines.cli", "baseline"),
]


def add_train_parser(sub) -> None:
    p = sub.add_parser(
        "train", help="train a model with MSD from a YAML config",
        description="Train with Multilingual Self-Distillation. The YAML config has sections "
                    "model, lora, data, prompt, rollout, loss, train; any key can be overridden "
                    "as section.key=value (e.g. train.lr=1e-5 loss.divergence=jsd). "
                    "Run `msd train --help-config` for every key with its default and meaning.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "-c", help="experiment YAML (default: built-in defaults, i.e. the model organism)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="dotted config overrides applied after the YAML")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", default=None,
                   help="continue from the latest checkpoint in train.output_dir (error if none); "
                        "by default a run resumes automatically when one exists")
    g.add_argument("--no-resume", dest="resume", action="store_false",
                   help="start fresh even if train.output_dir holds a checkpoint")
    p.add_argument("--help-config", action="store_true", help="print every config key and exit")
    p.add_argument("--strict", action="store_true", help=STRICT_HELP)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_train)


def run_train(args) -> int:
    from msd import config

    if args.help_config:
        print(config.describe())
        return 0
    cfg = config.load_config(args.config, args.overrides)
    from msd.train.setup import start_line

    start_line("train", cfg, args.strict)
    from msd.train import train

    # train() takes the output folder's lock itself, in the process its accelerator makes the
    # writer (msd.train.launch), once the launch is known to be what it claims; --no-resume
    # starts from a clean folder (the old run's logs and checkpoints discarded, never mixed with
    # the new run's), and only in a folder msd train owns.
    result = train(cfg, progress=not args.quiet, resume=args.resume)
    if result.main_process:  # once per launch, not once per process
        print(f"msd: trained {result.steps} steps; outputs in {result.output_dir}")
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, like every other msd error (the usage is in --help)."""

    def error(self, message):
        print(f"msd: error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    from msd import __version__

    parser = _Parser(
        prog="msd",
        description="Multilingual Self-Distillation: make a chat LLM as safe in low-resource "
                    "languages as it is in English, from translated queries alone.")
    parser.add_argument("--version", action="version", version=f"msd {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show full tracebacks for errors (also: MSD_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_train_parser(sub)
    for module, name in COMMANDS:
        try:
            importlib.import_module(module).add_parser(sub)
        except ImportError as e:
            p = sub.add_parser(name, help=f"(unavailable: {e})")
            # Fixed bug: its arguments (msd baseline sft ...) were refused as unrecognized,
            # hiding the line that says what to install.
            p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
            p.set_defaults(func=lambda args, e=e: _unavailable(e))
    return parser


def _unavailable(e) -> int:
    raise MsdError(f"this command is unavailable: {e}")


def _quiet_libraries() -> None:
    """--quiet: no progress bars from transformers / huggingface_hub either (weight loading)."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read when they are first imported
    for name in ("transformers.utils.logging",):
        module = sys.modules.get(name)
        if module is not None:
            module.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv or os.environ.get("MSD_DEBUG") == "1"
    nul = next((i for i, a in enumerate(argv, start=1) if "\x00" in a), None)
    if nul:  # no path or setting can hold one (fixed bug: a NUL in --out was a traceback)
        print(f"msd: error: argument {nul} holds a NUL byte", file=sys.stderr)
        return 2
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Fixed bug: argparse stops collecting positionals at the first option, so overrides after
    # one (msd train --quiet a=1 --resume b=2) were refused; they are gathered here.
    if extra and isinstance(getattr(args, "overrides", None), list) and all(
            "=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if getattr(args, "quiet", False):
        _quiet_libraries()
    try:
        return int(args.func(args) or 0)
    except MsdError as e:
        if debug:
            raise
        # one line, always, and never a raw terminal escape from the input (msd.identifiers)
        print(f"msd: error: {printable(' '.join(str(e).split()))}", file=sys.stderr)
        return 2
    except OSError as e:
        if debug or e.errno not in ENVIRONMENT_ERRNOS:
            raise
        hint = ("shorten the path" if e.errno in (errno.ENAMETOOLONG, errno.ELOOP) else
                "free space or fix the permissions, then rerun (finished work is kept)")
        name = str(e.filename or "output")
        name = name if len(name) <= 200 else name[:200] + "..."
        print(f"msd: error: {printable(' '.join(name.split()))}: {e.strerror}; {hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("msd: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
