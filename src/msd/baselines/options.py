"""The `baseline` config section: what `msd baseline METHOD` trains and on which data.

Everything else a baseline run needs comes from the sections MSD uses: model, lora, data (the
training queries), prompt (the teacher prompt of self-generated data), rollout (its sampling)
and train (optimizer, schedule, steps, output folder), so a baseline and an MSD run read the
same YAML. Importing this module registers the section and its choices into msd.config (the
core does not import the baselines; msd.plugins loads this module before the first lookup).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from msd.choices import CHOICES, REGISTERED
from msd.config import SECTIONS


def _f(default, help: str, **bounds):
    """A documented field; `bounds` are its declared limits (msd.bounds: ge, gt, lt, nonempty)."""
    return field(default=default, metadata={"help": help, **bounds})


@dataclass
class BaselineConfig:
    method: str = _f("sft", "Baseline method (TRL's own trainer): sft, dpo, kto, orpo, simpo. Set by `msd baseline METHOD`.")
    loss_type: str = _f("sigmoid", "DPO loss: sigmoid (DPO), robust (rDPO, label noise = label_smoothing), ipo. Other methods ignore it.")
    beta: float = _f(0.1, "Strength of the preference term: DPO/KTO beta (KL to the reference), ORPO lambda, SimPO beta.", gt=0)
    label_smoothing: float = _f(0.1, "rDPO: assumed share of flipped preference labels, in [0, 0.5).", ge=0, lt=0.5)
    simpo_gamma: float = _f(0.5, "SimPO: target reward margin gamma.", ge=0)
    desirable_weight: float = _f(1.0, "KTO: weight of desirable (chosen) examples.", gt=0)
    undesirable_weight: float = _f(1.0, "KTO: weight of undesirable (rejected) examples.", gt=0)
    data: str = _f("self_generated", "Training examples: a registered baseline data source (self_generated, organism, ...) or a JSONL/CSV file (prompt, chosen, rejected | prompt, completion, label; optional lang).", nonempty=True)
    cache_dir: str | None = _f(None, "self_generated: where the teacher and student samples are cached; None = <output_dir>/baseline_cache.")
    max_length: int = _f(512, "Longest prompt + response, in tokens (TRL's max_length).", gt=0)


def method_names() -> list[str]:
    from msd.baselines.methods import METHODS

    return METHODS.names()


def data_names() -> list[str]:
    from msd.baselines.data import BASELINE_DATA

    return BASELINE_DATA.names()


SECTIONS.register("baseline", BaselineConfig)
CHOICES.register("baseline.method", method_names)
CHOICES.register("baseline.loss_type", lambda: ["sigmoid", "robust", "ipo"])
REGISTERED.register("baseline.data", data_names)
