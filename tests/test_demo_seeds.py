"""`msd demo --seeds N`: the seed table (from hand-made records, against scipy) and the runner
(two seeds of two variants of two steps: the machinery, not the comparison)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from msd.demo import seeds as S
from msd.demo import seedtable as T
from msd.eval import records as rec
from msd.organism import LANGUAGES

scipy_stats = pytest.importorskip("scipy.stats")

UNSEEN = LANGUAGES["unseen"][0]
ALL = [c for codes in LANGUAGES.values() for c in codes]


def write_variant(out, seed: int, variant: str, unseen_attacked: int, n: int = 20):
    """A finished (seed, variant): every language safe except `unseen_attacked` of n held-out
    queries in the unseen language."""
    vdir = out / f"seed_{seed}" / variant
    write_eval(vdir / "eval", unseen_attacked, n)
    (vdir / "done.json").write_text(json.dumps({"seed": seed, "variant": variant, "overrides": {}}))


def write_eval(folder, unseen_attacked: int, n: int = 20):
    for split in T.SPLITS:
        records = []
        for lang in ALL:
            for q in range(n):
                bad = split == "heldout_queries" and lang == UNSEEN and q < unseen_attacked
                records.append({"benchmark": f"organism-{split}", "lang": lang, "query_id": f"q{q}",
                                "sample": 0, "label": "unsafe" if bad else "safe", "harmful": True,
                                "refused": not bad, "response_lang": lang})
            records.append({"benchmark": f"organism-{split}", "lang": lang, "query_id": "b0", "sample": 0,
                            "label": "safe", "harmful": False, "refused": False, "response_lang": lang})
        rec.compact(folder / split, records)


BASE = [4, 3, 5, 2, 4]
OFF = [10, 2, 9, 8, 11]


def test_seed_table_intervals_and_paired_tests_equal_scipy(tmp_path):
    for s, (a, b) in enumerate(zip(BASE, OFF)):
        write_variant(tmp_path, s, "msd_on_policy", a)
        write_variant(tmp_path, s, "msd_off_policy", b)
    write_variant(tmp_path, 0, "sft", 1)  # one seed: no interval, no paired test
    table = T.write_seed_table(tmp_path)
    base, off = (table["variants"][v] for v in ("msd_on_policy", "msd_off_policy"))
    x, y = [a / 20 for a in BASE], [b / 20 for b in OFF]
    assert base["mean"]["asr_unseen"]["values"] == pytest.approx(x)
    lo, hi = scipy_stats.t.interval(0.95, 4, loc=sum(x) / 5, scale=scipy_stats.sem(x))
    assert base["mean"]["asr_unseen"]["ci95"] == pytest.approx([lo, hi])
    boot = base["mean"]["asr_unseen"]["ci95_bootstrap"]
    assert min(x) <= boot[0] < boot[1] <= max(x)
    test = off["vs_base"]["asr_unseen"]
    assert test["diff"] == pytest.approx(sum(y) / 5 - sum(x) / 5)
    assert test["p"] == pytest.approx(scipy_stats.ttest_rel(y, x).pvalue, rel=1e-9)
    # pooled McNemar: on-policy's attacked queries are a subset of off-policy's in every seed but 1
    b = sum(max(0, a - o) for a, o in zip(BASE, OFF))
    c = sum(max(0, o - a) for a, o in zip(BASE, OFF))
    assert (test["mcnemar"]["b"], test["mcnemar"]["c"]) == (b, c)
    assert test["mcnemar"]["p"] == pytest.approx(scipy_stats.binomtest(b, b + c, 0.5).pvalue)
    # a rerun of 3 new seeds: the t prediction interval of the differences' mean
    d = [v - u for u, v in zip(x, y)]
    lo, hi = scipy_stats.t.interval(0.95, 4, loc=sum(d) / 5, scale=np.std(d, ddof=1) * (1 / 5 + 1 / 3) ** 0.5)
    assert test["rerun"]["3"] == pytest.approx([max(-1, lo), min(1, hi)])
    assert base["mean"]["asr_unseen"]["rerun"]["10"][0] <= base["mean"]["asr_unseen"]["ci95"][0]
    # sft has one seed: its Wilson interval, and McNemar on its seed (b = 4 - 1, c = 0)
    sft = table["variants"]["sft"]
    assert sft["mean"]["asr_unseen"]["ci95"] is None
    assert sft["mean"]["asr_unseen"]["pooled"]["ci95"] == pytest.approx(list(
        scipy_stats.binomtest(1, 20).proportion_ci(method="wilson")), abs=1e-5)
    one = sft["vs_base"]["asr_unseen"]
    assert one["test"].startswith("exact McNemar") and one["p"] == pytest.approx(0.25)
    assert test["p_holm"] == pytest.approx(min(1.0, 2 * min(test["p"], one["p"])) if test["p"] < one["p"]
                                           else max(2 * one["p"], test["p"]))
    md = (tmp_path / "seeds.md").read_text()
    assert "| msd_off_policy | 5 |" in md and "0.05 [W " in md
    rerun = test["rerun"]["5"]
    assert f"| [{rerun[0]:+.3f}, {rerun[1]:+.3f}] |" in md and "rerun, 5 new seeds" in md
    assert json.loads((tmp_path / "seeds.json").read_text())["variants"]["msd_off_policy"]["seeds"] == [0, 1, 2, 3, 4]


def test_variants_cover_ablations_and_baselines_once():
    from msd.demo.ablations import ABLATIONS
    from msd.demo.baselines import METHODS

    names = S.variants()
    assert set(METHODS) <= set(names) and len(names) == len(METHODS) + len(ABLATIONS) - 2
    assert S.ablation_names()[:3] == ["msd_on_policy", "msd_off_policy", "uniform_weights_no_dpsw"]
    assert S.parse_variants("sft", False, False) == ["sft"]
    assert S.parse_variants(None, False, True)[:3] == ["msd_on_policy", "msd_off_policy", "sft"]
    from msd.errors import MsdError

    with pytest.raises(MsdError, match="unknown variant 'nope'"):
        S.parse_variants("sft,nope", False, False)


def test_demo_seeds_runs_each_seed_and_variant_once(tmp_path, capsys):
    from msd.cli import main

    out = tmp_path / "seeds"
    argv = ["demo", "--seeds", "2", "--variants", "msd_on_policy,sft", "--eval-limit", "2", "--quiet",
            "--out", str(out), "train.max_steps=2", "data.limit=8"]
    assert main(argv) == 0
    table = json.loads((out / "seeds.json").read_text())
    assert set(table["variants"]) == {"msd_on_policy", "sft"}
    for v in table["variants"].values():
        assert v["seeds"] == [0, 1] and set(v["per_seed"]) == {"0", "1"}
        assert len(v["mean"]["asr_unseen"]["ci95"]) == 2
    assert "asr_unseen" in table["variants"]["sft"]["vs_base"]
    assert not (out / "seed_0" / "sft" / "train").exists()
    stamp = (out / "seed_1" / "sft" / "done.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(argv[:2] + ["3"] + argv[3:]) == 0  # one more seed: only seed 2 trains
    printed = capsys.readouterr().out
    assert "seed 2, sft" in printed and "seed 1, sft" not in printed
    rows = {line.split()[0]: line.split() for line in printed.splitlines() if line.startswith(("msd_on_policy ", "sft "))}
    assert rows["sft"][1] == "3" and rows["msd_on_policy"][1] == "3"  # the means table, with its seeds
    assert printed.count("[") >= 2 * 6 and "significant against msd_on_policy after Holm (5%):" in printed
    assert (out / "seed_1" / "sft" / "done.json").stat().st_mtime_ns == stamp


def test_single_seed_tables_get_wilson_intervals_and_mcnemar(tmp_path):
    """What `msd demo --ablations` / `--baselines` append to their tables (one seed)."""
    write_eval(tmp_path / "after", 2)
    write_eval(tmp_path / "ablations" / "01" / "eval", 12)
    folders = {"default": tmp_path / "after", "off-policy": tmp_path / "ablations" / "01" / "eval",
               "missing": tmp_path / "ablations" / "02" / "eval"}
    text = T.stats_section(tmp_path / "stats.json", folders, "default", 0)
    saved = json.loads((tmp_path / "stats.json").read_text())
    assert set(saved["variants"]) == {"default", "off-policy"}
    test = saved["variants"]["off-policy"]["vs_base"]["asr_unseen"]
    assert (test["mcnemar"]["b"], test["mcnemar"]["c"]) == (0, 10)
    assert test["p"] == pytest.approx(scipy_stats.binomtest(0, 10, 0.5).pvalue)
    assert "| off-policy | 1 |" in text and "0.60 [W 0.39, 0.78]" in text
    assert T.stats_section(tmp_path / "x.json", {"default": tmp_path / "none"}, "default", 0) == ""


def test_seed_intervals_stay_within_rates(tmp_path):
    write_variant(tmp_path, 0, "msd_on_policy", 0)
    write_variant(tmp_path, 1, "msd_on_policy", 6)  # mean 0.15, t interval with 1 df: far below 0
    m = T.write_seed_table(tmp_path)["variants"]["msd_on_policy"]["mean"]["asr_unseen"]
    assert m["ci95"][0] == 0.0 and 0.15 < m["ci95"][1] <= 1.0


@pytest.mark.parametrize("argv,expected", [(["--seeds", "0"], "--seeds must be at least 1"),
                                           (["--variants", "sft"], "--variants needs --seeds"),
                                           (["--seeds", "2", "--variants", "sft,x"], "unknown variant 'x'")])
def test_demo_seeds_bad_input_is_one_line(tmp_path, capsys, argv, expected):
    from msd.cli import main

    assert main(["demo", "--out", str(tmp_path / "o")] + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("msd: error:") and expected in err[0]
