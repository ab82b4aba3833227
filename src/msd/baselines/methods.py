"""The baseline methods, each on TRL's own trainer: one registry entry per method.

    METHODS.get("dpo").build(model, tokenizer, args_kwargs, baseline_cfg, dataset, callbacks)

An entry names the kind of examples its trainer reads ("sft": prompt + completion,
"pairs": prompt + chosen + rejected, "labeled": prompt + completion + label) and builds the
trainer with TRL's config class. Nothing here re-implements a loss: DPO (and its robust and IPO
variants) is `trl.DPOTrainer`, KTO `trl.KTOTrainer`, ORPO `ORPOTrainer`, SimPO `CPOTrainer` with
`loss_type="simpo"` (and `cpo_alpha=0`, SimPO proper). trl is imported only when a trainer is
built, so msd works without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from msd.errors import MsdError
from msd.registry import Registry

KINDS = ("sft", "pairs", "labeled")


@dataclass(frozen=True)
class Method:
    kind: str  # which examples the trainer reads (KINDS)
    trainer: Callable[[], tuple[type, type]]  # () -> (TRL trainer class, its config class)
    options: Callable[[object], dict]  # baseline config -> the method's TRL config fields
    reference_free: bool = False  # no reference model (ORPO, SimPO): no frozen copy is made
    description: str = ""

    def build(self, model, tokenizer, args: dict, bcfg, dataset, callbacks):
        trainer_cls, config_cls = self.trainer()
        targs = config_cls(**args, **self.options(bcfg))
        return trainer_cls(model=model, args=targs, train_dataset=dataset, processing_class=tokenizer,
                           callbacks=callbacks)


METHODS: Registry[Method] = Registry("baseline method", where="baseline.method")


def require_trl():
    try:
        import trl
    except ImportError:
        raise MsdError("baselines need TRL: pip install 'msd[baselines]'") from None
    return trl


def _sft():
    trl = require_trl()
    return trl.SFTTrainer, trl.SFTConfig


def _dpo():
    trl = require_trl()
    return trl.DPOTrainer, trl.DPOConfig


def _kto():
    trl = require_trl()
    return trl.KTOTrainer, trl.KTOConfig


def _orpo():
    trl = require_trl()
    try:  # TRL 1.x moved ORPO and CPO to trl.experimental
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer
    except ImportError:
        ORPOConfig, ORPOTrainer = trl.ORPOConfig, trl.ORPOTrainer
    return ORPOTrainer, ORPOConfig


def _cpo():
    trl = require_trl()
    try:
        from trl.experimental.cpo import CPOConfig, CPOTrainer
    except ImportError:
        CPOConfig, CPOTrainer = trl.CPOConfig, trl.CPOTrainer
    return CPOTrainer, CPOConfig


def _dpo_options(b) -> dict:  # label_smoothing's bounds (rDPO: [0, 0.5)) are checked in the config
    return {"beta": b.beta, "loss_type": [b.loss_type],
            "label_smoothing": b.label_smoothing if b.loss_type == "robust" else 0.0}


METHODS.register("sft", Method("sft", _sft, lambda b: {"completion_only_loss": True},
                               description="supervised fine-tuning on the chosen answers"))
METHODS.register("dpo", Method("pairs", _dpo, _dpo_options,
                               description="DPO; baseline.loss_type sigmoid | robust (rDPO) | ipo"))
METHODS.register("kto", Method("labeled", _kto, lambda b: {
    "beta": b.beta, "desirable_weight": b.desirable_weight,
    "undesirable_weight": b.undesirable_weight}, description="KTO on desirable/undesirable answers"))
METHODS.register("orpo", Method("pairs", _orpo, lambda b: {"beta": b.beta}, reference_free=True,
                                description="ORPO: SFT plus an odds-ratio preference term"))
METHODS.register("simpo", Method("pairs", _cpo, lambda b: {
    "loss_type": "simpo", "cpo_alpha": 0.0, "beta": b.beta, "simpo_gamma": b.simpo_gamma},
    reference_free=True, description="SimPO (TRL's CPOTrainer, loss_type=simpo, cpo_alpha=0)"))
