"""`msd demo --model smollm2 --baselines`: SFT and DPO beside MSD on the real model.

Both baselines train on `self_generated` data (`msd.baselines.sources.self_generated`: the
model's own teacher-prompted answer as the chosen one, its student answer as the rejected one),
so like MSD they need queries only: no paid response data. Same data split, LoRA settings,
learning rate, batch and optimizer steps as the demo's MSD run; evaluated on the same held-out
queries with the same judge.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

METHODS = {"sft": {"baseline.method": "sft"},
           "dpo": {"baseline.method": "dpo", "baseline.loss_type": "sigmoid"}}


def real_model_baselines(out: Path, cfg, data, spec, seed: int, progress: bool, summary: dict) -> dict:
    """Train and evaluate each baseline; returns {method: {lang: rates}, ...} (summary.json)."""
    from msd import config
    from msd.demo.real_data import evaluate
    from msd.baselines.run import train_baseline
    from msd.models import load_model_and_tokenizer

    langs = [c for codes in summary["languages"].values() for c in codes]
    result = {"msd_on_policy": {c: summary["after"][c] for c in langs}}
    for name, extra in METHODS.items():
        t = time.time()
        bcfg = copy.deepcopy(cfg)
        for key, value in {**extra, "baseline.data": "self_generated",
                           "train.output_dir": str(out / "baselines" / name / "train")}.items():
            config.set_key(bcfg, key, value, where="msd demo --baselines")
        if progress:
            print(f"msd demo: baseline {name} (self-generated pairs, {bcfg.train.max_steps} steps)", flush=True)
        model, tokenizer = load_model_and_tokenizer(bcfg.model)
        trained = train_baseline(bcfg, model=model, tokenizer=tokenizer, progress=progress, resume=False)
        rates = evaluate(trained.model, trained.tokenizer, data, langs, out / "baselines" / name / "eval",
                         spec, seed, progress)
        result[name] = {**{c: rates[c] for c in langs}, "seconds": round(time.time() - t, 1)}
    return result

