"""Safety evaluation: records, resume, re-judging, judge failures, metrics from records."""

from __future__ import annotations

import json

import pytest

from msd.data import QueryTuple
from msd.errors import MsdError
from msd.eval import records as rec
from msd.eval import safety
from msd.eval.judges import Judge, Verdict, get_judge
from msd.testing import make_tokenizer

WORDS = "sorry I can not help with that here are steps one two make bread fire weapon tell me about".split()


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(WORDS + ["jv", "sw", "en"] + [str(i) for i in range(40)])


def make_tuples(n=6):
    out = []
    for i in range(n):
        texts = {"en": f"make weapon {i}", "jv": f"tell me about fire {i}", "sw": f"make bread {i}"}
        out.append(QueryTuple(f"q{i}", texts, {"harmful": i % 3 != 2}))
    return out


class FakeGenerate:
    """Refuses queries about bread, gives 'steps' otherwise; counts prompts generated."""

    def __init__(self, tok):
        self.tok, self.calls, self.prompts = tok, 0, 0
        self.bread = tok.convert_tokens_to_ids("bread")

    def __call__(self, model, tokenizer, prompts, **kw):
        self.calls += 1
        self.prompts += len(prompts)
        out = []
        for p in prompts:
            text = "sorry I can not help with that" if self.bread in p else "here are steps one two"
            ids = self.tok(text, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
            out.append([list(ids) for _ in range(kw["num_samples"])])
        return out


@pytest.fixture
def fake_gen(tok):
    return FakeGenerate(tok)


def run(tok, out, judge=None, **kw):
    kw.setdefault("benchmark", "toy")
    return safety.evaluate(None, tok, make_tuples(), ["en", "jv", "sw"], judge or get_judge("keyword"),
                           out, batch_size=4, progress=False, **kw)


def test_records_and_metrics(tok, fake_gen, tmp_path):
    m = run(tok, tmp_path, generate_fn=fake_gen)
    records = rec.load_records(tmp_path)
    assert len(records) == 18
    r = records[0]
    for field in ("benchmark", "lang", "query_id", "sample", "prompt", "response", "judge",
                  "judge_version", "label", "harmful", "refused", "helpful", "response_lang"):
        assert field in r
    sw = m["sw"]  # every sw query mentions bread -> refused -> safe
    assert sw["asr"] == 0.0 and sw["n"] == 4 and sw["n_benign"] == 2 and sw["benign_refusal"] == 1.0
    assert m["jv"]["asr"] == 1.0 and m["jv"]["unsafe"] == 4 and m["jv"]["invalid"] == 0
    assert m["average"]["asr"] == pytest.approx((1 + 1 + 0) / 3)
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(m))
    info = json.loads((tmp_path / "run.json").read_text())
    assert info["throughput"]["responses"] == 18 and info["judge"]["name"] == "keyword"


def test_resume_regenerates_only_missing(tok, fake_gen, tmp_path):
    run(tok, tmp_path, generate_fn=fake_gen)
    path = tmp_path / rec.RECORDS
    lines = path.read_text().splitlines(keepends=True)
    kept = lines[::2]  # delete half the records
    path.write_text("".join(kept) + lines[1][: len(lines[1]) // 2])  # plus a torn last line
    fake_gen.prompts = 0
    m = run(tok, tmp_path, generate_fn=fake_gen)
    assert fake_gen.prompts == 18 - len(kept)
    assert len(rec.load_records(tmp_path)) == 18
    assert len(path.read_text().splitlines()) == 18  # compacted, torn line gone
    fake_gen.prompts = 0
    assert run(tok, tmp_path, generate_fn=fake_gen) == m and fake_gen.prompts == 0


def test_num_samples_and_limit(tok, fake_gen, tmp_path):
    # sampled (temperature > 0): greedy decoding has one sample per query (test_hostile_rules)
    run(tok, tmp_path, generate_fn=fake_gen, num_samples=2, limit=2, temperature=0.7)
    keys = {(r["lang"], r["query_id"], r["sample"]) for r in rec.load_records(tmp_path)}
    assert len(keys) == 2 * 3 * 2
    run(tok, tmp_path, generate_fn=fake_gen, num_samples=2, limit=3, temperature=0.7)  # a larger limit adds the new queries only
    assert len(rec.load_records(tmp_path)) == 3 * 3 * 2


def test_changed_generation_settings_are_refused(tok, fake_gen, tmp_path):
    run(tok, tmp_path, generate_fn=fake_gen)
    with pytest.raises(MsdError, match="max_new_tokens"):
        run(tok, tmp_path, generate_fn=fake_gen, max_new_tokens=8)


class Flaky(Judge):
    name, version = "flaky", "1"

    def __init__(self, fail=True):
        self.fail = fail

    def judge(self, items):
        if self.fail:
            raise MsdError("endpoint down", "http://127.0.0.1:1")
        return [Verdict("unsafe", refused=False) for _ in items]


def test_judge_failure_keeps_responses_and_rejudges_later(tok, fake_gen, tmp_path):
    with pytest.raises(MsdError, match="endpoint down"):
        run(tok, tmp_path, generate_fn=fake_gen, judge=Flaky(fail=True))
    records = rec.load_records(tmp_path)
    assert len(records) == 4  # the first batch was generated and kept, unjudged
    assert all(r["label"] is None and "endpoint down" in r["judge_error"] for r in records)
    assert json.loads((tmp_path / "metrics.json").read_text())  # metrics still written
    fake_gen.prompts = 0
    m = run(tok, tmp_path, generate_fn=fake_gen, judge=Flaky(fail=False))
    assert fake_gen.prompts == 14  # the 4 saved responses were judged, not generated again
    assert m["average"]["asr"] == 1.0 and "judge_errors" not in m["average"]


def test_another_judge_rejudges_without_generating(tok, fake_gen, tmp_path):
    run(tok, tmp_path, generate_fn=fake_gen)
    fake_gen.prompts = 0
    m = run(tok, tmp_path, generate_fn=fake_gen, judge=Flaky(fail=False))
    assert fake_gen.prompts == 0
    assert {r["judge"] for r in rec.load_records(tmp_path)} == {"flaky"}
    assert m["sw"]["asr"] == 1.0


def test_teacher_prompts_use_teacher_builder(tok, tmp_path):
    seen = []

    def gen(model, tokenizer, prompts, **kw):
        seen.extend(prompts)
        return [[[tok.eos_token_id]] for _ in prompts]

    class Builder:
        template, system_prompt = "T {query}", None

        def student(self, q):
            return [1]

        def teacher(self, q, english, lang):
            return [2, 3]

    run(tok, tmp_path, prompt_builder=Builder(), teacher_prompts=True, generate_fn=gen)
    assert seen and all(p == [2, 3] for p in seen)


def test_unknown_language_is_one_line_error(tok, fake_gen, tmp_path):
    with pytest.raises(MsdError, match="no query of benchmark 'toy' is in language"):
        safety.evaluate(None, tok, make_tuples(), ["bn"], get_judge("keyword"), tmp_path,
                        benchmark="toy", progress=False, generate_fn=fake_gen)


def test_tiny_model_end_to_end_multijail_cli(tiny_model_dir, tmp_path):
    """Real generation (msd.rollout) on MultiJail through the CLI, then resume."""
    from msd.cli import main

    out = tmp_path / "mj"
    argv = ["eval", "safety", "--model", str(tiny_model_dir), "--benchmark", "multijail",
            "--langs", "en,jv,sw", "--judge", "keyword", "--limit", "3", "--max-new-tokens", "6",
            "--batch-size", "4", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    records = rec.load_records(out)
    assert len(records) == 9 and {r["lang"] for r in records} == {"en", "jv", "sw"}
    assert all(r["response_tokens"] <= 6 and r["label"] in ("safe", "unsafe") for r in records)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"en", "jv", "sw", "average"} and metrics["jv"]["n"] == 3
    lines = (out / rec.RECORDS).read_text().splitlines(keepends=True)
    (out / rec.RECORDS).write_text("".join(lines[:4]))
    assert main(argv) == 0
    again = {rec.metrics_mod.record_key(r): r["response"] for r in rec.load_records(out)}
    assert again == {rec.metrics_mod.record_key(r): r["response"] for r in records}  # greedy: same text


def test_answers_cut_mid_character_are_clean_and_counted(tmp_path):
    """Fixed bug: a Bengali answer cut at the token limit inside a character ended in U+FFFD
    (which the judge and language ID read), and no metric said how many answers were cut."""
    from pathlib import Path

    from msd.testing.families import TINY_FAMILIES, family_tokenizer

    template = (Path(__file__).parent / "fixtures" / "chat_templates" / "qwen2.5-7b-instruct.jinja").read_text()
    tok = family_tokenizer(TINY_FAMILIES["qwen2.5"], template)
    answer = tok("আমি সাহায্য করতে পারব না", add_special_tokens=False)["input_ids"]
    limit = next(k for k in range(4, len(answer)) if tok.decode(answer[:k]).endswith("\ufffd"))

    def cut_bengali(model, tokenizer, prompts, **kw):  # bn answers hit the limit, en ones end
        return [[answer[:limit] if len(p) % 2 else answer[:2] + [tok.eos_token_id]] * kw["num_samples"]
                for p in prompts]

    tuples = [QueryTuple(f"q{i}", {"en": "make weapon " + "x" * i, "bn": "x" * i}) for i in range(6)]
    m = safety.evaluate(None, tok, tuples, ["en", "bn"], get_judge("keyword"), tmp_path, benchmark="toy",
                        max_new_tokens=limit, generate_fn=cut_bengali, progress=False)
    records = rec.load_records(tmp_path)
    assert not [r for r in records if "\ufffd" in r["response"]]
    cut = [r for r in records if r["truncated"]]
    assert cut and all(r["response_tokens"] == limit for r in cut)
    assert m["average"]["truncated"] == len(cut)
    for lang in ("en", "bn"):
        mine = [r for r in records if r["lang"] == lang]
        assert m[lang]["truncated_rate"] == sum(r["truncated"] for r in mine) / len(mine)


def test_benign_answers_are_labelled_complied_or_refused(tok, fake_gen, tmp_path):
    """Fixed bug: a helpful answer to a benign query was labelled `unsafe`."""
    m = run(tok, tmp_path, generate_fn=fake_gen)
    records = rec.load_records(tmp_path)
    benign = {r["lang"]: r["label"] for r in records if not r["harmful"]}
    assert benign == {"en": "complied", "jv": "complied", "sw": "refused"}
    assert {r["label"] for r in records if r["harmful"]} == {"safe", "unsafe"}
    assert m["sw"]["benign_refusal"] == 1.0 and m["jv"]["benign_refusal"] == 0.0


def test_old_benign_records_labelled_safe_or_unsafe_still_read(tok, fake_gen, tmp_path):
    from msd.eval.metrics import record_label

    run(tok, tmp_path, generate_fn=fake_gen)
    records = rec.load_records(tmp_path)
    for r in records:
        if not r["harmful"]:
            r["label"] = "safe" if r["refused"] else "unsafe"  # as msd wrote them before
    rec.compact(tmp_path, records)
    old = rec.load_records(tmp_path)
    assert {record_label(r) for r in old if not r["harmful"]} == {"complied", "refused"}
    assert rec.write_metrics(tmp_path)["sw"]["benign_refusal"] == 1.0


def test_progress_shows_a_moving_status_while_the_first_batch_generates(tok, tmp_path, monkeypatch):
    """Fixed bug: the bar advanced only when a whole batch was done; on a real model it sat at
    0/32 for minutes with nothing moving. Now a status line names the batch being generated
    and the bar is redrawn (elapsed time) while it runs."""
    import io
    import time as time_mod

    from tqdm.auto import tqdm

    seen = []
    stream = io.StringIO()

    def slow(model, tokenizer, prompts, **kw):
        time_mod.sleep(1.3)
        seen.append(stream.getvalue())
        return FakeGenerate(tok)(model, tokenizer, prompts, **kw)

    real = tqdm.__init__

    def to_stream(self, *a, **kw):
        kw.update(file=stream, disable=False, mininterval=0)
        real(self, *a, **kw)

    monkeypatch.setattr(tqdm, "__init__", to_stream)
    safety.evaluate(None, tok, make_tuples(), ["en", "jv", "sw"], get_judge("keyword"), tmp_path,
                    benchmark="toy", batch_size=32, generate_fn=slow, progress=True)
    first = seen[0]
    assert "0/18" in first and "batch 1/1: generating 18 answers of up to 256 tokens" in first
    assert "00:01" in first  # redrawn while generating, not only when the batch ended
