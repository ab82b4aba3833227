"""Bad input gets one clear line through the CLI: `msd: error: <where>: <problem>`, exit code 2,
no traceback (unless --debug). Each case names the file, line or field at fault."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from conftest import write_queries
from msd.cli import main
from msd.errors import MsdError


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second thread only adds contention


@pytest.fixture(scope="module")
def env(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    no_template = root / "no_template"
    shutil.copytree(tiny_model_dir, no_template)
    (no_template / "chat_template.jinja").unlink(missing_ok=True)
    tok_cfg = json.loads((no_template / "tokenizer_config.json").read_text())
    tok_cfg.pop("chat_template", None)
    (no_template / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    (root / "no_config").mkdir()
    (root / "a_file").write_text("not a folder\n")
    return {"root": root, "model": str(tiny_model_dir), "queries": write_queries(root / "q.jsonl", n=6),
            "no_template": str(no_template)}


def train_argv(env, *overrides, out="run") -> list[str]:
    return ["train", "--quiet", f"model.name_or_path={env['model']}", f"data.source={env['queries']}",
            f"train.output_dir={env['root'] / out}", "train.batch_size=2", "train.max_steps=1",
            "rollout.max_new_tokens=4", *overrides]


def queries(env, name: str, text: str) -> str:
    path = env["root"] / name
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return f"data.source={path}"


def yaml_config(env, name: str, text: str) -> list[str]:
    path = env["root"] / name
    path.write_text(text)
    return ["train", "--config", str(path)]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# name -> (argv builder, substrings the error line must contain)
CASES = {
    "query file missing": (
        lambda e: train_argv(e, f"data.source={e['root'] / 'missing.jsonl'}"),
        ["missing.jsonl: query file not found"]),
    "query file not UTF-8": (
        lambda e: train_argv(e, queries(e, "latin1.jsonl", b'{"id": 1, "en": "a"}\n{"id": 2, "en": "caf\xe9"}\n')),
        ["latin1.jsonl:2: not UTF-8 text"]),
    "malformed JSONL line": (
        lambda e: train_argv(e, queries(e, "bad.jsonl", '{"id": 1, "en": "a"}\n{"id": 2, "en": }\n')),
        ["bad.jsonl:2: malformed JSON"]),
    "CSV row with more fields than the header": (
        lambda e: train_argv(e, queries(e, "bad.csv", "id,en,jv\n1,a,b\n2,a,b,c\n")),
        ["bad.csv:3: row has more fields than the header"]),
    "tuple without English": (
        lambda e: train_argv(e, queries(e, "noen.jsonl", '{"id": 1, "en": "a"}\n{"id": 2, "jv": "b"}\n')),
        ["noen.jsonl:2: tuple '2' has no English ('en') text"]),
    "whitespace-only query": (
        lambda e: train_argv(e, queries(e, "blank.jsonl", '{"id": 1, "en": "a", "jv": "  "}\n')),
        ["blank.jsonl:1: field 'jv' is empty or whitespace-only"]),
    "empty English query in CSV": (
        lambda e: train_argv(e, queries(e, "empty.csv", "id,en,jv\n1,a,b\n2,,b\n")),
        ["empty.csv:3: tuple '2' has no English"]),
    "duplicate ids": (
        lambda e: train_argv(e, queries(e, "dup.jsonl", '{"id": 7, "en": "a"}\n{"id": 7, "en": "b"}\n')),
        ["dup.jsonl:2: duplicate id '7' (first seen in tuple 1)"]),
    "unknown language code in the file": (
        lambda e: train_argv(e, queries(e, "lang.jsonl", '{"id": 1, "en": "a", "javanese": "b"}\n')),
        ["lang.jsonl:1, field 'javanese': unknown language code 'javanese'; known: ", "jv"]),
    "unknown config key": (
        lambda e: train_argv(e, "train.learning_rate=1e-5"),
        ["override 'train.learning_rate=1e-5': unknown config key 'train.learning_rate'",
         "did you mean 'train.lr'?"]),
    "unknown config section": (
        lambda e: yaml_config(e, "section.yaml", "trainer:\n  lr: 1.0e-5\n"),
        ["section.yaml: unknown config section 'trainer' (did you mean 'train'?)"]),
    "wrongly typed override": (
        lambda e: train_argv(e, "train.lr=abc"),
        ["override 'train.lr=abc': field 'train.lr' expects float, got 'abc'"]),
    "invalid choice": (
        lambda e: train_argv(e, "loss.divergence=foo"),
        ["field 'loss.divergence' must be one of ['akl', 'fkl', 'jsd', 'rkl', 'tvd'], got 'foo'"]),
    "invalid YAML": (
        lambda e: yaml_config(e, "broken.yaml", "train:\n  lr: 1.0e-5\n  batch_size: [2\n"),
        ["broken.yaml:", "invalid YAML"]),
    "missing config file": (
        lambda e: ["train", "--config", str(e["root"] / "nope.yaml")],
        ["nope.yaml: config file not found"]),
    "model path does not exist": (
        lambda e: train_argv(e, f"model.name_or_path={e['root'] / 'no_such_model'}"),
        ["no_such_model: model path does not exist"]),
    "model path is a file": (
        lambda e: train_argv(e, f"model.name_or_path={e['root'] / 'a_file'}"),
        ["a_file: model path is a file; expected a Hugging Face model folder"]),
    "model folder without config.json": (
        lambda e: train_argv(e, f"model.name_or_path={e['root'] / 'no_config'}"),
        ["no_config: model folder has no config.json"]),
    "tokenizer without chat template": (
        lambda e: train_argv(e, f"model.name_or_path={e['no_template']}"),
        ["model.chat_template: the tokenizer has no chat template; pass model.chat_template"]),
    "output folder not writable": (
        lambda e: train_argv(e, out="a_file/run"),
        ["a_file/run: output folder is not writable"]),
    "batch size larger than the data": (
        lambda e: train_argv(e, "train.batch_size=64"),
        ["train.batch_size: only 10 training items, fewer than train.batch_size x processes (64)"]),
    "unknown data.languages code": (
        lambda e: train_argv(e, "data.languages=jv,xx"),
        ["data.languages: unknown language code 'xx'; known: "]),
    "data.languages absent from the data": (
        lambda e: train_argv(e, "data.languages=bn"),
        ["data.languages: no training items"]),
    "--resume without a checkpoint": (
        lambda e: train_argv(e, "--resume", out="empty_run"),
        ["empty_run: --resume given but the output folder holds no checkpoint"]),
    "override without '='": (
        lambda e: train_argv(e, "train.lr"),
        ["override 'train.lr' must look like section.key=value"]),
    "teacher template without {query}": (
        lambda e: train_argv(e, "prompt.teacher_template=Answer in {language}"),
        ["prompt.teacher_template: teacher template must contain {query}"]),
    "judge endpoint down": (
        lambda e: ["eval", "safety", "--model", e["model"], "--benchmark", e["queries"], "--langs", "jv",
                   "--limit", "1", "--max-new-tokens", "2", "--judge", "llm", "--judge-model", "m",
                   "--judge-base-url", f"http://127.0.0.1:{closed_port()}/v1", "--judge-retries", "1",
                   "--judge-cache-dir", str(e["root"] / "judge_cache"), "--out", str(e["root"] / "ev"),
                   "--quiet"],
        ["judge endpoint unreachable after 1 tries", "rerun to continue"]),
}


def error_line(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert "Traceback" not in err
    tail = err[err.index("msd: error: "):]
    assert tail.endswith("\n") and tail.count("\n") == 1, tail  # one line, and the last thing printed
    return tail.strip()


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_line_error(env, capsys, case):
    build, needles = CASES[case]
    line = error_line(capsys, build(env))
    for needle in needles:
        assert needle in line


@pytest.fixture(scope="module")
def finished_run(env):
    assert main(train_argv(env, out="done")) == 0
    return env["root"] / "done"


def test_checkpoint_from_a_different_config(env, finished_run, capsys):
    line = error_line(capsys, train_argv(env, "lora.r=4", "train.lr=2e-4", out="done"))
    assert line.startswith(f"msd: error: {finished_run / 'checkpoints' / 'step_1'}: "
                           "checkpoint was made with a different config (lora.r: 16 -> 4, "
                           "train.lr: 1e-05 -> 0.0002); use a new train.output_dir")


@pytest.mark.parametrize("name, damage, problem", [
    ("trainable.safetensors", b"garbage", "cannot read checkpoint (SafetensorError: "),
    ("optimizer.pt", b"PK\x03\x04 truncated", "cannot read checkpoint ("),
    ("state.json", b'{"step": ', "cannot read checkpoint state (JSONDecodeError: "),
])
def test_damaged_checkpoint(env, finished_run, tmp_path, capsys, name, damage, problem):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    ckpt = run / "checkpoints" / "step_1"
    (ckpt / name).write_bytes(damage)
    line = error_line(capsys, train_argv(env, out=run))
    assert line.startswith(f"msd: error: {ckpt}: {problem}")
    assert "remove this folder to resume from the one before" in line


def test_chat_template_option_rescues_a_tokenizer_without_one(env, tmp_path):
    from msd.config import ModelConfig
    from msd.models import load_model_and_tokenizer
    from msd.testing import CHAT_TEMPLATE

    (tmp_path / "t.jinja").write_text(CHAT_TEMPLATE)
    for template in (str(tmp_path / "t.jinja"), CHAT_TEMPLATE):
        _, tok = load_model_and_tokenizer(ModelConfig(name_or_path=env["no_template"],
                                                      chat_template=template))
        assert tok.chat_template == CHAT_TEMPLATE


def test_overrides_may_follow_options(env, capsys):
    # argparse alone stops collecting overrides at the first option
    line = error_line(capsys, ["train", "--quiet", "train.lr=1e-5", "--no-resume", "train.lrr=1"])
    assert "unknown config key 'train.lrr'" in line


def test_debug_shows_the_traceback(env):
    with pytest.raises(MsdError, match="expects float"):
        main(["--debug", *train_argv(env, "train.lr=abc")])


def test_real_process_prints_one_line_and_exits_2(env):
    """The installed entry point, as a user runs it (config errors stop before the heavy imports)."""
    proc = subprocess.run([sys.executable, "-m", "msd.cli", "train", "loss.weighting=dspw"],
                          capture_output=True, text=True, env={**os.environ, "MSD_DEBUG": ""})
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("msd: error: override 'loss.weighting=dspw': field 'loss.weighting' "
                                  "must be one of") and proc.stderr.count("\n") == 1
