"""Every YAML config shipped with msd loads and validates."""

from pathlib import Path

import pytest

from msd.config import load_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml")) + \
    sorted((Path(__file__).parent.parent / "configs" / "paper").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads(path):
    cfg = load_config(path)
    assert cfg.train.output_dir


def test_paper_configs_cover_the_four_models_both_modes():
    names = {p.name for p in CONFIGS}
    for model in ("qwen2.5-7b-instruct", "qwen3-8b", "llama-2-7b-chat", "llama-3-8b-instruct"):
        for mode in ("on-policy", "off-policy"):
            assert f"{model}-{mode}.yaml" in names
