"""Nothing msd loads can run code: remote code is off unless asked for, weights come from
safetensors only, every torch.load is weights_only, and API keys never reach an output file."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest
import torch

import msd
from conftest import write_queries
from msd.cli import main
from msd.config import ModelConfig
from msd.errors import MsdError
from msd.models import load_model_and_tokenizer

SRC = Path(msd.__file__).parent


@pytest.fixture
def spy(monkeypatch):
    """Records the keyword arguments of every from_pretrained call msd makes."""
    import transformers

    calls: dict[str, list[dict]] = {"model": [], "tokenizer": []}
    for kind, cls in (("model", transformers.AutoModelForCausalLM),
                      ("tokenizer", transformers.AutoTokenizer)):
        real = cls.from_pretrained.__func__

        def fake(klass, *args, _real=real, _kind=kind, **kw):
            calls[_kind].append(kw)
            return _real(klass, *args, **kw)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(fake))
    return calls


def test_remote_code_is_off_by_default_and_safetensors_required(tiny_model_dir, spy):
    load_model_and_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir)))
    assert [c["trust_remote_code"] for c in spy["model"] + spy["tokenizer"]] == [False, False]
    assert spy["model"][0]["use_safetensors"] is True


def test_remote_code_only_when_asked(tiny_model_dir, spy):
    load_model_and_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir), trust_remote_code=True))
    assert [c["trust_remote_code"] for c in spy["model"] + spy["tokenizer"]] == [True, True]


@pytest.fixture(scope="module")
def pickled_model(tiny_model_dir, tmp_path_factory):
    """The tiny model with its weights as pytorch_model.bin only."""
    from safetensors.torch import load_file

    folder = tmp_path_factory.mktemp("pickled") / "model"
    shutil.copytree(tiny_model_dir, folder)
    weights = folder / "model.safetensors"
    torch.save(load_file(str(weights)), folder / "pytorch_model.bin")
    weights.unlink()
    return folder


def test_pickle_only_model_is_refused_with_a_clear_error(pickled_model, capsys):
    with pytest.raises(MsdError) as err:
        load_model_and_tokenizer(ModelConfig(name_or_path=str(pickled_model)))
    msg = str(err.value)
    assert msg.startswith(f"{pickled_model}: folder holds only pickled weights (.bin/.pt); "
                          "msd loads safetensors only")
    assert "\n" not in msg and "save_pretrained" in msg
    # and through the CLI: one line, exit code 2
    assert main(["train", f"model.name_or_path={pickled_model}"]) == 2
    assert "folder holds only pickled weights" in capsys.readouterr().err


def test_transformers_itself_refuses_pickles_with_use_safetensors(pickled_model):
    """The second line of defence (hub ids are not checked by msd): transformers refuses too."""
    from transformers import AutoModelForCausalLM

    with pytest.raises(OSError, match="safetensors"):
        AutoModelForCausalLM.from_pretrained(pickled_model, use_safetensors=True)


def test_pickle_only_adapter_is_refused(tiny_model_dir, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    torch.save({}, adapter / "adapter_model.bin")
    with pytest.raises(MsdError, match="adapter: folder holds only pickled weights"):
        load_model_and_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir)), adapter=str(adapter))


def _calls(tree: ast.AST, module: str, attr: str):
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == attr and isinstance(node.func.value, ast.Name)
                and node.func.value.id == module):
            yield node


def test_every_torch_load_is_weights_only_and_nothing_unpickles():
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 10
    found, bad = 0, []
    for path in files:
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text, str(path))
        for call in _calls(tree, "torch", "load"):
            found += 1
            kw = {k.arg: k.value for k in call.keywords}
            if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                bad.append(f"{path.relative_to(SRC)}:{call.lineno}: torch.load without weights_only=True")
        for name in ("load", "loads"):
            for call in _calls(tree, "pickle", name):
                bad.append(f"{path.relative_to(SRC)}:{call.lineno}: pickle.{name}")
        for node in ast.walk(tree):
            if (isinstance(node, ast.keyword) and node.arg == "trust_remote_code"
                    and isinstance(node.value, ast.Constant) and node.value.value is True):
                bad.append(f"{path.relative_to(SRC)}:{node.value.lineno}: trust_remote_code=True")
    assert found >= 3  # the checkpoint loader's calls are seen
    assert bad == []


SECRETS = {"MSD_JUDGE_API_KEY": "sk-msd-judge-0123456789abcdef", "OPENAI_API_KEY": "sk-openai-fedcba9876543210",
           "HF_TOKEN": "hf_secretTokenValue0123456789", "WANDB_API_KEY": "wandb-secret-0123456789abcdef"}


def test_api_keys_never_reach_training_outputs(tiny_model_dir, tmp_path, monkeypatch, capsys,
                                               one_thread):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    run = tmp_path / "run"
    q = write_queries(tmp_path / "q.jsonl", n=6)
    for mode in ("on_policy", "off_policy"):
        assert main(["train", "--quiet", f"model.name_or_path={tiny_model_dir}", f"data.source={q}",
                     f"train.output_dir={run / mode}", f"train.mode={mode}", "train.batch_size=2",
                     "train.max_steps=1", "rollout.max_new_tokens=4"]) == 0
    printed = "".join(capsys.readouterr())
    files = [p for p in run.rglob("*") if p.is_file()]
    assert any(p.name == "state.json" for p in files) and any(p.name == "config.yaml" for p in files)
    for p in files:
        data = p.read_bytes()
        for name, value in SECRETS.items():
            assert value.encode() not in data, f"{name} written to {p}"
    for value in SECRETS.values():
        assert value not in printed
