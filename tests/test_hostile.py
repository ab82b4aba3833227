"""Hostile input, case by case: each gives exit 2 with one clear line, or works correctly.

Classes (docs/RELIABILITY.md): silent reuse of an output folder, two writers, values taken for
what they are not (bounds, paths), safe loading, hangs and limits, damaged files and failing
environments, messages that blame the right thing.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import write_queries
from test_bad_input import error_line  # one line, exit 2, no traceback
from msd.cli import main
from msd.errors import MsdError

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def env(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    return {"root": root, "model": str(tiny_model_dir), "queries": write_queries(root / "q.jsonl", n=6)}


def eval_argv(env, out, *extra, model=None, bench=None):
    return ["eval", "safety", "--quiet", "--model", model or env["model"], "--benchmark",
            bench or env["queries"], "--langs", "jv", "--judge", "keyword", "--max-new-tokens", "3",
            "--out", str(out), *extra]


def train_argv(env, *overrides, out="run", source=None):
    return ["train", "--quiet", f"model.name_or_path={env['model']}",
            f"data.source={source or env['queries']}", f"train.output_dir={env['root'] / out}",
            "train.batch_size=2", "train.max_steps=1", "rollout.max_new_tokens=4", *overrides]


def records(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "records.jsonl").read_text().splitlines()]


# ============================================================ 1. every output knows what made it

def _copy_model(env, name) -> Path:
    dst = env["root"] / name
    if not dst.exists():
        shutil.copytree(env["model"], dst)
    return dst


def _adapter(env, name, seed=0) -> Path:
    """A LoRA adapter for the tiny model, saved in PEFT format."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dst = env["root"] / name
    if not dst.exists():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(env["model"])
        peft = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
        peft.save_pretrained(dst)
    return dst


@pytest.mark.parametrize("change, named", [
    ("adapter", "adapter"),
    ("other model", "model"),
    ("chat template", "chat template"),
    ("benchmark edited", "benchmark content"),
    ("benchmark with the same stem", "benchmark content"),
    ("generation setting", "max_new_tokens"),
    ("dtype", "dtype"),
])
def test_a_changed_input_is_never_silently_reused(env, capsys, change, named):
    out = env["root"] / f"reuse-{change.replace(' ', '_')}"
    bench = env["root"] / f"b-{change.replace(' ', '_')}" / "q.jsonl"
    bench.parent.mkdir()
    write_queries(bench, n=3)
    assert main(eval_argv(env, out, bench=str(bench))) == 0
    before = records(out)
    extra, kw = [], {"bench": str(bench)}
    if change == "adapter":
        extra = ["--adapter", str(_adapter(env, "adapter-a"))]
    elif change == "other model":
        kw["model"] = str(_copy_model(env, "model-copy-edited"))
        cfg = json.loads(Path(kw["model"], "config.json").read_text())
        cfg["rms_norm_eps"] = 1e-3  # same path shape, other content
        Path(kw["model"], "config.json").write_text(json.dumps(cfg))
    elif change == "chat template":
        extra = ["--chat-template", "text:{% for m in messages %}{{ m['content'] }}{% endfor %}"]
    elif change == "benchmark edited":
        write_queries(bench, n=4)
    elif change == "benchmark with the same stem":
        other = env["root"] / "elsewhere" / "q.jsonl"
        other.parent.mkdir(exist_ok=True)
        write_queries(other, n=3, langs=("jv", "bn"))
        kw["bench"] = str(other)
    elif change == "generation setting":
        extra = ["--max-new-tokens", "4"]
    elif change == "dtype":
        extra = ["--dtype", "bfloat16"]
    line = error_line(capsys, eval_argv(env, out, *extra, **kw))
    assert named in line and "--fresh" in line, line
    assert records(out) == before  # nothing lost, nothing relabelled
    # --fresh starts over: the records are those of the new input only
    assert main(eval_argv(env, out, "--fresh", *extra, **kw)) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["last_call"]["generated"] == len(records(out)) > 0


def test_an_adapter_changed_in_place_is_named(env, capsys):
    adapter = env["root"] / "adapter-in-place"
    shutil.copytree(_adapter(env, "adapter-b", seed=1), adapter)
    out = env["root"] / "in-place"
    assert main(eval_argv(env, out, "--adapter", str(adapter))) == 0
    shutil.rmtree(adapter)
    shutil.copytree(_adapter(env, "adapter-c", seed=2), adapter)  # retrained, same path
    line = error_line(capsys, eval_argv(env, out, "--adapter", str(adapter)))
    assert f"adapter {adapter.resolve()} (its files changed)" in line


def test_run_json_records_the_identity(env):
    out = env["root"] / "identity"
    assert main(eval_argv(env, out, "--adapter", str(_adapter(env, "adapter-a")))) == 0
    settings = json.loads((out / "run.json").read_text())["settings"]
    assert settings["model"]["sha"] and settings["adapter"]["sha"] and settings["benchmark_sha"]
    assert settings["chat_template_sha"]


def test_a_different_judge_rejudges_without_generating(env):
    out = env["root"] / "rejudge"
    assert main(eval_argv(env, out)) == 0
    assert main(eval_argv(env, out, "--keyword-window", "10")) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["last_call"]["generated"] == 0 and info["last_call"]["rejudged"] > 0


def test_training_does_not_resume_after_its_data_changed(env, capsys):
    data = env["root"] / "train-data.jsonl"
    write_queries(data, n=6)
    assert main(train_argv(env, "train.max_steps=2", "train.save_every=1", out="tdata", source=data)) == 0
    write_queries(data, n=7)  # edited
    line = error_line(capsys, train_argv(env, "train.max_steps=3", out="tdata", source=data))
    assert "identity.data_content" in line and "--no-resume" in line
    assert main(train_argv(env, "train.max_steps=1", "--no-resume", out="tdata", source=data)) == 0


def test_training_does_not_resume_after_its_template_file_changed(env, capsys):
    template = env["root"] / "teacher.txt"
    template.write_text("Q: {query} / {english}")
    argv = train_argv(env, f"prompt.teacher_template={template}", "train.max_steps=2", "train.save_every=1",
                      out="ttemplate")
    assert main(argv) == 0
    template.write_text("Question: {query} (English: {english})")  # same path, other text
    line = error_line(capsys, argv[:-2] + ["train.max_steps=3"])
    assert "identity.teacher_template_text" in line


def test_a_broken_chat_template_is_one_line(env, capsys):
    line = error_line(capsys, eval_argv(env, env["root"] / "never-eval", "--chat-template",
                                        "text:{% for m in messages %}{{ m['content'] }"))
    assert "model.chat_template: the chat template fails" in line


def test_training_does_not_resume_on_another_model(env, capsys):
    assert main(train_argv(env, out="tmodel")) == 0
    other = _copy_model(env, "model-copy-train")
    cfg = json.loads((other / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-3
    (other / "config.json").write_text(json.dumps(cfg))
    argv = train_argv(env, "train.max_steps=2", out="tmodel")
    argv[2] = f"model.name_or_path={other}"
    assert "identity.model_files" in error_line(capsys, argv)


# ============================================================ 2. one writer per output folder

HOLD = """
import sys, time
from msd.lock import output_lock
with output_lock(sys.argv[1], "eval"):
    print("held", flush=True)
    time.sleep(60)
"""


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_a_second_writer_gets_one_line_naming_the_holder(env, capsys):
    out = env["root"] / "locked"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, env=_env())
    try:
        assert holder.stdout.readline().strip() == b"held"
        line = error_line(capsys, eval_argv(env, out))
        assert f"pid {holder.pid}" in line and str(out) in line
        line = error_line(capsys, train_argv(env, out="locked"))
        assert f"pid {holder.pid}" in line
    finally:
        holder.kill()
        holder.wait()
    assert main(eval_argv(env, out)) == 0  # the kernel dropped the lock with the process


def test_two_evals_at_once_lose_no_record(env, tmp_path):
    """The first eval is held up by a slow judge, so the second surely starts while it runs."""
    def slow(h):
        time.sleep(0.4)
        _ok(h)

    server, _ = _server(slow)
    out = tmp_path / "two"
    bench = tmp_path / "q.jsonl"
    write_queries(bench, n=12)
    argv = [sys.executable, "-m", "msd.cli", *eval_argv(env, out, bench=str(bench))]
    argv[argv.index("keyword")] = "llm"
    argv += ["--judge-base-url", f"http://127.0.0.1:{server.server_address[1]}/v1", "--judge-model", "m",
             "--judge-concurrency", "1", "--judge-cache-dir", str(tmp_path / "cache")]
    first = subprocess.Popen(argv, stderr=subprocess.PIPE, env=_env())
    lock = out / ".msd.lock"
    deadline = time.time() + 60
    while not (lock.exists() and lock.read_text().strip() == str(first.pid)) and time.time() < deadline:
        time.sleep(0.05)
    second = subprocess.run(argv, capture_output=True, text=True, env=_env(), timeout=120)
    assert first.wait(timeout=120) == 0, first.stderr.read().decode()[-2000:]
    server.shutdown()
    assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
    assert f"pid {first.pid}" in second.stderr and str(out) in second.stderr
    recs = records(out)
    assert len(recs) == 12 and all(r["label"] == "safe" for r in recs)
    assert len({(r["query_id"], r["sample"]) for r in recs}) == 12


# ============================================================ 3. bounds, choices, paths

@pytest.mark.parametrize("override, key", [
    ("train.lr=-1", "train.lr"), ("train.lr=0", "train.lr"), ("train.lr=nan", "train.lr"),
    ("train.lr=inf", "train.lr"), ("train.batch_size=0", "train.batch_size"),
    ("train.batch_size=-1", "train.batch_size"), ("train.grad_accum=0", "train.grad_accum"),
    ("train.log_every=0", "train.log_every"), ("train.save_every=-2", "train.save_every"),
    ("train.max_steps=-1", "train.max_steps"), ("train.max_steps=0", "train.max_steps"),
    ("train.warmup_ratio=1.5", "train.warmup_ratio"), ("train.epochs=0", "train.epochs"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints"), ("train.weight_decay=-1", "train.weight_decay"),
    ("lora.r=0", "lora.r"), ("lora.dropout=2", "lora.dropout"), ("lora.dropout=1", "lora.dropout"),
    ("rollout.num_samples=0", "rollout.num_samples"), ("rollout.temperature=-1", "rollout.temperature"),
    ("rollout.max_new_tokens=0", "rollout.max_new_tokens"), ("rollout.top_p=0", "rollout.top_p"),
    ("rollout.top_p=1.5", "rollout.top_p"), ("rollout.batch_size=0", "rollout.batch_size"),
    ("data.heldout_fraction=1", "data.heldout_fraction"), ("data.heldout_fraction=-0.1", "data.heldout_fraction"),
    ("data.limit=0", "data.limit"), ("loss.top_k=0", "loss.top_k"), ("loss.chunk_size=-5", "loss.chunk_size"),
    ("train.output_dir=", "train.output_dir"), ("train.output_dir=  ", "train.output_dir"),
    ("model.name_or_path=", "model.name_or_path"), ("data.source=", "data.source"),
    ("train.seed=-1", "train.seed"), ("data.seed=4294967296", "data.seed"),
])
def test_a_value_out_of_bounds_is_refused_before_any_work(env, capsys, override, key):
    line = error_line(capsys, train_argv(env, override, out="never"))
    assert f"field '{key}'" in line
    assert not (env["root"] / "never").exists()


@pytest.mark.parametrize("override, needle", [
    ("model.chat_template=templates/chat.jinja", "file not found: 'templates/chat.jinja'"),
    ("prompt.teacher_template=teacher.txt", "file not found: 'teacher.txt'"),
    ("prompt.teacher_template=Q: {query} {nonsense}", "unknown template field(s) {nonsense}"),
    ("prompt.teacher_template=Q: {query} {", "malformed template"),
    ("prompt.teacher_template=Q: {query} }", "malformed template"),
    ("prompt.teacher_template=text:no query here", "must contain {query}"),
    ("prompt.teacher_template=Q: {query.__class__}", "unknown template field(s)"),
])
def test_a_path_is_a_path_and_a_template_is_checked_at_config_time(env, capsys, override, needle):
    line = error_line(capsys, train_argv(env, override, out="never"))
    assert needle in line and override.split("=")[0] in line


def test_template_text_and_files_both_work(tmp_path):
    from msd.config import load_config

    f = tmp_path / "t.txt"
    f.write_text("Q: {query} ({language})")
    cfg = load_config(None, [f"prompt.teacher_template={f}", "model.chat_template=text:{{ x }}"])
    assert cfg.prompt.teacher_template == str(f)
    from msd.prompts import resolve_template
    from msd.textsetting import read_text_setting

    assert resolve_template("full", str(f)) == "Q: {query} ({language})"
    assert read_text_setting("text:plain words", "k") == "plain words"


@pytest.mark.parametrize("flag, value", [
    ("--judge-timeout", "-1"), ("--judge-timeout", "0"), ("--judge-concurrency", "0"),
    ("--judge-retries", "0"), ("--keyword-window", "-5"), ("--keyword-window", "0"),
])
def test_judge_flags_have_bounds(env, capsys, flag, value):
    argv = eval_argv(env, env["root"] / "never-eval", flag, value)
    if flag.startswith("--judge-"):
        argv[argv.index("keyword")] = "llm"
        argv += ["--judge-base-url", "http://127.0.0.1:9/v1", "--judge-model", "m"]
    assert flag in error_line(capsys, argv)


@pytest.mark.parametrize("flag, value", [
    ("--num-samples", "0"), ("--max-new-tokens", "0"), ("--temperature", "-1"), ("--top-p", "0"),
    ("--batch-size", "-3"), ("--limit", "0"), ("--out", ""), ("--out", " "), ("--max-new-tokens", "x"),
    ("--seed", "-1"),
])
def test_eval_flags_have_bounds(env, capsys, flag, value):
    argv = eval_argv(env, env["root"] / "never-eval", flag, value)
    if flag == "--out":
        argv[-1] = value
    try:
        line = error_line(capsys, argv)
    except SystemExit as e:  # argparse's own type errors, printed in one line too
        assert e.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("msd: error:") and flag in err
        return
    assert flag in line or flag.lstrip("-").replace("-", "_") in line


# ============================================================ 4. safe loading

def test_an_adapter_bin_beside_a_decoy_safetensors_is_refused(env, capsys):
    import torch

    adapter = env["root"] / "decoy-adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    torch.save({}, adapter / "adapter_model.bin")
    shutil.copy(Path(env["model"]) / "model.safetensors", adapter / "decoy.safetensors")
    line = error_line(capsys, eval_argv(env, env["root"] / "never-eval", "--adapter", str(adapter)))
    assert "pickled" in line and str(adapter) in line


def test_a_guard_model_with_pickled_weights_is_refused(env):
    import torch
    from safetensors.torch import load_file

    from msd.eval.judges import get_judge

    guard = _copy_model(env, "pickled-guard")
    weights = guard / "model.safetensors"
    if weights.exists():
        torch.save(load_file(str(weights)), guard / "pytorch_model.bin")
        weights.unlink()
        shutil.copy(Path(env["model"]) / "model.safetensors", guard / "decoy.safetensors")
    with pytest.raises(MsdError, match="pickled"):
        get_judge("guard", model=str(guard))


def test_a_pickled_optimizer_state_never_advises_weights_only_false(env, capsys, tmp_path):
    assert main(train_argv(env, out="pickle-run")) == 0
    ckpt = env["root"] / "pickle-run" / "checkpoints" / "step_1"
    import torch

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"state": Evil()}, ckpt / "optimizer.pt")
    line = error_line(capsys, train_argv(env, "train.max_steps=2", out="pickle-run"))
    assert "refused to unpickle" in line and "weights_only=False" not in line


# ============================================================ 5. deadlines and limits

def _server(handler_body):
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            seen.append({"path": self.path, "auth": self.headers.get("Authorization")})
            self.rfile.read(int(self.headers["Content-Length"]))
            handler_body(self)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, seen


def _ok(h, text="safe refusal", ctype="application/json"):
    payload = json.dumps({"choices": [{"message": {"content": text}}]}).encode()
    h.send_response(200)
    h.send_header("Content-Type", ctype)
    h.send_header("Content-Length", str(len(payload)))
    h.end_headers()
    h.wfile.write(payload)


def _trickle(h):
    h.send_response(200)
    h.send_header("Content-Length", "100000")
    h.end_headers()
    try:
        for _ in range(200):
            h.wfile.write(b" ")
            h.wfile.flush()
            time.sleep(0.1)
    except OSError:
        pass


def test_a_trickling_endpoint_times_out_in_total(tmp_path):
    from msd.eval.judges import JudgeItem, get_judge

    server, _ = _server(_trickle)
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    judge = get_judge("llm", base_url=url, model="m", timeout=1.0, max_retries=1, cache_dir=str(tmp_path))
    t0 = time.time()
    with pytest.raises(MsdError, match="no complete reply within 1 s"):
        judge.judge([JudgeItem("q", "r", "en", {})])
    assert time.time() - t0 < 4
    server.shutdown()


def test_ctrl_c_stops_the_judge_at_once_and_keeps_verdicts(tmp_path):
    import signal
    import threading

    from msd.eval.judges import JudgeItem, get_judge

    calls = {"n": 0}

    def handler(h):
        calls["n"] += 1
        if calls["n"] == 1:
            _ok(h)
        else:
            _trickle(h)

    server, _ = _server(handler)
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    judge = get_judge("llm", base_url=url, model="m", timeout=60, concurrency=1, cache_dir=str(tmp_path))
    threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT)).start()  # a real Ctrl-C
    t0 = time.time()
    with pytest.raises(KeyboardInterrupt):
        judge.judge([JudgeItem("q1", "r1", "en", {}), JudgeItem("q2", "r2", "en", {})])
    assert time.time() - t0 < 4
    cached = (tmp_path / "llm_judge_cache.jsonl").read_text().splitlines()
    assert len(cached) == 1  # the verdict that arrived was kept
    server.shutdown()


def test_a_yaml_alias_bomb_fails_fast(env, capsys):
    bomb = ["a: &a [x,x,x,x,x,x,x,x,x]"] + [
        f"{c}: &{c} [{','.join('*' + p for _ in range(9))}]" for p, c in zip("abcdefgh", "bcdefghi")]
    text = "\n".join(bomb) + "\ntrain:\n  lr: *i\n"
    path = env["root"] / "bomb.yaml"
    path.write_text(text)
    assert len(text) < 600
    t0 = time.time()
    line = error_line(capsys, ["train", "--config", str(path)])
    assert time.time() - t0 < 2 and "alias" in line and str(path) in line


def test_a_huge_value_is_never_printed_whole(env, capsys):
    shared = ", ".join(["&x0 [1, 1]"] + [f"&x{i} [*x{i - 1}, *x{i - 1}]" for i in range(1, 15)])
    path = env["root"] / "shared.yaml"
    path.write_text(f"train:\n  lr: [{shared}]\n")  # 28 aliases, 2**15 leaves when expanded
    t0 = time.time()
    line = error_line(capsys, ["train", "--config", str(path)])
    assert "train.lr" in line and len(line) < 400 and time.time() - t0 < 2
    line = error_line(capsys, ["train", "train.batch_size=" + "9" * 2_000_000])
    assert "train.batch_size" in line and len(line) < 400


@pytest.mark.parametrize("name, text", [
    ("deep.jsonl", '{"id": "q", "en": "a", "meta": ' + "[" * 200000 + "]" * 200000 + "}\n"),
    ("deep2.jsonl", '{"id": "q", "en": "a", "meta": {"m": ' + "[" * 100 + "]" * 100 + "}}\n"),
    ("meta.jsonl", '{"id": "q", "en": "a", "jv": "b", "meta": "harmful"}\n'),
    ("meta2.jsonl", '{"id": "q", "en": "a", "jv": "b", "meta": [1]}\n'),
    ("harmful.jsonl", '{"id": "q", "en": "a", "jv": "b", "meta": {"harmful": "false"}}\n'),
    ("id.jsonl", '{"id": {"a": 1}, "en": "a", "jv": "b"}\n'),
])
def test_hostile_query_files(env, capsys, name, text):
    path = env["root"] / name
    path.write_text(text)
    line = error_line(capsys, eval_argv(env, env["root"] / "never-eval", bench=str(path)))
    assert name in line


def test_a_query_longer_than_the_context_window_is_named(env, capsys):
    path = env["root"] / "long.jsonl"
    path.write_text(json.dumps({"id": "huge", "en": "bread " * 3000, "jv": "bread " * 3000}) + "\n"
                    + json.dumps({"id": "ok", "en": "water", "jv": "water"}) + "\n")
    line = error_line(capsys, eval_argv(env, env["root"] / "long-eval", bench=str(path)))
    assert "query huge (jv)" in line and "context window of 512" in line
    write_queries(env["root"] / "long-train.jsonl", n=6)
    rows = [json.loads(x) for x in (env["root"] / "long-train.jsonl").read_text().splitlines()]
    rows[0]["jv"] = "bread " * 3000
    (env["root"] / "long-train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    line = error_line(capsys, train_argv(env, "data.heldout_fraction=0", out="long-train",
                                         source=env["root"] / "long-train.jsonl"))
    assert "context window of 512" in line and "q0|jv" in line


# ============================================================ 6. damaged files, failing environments

def test_a_utf16_config_is_read(env):
    from msd.config import load_config

    path = env["root"] / "utf16.yaml"
    path.write_bytes("train:\n  lr: 0.002\n".encode("utf-16"))
    assert load_config(path).train.lr == 0.002


def test_a_config_in_another_encoding_is_one_line(env, capsys):
    path = env["root"] / "latin1.yaml"
    path.write_bytes("train:\n  output_dir: r\xe9sum\xe9\n".encode("latin-1"))
    assert "not UTF-8" in error_line(capsys, ["train", "--config", str(path)])


@pytest.mark.parametrize("damage", ["config list", "empty weights", "truncated weights",
                                    "broken tokenizer", "config not json", "index names a .bin"])
def test_a_damaged_model_folder_is_one_line(env, capsys, damage):
    folder = env["root"] / f"damaged-{damage.replace(' ', '_')}"
    shutil.copytree(env["model"], folder)
    weights = folder / "model.safetensors"
    if damage == "config list":
        (folder / "config.json").write_text("[1, 2]")
    elif damage == "config not json":
        (folder / "config.json").write_text("{oops")
    elif damage == "empty weights":
        weights.write_bytes(b"")
    elif damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "broken tokenizer":
        (folder / "tokenizer.json").write_text('{"model": {"type": "WordLevel", "vocab": ')
    elif damage == "index names a .bin":
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "x.bin"}}))
    line = error_line(capsys, eval_argv(env, env["root"] / "never-eval", model=str(folder)))
    assert str(folder) in line


@pytest.mark.parametrize("state, problem", [
    ("[]", "not a JSON object"), ("{}", "no whole-number step"),
    ('{"step": "1", "config_fingerprint": "x"}', "no whole-number step"),
    ('{"step": 1}', "no config fingerprint"), ('{"step": -1, "config_fingerprint": "x"}', "no whole-number step"),
])
def test_a_damaged_state_json_is_one_line(env, capsys, tmp_path, state, problem):
    run = env["root"] / "state-base"
    if not run.exists():
        assert main(train_argv(env, out="state-base")) == 0
    copy = env["root"] / f"state-{abs(hash(state))}"
    shutil.copytree(run, copy, dirs_exist_ok=True)
    (copy / "checkpoints" / "step_1" / "state.json").write_text(state)
    line = error_line(capsys, train_argv(env, "train.max_steps=2", out=copy.name))
    assert problem in line and "--no-resume" in line


@pytest.mark.parametrize("field, value", [("lang", None), ("sample", [0]), ("sample", "0"),
                                          ("query_id", None), ("harmful", "yes"), ("label", "maybe"),
                                          ("benchmark", 3)])
def test_foreign_records_in_a_report_are_one_line(env, capsys, tmp_path, field, value):
    run = tmp_path / "ev"
    run.mkdir()
    good = {"benchmark": "b", "lang": "jv", "query_id": "q1", "sample": 0, "label": "safe",
            "response": "no", "prompt": "x"}
    bad = {**good, "query_id": "q2", field: value}
    (run / "records.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    line = error_line(capsys, ["report", str(run), "--out", str(tmp_path / "rep")])
    assert "records.jsonl:2" in line


def test_an_unwritable_judge_cache_is_refused_before_any_request(env, tmp_path):
    from msd.eval.judges import get_judge

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(MsdError, match="judge cache is not writable.*--judge-cache-dir"):
        get_judge("llm", base_url="http://127.0.0.1:9/v1", model="m", cache_dir=str(blocker / "cache"))


def test_a_cache_that_fails_mid_run_keeps_the_verdicts(tmp_path, monkeypatch):
    from msd.eval.judges import JudgeItem, get_judge
    from msd.eval.judges import llm

    server, _ = _server(_ok)
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    judge = get_judge("llm", base_url=url, model="m", cache_dir=str(tmp_path))

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(llm, "JsonlWriter", full)
    with pytest.warns(UserWarning, match="not cached"):
        verdicts = judge.judge([JudgeItem("q", "r", "en", {})])
    assert verdicts[0].label == "safe"
    server.shutdown()


def test_a_full_disk_during_a_checkpoint_leaves_no_temporary_folder(env, capsys, monkeypatch):
    from msd.train import checkpoint

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", "trainable.safetensors")

    monkeypatch.setattr(checkpoint, "save_file", full)
    line = error_line(capsys, train_argv(env, out="full-disk"))
    assert "No space left on device" in line
    assert not list((env["root"] / "full-disk" / "checkpoints").glob(".step_*"))


def test_compaction_on_a_full_disk_keeps_the_old_file(env, monkeypatch):
    from msd.eval import records as rec

    out = env["root"] / "compact-full"
    assert main(eval_argv(env, out)) == 0
    (out / "records.jsonl").write_text((out / "records.jsonl").read_text() * 2)  # duplicates
    before = (out / "records.jsonl").read_bytes()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rec, "atomic_write_text", full)
    with pytest.warns(UserWarning, match="not compacted"):
        rec.compact(out, rec.load_records(out))
    assert (out / "records.jsonl").read_bytes() == before
    assert not [p for p in out.iterdir() if p.name.startswith(".records")]


# ============================================================ messages that blame the right thing

def test_heldout_fraction_that_keeps_nothing_says_so(env, capsys):
    line = error_line(capsys, train_argv(env, "data.heldout_fraction=0.99", out="heldout"))
    assert "holds out all 6 queries" in line
    line = error_line(capsys, train_argv(env, "data.heldout_fraction=1", out="heldout"))
    assert "hold out all queries" in line and "languages" not in line


def test_an_html_endpoint_is_named_as_such(tmp_path):
    from msd.eval.judges import JudgeItem, get_judge

    def html(h):
        body = b"<html><body>Welcome to nginx</body></html>"
        h.send_response(200)
        h.send_header("Content-Type", "text/html")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    server, _ = _server(html)
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    judge = get_judge("llm", base_url=url, model="m", cache_dir=str(tmp_path))
    with pytest.raises(MsdError, match="HTML page") as err:
        judge.judge([JudgeItem("q", "r", "en", {})])
    assert "unreachable" not in str(err.value)
    server.shutdown()


def test_url_credentials_become_basic_auth_and_the_query_string_is_kept(tmp_path, monkeypatch):
    import base64

    from msd.eval.judges import JudgeItem, get_judge

    monkeypatch.delenv("MSD_JUDGE_API_KEY", raising=False)
    server, seen = _server(_ok)
    url = f"http://alice:s3cret@127.0.0.1:{server.server_address[1]}/v1?api-version=2024-01"
    judge = get_judge("llm", base_url=url, model="m", cache_dir=str(tmp_path))
    assert judge.judge([JudgeItem("q", "r", "en", {})])[0].label == "safe"
    assert seen[0]["path"] == "/v1/chat/completions?api-version=2024-01"
    assert seen[0]["auth"] == "Basic " + base64.b64encode(b"alice:s3cret").decode()
    assert "s3cret" not in json.dumps(judge.describe()) and "2024-01" not in judge.public_url
    server.shutdown()
