"""Evaluation throughput: `msd eval`'s generation against plain `model.generate`.

Same model (the benchmark model: a random Qwen2-style decoder with the real 151,936-id Qwen
vocabulary), same student prompts (the chat template around filler queries of varying length),
same settings (greedy, --new-tokens, --batch prompts per call). msd: `msd.eval.safety.evaluate`
with the keyword judge into a fresh folder, its generation seconds read from run.json (prompts
sorted by length, msd's decode loop on CPU). Plain: the prompts in their given order, batches
left-padded by the tokenizer, `model.generate(do_sample=False)`. Both stop at the same EOS; the
greedy responses are compared (they must be the same tokens).

Runs alternate (msd, plain, msd, plain, ...); each figure is the median of --runs runs. The last
line is `eval_speedup=<plain seconds / msd seconds>`.

With `--model NAME` (any model msd accepts: `smollm2`, a folder, a GGUF file) the real model
and its tokenizer answer PolyRefuse's benign prompts in Spanish instead; both paths then stop at
the model's end of turn.

The speed-up depends on the CPU: msd's greedy decoding runs the output head in bfloat16 only
where the CPU has AVX512-BF16 or AMX (the first line printed names the CPU and its flags).

    python bench/eval_throughput.py                 # 64 prompts, 32 new tokens, batch 32
    python bench/eval_throughput.py --threads 1 --prompts 32
    python bench/eval_throughput.py --model smollm2 --prompts 24 --batch 8
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

from _common import REAL_QUERY_LANG, bench_tokenizer, machine_line, real_queries, resolve_model  # noqa: E402

SYNTHETIC_LANG = "jv"  # the synthetic queries' student language


def queries(n: int, real: bool = False, seed: int = 0):
    from msd.data import QueryTuple

    if real:
        return [QueryTuple(r["id"], {"en": r["en"], REAL_QUERY_LANG: r[REAL_QUERY_LANG]}, {"harmful": False})
                for r in real_queries(n)]
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = " ".join(f"w{rng.randrange(100_000)}" for _ in range(rng.randrange(6, 40)))
        out.append(QueryTuple(f"q{i}", {"en": words, SYNTHETIC_LANG: words}, {"harmful": True}))
    return out


def run_msd(model, tok, tuples, a) -> tuple[float, float, dict]:
    from msd.eval.judges import get_judge
    from msd.eval.safety import evaluate

    out = Path(tempfile.mkdtemp(prefix="msd-eval-bench-"))
    try:
        c0 = time.process_time()  # the whole evaluate call: generation, judging, records
        evaluate(model, tok, tuples, [a.lang], get_judge("keyword"), out, benchmark="bench",
                 max_new_tokens=a.new_tokens, batch_size=a.batch, progress=False)
        cpu = time.process_time() - c0
        seconds = json.loads((out / "run.json").read_text())["throughput"]["generate_seconds"]
        records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
        return seconds, cpu, {r["query_id"]: r["response"] for r in records}
    finally:
        shutil.rmtree(out, ignore_errors=True)


@torch.no_grad()
def run_plain(model, tok, tuples, a) -> tuple[float, float, dict]:
    from msd.generation import eos_ids
    from msd.prompts import PromptBuilder

    builder = PromptBuilder(tok)
    prompts = [builder.student(t.texts[a.lang]) for t in tuples]  # the ids msd generates from
    eos = sorted(eos_ids(model, tok))
    out, seconds, cpu = {}, 0.0, 0.0
    for start in range(0, len(tuples), a.batch):
        enc = tok.pad({"input_ids": prompts[start:start + a.batch]}, return_tensors="pt")  # left padding
        t0, c0 = time.perf_counter(), time.process_time()
        gen = model.generate(**enc, max_new_tokens=a.new_tokens, do_sample=False, eos_token_id=eos,
                             pad_token_id=tok.pad_token_id)
        seconds += time.perf_counter() - t0
        cpu += time.process_time() - c0
        for t, row in zip(tuples[start:start + a.batch], gen[:, enc["input_ids"].shape[1]:].tolist()):
            cut = next((i + 1 for i, x in enumerate(row) if x in eos), len(row))
            out[t.id] = tok.decode(row[:cut], skip_special_tokens=True)
    return seconds, cpu, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/msd_bench")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--model", help="any model msd accepts (e.g. smollm2); default: the synthetic benchmark model")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    print(machine_line(), flush=True)
    folder, real = resolve_model(a.model, Path(a.workdir))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = bench_tokenizer(folder, real)
    tuples = queries(a.prompts, real)
    a.lang = REAL_QUERY_LANG if real else SYNTHETIC_LANG
    # Warm-up (allocator, lazy initialisation), not timed.
    run_msd(model, tok, tuples[: a.batch], a)
    run_plain(model, tok, tuples[: a.batch], a)
    msd_s, plain_s, msd_c, plain_c = [], [], [], []
    for _ in range(a.runs):
        s, c, msd_out = run_msd(model, tok, tuples, a)
        msd_s.append(s)
        msd_c.append(c)
        s, c, plain_out = run_plain(model, tok, tuples, a)
        plain_s.append(s)
        plain_c.append(c)
    same = sum(msd_out[k] == plain_out[k] for k in msd_out)
    m, p = statistics.median(msd_s), statistics.median(plain_s)
    print(f"date: {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; model {folder if real else 'synthetic benchmark model'}; "
          f"{a.prompts} prompts, {a.new_tokens} new tokens, batch {a.batch}; load average at the end "
          f"{os.getloadavg()[0]:.1f}")
    print(f"msd eval generation: {m:.2f} s ({a.prompts / m:.2f} generations/s), runs {[round(x, 2) for x in msd_s]}")
    print(f"plain model.generate: {p:.2f} s ({a.prompts / p:.2f} generations/s), runs {[round(x, 2) for x in plain_s]}")
    print(f"identical greedy responses: {same}/{len(msd_out)}")
    # With one thread, CPU seconds are the time spent on a core: on a shared machine the wall
    # time also counts waiting for one (msd's CPU time includes judging and writing records).
    mc, pc = statistics.median(msd_c), statistics.median(plain_c)
    print(f"CPU seconds: msd {mc:.2f} (runs {[round(x, 2) for x in msd_c]}), plain {pc:.2f} "
          f"(runs {[round(x, 2) for x in plain_c]}), {torch.get_num_threads()} threads; "
          f"eval_speedup_cpu={pc / mc:.2f}")
    print(f"eval_speedup={p / m:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
