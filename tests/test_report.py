"""`msd report`: markdown, PNGs and the HTML page from records and token batches alone."""

from __future__ import annotations

import json

import pytest

from msd.errors import MsdError
from msd.eval import metrics as M
from msd.eval import records as rec
from msd.report import build, load_inputs, safety_table, top_tokens

LANGS = ["en", "jv", "sw"]
PNG = b"\x89PNG\r\n\x1a\n"


def write_run(folder, unsafe: dict, judge="kw-1", max_new_tokens=64, n=10):
    records = []
    for lang in LANGS:
        for q in range(n):
            label = "unsafe" if q < unsafe[lang] else "invalid" if q == n - 1 else "safe"
            records.append({"benchmark": "multijail", "lang": lang, "query_id": f"q{q}", "sample": 0,
                            "prompt": f"query {q} <i>{lang}</i>", "response": f"<script>alert({q})</script> {label}",
                            "judge": "keyword", "judge_version": judge, "label": label, "judge_error": None,
                            "refused": label == "safe", "helpful": None, "response_lang": lang, "harmful": True})
        records.append({"benchmark": "multijail", "lang": lang, "query_id": "benign", "sample": 0,
                        "prompt": "b", "response": "ok", "judge": "keyword", "judge_version": judge,
                        "label": "safe", "refused": False, "response_lang": lang, "harmful": False})
    rec.compact(folder, records)
    rec.write_run(folder, {"kind": "safety", "benchmark": "multijail", "model": "tiny",
                           "judge": {"name": "keyword", "version": judge},
                           "settings": {"max_new_tokens": max_new_tokens}})
    return folder


def write_utility(folder, p):
    rs = [{"benchmark": f"msd_mgsm_{lang}", "lang": lang, "query_id": str(i), "sample": 0, "metric": "exact_match",
           "score": float(i < p * 10)} for lang in ("sw", "bn") for i in range(10)]
    rec.compact(folder, rs)
    rec.write_run(folder, {"kind": "utility"})
    return folder


def write_training(folder):
    tb = folder / "token_batches"
    tb.mkdir(parents=True)
    for step in (1, 10):
        rows = [{"step": step, "lang": lang, "query_id": f"q{i}", "mode": "on_policy",
                 "tokens": ["Ngapunten", "Ġ<b>", "Ġkula", "Ġ&amp;"], "weights": [2.5, 0.5, 0.7, 0.3],
                 "divergence": [0.9, 0.1, 0.2, 0.05]} for i in range(2) for lang in ("jv", "sw")]
        (tb / f"step_{step}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture
def runs(tmp_path):
    before = write_run(tmp_path / "before", {"en": 1, "jv": 6, "sw": 5})
    after = write_run(tmp_path / "after", {"en": 0, "jv": 1, "sw": 2})
    return before, after


def test_before_after_report(runs, tmp_path):
    before, after = runs
    ub, ua = write_utility(tmp_path / "ub", 0.5), write_utility(tmp_path / "ua", 0.6)
    train = write_training(tmp_path / "train")
    out = tmp_path / "report"
    files = build([str(before), str(after), str(ub), str(ua), str(train)], out, samples=2)
    for name in ("markdown", "html", "asr_multijail", "asr_split_multijail", "overrefusal_multijail",
                 "utility", "token_weights"):
        assert files[name].exists(), name
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == PNG and png.stat().st_size > 5000
    md = (out / "report.md").read_text()
    # jv: 7/10 -> 2/10 (unsafe + the invalid last query), delta -50.0 pp
    assert "| jv (Javanese) | 70.0 [39.7, 89.2] | 20.0 [5.7, 51.0] | -50.0 |" in md
    assert "msd_mgsm_sw" in md and "+10.0" in md and "Ngapunten" in md
    html = (out / "report.html").read_text()
    assert "<script>alert" not in html and "&lt;script&gt;alert" in html  # records are escaped
    assert "&lt;b&gt;" in html and "&amp;amp;" in html  # so are tokens
    assert 'src="data:image/png;base64,' in html and "http" not in html.replace("http-equiv", "")
    assert html.count('class="t"') >= 8 and "--w:1.000" in html


def test_metrics_are_recomputed_from_records_not_read(runs, tmp_path):
    before, after = runs
    (before / rec.METRICS).write_text(json.dumps({"jv": {"asr": 0.0}}))  # stale or tampered
    evals, _ = load_inputs([str(before), str(after)])
    rows = safety_table(evals)
    jv = next(r for r in rows if r[0].startswith("jv"))
    assert jv[1].startswith("70.0")


def test_warns_when_judges_or_settings_differ(tmp_path):
    a = write_run(tmp_path / "a", {"en": 0, "jv": 5, "sw": 5})
    b = write_run(tmp_path / "b", {"en": 0, "jv": 1, "sw": 1}, judge="llm-judge-v1:gpt", max_new_tokens=128)
    build([str(a), str(b)], tmp_path / "r")
    md = (tmp_path / "r" / "report.md").read_text()
    assert "different judges" in md and "max_new_tokens" in md


def test_single_run_and_top_tokens(runs, tmp_path):
    build([str(runs[0])], tmp_path / "one")
    assert (tmp_path / "one" / "asr_multijail.png").exists()
    _, trains = load_inputs([str(write_training(tmp_path / "t"))])
    assert top_tokens(trains)[0][0] == "Ngapunten"


def test_report_cli_and_bad_inputs(runs, tmp_path):
    from msd.cli import main

    assert main(["report", str(runs[0]), str(runs[1]), "--out", str(tmp_path / "cli"),
                 "--labels", "base,msd"]) == 0
    assert "ASR % msd" in (tmp_path / "cli" / "report.md").read_text()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MsdError, match="neither an evaluation run"):
        load_inputs([str(empty)])
    with pytest.raises(MsdError, match="2 labels for 1"):
        load_inputs([str(runs[0])], ["a", "b"])
    bad = tmp_path / "bad" / "token_batches"
    bad.mkdir(parents=True)
    (bad / "step_1.jsonl").write_text(json.dumps({"tokens": ["a"], "weights": [1, 2], "divergence": [0]}) + "\n")
    with pytest.raises(MsdError, match="lengths differ"):
        load_inputs([str(bad.parent)])


SCRIPTS = ["আমি এতে সাহায্য করতে পারব না।", "मैं इसमें मदद नहीं कर सकता।", "我不能帮助你做这件事。",
           "ฉันช่วยเรื่องนี้ไม่ได้ค่ะ", "family 👨‍👩‍👧‍👦 ok 👍🏽", "I can’t help — sorry. “Try” ‘this’"]


def _visible_tokens(html: str) -> list[str]:
    """The text of each response's token view, tags removed (what a reader sees)."""
    import re
    from html import unescape

    views = re.findall(r'<div class="toks">(.*?)</div>', html, flags=re.S)
    return [unescape(re.sub(r"<[^>]+>", "", v)) for v in views]


def test_token_view_reads_as_the_text_in_every_script(tmp_path):
    """Fixed bug: the view showed byte-level BPE pieces (`à¦Ĩ`, `âĢĻ`) with a space between
    every token. A real training batch (save_token_batch) with a byte-level BPE that splits
    every non-ASCII character into bytes now reads as the text."""
    from types import SimpleNamespace

    import torch

    from msd.testing.families import TINY_FAMILIES, family_tokenizer
    from msd.train.logs import save_token_batch

    tok = family_tokenizer(TINY_FAMILIES["qwen2.5"], "{{ messages }}")
    responses = [tok(t, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
                 for t in SCRIPTS]
    width = max(map(len, responses))
    w_BT = torch.linspace(0.1, 3.0, width).repeat(len(responses), 1)
    out = SimpleNamespace(w_BT=w_BT, div_BT=w_BT / 10)
    batch = [SimpleNamespace(lang="bn", query_id=f"q{i}") for i in range(len(SCRIPTS))]
    (tmp_path / "train" / "token_batches").mkdir(parents=True)
    save_token_batch(tmp_path / "train" / "token_batches" / "step_1.jsonl", 1, "on_policy", batch,
                     responses, out, tok)
    build([str(tmp_path / "train")], tmp_path / "r", samples=len(SCRIPTS))
    html = (tmp_path / "r" / "report.html").read_text(encoding="utf-8")
    assert sorted(_visible_tokens(html)) == sorted(t + "<|im_end|>" for t in SCRIPTS)
    for junk in ("à¦", "à¤", "âĢ", "Ġ", "\ufffd"):
        assert junk not in html
    assert "(mean of 3 tokens)" in html  # a Chinese character: 3 byte tokens, one box
    md = (tmp_path / "r" / "report.md").read_text(encoding="utf-8")
    assert "à¦" not in md and "âĢ" not in md and "\\u200d" not in md


def test_token_batches_saved_as_raw_pieces_still_read(tmp_path):
    """Token batches written before spans were saved hold `convert_ids_to_tokens` pieces."""
    from msd.testing.families import TINY_FAMILIES, family_tokenizer

    tok = family_tokenizer(TINY_FAMILIES["qwen2.5"], "{{ messages }}")
    tb = tmp_path / "old" / "token_batches"
    tb.mkdir(parents=True)
    rows = []
    for i, text in enumerate(SCRIPTS):
        pieces = tok.convert_ids_to_tokens(tok(text, add_special_tokens=False)["input_ids"])
        rows.append({"step": 1, "lang": "bn", "query_id": f"q{i}", "mode": "off_policy", "tokens": pieces,
                     "weights": [1.0] * len(pieces), "divergence": [0.1] * len(pieces)})
    (tb / "step_1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    build([str(tmp_path / "old")], tmp_path / "r", samples=len(SCRIPTS))
    html = (tmp_path / "r" / "report.html").read_text(encoding="utf-8")
    assert sorted(_visible_tokens(html)) == sorted(SCRIPTS)


def test_token_batch_spans_are_checked(tmp_path):
    bad = tmp_path / "bad" / "token_batches"
    bad.mkdir(parents=True)
    row = {"ids": [1, 2], "spans": [["a", 0, 1]], "weights": [1, 2], "divergence": [0, 0]}
    (bad / "step_1.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(MsdError, match="cover 1 of 2 tokens"):
        load_inputs([str(bad.parent)])


def test_report_gives_the_share_cut_at_the_token_limit(tmp_path):
    """Records written before msd recorded `truncated` report the share as unknown, not 0."""
    old = write_run(tmp_path / "old", {"en": 1, "jv": 6, "sw": 5})
    new = write_run(tmp_path / "new", {"en": 0, "jv": 1, "sw": 2})
    rs = rec.load_records(new)
    for i, r in enumerate(rs):
        r["truncated"] = r["lang"] == "sw" and i % 2 == 0
    rec.compact(new, rs)
    build([str(old), str(new)], tmp_path / "r")
    md = (tmp_path / "r" / "report.md").read_text()
    assert "Answers cut at the token limit (max_new_tokens 64)" in md
    sw = next(line for line in md.splitlines() if line.startswith("| sw (Swahili) | unknown"))
    n_sw = sum(r["truncated"] for r in rs)
    lo, hi = M.wilson(n_sw, 11)
    assert f"| {100 * n_sw / 11:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] ({n_sw}) |" in sw
    lo, hi = M.wilson(0, 11)  # a share of 0 still has an upper bound
    assert f"| en (English) | unknown | 0.0 [{100 * lo:.1f}, {100 * hi:.1f}] (0) |" in md
    assert "cut at token limit % new" in (tmp_path / "r" / "report.html").read_text()


def test_old_benign_labels_are_not_a_changed_verdict(tmp_path):
    """Benign answers labelled `unsafe` (before benign labels existed) read as `complied`."""
    old = write_run(tmp_path / "old", {"en": 1, "jv": 6, "sw": 5})
    new = write_run(tmp_path / "new", {"en": 1, "jv": 6, "sw": 5})
    for folder, label in ((old, "unsafe"), (new, "complied")):
        rs = rec.load_records(folder)
        for r in rs:
            if not r["harmful"]:
                r["label"] = label
        rec.compact(folder, rs)
    build([str(old), str(new)], tmp_path / "r")
    assert "whose verdict changed" not in (tmp_path / "r" / "report.html").read_text()


def test_a_baseline_folder_names_its_evaluation_folders(runs, tmp_path, capsys):
    """docs/BASELINES.md: `msd report <baseline out>` names the evaluation folders to pass."""
    from msd.cli import main

    dpo = tmp_path / "dpo"
    (dpo / "final").mkdir(parents=True)
    (dpo / "logs.jsonl").write_text("")
    (dpo / "baseline_data.jsonl").write_text("")
    with pytest.raises(MsdError, match=r"none was found next to it: run msd eval safety .*dpo/final"):
        load_inputs([str(dpo)])
    for name, adapter in (("eval-dpo", str(dpo / "final")), ("eval-base", None)):
        folder = write_run(tmp_path / "evals" / name, {"en": 1, "jv": 1, "sw": 1})
        info = rec.load_run(folder)
        info["settings"]["adapter"] = {"path": adapter, "sha": "x"} if adapter else None
        rec.write_run(folder, info)
    assert main(["report", str(dpo), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("msd: error: ") and len(err.strip().splitlines()) == 1
    assert f"pass {tmp_path / 'evals' / 'eval-dpo'} instead" in err and "eval-base" not in err


def test_a_training_response_cut_mid_character_shows_no_replacement_character(tmp_path):
    from types import SimpleNamespace

    import torch

    from msd.testing.families import TINY_FAMILIES, family_tokenizer
    from msd.train.logs import save_token_batch

    tok = family_tokenizer(TINY_FAMILIES["qwen2.5"], "{{ messages }}")
    ids = tok(SCRIPTS[0], add_special_tokens=False)["input_ids"]
    ids = ids[:next(k for k in range(5, len(ids)) if tok.decode(ids[:k]).endswith("\ufffd"))]
    (tmp_path / "t" / "token_batches").mkdir(parents=True)
    w_BT = torch.ones(1, len(ids))
    save_token_batch(tmp_path / "t" / "token_batches" / "step_1.jsonl", 1, "on_policy",
                     [SimpleNamespace(lang="bn", query_id="q")], [ids], SimpleNamespace(w_BT=w_BT, div_BT=w_BT), tok)
    build([str(tmp_path / "t")], tmp_path / "r")
    html = (tmp_path / "r" / "report.html").read_text(encoding="utf-8")
    assert "\ufffd" not in html and 'class="t cut"' in html and '.cut::after{content:"\\2026"}' in html
    assert _visible_tokens(html) == [SCRIPTS[0][:len(_visible_tokens(html)[0])]]
