"""`msd demo --baselines`: the paper's main comparison on the organism, in one harness.

Every method trains from the same organism with the demo's LoRA settings, learning rate, batch
size and budget of optimizer steps (configs/organism.yaml), and is judged by the oracle on both
splits. MSD needs queries only; the baselines read the paper's translated-refusal data, which
the organism knows exactly (`baseline.data: organism`: the world's refusal or answer as chosen,
the compliance as rejected). [ours: the paper tunes each baseline; here they share MSD's
settings, except beta, which keeps TRL's default.]
"""

from __future__ import annotations

import time
from pathlib import Path

from msd.demo.seedtable import COLUMNS, means, stats_section
from msd.demo.steps import demo_config, evaluate_splits, summarize, train_variant
from msd.demo.summary import fmt

# name -> ("msd", overrides) | ("baseline", overrides); baselines read baseline.data: organism
METHODS = {
    "msd_on_policy": ("msd", {"train.mode": "on_policy"}),
    "msd_off_policy": ("msd", {"train.mode": "off_policy"}),
    "sft": ("baseline", {"baseline.method": "sft"}),
    "dpo": ("baseline", {"baseline.method": "dpo", "baseline.loss_type": "sigmoid"}),
    "dpo_robust": ("baseline", {"baseline.method": "dpo", "baseline.loss_type": "robust"}),
    "dpo_ipo": ("baseline", {"baseline.method": "dpo", "baseline.loss_type": "ipo"}),
    "kto": ("baseline", {"baseline.method": "kto"}),
    "orpo": ("baseline", {"baseline.method": "orpo"}),
    "simpo": ("baseline", {"baseline.method": "simpo"}),
}
REPORTED = ("asr", "benign_refusal", "fidelity")


def method_entry(summary: dict, seconds: float) -> dict:
    """baselines.json's entry: split -> language -> {asr, benign_refusal, fidelity}."""
    entry = {split: {lang: {k: m[k] for k in REPORTED} for lang, m in per_lang.items()}
             for split, per_lang in summary.items()}
    entry["wall_seconds"] = round(seconds, 1)
    return entry


def train_baseline_variant(cfg, progress: bool):
    from msd.baselines.run import train_baseline
    from msd.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(cfg.model)
    t0 = time.time()
    result = train_baseline(cfg, model=model, tokenizer=tokenizer, progress=progress, resume=False)
    return result, time.time() - t0


def run_baselines(out: Path, seed: int, tuples, organism_path: str, on_policy: dict | None = None,
                  overrides=(), limit=None, progress: bool = True, names=None) -> dict:
    """Train and evaluate every method (`names`, default all of METHODS); `on_policy` is the
    demo's own MSD run (summary, seconds) when it already ran. Writes baselines.json/.md/.png."""
    from msd.demo.ablations import pairs
    from msd.io import atomic_write_json

    result = {"methods": {}, "seed": seed, "organism": organism_path}
    for name in names or METHODS:
        kind, extra = METHODS[name]
        if name == "msd_on_policy" and on_policy is not None:
            result["methods"][name] = method_entry(*on_policy)
            continue
        vdir = out / "baselines" / name
        cfg = demo_config(vdir / "train", seed, {**dict(pairs(overrides)), **extra,
                                                 "baseline.data": "organism"})
        cfg.model.name_or_path = organism_path
        print(f"msd demo: {name}", flush=True)
        trained, seconds = (train_variant(cfg, tuples, progress) if kind == "msd"
                            else train_baseline_variant(cfg, progress))
        metrics = evaluate_splits(trained.model, trained.tokenizer, vdir / "eval", limit=limit,
                                  seed=seed, progress=progress)
        result["methods"][name] = method_entry(summarize(metrics), seconds)
        result["steps"], result["lora"] = cfg.train.max_steps, {"r": cfg.lora.r, "alpha": cfg.lora.alpha}
        atomic_write_json(out / "baselines.json", result)
    folders = {name: out / "baselines" / name / "eval" for name in result["methods"]}
    if on_policy is not None:
        folders["msd_on_policy"] = out / "after"
    write_outputs(out, result, stats_section(out / "baselines_stats.json", folders, "msd_on_policy", seed))
    return result


def table(result: dict, langs: dict) -> str:
    lines = ["| method | " + " | ".join(title for _, title in COLUMNS) + " | seconds |",
             "|---|" + "---|" * (len(COLUMNS) + 1)]
    for name, entry in result["methods"].items():
        m = means(entry, langs)
        lines.append(f"| {name} | " + " | ".join(fmt(m[k]) for k, _ in COLUMNS)
                     + f" | {entry['wall_seconds']:.0f} |")
    return "\n".join(lines)


def write_outputs(out: Path, result: dict, stats_md: str = "") -> None:
    from msd.io import atomic_write_json, atomic_write_text
    from msd.organism import LANGUAGES

    atomic_write_json(out / "baselines.json", result)
    text = ("# MSD and the baselines on the model organism\n\n"
            f"Same LoRA (r={result.get('lora', {}).get('r')}), learning rate, batch and "
            f"{result.get('steps')} optimizer steps for every method; oracle judge, greedy decoding. "
            "ASR on harmful queries (mean over languages); benign refusal and fidelity over all "
            "languages and both splits; seconds = training time.\n\n"
            + table(result, LANGUAGES) + "\n\n![methods](baselines.png)\n" + stats_md)
    atomic_write_text(out / "baselines.md", text)
    plot(result, LANGUAGES, out / "baselines.png")


def plot(result: dict, langs: dict, path: Path) -> Path:
    from msd.report.plots import grouped_bars, pyplot, save_figure

    plt = pyplot()
    names = list(result["methods"])
    rows = {n: means(e, langs) for n, e in result["methods"].items()}
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(names)), 4.2))
    series = [(title, [rows[n][k] for n in names], None)
              for k, title in COLUMNS if k != "asr_train_intents"]
    grouped_bars(ax, names, series, "%")
    ax.set_title("MSD vs baselines on the organism (ASR: lower is better; fidelity: higher)")
    return save_figure(fig, path)


def demo_baselines(out: Path, seed: int, overrides, eval_limit, progress: bool, summary: dict) -> dict:
    """`msd demo --baselines` after the demo: reuses its on-policy MSD run and evaluation."""
    import shutil

    from msd import organism
    from msd.io import atomic_write_json

    t = time.time()
    shutil.rmtree(out / "baselines", ignore_errors=True)  # a demo is always a fresh run
    result = run_baselines(out, seed, organism.training_queries(), summary["organism"],
                           (summary["after"], summary["seconds"]["msd_training"]), overrides,
                           eval_limit, progress)
    result["wall_seconds"] = round(time.time() - t + summary["wall_seconds"], 1)  # demo included
    atomic_write_json(out / "baselines.json", result)
    print("\n" + table(result, organism.LANGUAGES))
    print(f"baselines: {time.time() - t:.0f} s (with the demo: {result['wall_seconds']:.0f} s); "
          f"table: {out / 'baselines.md'}")
    return {"wall_seconds": result["wall_seconds"], "file": str(out / "baselines.json")}
