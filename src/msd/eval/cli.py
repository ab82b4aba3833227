"""`msd eval safety | overrefusal | utility`: the command line of msd.eval.

    msd eval safety --model organism --benchmark organism-heldout --judge oracle --out runs/ev
    msd eval safety --model Qwen/Qwen2.5-7B-Instruct --adapter runs/train/final \\
        --benchmark multijail --langs en,jv,sw --judge llm --judge-base-url URL \\
        --judge-model gpt-4o --out runs/ev-mj
    msd eval overrefusal --model M --benchmark polyrefuse-harmless --judge keyword --out runs/or
    msd eval utility --model M --tasks msd_mgsm --langs sw,bn --limit 50 --out runs/util

Each writes a run folder (records.jsonl, metrics.json, run.json); rerunning into the same
folder continues it. `msd report` turns run folders into tables, plots and a page.
"""

from __future__ import annotations

from msd.errors import MsdError
from msd.eval.judges import JUDGES
from msd.machine import STRICT_HELP


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate safety, over-refusal or utility",
                              description="Evaluate a model. Every run writes one record per sample "
                                          "(records.jsonl) and metrics computed from them (metrics.json).")
    sub = p.add_subparsers(dest="eval_command", metavar="WHAT")
    p.set_defaults(func=lambda args: _no_subcommand(p))

    s = sub.add_parser("safety", help="attack success rate per language on harmful prompts",
                       description="Generate responses to a benchmark's prompts in each language, "
                                   "judge them safe/unsafe/invalid, report ASR = (unsafe+invalid)/n per language.")
    _model_args(s)
    s.add_argument("--benchmark", default="multijail",
                   help=f"{_benchmarks()}; or a .jsonl/.csv file of parallel queries (default: multijail)")
    _common_args(s)
    s.add_argument("--teacher-prompts", action="store_true",
                   help="prompt with the teacher prompt (target + English query + instruction) to "
                        "measure the teacher itself")
    s.add_argument("--teacher-context", default="full", choices=["full", "english_only", "instruction_only"],
                   help="teacher prompt variant with --teacher-prompts (default: full)")
    s.set_defaults(func=run_safety, kind="safety")

    o = sub.add_parser("overrefusal", help="refusal rate per language on benign prompts",
                       description="Generate responses to benign prompts and report how often the "
                                   "model refuses (benign_refusal) and answers in the query's language (fidelity).")
    _model_args(o)
    o.add_argument("--benchmark", default="xstest",
                   help=f"the benign queries of one of {_benchmarks()}; or a query file with "
                        "meta.harmful=false (default: xstest)")
    _common_args(o)
    o.set_defaults(func=run_safety, kind="overrefusal", teacher_prompts=False, teacher_context="full")

    u = sub.add_parser("utility", help="lm-evaluation-harness tasks (MGSM, XCOPA shipped, offline)",
                       description="Run lm-eval tasks on the model with the adapter applied. Shipped "
                                   "offline tasks: msd_mgsm (11 languages), msd_xcopa (11 languages), or "
                                   "msd_mgsm_<lang> / msd_xcopa_<lang>; any other lm-eval task name needs the hub.")
    _model_args(u)
    u.add_argument("--tasks", default="msd_mgsm", help="comma-separated task names (default: msd_mgsm)")
    u.add_argument("--langs", help="languages of msd_mgsm / msd_xcopa to run (default: all)")
    u.add_argument("--limit", type=int, help="at most this many documents per task")
    u.add_argument("--num-fewshot", type=int, help="few-shot examples (default: the task's, 0 for msd tasks)")
    u.add_argument("--batch-size", type=int, default=8, help="lm-eval batch size (default: 8)")
    u.add_argument("--max-gen-toks", type=int, help="longest generated answer in tokens (default: the task's, 384 for msd_mgsm)")
    u.add_argument("--apply-chat-template", action="store_true", help="wrap prompts in the model's chat template")
    u.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    u.add_argument("--out", required=True, help="run folder to write (continued if it exists)")
    u.add_argument("--fresh", action="store_true", help="discard the folder's old records first")
    u.set_defaults(func=run_utility)


def _no_subcommand(parser) -> int:
    parser.print_help()
    return 2


def _model_args(p) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="organism",
                   help="Hugging Face hub id or local folder; 'organism' = the model organism (default)")
    g.add_argument("--adapter", help="LoRA adapter folder to apply (e.g. a training run's final/)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights dtype (default: auto = bfloat16 on GPUs that support it, else float32)")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="allow the model repo's own Python code to run (off unless you trust it)")
    g.add_argument("--chat-template", help="Jinja chat template (file or text) instead of the tokenizer's")
    g.add_argument("--device", default="auto",
                   help="where the model runs: auto (a GPU when one is visible, else the CPU), cpu, "
                        "cuda or cuda:N (default: auto)")
    g.add_argument("--threads", type=int, default=0,
                   help="CPU threads of torch; 0 = MSD_THREADS or OMP_NUM_THREADS if set, else the cores "
                        "this process may use (default: 0)")
    g.add_argument("--strict", action="store_true", help=STRICT_HELP)


def _common_args(p) -> None:
    p.add_argument("--langs", help="comma-separated language codes (default: all of the benchmark's)")
    p.add_argument("--limit", type=int, help="evaluate only the first N queries (per language)")
    p.add_argument("--out", required=True, help="run folder to write (continued if it exists)")
    p.add_argument("--fresh", action="store_true",
                   help="discard the folder's old records first (needed when the model, adapter, "
                        "template, benchmark or settings differ from theirs)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=None,
                   help="longest response in tokens (default: 256, or less when the model's context "
                        "window cannot hold the longest prompt and 256 more)")
    g.add_argument("--temperature", type=float, default=0.0, help="sampling temperature, 0 = greedy (default: 0)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0)")
    g.add_argument("--num-samples", type=int, default=1, help="responses per query (default: 1)")
    g.add_argument("--batch-size", type=int, default=32, help="prompts per generate call (default: 32)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    g.add_argument("--backend", default="auto",
                   help="generation backend, as rollout.backend in training: auto (compiled on CUDA, "
                        "msd's decode loop on CPU) or a registered one (loop, hf, compiled, vllm)")
    g.add_argument("--system-prompt", help="system message for every prompt (default: none)")
    g.add_argument("--enable-thinking", action="store_true",
                   help="thinking mode of templates that have one (Qwen3); the judged answer is the "
                        "text after the reasoning block, kept apart in each record (default: off)")
    _judge_args(p.add_argument_group("judge"))


def _benchmarks() -> str:
    from msd.data import describe

    return describe()


def _judge_flags() -> dict[str, tuple]:
    """Flag -> (its option, the names of the judges that declare it), over every registered judge."""
    flags: dict[str, tuple] = {}
    for name, cls in JUDGES.items():
        for opt in cls.options:
            first, names = flags.get(opt.flag, (opt, ()))
            flags[opt.flag] = (first, names + (name,))
    return flags


def _judge_args(g) -> None:
    summaries = ", ".join(f"{name} ({cls.summary})" if cls.summary else name for name, cls in JUDGES.items())
    g.add_argument("--judge", choices=JUDGES.names(),
                   help=f"{summaries}. Default: the benchmark's own judge if it has one, else keyword")
    for flag, (opt, names) in _judge_flags().items():
        kw = {"choices": list(opt.choices)} if opt.choices else {}
        g.add_argument(flag, dest=opt.dest, type=opt.type, help=f"{', '.join(names)}: {opt.help}", **kw)


# ----------------------------------------------------------------------------- helpers

def _check_positive(args, *names: str) -> None:
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise MsdError(f"must be at least 1, got {value}", "--" + name.replace("_", "-"))
    if not 0 <= args.seed < 2**32:  # numpy's seeds are unsigned 32-bit
        raise MsdError(f"must be in [0, 2**32), got {args.seed}", "--seed")


def _check_bounds(args, options) -> None:
    """Each option's declared bounds (JudgeOption.bounds), before any work starts."""
    from msd import bounds

    for opt in options:
        bounds.check(opt.flag, getattr(args, opt.dest, None), opt.flag, **(opt.bounds or {}))


def _backend(name: str) -> str:
    from msd.generation import BACKENDS

    if name != "auto" and name not in BACKENDS:
        raise MsdError(BACKENDS.unknown(name), "--backend")
    return name


def build_judge(args):
    from msd.eval.judges import get_judge

    name = args.judge or getattr(args, "default_judge", None) or "keyword"
    own = {opt.flag: opt for opt in JUDGES.get(name).options}
    foreign = [flag for flag, (opt, _) in _judge_flags().items()
               if flag not in own and getattr(args, opt.dest, None) is not None]
    if foreign:
        raise MsdError(f"{', '.join(foreign)} do(es) not apply to --judge {name}", "--judge")
    _check_bounds(args, own.values())
    required = [opt.flag for opt in own.values() if opt.required]
    if any(getattr(args, own[flag].dest, None) is None for flag in required):
        raise MsdError(f"--judge {name} needs {' and '.join(required)}", "--judge")
    return get_judge(name, **{opt.name: getattr(args, opt.dest, None) for opt in own.values()})


def load_model(args):
    from msd.config import ModelConfig
    from msd.models import load_model_and_tokenizer

    cfg = ModelConfig(name_or_path=args.model, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                      chat_template=args.chat_template)
    from msd.machine import resolve_device

    return load_model_and_tokenizer(cfg, adapter=args.adapter, device=resolve_device(args.device))


def start(args, command: str, settings: dict) -> None:
    """The machine check and the first line of an eval run (msd.machine.start)."""
    from msd import machine
    from msd.models import dtype_label

    if args.threads < 0:
        raise MsdError(f"must be at least 0, got {args.threads}", "--threads")
    args.device = machine.resolve_device(args.device)  # load_model puts the model there
    bf16 = {"--dtype bfloat16": "--dtype float32"} if args.dtype == "bfloat16" else {}
    machine.start(command, {"--dtype": dtype_label(args.dtype, args.device), **settings}, threads=args.threads,
                  threads_key="--threads", bf16=bf16, strict=args.strict, device=args.device)


def _identity(args) -> dict:
    from msd.fingerprint import model_identity

    return {"adapter": model_identity(args.adapter)}


def _run_info(args) -> dict:
    return {"model": args.model, "adapter": args.adapter, "dtype": args.dtype}


def _print_table(metrics: dict, kind: str) -> None:
    """Each rate with its Wilson 95% interval, and the records behind it."""
    from msd.eval.metrics import interval

    keys = ("asr", "unsafe_rate", "invalid_rate") if kind == "safety" else ("benign_refusal", "fidelity")
    keys += ("truncated_rate",)  # answers cut at --max-new-tokens
    count = "n" if kind == "safety" else "n_benign"
    print(f"{'lang':<10}" + "".join(f"{k + ' [95%]':>24}" for k in keys) + f"{count:>10}")
    for lang, m in metrics.items():
        cells = []
        for k in keys:
            v, ci = m.get(k), interval(m, k)
            text = "-" if v is None else f"{v:.3f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")
            cells.append(f"{text:>24}")
        print(f"{lang:<10}" + "".join(cells) + f"{m.get(count, '-')!s:>10}")


# ----------------------------------------------------------------------------- commands

def _one_writer(run):
    """Run a command holding the --out folder's writer lock (msd.lock); --fresh discards the
    old records once the lock is held."""
    def wrapped(args) -> int:
        from msd.lock import output_lock

        if not args.out.strip():
            raise MsdError("may not be empty (name the run folder to write)", "--out")
        with output_lock(args.out, "eval", fresh=args.fresh):  # --fresh: only an evaluation's files
            return run(args)

    return wrapped


@_one_writer
def run_safety(args) -> int:
    from msd import languages
    from msd.data import load_dataset
    from msd.prompts import PromptBuilder

    _check_positive(args, "limit", "num_samples", "batch_size", "max_new_tokens")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise MsdError("need --temperature >= 0 and 0 < --top-p <= 1", "--temperature/--top-p")
    bench = load_dataset(args.benchmark, where="--benchmark")
    args.default_judge = bench.default_judge
    from msd.eval.safety import check_langs

    langs = languages.parse_codes(args.langs, "--langs") if args.langs else bench.langs
    if args.kind == "overrefusal":
        from msd.eval.overrefusal import benign_tuples

        bench.tuples = benign_tuples(bench.tuples, bench.name)
    check_langs(bench.tuples, langs, bench.name)  # input errors show before the (slow) model load
    backend = _backend(args.backend)
    judge = build_judge(args)
    start(args, f"eval {args.kind}", {"--backend": backend, "--batch-size": args.batch_size,
                                      "--max-new-tokens": args.max_new_tokens or "auto"})
    model, tokenizer = load_model(args)
    builder = PromptBuilder(tokenizer, context=args.teacher_context, system_prompt=args.system_prompt,
                            enable_thinking=args.enable_thinking)
    if args.max_new_tokens is None:
        args.max_new_tokens = _default_max_new_tokens(model, tokenizer, bench, langs, builder, args)
    kwargs = dict(benchmark=bench.name, prompt_builder=builder, teacher_prompts=args.teacher_prompts,
                  max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                  num_samples=args.num_samples, batch_size=args.batch_size, seed=args.seed,
                  limit=args.limit, progress=not args.quiet, run_info=_run_info(args),
                  backend=backend, identity=_identity(args))
    if args.kind == "overrefusal":
        from msd.eval.overrefusal import evaluate_overrefusal

        metrics = evaluate_overrefusal(model, tokenizer, bench.tuples, langs, judge, args.out, **kwargs)
    else:
        from msd.eval.safety import evaluate

        metrics = evaluate(model, tokenizer, bench.tuples, langs, judge, args.out, **kwargs)
    _print_table(metrics, args.kind)
    _print_throughput(args.out)
    print(f"msd: records and metrics in {args.out}")
    return 0


def _default_max_new_tokens(model, tokenizer, bench, langs, builder, args) -> int:
    """256, or what the context window leaves after the benchmark's longest prompt (one line
    says so); the limit is recorded in run.json's settings like a chosen one."""
    from msd.eval.safety import DEFAULT_MAX_NEW_TOKENS, fitting_max_new_tokens

    n, longest, window = fitting_max_new_tokens(model, tokenizer, bench.tuples, langs, builder,
                                                teacher_prompts=args.teacher_prompts)
    if 0 < n < DEFAULT_MAX_NEW_TOKENS:
        print(f"msd: --max-new-tokens {n}: the context window of {window} tokens holds the longest prompt "
              f"({longest} tokens) and {n} more, not {DEFAULT_MAX_NEW_TOKENS} (set --max-new-tokens to choose)",
              flush=True)
    return max(n, 1)  # a prompt that fills the window alone: check_context names it


def _print_throughput(out) -> None:
    from msd.eval import records as rec

    t = rec.load_run(out).get("throughput")
    if t and (rec.load_run(out).get("last_call") or {}).get("generated"):
        print(f"msd: generated {t['responses']} responses, {t.get('tokens', 0)} tokens in "
              f"{t['generate_seconds']:.1f} s ({t.get('tokens_per_s', 0):.0f} tokens/s, backend {t.get('backend')})")


@_one_writer
def run_utility(args) -> int:
    from msd import languages
    from msd.eval import utility

    _check_positive(args, "limit", "batch_size", "max_gen_toks")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise MsdError(f"must be at least 0, got {args.num_fewshot}", "--num-fewshot")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise MsdError("no task given", "--tasks")
    langs = languages.parse_codes(args.langs, "--langs") if args.langs else None
    utility.task_manager(utility.expand_tasks(tasks, langs))  # unknown tasks fail before the model loads
    start(args, "eval utility", {"--batch-size": args.batch_size})
    model, tokenizer = load_model(args)
    metrics = utility.run(model, tokenizer, tasks, args.out, langs=langs, limit=args.limit,
                          batch_size=args.batch_size, num_fewshot=args.num_fewshot,
                          max_gen_toks=args.max_gen_toks, apply_chat_template=args.apply_chat_template,
                          seed=args.seed, run_info=_run_info(args), identity=_identity(args))
    for task, m in metrics.items():
        print(f"{task:<20} {m['score']:.3f}  (n={m['n']})")
    print(f"msd: records and metrics in {args.out}")
    return 0
