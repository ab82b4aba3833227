"""Fuzz: hostile configs, query files, records and checkpoint states thrown at the CLI.

A seeded generator (reproducible: the case number is in every failure message) mutates valid
inputs with values of the wrong type, out of bounds, huge, deeply nested, aliased, damaged or
not text at all. Every run must end in success or in exit code 2 with exactly one stderr line
`msd: error: ...`: never a traceback, never a hang (each call has an alarm).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_queries
from msd.cli import main

ROOT = Path(__file__).resolve().parents[1]
SEED = int(os.environ.get("MSD_FUZZ_SEED", "1234"))
SCALE = int(os.environ.get("MSD_FUZZ_SCALE", "1"))  # more cases for a deeper run, e.g. 10
CALL_SECONDS = 30

VALUES = [-1, 0, 1, 2, 3, 10**12, -10**12, 0.5, 1.5, -0.5, math.nan, math.inf, "", " ", "{",
          "}", "{query}", "{query} {x}", "a\nb", "x" * 5000, "text:{bad", "text:{query}", None,
          True, False, [], [1, "a"], {"a": 1}, "\u00ff\u202e", "../../nope", "null", "1e-5",
          "sdpa", "rkl", "no", "\x00"]
KEYS = {
    "model": ["dtype", "trust_remote_code", "chat_template", "attn_implementation", "enable_thinking",
              "bogus"],
    "lora": ["enabled", "r", "alpha", "dropout", "target_modules"],
    "data": ["languages", "english", "english_as_student", "heldout_fraction", "limit", "seed"],
    "prompt": ["teacher_context", "teacher_template", "system_prompt"],
    "rollout": ["max_new_tokens", "temperature", "top_p", "top_k", "num_samples", "batch_size",
                "backend", "merge_lora"],
    "loss": ["divergence", "beta", "weighting", "top_k", "chunk_size"],
    "train": ["mode", "lr", "weight_decay", "warmup_ratio", "schedule", "max_grad_norm", "batch_size",
              "grad_accum", "epochs", "mixed_precision", "seed", "log_every", "save_every",
              "keep_checkpoints", "max_nonfinite", "save_batch_every", "tensorboard", "wandb"],
    "bogus": ["x"],
}
RAW_YAML = ["a: &a [x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b]\n"
            "d: [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c,*c,*c,*c,*c,*c,*c,*c,*c,*c,*c,*c,*c,*c,*c,*c,*c]\n",
            "train: [", "train:\n\tlr: 1", "- 1\n- 2\n", "42", "'unclosed", "train: {lr: {x: [" * 40,
            "!!python/object/apply:os.system ['echo pwned']", "train:\n  lr: !!binary AAAA\n",
            "\ufefftrain:\n  lr: 0.001\n", "model:\n  dtype: &x auto\n  chat_template: *x\n"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second thread only adds contention


def _alarm(signum, frame):
    raise TimeoutError("msd call hung")


def run_cli(capsys, argv, case: str) -> int:
    """main(argv) under an alarm: success, or exit 2 with one line; never a traceback."""
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(CALL_SECONDS)
    try:
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's usage errors
            code = e.code
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    err = capsys.readouterr().err
    assert "Traceback" not in err, f"{case}: {err[-1500:]}"
    assert code in (0, 2), f"{case}: exit {code}: {err[-1500:]}"
    if code == 2:
        assert err.count("\n") == 1 and err.startswith("msd: error: "), f"{case}: {err[-1500:]}"
    return code


@pytest.fixture(scope="module")
def env(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    return {"root": root, "model": str(tiny_model_dir), "queries": write_queries(root / "q.jsonl", n=6)}


def base_overrides(env, out: Path) -> list[str]:
    """Keep a run that the fuzzed config lets through small: the tiny model, one step."""
    return [f"model.name_or_path={env['model']}", f"data.source={env['queries']}",
            f"train.output_dir={out}", "train.max_steps=1", "rollout.max_new_tokens=2"]


def _yaml_value(v) -> str:
    if isinstance(v, float) and not math.isfinite(v):
        return ".nan" if math.isnan(v) else (".inf" if v > 0 else "-.inf")
    return json.dumps(v)


def fuzz_config(rng: random.Random) -> str:
    if rng.random() < 0.25:
        return rng.choice(RAW_YAML)
    lines = []
    for section in rng.sample(list(KEYS), rng.randint(1, 3)):
        lines.append(f"{section}:")
        for key in rng.sample(KEYS[section], min(len(KEYS[section]), rng.randint(1, 3))):
            lines.append(f"  {key}: {_yaml_value(rng.choice(VALUES))}")
    return "\n".join(lines) + "\n"


def test_fuzz_configs(env, capsys):
    rng = random.Random(SEED)
    codes = []
    for i in range(40 * SCALE):
        path = env["root"] / f"cfg{i}.yaml"
        text = fuzz_config(rng)
        path.write_bytes(text.encode("utf-16") if rng.random() < 0.05 else text.encode("utf-8", "replace"))
        argv = ["train", "--quiet", "--config", str(path), *base_overrides(env, env["root"] / f"cfgrun{i}")]
        if rng.random() < 0.3:  # hostile overrides on the command line too
            section = rng.choice(list(KEYS))
            argv.append(f"{section}.{rng.choice(KEYS[section])}={rng.choice(VALUES)}")
        codes.append(run_cli(capsys, argv, f"config case {i}: {text[:200]!r} {argv[-1][:100]!r}"))
    assert {0, 2} <= set(codes), codes  # both ends are exercised


def fuzz_query_line(rng: random.Random, i: int) -> str:
    row = {"id": f"q{i}", "en": f"how do I make bread {i}", "jv": f"tell me about water {i}"}
    kind = rng.randrange(14)  # 8..13: a valid row
    if kind == 0:
        row[rng.choice(["id", "en", "jv", "meta", "texts"])] = rng.choice(VALUES)
    elif kind == 1:
        row["meta"] = {"harmful": rng.choice(VALUES)}
    elif kind == 2:
        row.pop(rng.choice(["id", "en", "jv"]))
    elif kind == 3:
        row["meta"] = json.loads("[" * 80 + "]" * 80)
    elif kind == 4:
        row[rng.choice(["xx", "EN", "zz-q", "de"])] = "text"
    elif kind == 5:
        return "[" * 5000 + "]" * 5000
    elif kind == 6:
        return json.dumps(row)[: rng.randint(1, 30)]
    elif kind == 7:
        row["jv"] = "bread " * rng.choice([10, 2000])
    return json.dumps(row, allow_nan=True)


def test_fuzz_query_files(env, capsys):
    rng = random.Random(SEED + 1)
    codes = []
    for i in range(16 * SCALE):
        path = env["root"] / f"queries{i}.{rng.choice(['jsonl', 'jsonl', 'csv'])}"
        if rng.random() < 0.15:
            data = bytes(rng.randrange(256) for _ in range(rng.randint(0, 200)))
        else:
            lines = [fuzz_query_line(rng, j) for j in range(rng.randint(1, 4))]
            data = ("\n".join(lines) + rng.choice(["\n", "", "\r\n"])).encode("utf-8", "replace")
        path.write_bytes(data)
        argv = ["eval", "safety", "--quiet", "--model", env["model"], "--benchmark", str(path),
                "--judge", "keyword", "--max-new-tokens", "2", "--out", str(env["root"] / f"qrun{i}")]
        if rng.random() < 0.5:
            argv += ["--langs", rng.choice(["jv", "en", "xx", "", "jv,jv"])]
        codes.append(run_cli(capsys, argv, f"query case {i}: {data[:200]!r}"))
    assert {0, 2} <= set(codes), codes


GOOD = {"benchmark": "b", "lang": "jv", "query_id": "q1", "sample": 0, "label": "safe",
        "response": "no", "prompt": "x", "harmful": True, "refused": True}


def fuzz_record(rng: random.Random, i: int) -> str:
    r = {**GOOD, "query_id": f"q{i}"}
    kind = rng.randrange(5)
    if kind == 0:
        r[rng.choice(list(GOOD))] = rng.choice(VALUES)
    elif kind == 1:
        r.pop(rng.choice(list(GOOD)))
    elif kind == 2:
        return json.dumps(r)[: rng.randint(1, 40)]
    elif kind == 3:
        return json.dumps(rng.choice(VALUES))
    return json.dumps(r, allow_nan=True)


def test_fuzz_records_in_a_report(env, capsys):
    rng = random.Random(SEED + 2)
    codes = []
    for i in range(25 * SCALE):
        run = env["root"] / f"ev{i}"
        run.mkdir()
        lines = [fuzz_record(rng, j) for j in range(rng.randint(1, 4))]
        (run / "records.jsonl").write_text("\n".join(lines) + rng.choice(["\n", ""]))
        if rng.random() < 0.3:
            (run / "run.json").write_text(rng.choice(["[]", "{", '{"kind": 3}', '{"settings": []}', "null"]))
        codes.append(run_cli(capsys, ["report", str(run), "--out", str(env["root"] / f"rep{i}")],
                             f"records case {i}: {lines!r}"[:400]))
    assert {0, 2} <= set(codes), codes


def test_fuzz_checkpoint_states(env, capsys):
    base = env["root"] / "ckpt-base"
    assert main(["train", "--quiet", *base_overrides(env, base), "train.batch_size=2"]) == 0
    rng = random.Random(SEED + 3)
    good = json.loads((base / "checkpoints" / "step_1" / "state.json").read_text())
    for i in range(8 * SCALE):
        run = env["root"] / f"ckpt{i}"
        shutil.copytree(base, run)
        step = run / "checkpoints" / "step_1"
        kind = rng.randrange(4)
        if kind == 0:
            state = {**good, rng.choice(list(good)): rng.choice(VALUES)}
            (step / "state.json").write_text(json.dumps(state, allow_nan=True))
        elif kind == 1:
            (step / "state.json").write_text(rng.choice(["[]", "{}", "", "null", '{"step": "1"}', "[" * 5000]))
        else:
            name = rng.choice(["trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt"])
            data = (step / name).read_bytes()
            (step / name).write_bytes(data[: rng.randint(0, len(data) - 1)] if kind == 2 else b"\x80\x04K")
        argv = ["train", "--quiet", *base_overrides(env, run), "train.batch_size=2", "train.max_steps=2"]
        run_cli(capsys, argv, f"checkpoint case {i} (kind {kind})")


@pytest.mark.parametrize("argv", [
    ["train", "train.lr=-1"],
    ["train", "--config", "{root}/bomb.yaml"],
    ["eval", "safety", "--out", "{root}/x", "--keyword-window", "-5", "--judge", "keyword"],
])
def test_fuzz_cases_in_a_real_process(env, argv):
    (env["root"] / "bomb.yaml").write_text(RAW_YAML[0])
    argv = [a.format(root=env["root"]) for a in argv]
    pythonpath = str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "msd.cli", *argv], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": pythonpath})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("msd: error: "), proc.stderr


# ----------------------------------------------------------------------------- baseline, report, judge

PAIR_FIELDS = ["prompt", "chosen", "rejected", "completion", "label", "lang"]


def fuzz_pair_line(rng: random.Random, i: int) -> str:
    row = {"prompt": f"how do I make fire {i}", "chosen": "sorry I can not help",
           "rejected": "here are steps one two", "lang": "en"}
    kind = rng.randrange(8)  # 5..7: a valid row
    if kind == 0:
        row[rng.choice(PAIR_FIELDS)] = rng.choice(VALUES)
    elif kind == 1:
        row.pop(rng.choice(list(row)))
    elif kind == 2:
        return json.dumps(row)[: rng.randint(1, 30)]
    elif kind == 3:
        return json.dumps(rng.choice(VALUES), allow_nan=True)
    elif kind == 4:
        row = {"prompt": row["prompt"], "completion": rng.choice(VALUES), "label": rng.choice(VALUES)}
    return json.dumps(row, allow_nan=True)


def test_fuzz_baselines(env, capsys):
    """Hostile pair files, baseline settings and output folders, through `msd baseline`."""
    rng = random.Random(SEED + 4)
    codes = []
    for i in range(10 * SCALE):
        data = env["root"] / f"pairs{i}.{rng.choice(['jsonl', 'jsonl', 'csv'])}"
        lines = [fuzz_pair_line(rng, j) if rng.random() < 0.5 else fuzz_pair_line(random.Random(7), j)
                 for j in range(rng.randint(2, 6))]
        if rng.random() < 0.5:  # a valid file: the run goes as far as the settings allow
            lines = [json.dumps({"prompt": f"make fire {j}", "chosen": "sorry no", "rejected": "steps one",
                                 "lang": "en"}) for j in range(4)]
        data.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="replace")
        out = env["root"] / f"brun{i % 4}"  # reused: reruns, other methods, other owners' folders
        argv = ["baseline", rng.choice(["sft", "dpo", "kto", "orpo", "simpo"]), "--quiet",
                f"model.name_or_path={env['model']}", f"baseline.data={data}", "train.batch_size=2",
                "train.max_steps=1", f"train.output_dir={out}"]
        if rng.random() < 0.4:
            key = rng.choice(["beta", "loss_type", "label_smoothing", "simpo_gamma", "max_length", "data",
                              "desirable_weight", "bogus"])
            argv.append(f"baseline.{key}={rng.choice(VALUES)}")
        if rng.random() < 0.3:
            argv.append(rng.choice(["--no-resume", "--resume", "train.save_every=1", "train.max_steps=3"]))
        codes.append(run_cli(capsys, argv, f"baseline case {i}: {lines!r} {argv[-1]!r}"[:400]))
    assert {0, 2} <= set(codes), codes


RUN_JSON = ["[]", "{", "null", '{"kind": 3}', '{"settings": []}', '{"judge": "x"}', '{"judge": {"name": 1}}',
            '{"languages": "jv"}', '{"benchmark": "a\\tb"}', '{"model": null}', '{"last_call": {"generated": "1"}}',
            '{"kind": "safety", "benchmark": "$\\\\frac{$", "languages": ["jv"]}', '{"throughput": []}']
NAMES = ["b", "b b", "b_b", "$x$", "$\\frac{", "x" * 200, "\u00e9", "a/b", "..", "-", "q\u202e"]


def test_fuzz_reports(env, capsys):
    """Hostile run.json files, benchmark names, labels and output folders, through `msd report`."""
    rng = random.Random(SEED + 5)
    codes = []
    for i in range(16 * SCALE):
        runs = []
        for k in range(rng.randint(1, 3)):
            run = env["root"] / f"rp{i}" / rng.choice(["a", "b", "$x$", "c d"]) / f"{k}"
            run.mkdir(parents=True, exist_ok=True)
            bench = rng.choice(NAMES)
            recs = [{**GOOD, "benchmark": bench, "query_id": f"q{j}", "label": rng.choice(["safe", "unsafe"])}
                    for j in range(3)]
            (run / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
            if rng.random() < 0.5:
                (run / "run.json").write_text(rng.choice(RUN_JSON))
            runs.append(str(run))
        argv = ["report", *runs, "--out", str(env["root"] / rng.choice([f"rpo{i}", f"ev{i}", f"rp{i}"]))]
        if rng.random() < 0.4:
            argv += ["--labels", ",".join(rng.choice(NAMES).replace(",", ";") for _ in runs)]
        codes.append(run_cli(capsys, argv, f"report case {i}: {argv!r}"[:400]))
    assert {0, 2} <= set(codes), codes


REPLIES = [b'{"choices": [{"message": {"content": "safe"}}]}', b'{"choices": [{"message": {"content": 1}}]}',
           b'{"choices": [{"message": {"content": [{"type": "text", "text": "unsafe"}]}}]}',
           b'{"choices": [{"message": {"content": null}}]}', b'{"choices": []}', b'{"choices": [{}]}',
           b'[]', b'{', b'<html>hi</html>', b'\xff\xfe\x00', b'{"choices": [{"message": {"content": {"a": 1}}}]}',
           b'{"choices": [{"message": {"content": "' + b"x" * 5000 + b'"}}]}', b"",
           b'{"choices": [{"message": {"content": ["invalid", 3, null]}}]}', b'"safe"']
KEYS_ENV = [None, "sk-ok", "sk-\nbad", "sk-\rbad", "k\u20ac", " sk", "sk-ok\n"]


def test_fuzz_judges(env, capsys, monkeypatch):
    """Hostile endpoint replies, status codes, API keys and judge flags, through `msd eval --judge llm`."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    rng = random.Random(SEED + 6)
    plan = {"status": 200, "body": REPLIES[0]}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(plan["status"])
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(plan["body"])))
            self.end_headers()
            self.wfile.write(plan["body"])

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    bench = write_queries(env["root"] / "judge-q.jsonl", n=2)
    codes = []
    try:
        for i in range(12 * SCALE):
            hostile = rng.random() < 0.6  # else a sound setup, so both ends are exercised
            plan.update(status=rng.choice([200, 200, 200, 400, 404, 429, 500]) if hostile else 200,
                        body=rng.choice(REPLIES) if hostile else REPLIES[rng.choice([0, 1, 2, 3])])
            key = rng.choice(KEYS_ENV) if hostile else "sk-ok"
            if key is None:
                monkeypatch.delenv("MSD_JUDGE_API_KEY", raising=False)
            else:
                monkeypatch.setenv("MSD_JUDGE_API_KEY", key)
            argv = ["eval", "safety", "--quiet", "--model", env["model"], "--benchmark", bench, "--langs", "jv",
                    "--max-new-tokens", "2", "--out", str(env["root"] / f"jrun{i % 3}"), "--judge", "llm",
                    "--judge-base-url", rng.choice([url, url + "?x=1", "ftp://x", "http://"]) if hostile else url,
                    "--judge-model", rng.choice(["m", "", "m\x1b[2J"]) if hostile else "m", "--judge-retries", "1",
                    "--judge-timeout", rng.choice(["2", "0", "-1", "nan"]) if hostile else "2",
                    "--judge-cache-dir", str(env["root"] / f"jcache{i}")]
            case = f"judge case {i}: status {plan['status']} body {plan['body'][:80]!r}"
            codes.append(run_cli(capsys, argv, case))
            err = capsys.readouterr()
            assert "bad" not in err.out + err.err and "\u20ac" not in err.err, case
    finally:
        server.shutdown()
    assert {0, 2} <= set(codes), codes
