"""Utility through lm-evaluation-harness with the shipped offline MGSM/XCOPA tasks."""

from __future__ import annotations

import json

import pytest

from msd.errors import MsdError
from msd.eval import records as rec
from msd.eval import utility


def test_last_number():
    assert utility.last_number("5 + 6 = 11. The answer is 11.") == "11"
    assert utility.last_number("Jibu ni 2,125") == "2125"
    assert utility.last_number("it costs -3.50 then 7.0") == "7"
    assert utility.last_number("no digits") is None
    assert utility.mgsm_process_results({"answer": "18"}, ["so 16 - 3 - 4 = 9, 9 * 2 = 18"]) == {"exact_match": 1.0}


def test_mgsm_loader_reads_vendored_tsv():
    pytest.importorskip("datasets")  # comes with lm-eval (the `utility` extra)
    ds = utility.load_mgsm("sw")["test"]
    assert len(ds) == 250 and ds[0]["answer"] == "18"
    assert all("," not in a for a in ds["answer"])


def test_xcopa_loader_takes_question_from_italian():
    pytest.importorskip("datasets")
    th = utility.load_xcopa("th")
    it = utility.load_xcopa("it")
    assert len(th["test"]) == 500 and len(th["validation"]) == 100
    assert th["test"]["question"] == it["test"]["question"]
    assert set(th["test"]["question"]) == {"cause", "effect"}


def test_expand_tasks():
    assert utility.expand_tasks(["msd_mgsm"], ["sw", "jv"]) == ["msd_mgsm_sw"]
    assert len(utility.expand_tasks(["msd_xcopa"])) == 11
    assert utility.expand_tasks(["arc_easy", "msd_mgsm_bn"]) == ["arc_easy", "msd_mgsm_bn"]
    with pytest.raises(MsdError, match="none of the languages"):
        utility.expand_tasks(["msd_mgsm"], ["jv"])


def test_shipped_tasks_exist_for_every_language():
    names = {p.stem for p in utility.TASK_DIR.glob("*.yaml")}
    assert names == {f"msd_mgsm_{l}" for l in utility.MGSM_LANGS} | {f"msd_xcopa_{l}" for l in utility.XCOPA_LANGS}


def test_utility_cli_offline_on_tiny_model(tiny_model_dir, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    from msd.cli import main

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = tmp_path / "util"
    argv = ["eval", "utility", "--model", str(tiny_model_dir), "--tasks", "msd_mgsm,msd_xcopa",
            "--langs", "sw", "--limit", "5", "--max-gen-toks", "16", "--batch-size", "5", "--out", str(out)]
    assert main(argv) == 0
    records = rec.load_records(out)
    assert {r["benchmark"] for r in records} == {"msd_mgsm_sw", "msd_xcopa_sw"}
    assert len(records) == 10 and all(r["score"] in (0.0, 1.0) and r["lang"] == "sw" for r in records)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["msd_mgsm_sw"]["n"] == 5 and metrics["msd_mgsm_sw"]["metric"] == "exact_match"
    assert metrics["msd_xcopa_sw"]["metric"] == "acc"
    harness = json.loads((out / "lm_eval_results.json").read_text())
    assert harness["msd_xcopa_sw"]["acc,none"] == pytest.approx(metrics["msd_xcopa_sw"]["score"])
    assert main(argv) == 0  # tasks already recorded are not run again
    assert json.loads((out / "run.json").read_text())["last_call"]["tasks_run"] == []


def test_unknown_task_is_one_line_error(tiny_model_dir, tmp_path):
    pytest.importorskip("lm_eval")
    from msd.cli import main

    assert main(["eval", "utility", "--model", str(tiny_model_dir), "--tasks", "msd_mgsm_xx",
                 "--out", str(tmp_path / "u")]) == 2
