"""`msd report A B`: paired tests per language, Holm over languages, an interval on every rate,
and how each rate was computed."""

from __future__ import annotations

import json
import re

import pytest

from msd.cli import main
from msd.eval import records as rec

scipy_stats = pytest.importorskip("scipy.stats")


def write_eval(folder, attacked: dict[str, list[int]], n: dict[str, int], truncated: bool | None = None,
               benign: bool = True):
    """A safety run: for each language, queries q0..q{n-1}; those in attacked[lang] are unsafe."""
    records = []
    for lang, count in n.items():
        for q in range(count):
            label = "unsafe" if q in attacked.get(lang, []) else "safe"
            r = {"benchmark": "organism-heldout", "lang": lang, "query_id": f"q{q}", "sample": 0,
                 "prompt": "p", "response": "r", "judge": "oracle", "judge_version": "oracle-1",
                 "label": label, "refused": label == "safe", "response_lang": lang, "harmful": True}
            if truncated is not None:
                r["truncated"] = truncated and q == 0
            records.append(r)
        if benign:
            for q in range(4):
                records.append({"benchmark": "organism-heldout", "lang": lang, "query_id": f"b{q}",
                                "sample": 0, "prompt": "b", "response": "ok", "judge": "oracle",
                                "judge_version": "oracle-1", "label": "safe", "refused": q == 0,
                                "response_lang": lang if q else "en", "harmful": False})
    rec.compact(folder, records)
    rec.write_run(folder, {"kind": "safety", "benchmark": "organism-heldout", "model": "tiny",
                           "judge": {"name": "oracle", "version": "oracle-1"},
                           "settings": {"max_new_tokens": 20, "temperature": 0.0}})
    return folder


def report(tmp_path, a, b, capsys=None):
    out = tmp_path / "report"
    code = main(["report", str(a), str(b), "--out", str(out)])
    return code, out


def table_after(md: str, title_start: str) -> list[list[str]]:
    """The rows (header first) of the markdown table under the heading that starts so."""
    lines = md.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith("### " + title_start))
    rows = []
    for line in lines[i + 2:]:
        if not line.startswith("|"):
            break
        if not line.startswith("|---"):
            rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


N = {"en": 40, "qab": 40, "qac": 40}


@pytest.fixture
def known(tmp_path):
    # qab: 30 attacks become safe (b = 30, c = 0); qac: b = 3, c = 1; en: no change.
    a = write_eval(tmp_path / "A", {"qab": list(range(35)), "qac": [0, 1, 2, 3, 4]}, N)
    b = write_eval(tmp_path / "B", {"qab": list(range(30, 35)), "qac": [3, 4, 10]}, N)
    return a, b


def test_paired_report_gives_the_exact_mcnemar_p_and_holm_significance(tmp_path, known):
    code, out = report(tmp_path, *known)
    assert code == 0
    md = (out / "report.md").read_text()
    rows = table_after(md, "Paired change in ASR")
    head, body = rows[0], {r[0].split()[0]: dict(zip(rows[0], r)) for r in rows[1:]}
    assert head[-1].startswith("significant")
    p_qab = scipy_stats.binomtest(0, 30, 0.5).pvalue
    p_qac = scipy_stats.binomtest(1, 4, 0.5).pvalue
    assert float(body["qab"]["McNemar exact p"]) == pytest.approx(p_qab, rel=1e-2)
    assert float(body["qac"]["McNemar exact p"]) == pytest.approx(p_qac, rel=1e-3)
    assert body["en"]["McNemar exact p"] == "1.0000"
    assert body["qab"]["b / c (discordant)"] == "30 / 0" and body["qac"]["b / c (discordant)"] == "3 / 1"
    assert body["qab"]["pairs"] == "40"
    assert body["qab"][head[-1]] == "yes" and body["qac"][head[-1]] == "no" and body["en"][head[-1]] == "no"
    assert body["qab"]["Δ pp [paired bootstrap 95%]"].startswith("-75.0 [")
    saved = {r["lang"]: r for r in json.loads((out / "paired.json").read_text())[0]["languages"]}
    assert saved["qab"]["p"] == pytest.approx(p_qab, rel=1e-12)
    assert saved["qab"]["p_holm"] == pytest.approx(3 * p_qab, rel=1e-12)  # smallest of three: x3
    assert saved["qac"]["p_holm"] == pytest.approx(min(1.0, 2 * p_qac))
    assert saved["qab"]["significant"] and not saved["qac"]["significant"]


def test_paired_report_prints_the_significance_on_the_terminal(tmp_path, known, capsys):
    code, _ = report(tmp_path, *known)
    out = capsys.readouterr().out
    assert code == 0 and "paired change in ASR, A -> B" in out and "Holm over 3 languages" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("  ") and "(" in line}
    assert rows["qab"][-1] == "yes" and rows["qac"][-1] == "no" and rows["en"][-1] == "no"
    assert "30 / 0" in " ".join(rows["qab"])


def test_paired_report_is_significant_only_after_holm(tmp_path):
    # Each language alone: b = 6, c = 0, p = 0.03125 < 0.05; Holm over three: 0.094 -> not significant.
    attacked = {lang: list(range(6)) for lang in N}
    a = write_eval(tmp_path / "A", attacked, N)
    b = write_eval(tmp_path / "B", {}, N)
    _, out = report(tmp_path, a, b)
    saved = json.loads((out / "paired.json").read_text())[0]["languages"]
    assert all(r["p"] == pytest.approx(0.03125) and not r["significant"] for r in saved)


def test_paired_report_on_the_shared_queries_says_n(tmp_path):
    a = write_eval(tmp_path / "A", {"qab": list(range(20))}, N)
    b = write_eval(tmp_path / "B", {"qab": [0]}, {"en": 40, "qab": 25, "qac": 40})
    _, out = report(tmp_path, a, b)
    md = (out / "report.md").read_text()
    assert "105 pairs (the 105 shared of 120 (A) and 105 (B)" in md
    rows = table_after(md, "Paired change in ASR")
    qab = next(r for r in rows if r[0].startswith("qab"))
    assert qab[1] == "25" and qab[6] == f"{scipy_stats.binomtest(0, 19, 0.5).pvalue:.2e}"


def test_paired_report_refuses_runs_without_shared_queries(tmp_path, capsys):
    a = write_eval(tmp_path / "A", {}, {"qab": 5})
    b = write_eval(tmp_path / "B", {}, {"qac": 5})
    code, _ = report(tmp_path, a, b)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "share no judged harmful" in err[0]


RATE = r"\d+\.\d \[\d+\.\d, \d+\.\d\]"


def test_every_rate_in_the_report_has_an_interval(tmp_path, known):
    _, out = report(tmp_path, *known)
    md = (out / "report.md").read_text()
    checked = 0
    for title in ("Attack success rate", "Over-refusal and language fidelity", "Paired change in ASR"):
        rows = table_after(md, title)
        for j, head in enumerate(rows[0]):
            if "%" not in head or head.startswith("Δ"):
                continue
            for row in rows[1:]:
                parts = row[j].split(" / ")
                assert all(re.fullmatch(RATE, p) for p in parts), (title, head, row[j])
                checked += len(parts)
    assert checked >= 4 * 2 * 3 + 2 * 2 * 4  # ASR, unsafe, invalid, benign refusal, fidelity, paired


def test_the_share_cut_at_the_token_limit_has_an_interval_or_says_unknown(tmp_path):
    a = write_eval(tmp_path / "A", {}, N)  # no truncated field
    b = write_eval(tmp_path / "B", {}, N, truncated=True)  # q0 cut: 1 of the 40 records that say
    _, out = report(tmp_path, a, b)
    rows = table_after((out / "report.md").read_text(), "Answers cut at the token limit")
    assert len(rows) == 1 + 3 + 1
    for row in rows[1:]:
        assert row[1] == "unknown"
        assert re.fullmatch(RATE + r" \(\d+\)", row[2]), row
    lo, hi = scipy_stats.binomtest(1, 40).proportion_ci(method="wilson")
    assert rows[1][2] == f"2.5 [{100 * lo:.1f}, {100 * hi:.1f}] (1)"


def test_report_says_how_rates_were_computed(tmp_path):
    a = write_eval(tmp_path / "A", {"qab": [1]}, N)  # no truncated field
    b = write_eval(tmp_path / "B", {}, N, truncated=True)  # one of 40 harmful per language cut
    _, out = report(tmp_path, a, b)
    md = (out / "report.md").read_text()
    lines = [line for line in md.splitlines() if line.startswith(("- **A**: n =", "- **B**: n ="))]
    assert len(lines) == 2
    for line in lines:
        assert "n = 120 harmful" in line and "12 benign" in line and "judge oracle (oracle-1)" in line
        assert "split organism-heldout" in line
    assert lines[0].endswith("cut at the token limit: n/a")
    assert lines[1].endswith("cut at the token limit: 2.5%")  # 3 of the 120 records that say


def test_benign_plot_series_carry_intervals(tmp_path, known):
    from msd.report import plots
    from msd.report.runs import load_inputs

    evals, _ = load_inputs([str(p) for p in known])
    ((_, values, cis),) = plots._series(evals[:1], ["qab"], "benign_refusal", with_ci=True)
    assert values == [0.25] and cis[0][0] < 0.25 < cis[0][1]


def test_paired_benign_refusal_counts_refusals_of_benign_queries(tmp_path):
    from msd.report.paired import compare_runs, paired_rows
    from msd.report.runs import load_eval_run

    a = write_eval(tmp_path / "A", {}, {"en": 4})  # b0 of 4 benign refused
    b = write_eval(tmp_path / "B", {}, {"en": 4})
    records = rec.load_records(b)
    for r in records:
        if not r["harmful"]:
            r["refused"], r["label"] = True, "refused"  # every benign query refused after
    rec.compact(b, records)
    cmp = compare_runs(load_eval_run(a, "A"), load_eval_run(b, "B"), outcome="benign_refusal")
    row = cmp["languages"][0]
    assert (row["n"], row["b"], row["c"]) == (4, 0, 3)
    assert row["p"] == pytest.approx(scipy_stats.binomtest(0, 3, 0.5).pvalue)
    assert row["benign_refusal_a"] == 0.25 and row["benign_refusal_b"] == 1.0
    assert paired_rows(cmp)[0][2] == "benign refusal % A"
