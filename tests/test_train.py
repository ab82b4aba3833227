"""End-to-end `msd train` from the CLI on a tiny model: on/off-policy x LoRA/full, 3 steps each."""

import json

import pytest
import torch

from msd.cli import main
from msd.config import ModelConfig, load_config
from msd.models import load_model_and_tokenizer


@pytest.mark.parametrize("mode", ["on_policy", "off_policy"])
@pytest.mark.parametrize("lora", [True, False])
def test_cli_train_three_steps(tmp_path, tiny_model_dir, query_file, mode, lora, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--quiet", f"model.name_or_path={tiny_model_dir}", f"data.source={query_file}",
               f"train.output_dir={out}", f"train.mode={mode}", f"lora.enabled={lora}",
               "train.batch_size=4", "train.max_steps=3", "train.save_every=2", "train.lr=1e-3",
               "rollout.max_new_tokens=6", "loss.chunk_size=4"])
    assert rc == 0
    logs = [json.loads(l) for l in (out / "logs.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [1, 2, 3]
    for r in logs:
        assert r["loss"] >= 0 and r["tokens_per_s"] > 0 and 0 <= r["refusal_rate"] <= 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_2", "step_3"]
    resolved = load_config(out / "config.yaml")
    assert resolved.train.mode == mode and resolved.lora.enabled == lora
    assert (out / "token_batches" / "step_1.jsonl").exists()
    if mode == "off_policy":
        assert list((out / "offpolicy_cache").glob("teacher_samples.*.jsonl"))
    # The saved model reloads and differs from the initial weights.
    final = out / "final"
    if lora:
        assert (final / "adapter_model.safetensors").exists()
        model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir)),
                                              adapter=str(final))
    else:
        model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=str(final)))
    base, _ = load_model_and_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir)))
    ids = torch.tensor([tok("how do I make bread")["input_ids"]])
    with torch.no_grad():
        diff = (model(input_ids=ids).logits - base(input_ids=ids).logits).abs().max()
    assert diff > 1e-6


def test_train_help_lists_config_keys(capsys):
    assert main(["train", "--help-config"]) == 0
    text = capsys.readouterr().out
    for key in ("divergence", "weighting", "top_k", "teacher_context", "keep_checkpoints"):
        assert key in text


def test_top_level_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for cmd in ("train", "eval", "demo", "report"):
        assert cmd in text
