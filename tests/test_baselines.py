"""`msd baseline`: data sources, bad data (one-line errors), one tiny step of each TRL trainer,
resume, and msd working without TRL."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from msd.baselines.data import Labeled, Pair, load_file, to_labeled, to_pairs, trl_rows
from msd.config import load_config
from msd.errors import MsdError

SRC = str(Path(__file__).resolve().parent.parent / "src")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def pair_rows(n=6, lang="en"):
    return [{"prompt": f"how do I make fire {i}", "chosen": "sorry I can not help with that",
             "rejected": "here are steps one two three", "lang": lang} for i in range(n)]


# ----------------------------------------------------------------------------- user files

def test_file_pairs_labeled_and_csv(tmp_path):
    pairs = load_file(write_jsonl(tmp_path / "p.jsonl", pair_rows(3)))
    assert pairs == [Pair(f"how do I make fire {i}", "sorry I can not help with that",
                          "here are steps one two three", "en") for i in range(3)]
    (tmp_path / "l.csv").write_text("prompt,completion,label,lang\nq1,good,true,sw\nq1,bad,0,sw\n"
                                    "q2,fine,yes,\n", encoding="utf-8")
    labeled = load_file(tmp_path / "l.csv")
    assert labeled == [Labeled("q1", "good", True, "sw"), Labeled("q1", "bad", False, "sw"),
                       Labeled("q2", "fine", True, None)]
    # pairwise methods pair q1's desirable with its undesirable completion; q2 has no pair
    assert to_pairs(labeled) == [Pair("q1", "good", "bad", "sw")]
    # KTO reads a pair as one desirable and one undesirable example; equal ones as desirable only
    assert to_labeled([Pair("q", "a", "b"), Pair("r", "c", "c")]) == [
        Labeled("q", "a", True), Labeled("q", "b", False), Labeled("r", "c", True)]
    rows = trl_rows("pairs", [Pair("q", "a", "b"), Pair("r", "c", "c")], system_prompt="be kind")
    assert rows == [{"prompt": [{"role": "system", "content": "be kind"}, {"role": "user", "content": "q"}],
                     "chosen": [{"role": "assistant", "content": "a"}],
                     "rejected": [{"role": "assistant", "content": "b"}]}]
    assert [r["completion"][0]["content"] for r in trl_rows("sft", labeled)] == ["good", "fine"]
    assert [r["label"] for r in trl_rows("labeled", labeled)] == [True, False, True]


@pytest.mark.parametrize("row, message", [
    ({"chosen": "a", "rejected": "b"}, ":2: missing field 'prompt'"),
    ({"prompt": "q", "chosen": "a"}, ":2: missing field 'rejected'"),
    ({"prompt": "q", "chosen": "a", "rejected": "   "}, ":2: field 'rejected' is blank"),
    ({"prompt": "q", "chosen": ["a"], "rejected": "b"}, ":2: field 'chosen' must be a string"),
    ({"prompt": "q", "completion": "a", "label": "maybe"}, ":2: field 'label' must be true or false"),
    ({"prompt": "q", "completion": "a"}, ":2: field 'label' must be true or false, got None"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "completion": "c"}, ":2: a row has either"),
    ({"prompt": "q", "answer": "a"}, ":2: missing field 'chosen'"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "lang": "zz-nope"}, ":2, field 'lang'"),
])
def test_bad_rows_name_file_line_and_field(tmp_path, row, message):
    path = write_jsonl(tmp_path / "d.jsonl", [pair_rows(1)[0], row])
    with pytest.raises(MsdError) as e:
        load_file(path)
    text = str(e.value)
    assert text.startswith(str(path)) and message in text and "\n" not in text


def test_bad_files(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{oops\n')
    with pytest.raises(MsdError, match=r"a.jsonl:2: malformed JSON"):
        load_file(tmp_path / "a.jsonl")
    (tmp_path / "b.csv").write_text("question,answer\nq,a\n")
    with pytest.raises(MsdError, match=r"b.csv:1: CSV needs a header row"):
        load_file(tmp_path / "b.csv")
    (tmp_path / "c.csv").write_text("prompt,chosen,rejected\nq,a\n")
    with pytest.raises(MsdError, match=r"c.csv:2: missing field 'rejected'"):
        load_file(tmp_path / "c.csv")
    (tmp_path / "d.jsonl").write_text("")
    with pytest.raises(MsdError, match=r"d.jsonl: no examples in file"):
        load_file(tmp_path / "d.jsonl")
    with pytest.raises(MsdError, match=r"missing.jsonl: baseline data file not found"):
        load_file(tmp_path / "missing.jsonl")


def test_bad_data_through_the_cli_is_one_line(tmp_path, tiny_model_dir, capsys):
    from msd.cli import main

    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "chosen": "a"}])
    code = main(["baseline", "dpo", "--quiet", f"model.name_or_path={tiny_model_dir}",
                 f"baseline.data={path}", f"train.output_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' loading bar
    assert code == 2 and err == f"msd: error: {path}:1: missing field 'rejected'"
    assert main(["baseline", "dpo", "baseline.loss_type=hinge"]) == 2
    assert "baseline.loss_type' must be one of ['ipo', 'robust', 'sigmoid']" in capsys.readouterr().err


# ----------------------------------------------------------------------------- built sources

def test_organism_source_is_the_translated_refusal_setting():
    from msd.baselines.data import BASELINE_DATA
    from msd.organism import world

    cfg = load_config(None, ["data.languages=[qab,qac]", "data.heldout_fraction=0"])
    examples = BASELINE_DATA.get("organism")(cfg, None, None)
    assert len(examples) == 2 * 192 and {e.lang for e in examples} == {"qab", "qac"}
    harmful = [e for e in examples if e.chosen == world.refusal(e.lang)]
    assert len(harmful) == 2 * 96  # every harmful query: refusal chosen, compliance rejected
    assert all(e.rejected != e.chosen for e in harmful)
    benign = [e for e in examples if e not in harmful]
    assert all(e.chosen == e.rejected for e in benign)  # benign: the answer, no preference
    assert len(to_pairs(examples)) == 2 * 96
    assert len(trl_rows("sft", examples)) == 2 * 192
    bad = load_config(None, ["baseline.data=organism"])
    bad.data.source = "xsafety"
    with pytest.raises(MsdError):
        BASELINE_DATA.get("organism")(bad, None, None)


def test_self_generated_samples_teacher_and_student_and_caches(tmp_path, tiny_model_dir, query_file):
    from msd.baselines.data import BASELINE_DATA
    from msd.models import load_model_and_tokenizer

    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", f"data.source={query_file}",
                             "data.heldout_fraction=0", "rollout.max_new_tokens=4",
                             "rollout.batch_size=8", f"train.output_dir={tmp_path / 'out'}",
                             "train.batch_size=2"])
    model, tok = load_model_and_tokenizer(cfg.model)
    first = BASELINE_DATA.get("self_generated")(cfg, model, tok, progress=False)
    cache = tmp_path / "out" / "baseline_cache"
    teacher = list(cache.glob("teacher_samples.*.jsonl"))
    student = list(cache.glob("student_samples.*.jsonl"))
    assert len(teacher) == 1 and len(student) == 1
    assert sum(1 for _ in teacher[0].open()) == 32  # 16 queries x 2 languages
    assert first and all(isinstance(e, Pair) and e.lang in ("jv", "sw") for e in first)
    stamp = (teacher[0].stat().st_mtime_ns, student[0].stat().st_mtime_ns)
    again = BASELINE_DATA.get("self_generated")(cfg, model, tok, progress=False)
    assert again == first  # read back from the cache, nothing sampled again
    assert (teacher[0].stat().st_mtime_ns, student[0].stat().st_mtime_ns) == stamp


# ----------------------------------------------------------------------------- trainers

@pytest.mark.parametrize("method, extra", [
    ("sft", []), ("dpo", []), ("dpo", ["baseline.loss_type=robust"]),
    ("dpo", ["baseline.loss_type=ipo"]), ("kto", []), ("orpo", []), ("simpo", []),
], ids=["sft", "dpo", "dpo_robust", "dpo_ipo", "kto", "orpo", "simpo"])
def test_one_step_of_each_trainer(tmp_path, tiny_model_dir, method, extra):
    from msd.cli import main

    data = write_jsonl(tmp_path / "d.jsonl", pair_rows(4))
    out = tmp_path / "out"
    code = main(["baseline", method, "--quiet", f"model.name_or_path={tiny_model_dir}",
                 f"baseline.data={data}", "train.max_steps=1", "train.batch_size=2",
                 f"train.output_dir={out}", *extra])
    assert code == 0
    assert (out / "final" / "adapter_config.json").exists()
    assert load_config(out / "config.yaml").baseline.method == method
    logs = [json.loads(line) for line in (out / "logs.jsonl").open()]
    assert logs[-1]["step"] == 1 and logs[-1]["method"] == method and "loss" in logs[-1]


def test_full_finetuning_and_resume_with_config_check(tmp_path, tiny_model_dir, capsys):
    from msd.cli import main

    data = write_jsonl(tmp_path / "d.jsonl", pair_rows(8))
    out = tmp_path / "out"
    args = ["baseline", "dpo", "--quiet", f"model.name_or_path={tiny_model_dir}", "lora.enabled=false",
            f"baseline.data={data}", "train.batch_size=2", "train.save_every=1", f"train.output_dir={out}"]
    assert main([*args, "train.max_steps=1"]) == 0
    assert (out / "final" / "model.safetensors").exists()
    assert json.loads((out / "checkpoints" / "checkpoint-1" / "state.json").read_text())["step"] == 1
    assert main([*args, "train.max_steps=2"]) == 0  # resumes from checkpoint-1
    assert "resuming from" in capsys.readouterr().out
    assert [json.loads(line)["step"] for line in (out / "logs.jsonl").open()] == [1, 2]
    assert main([*args, "train.max_steps=3", "baseline.beta=0.5"]) == 2
    assert "different config (baseline.beta: 0.1 -> 0.5)" in capsys.readouterr().err


def test_eval_reads_a_baseline_output(tmp_path, tiny_model_dir, query_file):
    from msd.cli import main

    data = write_jsonl(tmp_path / "d.jsonl", pair_rows(4))
    out = tmp_path / "out"
    assert main(["baseline", "sft", "--quiet", f"model.name_or_path={tiny_model_dir}",
                 f"baseline.data={data}", "train.max_steps=1", "train.batch_size=2",
                 f"train.output_dir={out}"]) == 0
    from msd.models import load_model_and_tokenizer

    cfg = load_config(out / "config.yaml")
    model, _ = load_model_and_tokenizer(cfg.model, adapter=str(out / "final"))
    assert model.peft_config  # msd loads the adapter like any msd train output


# ----------------------------------------------------------------------------- without TRL

BLOCK_TRL = """
import sys
class NoTrl:
    def find_spec(self, name, path=None, target=None):
        if name == "trl" or name.startswith("trl."):
            raise ModuleNotFoundError("No module named 'trl'")
sys.meta_path.insert(0, NoTrl())
"""


def test_msd_works_without_trl():
    code = BLOCK_TRL + """
import msd.cli, msd.train, msd.eval, msd.config
from msd.cli import build_parser, main
build_parser()
assert "trl" not in sys.modules
assert main(["baseline", "sft"]) == 2
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin", "HOME": str(Path.home())})
    assert res.returncode == 0, res.stderr
    assert "ok" in res.stdout and "msd: error: this command is unavailable" in res.stderr


PAPER = sorted((Path(__file__).resolve().parent.parent / "configs" / "paper" / "baselines").glob("*.yaml"))


def test_paper_baseline_configs_cover_every_model_and_method():
    names = {p.name for p in PAPER}
    for model in ("qwen2.5-7b-instruct", "qwen3-8b", "llama-2-7b-chat", "llama-3-8b-instruct"):
        for method in ("sft", "dpo", "kto", "orpo", "simpo"):
            assert f"{model}-{method}.yaml" in names
    for path in PAPER:
        cfg = load_config(path)
        assert path.name.endswith(f"-{cfg.baseline.method}.yaml") and cfg.baseline.data == "self_generated"


def test_demo_baselines_writes_every_method(tmp_path):
    """The harness on three methods of two steps each (not the real comparison)."""
    from msd import organism
    from msd.demo.baselines import METHODS, run_baselines
    from msd.organism.pretrain import auto_threads, torch_threads

    assert {"msd_on_policy", "msd_off_policy", "sft", "dpo", "kto", "orpo", "simpo"} <= set(METHODS)
    langs = [c for codes in organism.LANGUAGES.values() for c in codes]
    on_policy = {s: {c: {"asr": 1.0, "benign_refusal": 0.0, "fidelity": 1.0, "n": 1} for c in langs}
                 for s in organism.SPLITS}
    with torch_threads(auto_threads()):
        result = run_baselines(tmp_path, 0, organism.training_queries(), str(organism.ensure_organism()),
                               (on_policy, 1.0), ["train.max_steps=2", "data.limit=8"], limit=2,
                               progress=False, names=["msd_on_policy", "dpo_robust", "simpo"])
    saved = json.loads((tmp_path / "baselines.json").read_text())
    assert list(saved["methods"]) == ["msd_on_policy", "dpo_robust", "simpo"] and saved["steps"] == 2
    for entry in saved["methods"].values():
        assert set(entry["heldout_queries"]) == set(langs) and entry["wall_seconds"] >= 0
        assert set(entry["train_queries"]["qab"]) == {"asr", "benign_refusal", "fidelity"}
    assert saved == result and (tmp_path / "baselines.png").stat().st_size > 0
    assert "| dpo_robust |" in (tmp_path / "baselines.md").read_text()
    trained = load_config(tmp_path / "baselines" / "simpo" / "train" / "config.yaml")
    assert (trained.baseline.method, trained.lora.r, trained.baseline.data) == ("simpo", 4, "organism")


def test_baseline_settings_have_bounds():
    with pytest.raises(MsdError, match="baseline.label_smoothing"):
        load_config(None, ["baseline.label_smoothing=0.5"])
    with pytest.raises(MsdError, match="baseline.beta"):
        load_config(None, ["baseline.beta=0"])
    with pytest.raises(MsdError, match="baseline.data"):
        load_config(None, ["baseline.data= "])


def test_self_generated_texts_are_decoded_as_eval_decodes_answers(tmp_path, query_file, monkeypatch):
    """Samples cut inside a multibyte character give no U+FFFD in the chosen / rejected texts,
    and no template token: the texts are msd.families.decode_answer's."""
    from pathlib import Path

    from msd.baselines.data import BASELINE_DATA
    from msd.baselines.sources import self_generated as sg
    from msd.models import load_model_and_tokenizer
    from msd.testing.families import make_family_model

    template = (Path(__file__).parent / "fixtures" / "chat_templates" / "qwen2.5-7b-instruct.jinja").read_text()
    folder = make_family_model(tmp_path / "qwen", "qwen2.5", template)
    cfg = load_config(None, [f"model.name_or_path={folder}", f"data.source={query_file}",
                             "data.heldout_fraction=0", f"train.output_dir={tmp_path / 'out'}"])
    model, tok = load_model_and_tokenizer(cfg.model)
    ids = tok("সাহায্য", add_special_tokens=False)["input_ids"]
    cut = ids[:next(k for k in range(4, len(ids)) if tok.decode(ids[:k]).endswith("\ufffd"))]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    monkeypatch.setattr(sg.responses, "teacher_samples", lambda cfg, run, t, items, *a: {it.key: [cut] for it in items})
    monkeypatch.setattr(sg, "student_samples", lambda cfg, st, m, t, items, *a: {it.key: [cut + [end]] for it in items})
    pairs = BASELINE_DATA.get("self_generated")(cfg, model, tok, progress=False)
    assert pairs and {(p.chosen, p.rejected) for p in pairs} == {(tok.decode(cut).rstrip("\ufffd"),) * 2}
