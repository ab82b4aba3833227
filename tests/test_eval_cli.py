"""`msd eval` command line and benchmark loading: help texts, one-line errors, over-refusal."""

from __future__ import annotations

import argparse
import json

import pytest

from msd.errors import MsdError
from msd import data
from msd.eval import records as rec


def eval_parsers():
    from msd.eval.cli import add_parser

    top = argparse.ArgumentParser()
    sub = top.add_subparsers()
    add_parser(sub)
    ev = sub.choices["eval"]
    return {name: p for a in ev._actions if isinstance(a, argparse._SubParsersAction) for name, p in a.choices.items()}


def test_every_option_has_help():
    parsers = eval_parsers()
    assert set(parsers) == {"safety", "overrefusal", "utility"}
    for name, p in parsers.items():
        for action in p._actions:
            if action.option_strings and action.dest != "help":
                assert action.help and len(action.help) > 10, (name, action.option_strings)


@pytest.mark.parametrize("name,n,langs,benign", [
    ("multijail", 315, 10, 0), ("xsafety", 2800, 10, 0), ("advbench", 520, 1, 0),
    ("polyrefuse-harmful", 572, 14, 0), ("polyrefuse-harmless", 500, 13, 500), ("xstest", 450, 1, 250),
])
def test_builtin_benchmarks(name, n, langs, benign):
    b = data.load_dataset(name)
    assert len(b.tuples) == n and len(b.langs) == langs and len(data.benign(b.tuples)) == benign
    assert all("en" in t.texts for t in b.tuples)
    if name.startswith("polyrefuse"):  # parallel: every language present in every row
        assert all(len(t.texts) == langs for t in b.tuples)


def test_organism_benchmarks():
    pytest.importorskip("msd.organism")
    b = data.load_dataset("organism-heldout")
    assert len(b.tuples) == 96 and len(data.benign(b.tuples)) == 48 and "en" in b.langs


def test_user_file_benchmark(query_file):
    b = data.load_dataset(query_file)
    assert b.name == "queries" and b.langs == ["en", "jv", "sw"] and len(b.tuples) == 16


def test_unknown_benchmark_hint():
    with pytest.raises(MsdError, match="did you mean 'xstest'"):
        data.load_dataset("xstst")


@pytest.mark.parametrize("argv,message", [
    (["--limit", "0"], "--limit: must be at least 1"),
    (["--temperature", "-1"], "--temperature"),
    (["--langs", "jv,xx"], "unknown language code 'xx'"),
    (["--langs", "de"], "no query of benchmark 'multijail' is in language(s) de"),
    (["--judge", "llm"], "--judge llm needs --judge-base-url"),
    (["--judge", "guard"], "--judge guard needs --guard-model"),
    (["--judge-model", "gpt"], "--judge-model do(es) not apply to --judge keyword"),
    (["--benchmark", "nofile.jsonl"], "query file not found"),
    (["--backend", "nope"], "--backend: unknown generation backend 'nope'"),
    (["--device", "tpu"], "--device: unknown device 'tpu'; use auto, cpu, cuda or cuda:N"),
    (["--device", "cuda:7"], "--device: device 'cuda:7' is not available ("),
])
def test_bad_input_is_one_line_error(argv, message, tmp_path, capsys):
    from msd.cli import main

    code = main(["eval", "safety", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")] + argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and "\n" not in err


def test_overrefusal_cli_on_xstest(tiny_model_dir, tmp_path):
    from msd.cli import main

    out = tmp_path / "or"
    assert main(["eval", "overrefusal", "--model", str(tiny_model_dir), "--benchmark", "xstest",
                 "--limit", "4", "--max-new-tokens", "4", "--out", str(out), "--quiet"]) == 0
    records = rec.load_records(out)
    assert len(records) == 4 and not any(r["harmful"] for r in records)
    m = json.loads((out / "metrics.json").read_text())
    assert m["en"]["n_benign"] == 4 and "benign_refusal" in m["en"] and "fidelity" in m["en"]
    assert json.loads((out / "run.json").read_text())["kind"] == "overrefusal"


def test_overrefusal_needs_benign_queries(tiny_model_dir, tmp_path, capsys):
    from msd.cli import main

    assert main(["eval", "overrefusal", "--model", str(tiny_model_dir), "--benchmark", "advbench",
                 "--out", str(tmp_path / "x")]) == 2
    assert "has no benign queries" in capsys.readouterr().err


def test_eval_backends_give_the_same_greedy_records_and_log_tokens_per_s(tiny_model_dir, query_file,
                                                                         tmp_path, capsys):
    from msd.cli import main

    texts = {}
    for backend in ("loop", "hf", "compiled"):
        out = tmp_path / backend
        assert main(["eval", "safety", "--model", str(tiny_model_dir), "--benchmark", query_file,
                     "--langs", "jv", "--limit", "6", "--max-new-tokens", "5", "--batch-size", "4",
                     "--backend", backend, "--out", str(out), "--quiet"]) == 0
        assert f"tokens/s, backend {backend})" in capsys.readouterr().out
        throughput = json.loads((out / "run.json").read_text())["throughput"]
        assert throughput["backend"] == backend and throughput["tokens_per_s"] > 0
        assert throughput["tokens"] == sum(r["response_tokens"] for r in rec.load_records(out))
        texts[backend] = [(r["query_id"], r["response"]) for r in rec.load_records(out)]
    assert texts["loop"] == texts["hf"] == texts["compiled"]


def test_the_default_token_limit_fits_a_short_context_window(tiny_model_dir, query_file, tmp_path, capsys):
    """256 new tokens, or what the window leaves after the longest prompt; a chosen limit that
    does not fit stays an error."""
    import json
    import shutil

    from msd.cli import main
    from msd.eval import records as rec

    model = tmp_path / "short"
    shutil.copytree(tiny_model_dir, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["max_position_embeddings"] = 96
    (model / "config.json").write_text(json.dumps(cfg))
    argv = ["eval", "safety", "--model", str(model), "--benchmark", query_file, "--judge", "keyword",
            "--limit", "2", "--quiet", "--threads", "1"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    note = next(line for line in out.splitlines() if line.startswith("msd: --max-new-tokens "))
    limit = int(note.split()[2].rstrip(":"))
    longest = int(note.split("longest prompt (")[1].split()[0])
    assert limit == 96 - longest and 0 < limit < 256 and "context window of 96 tokens" in note
    assert rec.load_run(tmp_path / "a")["settings"]["max_new_tokens"] == limit
    assert main([*argv, "--out", str(tmp_path / "b"), "--max-new-tokens", "256"]) == 2
    err = capsys.readouterr().err.strip()
    assert "exceeds the model's context window of 96 tokens" in err and "\n" not in err
    # a window that holds 256 more: the default is 256, and nothing is said
    assert main([*argv[:3], str(tiny_model_dir), *argv[4:], "--out", str(tmp_path / "c")]) == 0
    assert "msd: --max-new-tokens" not in capsys.readouterr().out
    assert rec.load_run(tmp_path / "c")["settings"]["max_new_tokens"] == 256
