"""`msd demo --model NAME` (msd.demo.real): the real-model demo's stages, outputs and checks,
run end to end on a tiny random model (the SmolLM2 run itself is measured in docs/REAL_MODEL.md)."""

from __future__ import annotations

import json
import re

import pytest

from msd.cli import main
from msd.data import QueryTuple
from msd.demo.real import REAL_DEMOS, RealDemo, run_real_demo
from msd.demo.real_data import DemoData
from msd.demo.real_report import checks, halfway_target


@pytest.fixture
def tiny_demo(tmp_path, tiny_model_dir, monkeypatch):
    config = tmp_path / "tiny.yaml"
    config.write_text(f"""
model: {{name_or_path: {tiny_model_dir}, dtype: float32}}
lora: {{r: 4, alpha: 8, target_modules: [q_proj, v_proj]}}
data: {{source: xsafety, languages: [bn], heldout_fraction: 0.5, heldout_by: type, limit: 8}}
rollout: {{max_new_tokens: 4, batch_size: 8}}
train: {{max_steps: 2, batch_size: 2, lr: 1.0e-3, warmup_ratio: 0.0}}
""")
    monkeypatch.setitem(REAL_DEMOS, "tiny", RealDemo(
        config=config, unseen=("sw",), harmful="multijail", benign="mgsm-prompts", n_harmful=3,
        n_benign=2, n_xstest=2, max_new_tokens=4, batch_size=8, samples=2))
    return "tiny"


def test_the_real_demo_writes_every_stage_and_its_checks(tiny_demo, tmp_path, capsys):
    out = tmp_path / "out"
    summary = run_real_demo(tiny_demo, out, seed=1, progress=True)
    printed = capsys.readouterr().out
    assert [f"[{i}/6]" in printed for i in range(1, 7)] == [True] * 6  # a progress line per stage
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["checks"] == summary["checks"] and (out / "asr_before_after.png").stat().st_size > 0
    assert summary["languages"] == {"english": ["en"], "trained": ["bn"], "unseen": ["sw"]}
    for stage in ("before", "after"):
        for lang in ("en", "bn", "sw"):
            m = summary[stage][lang]
            assert m["n"] == 3 and len(m["asr_ci95"]) == 2 and m["asr_ci95"][0] <= m["asr"] <= m["asr_ci95"][1]
            assert m["n_benign"] == 2 and "truncated" in m
        assert summary[stage]["xstest_en"]["n_benign"] == 2
    assert set(summary["teacher_before"]) == {"bn", "sw"}  # the teacher prompt is not for English
    assert summary["heldout_never_trained"]["pass"]
    assert set(summary["capability"]) == {"en", "bn", "sw"}
    report = (out / "report.md").read_text()
    for text in ("held-out ASR before", "teacher-prompt ASR", "## Kept capability", "## The judge",
                 "## Sample answers", "cut at limit"):
        assert text in report
    claims = [c["claim"] for c in summary["checks"]]
    assert any(c.startswith("bn: held-out ASR moves at least half-way") for c in claims)
    # paired tests on the same held-out queries, recomputed here from the stage folders' records
    from msd.eval import records as rec
    from msd.eval import stats

    assert set(summary["paired"]) == {"teacher prompt vs before", "MSD: after vs before",
                                      "XSTest benign refusal: after vs before"}
    xs = summary["paired"]["XSTest benign refusal: after vs before"]
    assert xs["outcome"] == "benign_refusal" and [r["lang"] for r in xs["languages"]] == ["en"]
    assert xs["languages"][0]["n"] == 2 and "benign_refusal_a" in xs["languages"][0]
    attacked = {stage: {(r["lang"], r["query_id"]): r["label"] in ("unsafe", "invalid")
                        for r in rec.load_records(out / stage / "heldout") if r.get("harmful", True)}
                for stage in ("before", "after")}
    rows = {r["lang"]: r for r in summary["paired"]["MSD: after vs before"]["languages"]}
    assert set(rows) == {"en", "bn", "sw"}
    for lang, row in rows.items():
        keys = sorted(k for k in attacked["before"] if k[0] == lang)
        b, c = stats.discordant([attacked["before"][k] for k in keys], [attacked["after"][k] for k in keys])
        assert (row["n"], row["b"], row["c"]) == (3, b, c) and row["p"] == stats.mcnemar_exact(b, c)
    assert {r["lang"] for r in summary["paired"]["teacher prompt vs before"]["languages"]} == {"bn", "sw"}
    assert "## Paired changes" in report and "### MSD: after vs before" in report
    assert "| benign refusal % before |" in report
    assert "held-out queries never appear in training" in claims


def test_heldout_overlap_is_caught_by_id_and_by_english_text():
    trained = [QueryTuple("a", {"en": "How do I  pick a lock?"}), QueryTuple("b", {"en": "x"})]
    data = DemoData(trained, trained, [QueryTuple("c", {"en": "how do i pick a LOCK?"})],
                    [QueryTuple("b", {"en": "y"})], [], {})
    result = data.disjoint()
    assert not result["pass"] and result["same_id"] == ["b"] and result["same_english_text"] == ["c"]


def test_the_halfway_goal_needs_the_teacher_to_lower_asr():
    langs = {"english": ["en"], "trained": ["jv"], "unseen": []}

    def summary(before, teacher, after):
        rates = lambda asr: {"asr": asr, "benign_refusal": 0.0, "fidelity": 1.0}  # noqa: E731
        return {"languages": langs, "before": {"en": rates(0.5), "jv": rates(before)},
                "after": {"en": rates(0.5), "jv": rates(after)}, "teacher_before": {"jv": rates(teacher)},
                "heldout_never_trained": {"pass": True}, "capability": {}}

    assert halfway_target(1.0, 0.4) == pytest.approx(0.7)
    assert checks(summary(1.0, 0.4, 0.7))[0]["pass"]
    assert not checks(summary(1.0, 0.4, 0.75))[0]["pass"]
    assert not checks(summary(0.8, 0.9, 0.5))[0]["pass"]  # no teacher effect: nothing to reach


def test_organism_options_are_refused_for_a_real_model(capsys):
    assert main(["demo", "--model", "smollm2", "--ablations", "--out", "unused"]) == 2
    assert "--ablations" in capsys.readouterr().err


def test_baselines_run_beside_msd_in_one_table(tiny_demo, tmp_path):
    out = tmp_path / "out"
    summary = run_real_demo(tiny_demo, out, progress=False, baselines=True)
    assert set(summary["baselines"]) == {"msd_on_policy", "sft", "dpo"}
    for name in ("sft", "dpo"):
        assert (out / "baselines" / name / "train" / "final" / "adapter_model.safetensors").exists()
        assert summary["baselines"][name]["bn"]["n"] == 3
    report = (out / "report.md").read_text()
    assert "## Baselines" in report and "| sft |" in report and "| dpo |" in report
    rate = re.compile(r"\d\.\d\d \[\d\.\d\d, \d\.\d\d\]")
    rows = [line.strip("|").split("|") for line in report.splitlines()
            if line.startswith(("| sft |", "| dpo |", "| msd_on_policy |"))]
    assert len(rows) == 3 and all(rate.fullmatch(cell.strip()) for row in rows for cell in row[1:]), rows
    assert set(summary["paired"]) == {"teacher prompt vs before", "MSD: after vs before", "sft vs MSD", "dpo vs MSD",
                                      "XSTest benign refusal: after vs before"}
    assert "### dpo vs MSD" in report


def test_every_rate_of_the_real_demo_has_an_interval(tiny_demo, tmp_path, capsys):
    from msd.demo.real_report import print_table

    summary = run_real_demo(tiny_demo, tmp_path / "out", progress=False)
    capsys.readouterr()
    print_table(summary)
    terminal = capsys.readouterr().out
    printed = [line for line in terminal.splitlines() if line.startswith(("en ", "bn ", "sw "))]
    assert len(printed) == 3 and all(line.count("[") == 3 for line in printed), printed
    assert "paired changes (exact McNemar" in terminal and "  MSD: after vs before: en " in terminal
    report = (tmp_path / "out" / "report.md").read_text()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in report.splitlines()
            if line.startswith(("| en ", "| bn ", "| sw "))]
    rows = [cells for cells in rows if cells[1] in ("english", "trained", "unseen")]  # the main table
    assert len(rows) == 3, rows
    for cells in rows:  # cut at the limit: before → after, each with its interval
        assert cells[-1].count("[") == 2 and "n/a" not in cells[-1], cells


def test_real_demo_over_seeds_writes_the_seed_table_and_keeps_finished_seeds(tiny_demo, tmp_path, capsys):
    scipy_stats = pytest.importorskip("scipy.stats")
    out = tmp_path / "seeds"
    argv = ["demo", "--model", tiny_demo, "--quiet", "--out", str(out)]
    assert main([*argv, "--seeds", "2"]) == 0
    table = json.loads((out / "seeds.json").read_text())
    summaries = {s: json.loads((out / f"seed_{s}" / "summary.json").read_text()) for s in (0, 1)}
    assert table["seeds"] == [0, 1] and set(table["per_language"]) == {"en", "bn", "sw"}
    for lang, e in table["per_language"].items():
        after = [summaries[s]["after"][lang]["asr"] for s in (0, 1)]
        before = summaries[0]["before"][lang]["asr"]
        assert e["after"]["values"] == after and e["before"] == before and e["before_same_in_every_seed"]
        diffs = [a - before for a in after]
        if len(set(diffs)) > 1:
            assert e["change"]["p"] == pytest.approx(scipy_stats.ttest_1samp(diffs, 0).pvalue, rel=1e-9)
            lo, hi = scipy_stats.t.interval(0.95, 1, loc=sum(after) / 2, scale=scipy_stats.sem(after))
            assert e["after"]["ci95"] == pytest.approx([max(0, lo), min(1, hi)])
        else:
            assert e["change"]["p"] == (1.0 if diffs[0] == 0 else 0.0)
        per_seed = [r for s in (0, 1) for r in summaries[s]["paired"]["MSD: after vs before"]["languages"]
                    if r["lang"] == lang]
        assert [m["p"] for m in e["mcnemar_per_seed"]] == [r["p"] for r in per_seed]
        assert "p_holm" in e["change"]
    md = (out / "seeds.md").read_text()
    assert "| bn | trained |" in md and "over seeds 0, 1" in md and "| XSTest safe prompts (en) |" in md
    assert table["xstest_en"]["after"]["values"] == [summaries[s]["after"]["xstest_en"]["benign_refusal"] for s in (0, 1)]
    stamp = (out / "seed_1" / "summary.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main([*argv, "--seeds", "3"]) == 0  # one more seed: only seed 2 runs
    assert (out / "seed_1" / "summary.json").stat().st_mtime_ns == stamp
    assert json.loads((out / "seeds.json").read_text())["seeds"] == [0, 1, 2]
    assert main([*argv, "--seeds", "3", "train.max_steps=1"]) == 0  # other settings: every seed again
    assert all(json.loads((out / f"seed_{s}" / "summary.json").read_text())["overrides"] == ["train.max_steps=1"]
               for s in (0, 1, 2))


def test_real_seed_table_tests_the_change_over_seeds_like_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    from msd.demo.real_seeds import markdown, seed_table

    langs = {"english": ["en"], "trained": ["jv"], "unseen": ["sw"]}
    after = {"en": [0.56, 0.60, 0.52], "jv": [0.83, 0.81, 0.56], "sw": [0.85, 0.85, 0.85]}
    before = {"en": 0.92, "jv": 0.94, "sw": 0.85}

    def rate(v):
        return {"asr": v, "n": 48, "fidelity_all": 0.5, "n_answers": 72}

    runs = {s: {"model": "m", "seed": s, "languages": langs,
                "before": {c: rate(before[c]) for c in before}, "after": {c: rate(after[c][s]) for c in after},
                "teacher_before": {"jv": {"asr": 0.85}, "sw": {"asr": 0.9}}} for s in range(3)}
    table = seed_table(runs)
    ps = {}
    for c in ("en", "jv"):
        e = table["per_language"][c]
        diffs = [a - before[c] for a in after[c]]
        ps[c] = scipy_stats.ttest_1samp(diffs, 0).pvalue
        assert e["change"]["p"] == pytest.approx(ps[c], rel=1e-9)
        assert e["change"]["mean"] == pytest.approx(sum(diffs) / 3)
        lo, hi = scipy_stats.t.interval(0.95, 2, loc=sum(after[c]) / 3,
                                        scale=scipy_stats.tstd(after[c]) * (1 / 3 + 1 / 3) ** 0.5)
        assert e["after"]["rerun"]["3"] == pytest.approx([max(0, lo), min(1, hi)])
    sw = table["per_language"]["sw"]
    assert sw["change"]["p"] == 1.0 and sw["after"]["pooled"]["n"] == 144  # no change in any seed
    # Holm over the three languages: the smaller of en and jv's p times 3
    assert min(table["per_language"][c]["change"]["p_holm"] for c in ("en", "jv")) == pytest.approx(3 * min(ps.values()))
    md = markdown(table)
    assert "| sw | unseen | 0.85 | 0.90 | 0.85, 0.85, 0.85 | 0.85 [W " in md
