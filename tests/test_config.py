"""Config: YAML round trip, dotted overrides, type checks, choices, hints, describe()."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from msd.config import CHOICES, Config, describe, from_dict, load_config, sections, to_dict, to_yaml
from msd.errors import MsdError


def test_defaults_follow_the_paper():
    cfg = Config()
    assert cfg.loss.divergence == "rkl" and cfg.loss.weighting == "dpsw" and cfg.loss.top_k == 32
    assert cfg.prompt.teacher_context == "full" and cfg.model.trust_remote_code is False


def test_yaml_round_trip(tmp_path):
    cfg = load_config(None, ["train.lr=2e-5", "loss.divergence=jsd", "data.languages=jv,sw",
                             "model.chat_template=null", "data.limit=7", "lora.enabled=false"])
    path = tmp_path / "x.yaml"
    path.write_text(to_yaml(cfg), encoding="utf-8")
    again = load_config(path)
    assert again == cfg
    assert to_dict(again) == yaml.safe_load(path.read_text())


def test_partial_yaml_keeps_defaults_and_overrides_win(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("train:\n  lr: 1.0e-6\n  batch_size: 4\nloss:\n  top_k: 16\nlora:\n")
    cfg = load_config(path, ["train.batch_size=2"])
    assert cfg.train.lr == 1e-6 and cfg.train.batch_size == 2 and cfg.loss.top_k == 16
    assert cfg.train.epochs == Config().train.epochs and cfg.lora == Config().lora


def test_empty_yaml_is_the_defaults(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("# nothing here\n")
    assert load_config(path) == Config()


@pytest.mark.parametrize("override, key, value", [
    ("train.lr=1e-5", "train.lr", 1e-5),
    ("train.lr=3", "train.lr", 3.0),  # ints widen to float
    ("train.batch_size=16", "train.batch_size", 16),
    ("train.max_steps=null", "train.max_steps", None),
    ("train.max_steps=None", "train.max_steps", None),
    ("lora.enabled=false", "lora.enabled", False),
    ("lora.enabled=yes", "lora.enabled", True),
    ("data.languages=jv, sw,bn", "data.languages", ["jv", "sw", "bn"]),
    ("data.languages=[jv, sw]", "data.languages", ["jv", "sw"]),
    ("data.languages=", "data.languages", []),
    ("prompt.system_prompt=be kind: always", "prompt.system_prompt", "be kind: always"),
    ("model.name_or_path=Qwen/Qwen2.5-7B-Instruct", "model.name_or_path", "Qwen/Qwen2.5-7B-Instruct"),
    ("train.output_dir=runs/a=b", "train.output_dir", "runs/a=b"),  # split on the first '='
    ("model.chat_template=text:123", "model.chat_template", "text:123"),  # a path unless marked as text
    ("train.mixed_precision=no", "train.mixed_precision", "no"),  # YAML would read False
    ("prompt.teacher_template=Q: {query}", "prompt.teacher_template", "Q: {query}"),
])
def test_overrides_are_typed(override, key, value):
    cfg = load_config(None, [override])
    section, name = key.split(".")
    got = getattr(getattr(cfg, section), name)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("override, message", [
    ("train.lr=abc", "field 'train.lr' expects float, got 'abc'"),
    ("train.batch_size=2.5", "field 'train.batch_size' expects int, got 2.5"),
    ("train.batch_size=true", "field 'train.batch_size' expects int, got True"),
    ("lora.enabled=maybe", "field 'lora.enabled' expects bool, got 'maybe'"),
    ("train.epochs=null", "field 'train.epochs' cannot be null"),
    ("data.languages={a: 1}", "field 'data.languages' expects a list of str"),
    ("loss.divergence=foo", "field 'loss.divergence' must be one of ['akl', 'fkl', 'jsd', 'rkl', 'tvd'], got 'foo'"),
    ("train.lrr=1", "unknown config key 'train.lrr' (did you mean 'train.lr'?)"),
    ("trian.lr=1", "unknown config key 'trian.lr' (did you mean 'train.lr'?)"),
    ("lr=1", "unknown config key 'lr'"),
    ("train.batchsize=2", "(did you mean 'train.batch_size'?)"),
    ("train.learning_rate=1e-5", "(did you mean 'train.lr'?)"),  # HF TrainingArguments names
    ("num_train_epochs=1", "(did you mean 'train.epochs'?)"),
    ("train.lr", "must look like section.key=value"),
    ("loss.chunk_size=-2", "field 'loss.chunk_size' must be >= -1, got -2"),
    ("loss.top_k=0", "field 'loss.top_k' must be >= 1, got 0"),
])
def test_bad_overrides_say_what_is_wrong(override, message):
    with pytest.raises(MsdError) as err:
        load_config(None, [override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_every_choice_is_accepted():
    for key, options in CHOICES.items():
        for option in options:
            cfg = load_config(None, [f"{key}={option}"])
            section, name = key.split(".")
            assert getattr(getattr(cfg, section), name) == option


@pytest.mark.parametrize("data, message", [
    ({"trainn": {"lr": 1}}, "unknown config section 'trainn' (did you mean 'train'?)"),
    ({"train": {"lrr": 1}}, "unknown config key 'train.lrr' (did you mean 'train.lr'?)"),
    ({"train": [1, 2]}, "section 'train' must be a mapping"),
    (["train"], "the config must be a mapping"),
    ({"train": {"lr": "fast"}}, "field 'train.lr' expects float"),
])
def test_bad_yaml_content(data, message):
    with pytest.raises(MsdError) as err:
        from_dict(data, "x.yaml")
    assert str(err.value).startswith("x.yaml: ") and message in str(err.value)


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("train:\n  lr: 1\n  batch_size: [1, 2\nloss:\n")
    with pytest.raises(MsdError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}:") and "invalid YAML" in str(err.value)
    line = int(str(err.value).split(":")[1])
    assert 3 <= line <= 5


def test_missing_config_file(tmp_path):
    with pytest.raises(MsdError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_describe_documents_every_key_once():
    listed: dict[str, list[str]] = {}
    section = None
    for line in describe().splitlines():
        if not line.startswith(" "):
            section = line.rstrip(":")
            listed[section] = []
        elif not line.startswith("    "):
            listed[section].append(line.split(" (default ")[0].strip())
    want = {name: [f.name for f in dataclasses.fields(section)] for name, section in sections(Config()).items()}
    assert listed == want and "baseline" in want  # the registered sections too
    for section in sections(Config()).values():
        for f in dataclasses.fields(section):
            assert f.metadata["help"] in describe()


def test_quoting_hint_for_yaml_booleans_in_text_fields(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("train:\n  mixed_precision: no\n")
    with pytest.raises(MsdError, match="quote the value"):
        load_config(path)
    path.write_text("train:\n  mixed_precision: 'no'\n")
    assert load_config(path).train.mixed_precision == "no"


def test_auto_chunk_size_depends_on_the_device():
    from msd.config import chunk_size_for

    auto = load_config(None, []).loss
    assert auto.chunk_size == -1
    assert chunk_size_for(auto, "cpu") == 48 and chunk_size_for(auto, "cuda") == 512
    assert chunk_size_for(auto, "cpu", shared_head=False) == 64
    assert chunk_size_for(auto, "cuda", shared_head=False) == 512
    fixed = load_config(None, ["loss.chunk_size=0"]).loss
    assert chunk_size_for(fixed, "cpu") == 0 and chunk_size_for(fixed, "cuda") == 0
    assert chunk_size_for(load_config(None, ["loss.chunk_size=7"]).loss, "cuda") == 7
