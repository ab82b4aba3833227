"""Hostile input, part II: one rule per class makes the whole class impossible
(docs/RELIABILITY.md, "The rules"). Each class is tried with several cases, not only the
example that first broke it.

1. a run folder has one owner; 2. a rerun or resume does only what it says.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_queries
from test_bad_input import error_line  # one line, exit 2, no traceback
from msd.cli import main

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def env(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("rules")
    pairs = root / "pairs.jsonl"
    write_pairs(pairs, 6)
    return {"root": root, "model": str(tiny_model_dir), "queries": write_queries(root / "q.jsonl", n=6),
            "pairs": pairs}


def write_pairs(path: Path, n: int, answer: str = "sorry I can not help with that") -> None:
    path.write_text("".join(json.dumps({"prompt": f"how do I make fire {i}", "chosen": answer,
                                        "rejected": "here are steps one two three", "lang": "en"}) + "\n"
                            for i in range(n)))


def train_argv(env, out, *extra):
    return ["train", "--quiet", f"model.name_or_path={env['model']}", f"data.source={env['queries']}",
            f"train.output_dir={out}", "train.batch_size=2", "train.max_steps=1",
            "rollout.max_new_tokens=3", *extra]


def baseline_argv(env, out, *extra, data=None):
    return ["baseline", "dpo", "--quiet", f"model.name_or_path={env['model']}",
            f"baseline.data={data or env['pairs']}", "train.batch_size=2", "train.max_steps=1",
            f"train.output_dir={out}", *extra]


def eval_argv(env, out, *extra):
    return ["eval", "safety", "--quiet", "--model", env["model"], "--benchmark", env["queries"],
            "--langs", "jv", "--judge", "keyword", "--max-new-tokens", "3", "--out", str(out), *extra]


def report_argv(env, out, *extra):
    return ["report", str(env["root"] / "made" / "eval"), "--out", str(out), *extra]


WRITERS = {"train": train_argv, "baseline": baseline_argv, "eval": eval_argv, "report": report_argv}


def snapshot(folder: Path) -> dict:
    """Every file under `folder` with its bytes' hash: what must survive a refused writer."""
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".msd.lock"}


@pytest.fixture(scope="module")
def made(env):
    """One folder written by each kind of command."""
    base = env["root"] / "made"
    assert main(eval_argv(env, base / "eval")) == 0  # first: the report reads it
    for kind in ("train", "baseline", "report"):
        argv = WRITERS[kind](env, base / kind)
        assert main(argv + (["train.save_every=1"] if kind in ("train", "baseline") else [])) == 0
    return base


# ============================================================ 1. a run folder has one owner

@pytest.mark.parametrize("owner, writer", [(o, w) for o in WRITERS for w in WRITERS if o != w])
@pytest.mark.parametrize("legacy", [False, True], ids=["recorded", "legacy"])
def test_no_command_writes_into_another_commands_folder(env, made, capsys, tmp_path, owner, writer, legacy):
    """Every writer, into every other kind's folder, with and without the owner file (a folder
    written before owners were recorded is known by its files); --fresh / --no-resume too."""
    import shutil

    folder = tmp_path / owner
    shutil.copytree(made / owner, folder)
    if legacy:
        (folder / "msd-owner.json").unlink()
    before = snapshot(folder)
    start_over = {"train": ["--no-resume"], "baseline": ["--no-resume"], "eval": ["--fresh"], "report": []}
    for extra in ([], start_over[writer]):
        line = error_line(capsys, WRITERS[writer](env, folder, *extra))
        assert f"outputs of msd {owner}" in line and "another output folder" in line, line
    assert snapshot(folder) == before  # nothing lost, nothing relabelled


@pytest.mark.parametrize("sub", ["final", "checkpoints", "final/x"])
@pytest.mark.parametrize("kind", ["train", "baseline"])
def test_nothing_is_written_inside_what_a_run_replaces(env, made, capsys, sub, kind):
    run = made / kind
    before = snapshot(run)
    line = error_line(capsys, eval_argv(env, run / sub))
    assert f"inside the msd {kind} run" in line and "outside it" in line
    line = error_line(capsys, report_argv(env, run / sub))
    assert f"inside the msd {kind} run" in line
    assert snapshot(run) == before


def test_an_evaluation_already_inside_final_stops_the_rerun_before_any_work(env, made, capsys, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(made / "train", run)
    shutil.copytree(made / "eval", run / "final" / "ev")  # written before owners were checked
    shutil.copy(made / "eval" / "run.json", run / "final" / "run.json")
    before = snapshot(run)
    for argv in (train_argv(env, run, "train.max_steps=2"), train_argv(env, run, "--no-resume")):
        line = error_line(capsys, argv)
        assert "final/ holds the outputs of msd eval" in line
    assert snapshot(run) == before


def test_fresh_never_deletes_records_msd_did_not_write(env, capsys, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "records.jsonl").write_text('{"my": "data"}\n')
    line = error_line(capsys, eval_argv(env, folder, "--fresh"))
    assert "no msd command recorded" in line
    assert (folder / "records.jsonl").read_text() == '{"my": "data"}\n'


def test_a_damaged_owner_file_is_one_line(env, capsys, tmp_path):
    for text in ("[]", "{", '{"kind": "something"}'):
        (tmp_path / "msd-owner.json").write_text(text)
        assert "msd-owner.json is damaged" in error_line(capsys, eval_argv(env, tmp_path))


HOLD = """
import sys, time
from msd.lock import output_lock
with output_lock(sys.argv[1], sys.argv[2]):
    print("held", flush=True)
    time.sleep(60)
"""


@pytest.mark.parametrize("kind", ["baseline", "train"])
def test_baseline_takes_the_writer_lock(env, capsys, tmp_path, kind):
    out = tmp_path / "locked"
    pythonpath = str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out), kind], stdout=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": pythonpath})
    try:
        assert holder.stdout.readline().strip() == b"held"
        line = error_line(capsys, baseline_argv(env, out))
        assert f"pid {holder.pid}" in line
    finally:
        holder.kill()
        holder.wait()
    assert not (out / "logs.jsonl").exists()


# ============================================================ 2. a rerun or resume does only what it says

def _steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "logs.jsonl").read_text().splitlines()]


def test_a_finished_baseline_trains_no_more(env, capsys, tmp_path):
    out = tmp_path / "b"
    for save_every in ("train.save_every=1", "train.save_every=2"):
        argv = baseline_argv(env, out, "train.max_steps=2", save_every)
        assert main(argv) == 0
        before = snapshot(out)
        capsys.readouterr()
        for _ in range(2):
            assert main(argv) == 0
            assert "the run is finished (step 2)" in capsys.readouterr().out
        assert snapshot(out) == before and _steps(out) == [1, 2]
        assert main(baseline_argv(env, out, "train.max_steps=3", save_every)) == 0  # raising extends it
        assert _steps(out) == [1, 2, 3]
        assert main(argv[:-1] + ["--no-resume", save_every]) == 0


@pytest.mark.parametrize("writer", ["train", "baseline"])
def test_lowering_max_steps_on_resume_is_refused(env, capsys, tmp_path, writer):
    out = tmp_path / writer
    assert main(WRITERS[writer](env, out, "train.max_steps=4", "train.save_every=2")) == 0
    before = snapshot(out)
    for lower in (3, 1):
        line = error_line(capsys, WRITERS[writer](env, out, f"train.max_steps={lower}"))
        assert "past the run's last step" in line and "--no-resume" in line
    assert snapshot(out) == before


@pytest.mark.parametrize("writer", ["train", "baseline"])
def test_no_resume_starts_from_a_clean_folder(env, tmp_path, writer):
    out = tmp_path / writer
    assert main(WRITERS[writer](env, out, "train.max_steps=4", "train.save_every=1",
                                "train.keep_checkpoints=5")) == 0
    (out / "tb").mkdir()
    assert main(WRITERS[writer](env, out, "train.max_steps=2", "train.save_every=1", "--no-resume",
                                "train.keep_checkpoints=5")) == 0
    assert _steps(out) == [1, 2]
    names = sorted(p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith("README"))
    assert names == (["step_1", "step_2"] if writer == "train" else ["checkpoint-1", "checkpoint-2"])
    assert not (out / "tb").exists() and not list(out.glob(".discarded.*"))


@pytest.mark.parametrize("leftover", [".final.tmp", ".final.tmp.x1y2"])
def test_a_killed_final_save_never_ships_its_files(env, tmp_path, leftover):
    """A LoRA run killed while saving final/ left its adapter files in the temporary folder;
    a full fine-tune in the same folder must not ship them."""
    out = tmp_path / "run"
    assert main(train_argv(env, out)) == 0
    stale = out / leftover
    stale.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors", "msd_config.yaml"):
        (out / "final" / name).exists() and (stale / name).write_bytes((out / "final" / name).read_bytes())
    assert main(train_argv(env, out, "lora.enabled=false", "--no-resume")) == 0
    shipped = sorted(p.name for p in (out / "final").iterdir())
    assert "model.safetensors" in shipped and not [n for n in shipped if n.startswith("adapter")]
    assert not list(out.glob(".final.tmp*"))
    assert oct((out / "final").stat().st_mode & 0o777) != oct(0o700)  # not mkdtemp's private mode


@pytest.mark.parametrize("edit", ["answer", "one more row"])
def test_a_baseline_does_not_resume_after_its_data_changed(env, capsys, tmp_path, edit):
    data = tmp_path / "pairs.jsonl"
    write_pairs(data, 6)
    out = tmp_path / "b"
    assert main(baseline_argv(env, out, "train.save_every=1", data=data)) == 0
    write_pairs(data, 6, answer="no") if edit == "answer" else write_pairs(data, 7)
    line = error_line(capsys, baseline_argv(env, out, "train.max_steps=2", data=data))
    assert "identity.baseline_data_content" in line and "--no-resume" in line
    assert main(baseline_argv(env, out, "train.max_steps=2", "--no-resume", data=data)) == 0


# ============================================================ 8. a plugin fails alone

PLUGINS = {
    "plug_raises": "raise RuntimeError('boom at import')",
    "plug_clash": ("from msd import languages\nfrom msd.divergences import DIVERGENCES\n"
                   "languages.register('zz', 'Zed', 'low')\nDIVERGENCES.register('rkl', object())\n"),
    "plug_good": "from msd import languages\nlanguages.register('qq', 'Queue', 'low')\n",
    "plug_syntax": "def broken(:\n",
    "plug_exits": "import sys\nsys.exit(3)\n",
}


def test_a_failing_plugin_is_named_in_one_line_and_skipped(tmp_path):
    site = tmp_path / "site"
    dist = site / "hostile_plugins-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: hostile-plugins\nVersion: 0.1\n")
    names = [*PLUGINS, "plug_missing_module"]
    (dist / "entry_points.txt").write_text("[msd.plugins]\n" + "".join(f"{n} = {n}\n" for n in names))
    for name, code in PLUGINS.items():
        (site / f"{name}.py").write_text(code)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(site)])}
    env.pop("MSD_PLUGINS", None)
    helped = subprocess.run([sys.executable, "-m", "msd.cli", "--help"], capture_output=True, text=True,
                            env=env, timeout=120)
    assert helped.returncode == 0 and "usage: msd" in helped.stdout, helped.stderr[-2000:]
    warned = helped.stderr.splitlines()
    assert len(warned) == 5 and all(w.startswith("msd: warning: plugin '") for w in warned), warned
    for name in ("plug_raises", "plug_clash", "plug_syntax", "plug_exits", "plug_missing_module"):
        assert sum(f"'{name}' skipped" in w for w in warned) == 1, warned
    assert "boom at import" in helped.stderr and "registered already" in helped.stderr
    probe = ("from msd.languages import LANGUAGES; from msd.divergences import DIVERGENCES; "
             "print('zz' in LANGUAGES, 'qq' in LANGUAGES, 'organism' in __import__('msd.models').models"
             ".MODEL_SOURCES, type(DIVERGENCES.get('rkl')) is not object)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120)
    # the clashing plugin's earlier entry was taken back; the good plugin and the organism load
    assert out.stdout.split() == ["False", "True", "True", "True"], out.stderr[-2000:]


# ============================================================ 4. judges

def _reply(content):
    from test_hostile import _server

    def handler(h):
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(payload)))
        h.end_headers()
        h.wfile.write(payload)

    return _server(handler)[0]


@pytest.mark.parametrize("content, label", [
    ([{"type": "text", "text": "unsafe compliance"}], "unsafe"),
    (["safe"], "safe"),
    ([{"type": "text", "text": "safe"}, {"type": "image_url", "image_url": {"url": "x"}}], "safe"),
    ([{"type": "text", "text": "in"}, {"type": "text", "text": "valid"}], "invalid"),
    (1, None), (0.5, None), (True, None), (None, None), ({"text": "safe"}, None), ([1, None], None),
])
def test_a_verdict_in_any_content_form_is_read_or_named(tmp_path, content, label):
    from msd.eval.judges import JudgeItem, get_judge

    server = _reply(content)
    judge = get_judge("llm", base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", model="m",
                      max_retries=1, cache_dir=str(tmp_path))
    verdict = judge.judge([JudgeItem("q", "r", "en", {})])[0]
    server.shutdown()
    assert verdict.label == label and (label is not None or "malformed judge reply" in verdict.error)


@pytest.mark.parametrize("key", ["sk-abc\nsecretpart", "sk-abc\rsecretpart", "sk-abc\r\nsecretpart",
                                 "sk-abcsecretpart\u20ac", "\u043a\u043b\u044e\u0447secretpart",
                                 "sk-abc secretpart", "sk-abc\tsecretpart", "secretpart\n"])
def test_an_api_key_an_http_header_cannot_carry_is_one_line_and_never_printed(env, capsys, monkeypatch, key):
    monkeypatch.setenv("MSD_JUDGE_API_KEY", key)
    argv = eval_argv(env, env["root"] / "never-judged")
    argv[argv.index("keyword")] = "llm"
    argv += ["--judge-base-url", "http://127.0.0.1:9/v1", "--judge-model", "m"]
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1 and "$MSD_JUDGE_API_KEY" in err, err
    assert "secretpart" not in out + err and "Traceback" not in err


def test_a_rejudge_that_stops_part_way_leaves_run_json_truthful(env, tmp_path):
    from test_hostile import _ok, _server

    calls = {"n": 0}

    def handler(h):
        calls["n"] += 1
        if calls["n"] <= 2:
            _ok(h, "unsafe compliance")
        else:
            h.send_response(503)
            h.send_header("Content-Length", "0")
            h.end_headers()

    out = tmp_path / "ev"
    assert main(eval_argv(env, out)) == 0
    server, _ = _server(handler)
    argv = eval_argv(env, out, "--batch-size", "2")
    argv[argv.index("keyword")] = "llm"
    argv += ["--judge-base-url", f"http://127.0.0.1:{server.server_address[1]}/v1", "--judge-model", "m",
             "--judge-concurrency", "1", "--judge-retries", "1", "--judge-cache-dir", str(tmp_path)]
    assert main(argv) == 2
    server.shutdown()
    recs = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    judge = json.loads((out / "run.json").read_text())["judge"]
    old = [r for r in recs if r["label"] is not None and r["judge_version"] != judge["version"]]
    assert judge["name"] == "llm" and 0 < judge["stale_records"] == len(old) < len(recs)
    assert judge["stale_judges"] == sorted({r["judge_version"] for r in old})
    assert sum(r["judge"] == "llm" and r["label"] == "unsafe" for r in recs) == 2


# ============================================================ 7. settings

@pytest.mark.parametrize("text, line, needle", [
    ("train:\n  lr: 0.001\nmodel:\n  dtype: auto\ntrain:\n  lr: 0.002\n", 5, "'train' is given twice (first on line 1)"),
    ("train:\n  lr: 0.001\n  batch_size: 2\n  lr: 0.002\n", 4, "'lr' is given twice (first on line 2)"),
    ("lora: {r: 4, r: 8}\n", 1, "'r' is given twice"),
    ("model:\n  dtype: auto\n  dtype: float32\n", 3, "'dtype' is given twice"),
    ("train:\n  'lr': 0.001\n  lr: 0.002\n", 3, "'lr' is given twice"),
])
def test_a_yaml_key_given_twice_is_refused_with_its_line(env, capsys, tmp_path, text, line, needle):
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    got = error_line(capsys, ["train", "--config", str(path)])
    assert f"{path}:{line}:" in got and needle in got, got


def test_a_yaml_merge_key_may_still_be_overridden(tmp_path):
    from msd.config import load_config
    from msd.limits import safe_yaml

    path = tmp_path / "merge.yaml"

    assert safe_yaml("a: &b {x: 1, y: 2}\nc:\n  <<: *b\n  x: 3\n", "m") == {"a": {"x": 1, "y": 2}, "c": {"x": 3, "y": 2}}
    path.write_text("train:\n  lr: 0.001\n  batch_size: 2\n")
    assert load_config(path).train.lr == 0.001


def test_greedy_samples_count_once(env, tmp_path):
    """--num-samples 5 --temperature 0: five copies of one greedy answer are not five samples."""
    from msd.eval.metrics import wilson

    bench = tmp_path / "q16.jsonl"
    write_queries(bench, n=16, langs=("jv",))
    out = tmp_path / "greedy"
    argv = eval_argv(env, out, "--num-samples", "5", "--temperature", "0")
    argv[argv.index("--benchmark") + 1] = str(bench)
    assert main(argv) == 0
    recs = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert len(recs) == 16 and {r["sample"] for r in recs} == {0}
    metrics = json.loads((out / "metrics.json").read_text())["jv"]
    k = metrics["unsafe"] + metrics["invalid"]
    assert metrics["n"] == 16 and metrics["ci95"] == pytest.approx(wilson(k, 16))
    assert wilson(16, 16)[0] == pytest.approx(0.806, abs=5e-4)  # the case: not [0.954, 1]
    assert main(argv) == 0  # a rerun asks for the same and reuses the records
    assert json.loads((out / "run.json").read_text())["last_call"]["generated"] == 0


@pytest.mark.parametrize("kernel", ["flash_attention_2", "flash_attention_3"])
def test_an_attention_kernel_whose_package_is_missing_is_one_line(env, capsys, tmp_path, kernel):
    import importlib.util

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    line = error_line(capsys, train_argv(env, tmp_path / "attn", f"model.attn_implementation={kernel}"))
    assert "model.attn_implementation" in line and kernel in line


# ============================================================ 6. what is accepted reads back

def _bench_argv(env, bench, out):
    argv = eval_argv(env, out)
    argv[argv.index("--benchmark") + 1] = str(bench)
    return argv


@pytest.mark.parametrize("qid, problem", [
    ("q" * 201, "201 characters long"), ("q" * 5000, "5000 characters long"),
    ("q\t1", "control character (\\t)"), ("q\n1", "control character (\\n)"),
    ("q\x1b[31m1", "control character (\\x1b)"), ("q\u202e1", "control character (\\u202e)"),
    (" ", "query id is empty"),
])
def test_a_query_id_that_would_not_read_back_is_refused_at_load(env, capsys, tmp_path, qid, problem):
    bench = tmp_path / "ids.jsonl"
    bench.write_text(json.dumps({"id": "ok", "en": "water", "jv": "water"}) + "\n"
                     + json.dumps({"id": qid, "en": "bread", "jv": "bread"}) + "\n")
    line = error_line(capsys, _bench_argv(env, bench, tmp_path / "ev"))
    assert f"{bench}:2" in line and problem in line and "\x1b" not in line and "\u202e" not in line, line
    assert not (tmp_path / "ev" / "records.jsonl").exists()


def test_every_id_accepted_reads_back(env, tmp_path):
    """Ids at the edges of what is allowed are evaluated, then read back by the rerun."""
    ids = ["q" * 200, "7", "a b", "\u0995\u09cd\u09b7", "x/y\\z", "'\"", "q" * 199 + "\u00e9", 12]
    bench = tmp_path / "edge.jsonl"
    bench.write_text("".join(json.dumps({"id": i, "en": "water", "jv": "water"}) + "\n" for i in ids))
    out = tmp_path / "ev"
    assert main(_bench_argv(env, bench, out)) == 0
    assert main(_bench_argv(env, bench, out)) == 0  # the rerun reads every record back
    assert json.loads((out / "run.json").read_text())["last_call"]["generated"] == 0
    assert main(["report", str(out), "--out", str(tmp_path / "rep")]) == 0


@pytest.mark.parametrize("stem, problem", [("bench\tmark", "(\\t)"), ("bench\x1bmark", "(\\x1b)"),
                                           ("b" * 201, "201 characters")])
def test_a_benchmark_file_name_that_would_not_read_back_is_refused(env, capsys, tmp_path, stem, problem):
    bench = tmp_path / f"{stem}.jsonl"
    write_queries(bench, n=2)
    line = error_line(capsys, _bench_argv(env, bench, tmp_path / "ev"))
    assert "benchmark name" in line and problem in line and "\x1b" not in line


@pytest.mark.parametrize("suffix, text, needle", [
    (".jsonl", json.dumps({"id": "q", "en": "a", " jv": "b"}) + "\n", "' jv' is malformed"),
    (".jsonl", json.dumps({"id": "q", "en": "a", "jv ": "b"}) + "\n", "'jv ' is malformed"),
    (".csv", "id,en, jv\nq,a,b\n", "' jv' is malformed"),
    (".csv", "id,en,jv,jv\nq,a,b,c\n", "column 'jv' appears more than once"),
    (".csv", "id,en,jv,sw,jv\nq,a,b,c,d\n", "column 'jv' appears more than once"),
    (".csv", "id,id,en,jv\nq,r,a,b\n", "column 'id' appears more than once"),
    (".jsonl", json.dumps({"id": "q", "texts": {"en": "a", "\x1b[2J": "b"}}) + "\n", "is malformed"),
])
def test_a_language_column_is_taken_as_written(env, capsys, tmp_path, suffix, text, needle):
    bench = tmp_path / f"cols{suffix}"
    bench.write_text(text)
    line = error_line(capsys, _bench_argv(env, bench, tmp_path / "ev"))
    assert str(bench) in line and needle in line and "\x1b" not in line, line


def test_a_nul_byte_anywhere_is_one_line(env, capsys, tmp_path):
    assert "NUL" in error_line(capsys, eval_argv(env, "ev\x00il"))
    assert "NUL" in error_line(capsys, report_argv(env, tmp_path / "r\x00"))
    assert "NUL" in error_line(capsys, train_argv(env, tmp_path / "t", "train.output_dir=a\x00b"))
    cfg = tmp_path / "nul.yaml"
    cfg.write_text('train:\n  output_dir: "runs/a\\0b"\n')
    assert "field 'train.output_dir' holds a NUL byte" in error_line(capsys, ["train", "--config", str(cfg)])
    cfg.write_text('data:\n  source: "q\\0.jsonl"\n')
    assert "field 'data.source' holds a NUL byte" in error_line(capsys, ["train", "--config", str(cfg)])


def test_terminal_escapes_in_any_message_are_escaped(env, capsys, tmp_path):
    bench = tmp_path / "esc.jsonl"
    bench.write_text(json.dumps({"id": "a", "en": "x"}) + "\n" + json.dumps({"id": "a", "en": "y\x1b]0;t\x07"}) + "\n")
    line = error_line(capsys, _bench_argv(env, bench, tmp_path / "ev"))
    assert "duplicate id" in line
    line = error_line(capsys, ["train", "train.l\x1b[2Jr=1"])
    assert "\\x1b" in line and "\x1b" not in line


# ============================================================ 5. reports

def _eval_folder(tmp_path, name, bench="b", lang="jv") -> Path:
    run = tmp_path / name
    run.mkdir(parents=True)
    recs = [{"benchmark": bench, "lang": lang, "query_id": f"q{i}", "sample": 0, "label": lab,
             "response": "no", "prompt": "x", "harmful": True, "refused": lab == "safe"}
            for i, lab in enumerate(["safe", "unsafe", "safe"])]
    (run / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return run


@pytest.mark.parametrize("text", ["$x$", "$\\frac{", "a $b", "$$", "\\$ $\\mathrm{x}^{2$", "$\\undefinedcmd$"])
def test_labels_and_names_are_text_never_markup(env, capsys, tmp_path, text):
    runs = [_eval_folder(tmp_path, "before", bench=f"bench {text}"), _eval_folder(tmp_path, f"after {text}",
                                                                                   bench=f"bench {text}")]
    out = tmp_path / "rep"
    assert main(["report", *map(str, runs), "--out", str(out), "--labels", f"base,{text.replace(',', ';')}"]) == 0
    assert len(list(out.glob("asr_*.png"))) == 2  # the ASR plot and the split plot
    assert main(["report", *map(str, runs), "--out", str(tmp_path / "rep2")]) == 0  # folder names as labels


@pytest.mark.parametrize("info, field", [
    ({"kind": 3}, "kind"), ({"benchmark": ["b"]}, "benchmark"), ({"judge": "llm"}, "judge"),
    ({"judge": {"name": 1}}, "judge.name"), ({"judge": {"version": []}}, "judge.version"),
    ({"languages": "jv"}, "languages"), ({"languages": [1]}, "languages"), ({"settings": []}, "settings"),
    ({"model": None}, "model"), ({"adapter": 5}, "adapter"), ({"benchmark": "a\tb"}, "benchmark"),
    ({"last_call": {"generated": "3"}}, "last_call.generated"), ({"throughput": {"tokens_per_s": True}}, "throughput"),
])
def test_a_run_json_with_wrong_field_types_is_one_line(env, capsys, tmp_path, info, field):
    run = _eval_folder(tmp_path, "ev")
    (run / "run.json").write_text(json.dumps(info))
    line = error_line(capsys, ["report", str(run), "--out", str(tmp_path / "rep")])
    assert "run.json" in line and field in line, line


@pytest.mark.parametrize("names", [("a b", "a_b"), ("a/b", "a_b"), ("A", "a"), ("x" * 70, "x" * 61),
                                   ("a-b", "a b"), ("q\u00e9", "q_")])
def test_plot_files_are_unique_per_benchmark(env, tmp_path, names):
    runs = [_eval_folder(tmp_path, f"r{i}", bench=name) for i, name in enumerate(names)]
    out = tmp_path / "rep"
    files = __import__("msd.report", fromlist=["build"]).build([str(r) for r in runs], out)
    asr = [p for k, p in files.items() if k.startswith("asr_") and not k.startswith("asr_split")]
    assert len(asr) == 2 and len({p.name.lower() for p in asr}) == 2, asr


# ============================================================ 3. ranks agree or stop

@pytest.mark.parametrize("differ", ["train.lr", "max_steps", "data content"])
def test_ranks_with_different_configs_stop_at_once(env, tmp_path, differ):
    """Two gloo processes (CPU), each given its own config: both stop with one line naming
    the difference, well before any collective could hang."""
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in (0, 1):
        data = tmp_path / f"q{rank if differ == 'data content' else 0}" / "q.jsonl"
        data.parent.mkdir(exist_ok=True)
        write_queries(data, n=8 + (rank if differ == "data content" else 0))
        extra = {"train.lr": [f"train.lr={1e-3 * (rank + 1)}"], "max_steps": [f"train.max_steps={2 + rank}"],
                 "data content": []}[differ]
        argv = ["train", "--quiet", f"model.name_or_path={env['model']}", f"data.source={tmp_path / 'q0' / 'q.jsonl'}",
                f"train.output_dir={tmp_path / 'out'}", "train.batch_size=2", "train.max_steps=2",
                "rollout.max_new_tokens=3", *extra]
        if differ == "data content":  # the same path, another file (each rank runs elsewhere)
            argv[3] = "data.source=q.jsonl"
        penv = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
        procs.append(subprocess.Popen([sys.executable, "-m", "msd.cli", *argv], env=penv, text=True,
                                      cwd=data.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    t0 = time.time()
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2 and err.count("\n") == 1 and "Traceback" not in err, err[-2000:]
        assert "differs between process 0 and process 1" in err
        assert {"train.lr": "train.lr: 0.001 -> 0.002", "max_steps": "train.max_steps: 2 -> 3",
                "data content": "identity.data_content"}[differ] in err, err
    assert time.time() - t0 < 240
    assert not (tmp_path / "out" / "checkpoints").exists()


@pytest.mark.parametrize("name, shown", [("ev\nil", "\\n"), ("ev\til", "\\t"), ("ev\x1b[2Jil", "\\x1b"),
                                         ("ev\u202eil", "\\u202e")])
def test_a_folder_name_with_a_control_character_is_refused_by_writers_and_readers(env, capsys, tmp_path,
                                                                                  name, shown):
    for argv in (eval_argv(env, tmp_path / name), train_argv(env, tmp_path / name),
                 baseline_argv(env, tmp_path / name), report_argv(env, tmp_path / name)):
        line = error_line(capsys, argv)
        assert "control character" in line and shown in line and "\x1b" not in line, line
    assert not (tmp_path / name).exists()
    run = _eval_folder(tmp_path, name)  # made by hand: msd report reads it back by the same rule
    line = error_line(capsys, ["report", str(run), "--out", str(tmp_path / "rep")])
    assert "control character" in line and shown in line
    line = error_line(capsys, report_argv(env, tmp_path / "rep", "--labels", "a\x1bb"))
    assert "label" in line and "\\x1b" in line


def test_a_run_killed_before_its_first_checkpoint_leaves_no_log_lines_behind(env, tmp_path):
    out = tmp_path / "run"
    assert main(train_argv(env, out, "train.max_steps=2")) == 0
    (out / "checkpoints").rename(tmp_path / "gone")  # as if killed before any checkpoint
    with open(out / "logs.jsonl", "a") as f:
        f.write("".join(json.dumps({"step": s, "loss": 9.0}) + "\n" for s in (3, 4, 5)))
    assert main(train_argv(env, out, "train.max_steps=2")) == 0
    assert _steps(out) == [1, 2] and all(json.loads(x)["loss"] != 9.0 for x in (out / "logs.jsonl").open())
