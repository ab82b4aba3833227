"""`msd demo --model smollm2`: MSD on a real pretrained chat model, judged on real benchmarks.

The organism demo shows MSD where the gap is built in; this one asks whether MSD does anything
on real weights, a real tokenizer and real benchmark text, on a CPU. Stages (one progress line
each): load the model; evaluate it with the student prompt ("before") and with the teacher
prompt ("teacher_before", what the student is distilled towards); train MSD (LoRA, on-policy,
DPSW); evaluate again ("after"); measure kept capability; write summary.json, report.md and a
plot. Docs and findings: docs/REAL_MODEL.md.

Data (`msd.demo.real_data`): the training config's source split by its own rule
(`data.heldout_by`, `data.heldout_fraction`, `data.seed`; for SmolLM2, MultiJail split by harm
category): MSD trains on one part and every harmful figure here is measured on the other, so no
evaluated query is ever trained on (checked by id and English text, written to summary.json).
Benign prompts: MGSM questions where MGSM has the language, and XSTest's safe prompts (English).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from msd.demo.steps import DEMO_CONFIG


@dataclass(frozen=True)
class RealDemo:
    """What a real-model demo evaluates; the MSD training settings live in `config`."""
    config: Path  # the MSD training YAML (model, data languages, LoRA, rollout, loss, train)
    english: tuple[str, ...] = ("en",)
    unseen: tuple[str, ...] = ()  # evaluated, never trained on
    harmful: str = "multijail"  # held-out harmful queries (the held-out split if it is the training source)
    benign: str = "mgsm-prompts"  # held-out benign prompts, likewise
    n_harmful: int = 48  # held-out harmful queries per language
    n_benign: int = 24  # held-out benign prompts per language
    n_xstest: int = 24  # XSTest safe prompts (English)
    max_new_tokens: int = 40  # the keyword judge reads the start of an answer
    batch_size: int = 48
    samples: int = 3  # answers shown per language in the report


REAL_DEMOS = {
    # Languages chosen by measurement (docs/REAL_MODEL.md): of MultiJail's ten, the teacher prompt
    # lowers SmolLM2's ASR clearly only in Javanese (and English); Swahili is evaluated, never trained.
    "smollm2": RealDemo(config=DEMO_CONFIG.parent / "smollm2.yaml", unseen=("sw",)),
}


def spec_settings(spec: RealDemo) -> dict:
    """A demo's settings as summary.json holds them (JSON types)."""
    import json

    return json.loads(json.dumps(asdict(spec) | {"config": str(spec.config)}))


def run_real_demo(name: str, out: Path, seed: int = 0, overrides=(), progress: bool = True,
                  baselines: bool = False) -> dict:
    """Run the real-model demo `name`; returns summary.json's content."""
    import torch

    from msd.demo import real_data, real_report
    from msd.demo.steps import demo_config_from
    from msd.io import atomic_write_json, ensure_writable_dir
    from msd.models import load_model_and_tokenizer
    from msd.train.setup import start_line

    spec = REAL_DEMOS[name]
    t_start = time.time()
    out = ensure_writable_dir(out)
    stages = Stages(progress)
    cfg = demo_config_from(spec.config, out / "train", seed, overrides)
    start_line("demo", cfg, strict=False)  # bfloat16 check, torch's threads, the settings line
    langs = {"english": list(spec.english), "trained": list(cfg.data.languages), "unseen": list(spec.unseen)}
    every = [c for codes in langs.values() for c in codes]
    torch.manual_seed(seed)

    with stages("load the model and the data"):
        model, tokenizer = load_model_and_tokenizer(cfg.model)
        data = real_data.demo_data(cfg, spec, every)
    summary = {"model": name, "model_path": str(model.config._name_or_path), "seed": seed,
               "overrides": list(overrides), "languages": langs, "data": data.describe(),
               "settings": spec_settings(spec)}

    evals = {}
    with stages("evaluate before training (student prompt)"):
        evals["before"] = real_data.evaluate(model, tokenizer, data, every, out / "before", spec, seed, progress)
    with stages("evaluate the teacher prompt (what MSD distils towards)"):
        evals["teacher_before"] = real_data.evaluate(model, tokenizer, data, every, out / "teacher_before",
                                                     spec, seed, progress, teacher=cfg.prompt.teacher_context)
    with stages("base model's answers to benign prompts (capability reference)"):
        reference = real_data.reference_answers(model, tokenizer, data, every, spec)
        base_ll = real_data.answer_loglik(model, tokenizer, reference)
    del model

    from msd.demo.steps import train_variant
    from msd.eval.judges.keyword import is_refusal

    with stages(f"train MSD ({cfg.train.max_steps} steps, {cfg.train.mode}, LoRA r={cfg.lora.r})"):
        result, _ = train_variant(cfg, data.train, progress, refusal_check=is_refusal)
    with stages("evaluate after training (student prompt)"):
        evals["after"] = real_data.evaluate(result.model, result.tokenizer, data, every, out / "after",
                                            spec, seed, progress)
        trained_ll = real_data.answer_loglik(result.model, result.tokenizer, reference)

    summary.update(evals)
    summary["capability"] = real_data.capability(base_ll, trained_ll, reference)
    summary["heldout_never_trained"] = data.disjoint()
    summary["seconds"] = stages.seconds
    summary["wall_seconds"] = round(time.time() - t_start, 1)
    summary["torch_threads"] = torch.get_num_threads()
    summary["checks"] = real_report.checks(summary)
    summary["paired"] = real_data.paired_changes(out)
    summary["samples"] = real_data.samples(out, every, spec.samples)
    atomic_write_json(out / "summary.json", summary)
    real_report.plot(summary, out / "asr_before_after.png")
    real_report.write(out, summary)
    real_report.print_table(summary)
    if baselines:
        from msd.demo.real_baselines import real_model_baselines

        summary["baselines"] = real_model_baselines(out, cfg, data, spec, seed, progress, summary)
        summary["paired"] = real_data.paired_changes(out, [n for n in summary["baselines"] if n != "msd_on_policy"])
        atomic_write_json(out / "summary.json", summary)
        real_report.write(out, summary)
    return summary


class Stages:
    """One progress line per stage: `msd demo: [3/6] train MSD ... done in 412 s`."""

    TOTAL = 6

    def __init__(self, progress: bool):
        self.progress, self.n, self.seconds = progress, 0, {}

    def __call__(self, title: str):
        self.n += 1
        self.title = title
        return self

    def __enter__(self):
        self.t = time.time()
        if self.progress:
            print(f"msd demo: [{self.n}/{self.TOTAL}] {self.title} ...", flush=True)
        return self

    def __exit__(self, *exc):
        took = time.time() - self.t
        self.seconds[self.title] = round(took, 1)
        if self.progress and exc[0] is None:
            print(f"msd demo: [{self.n}/{self.TOTAL}] done in {took:.0f} s", flush=True)
