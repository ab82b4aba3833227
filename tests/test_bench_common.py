"""bench/_common.py: the machine line every benchmark prints, and the real queries of `--model`."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import _common  # noqa: E402

AVX2_ONLY = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B12
flags\t\t: fpu sse sse2 avx avx2 fma
processor\t: 1
model name\t: AMD EPYC 7B12
flags\t\t: fpu sse sse2 avx avx2 fma avx512f avx512_bf16
"""


def test_cpu_description_names_cpu_and_instruction_sets():
    line = _common.cpu_description(AVX2_ONLY)
    # the first processor's block decides; avx512f must not match inside another flag's name
    assert line == "AMD EPYC 7B12; avx2 yes, avx512f no, avx512_bf16 no, amx_bf16 no"
    bf16 = _common.cpu_description("model name : Xeon X\nflags : avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n")
    assert bf16 == "Xeon X; avx2 yes, avx512f yes, avx512_bf16 yes, amx_bf16 yes"


def test_cpu_description_without_flags_says_unknown():
    assert _common.cpu_description("model name : Some ARM\n").endswith("; instruction sets unknown")


def test_machine_line_names_threads_and_load():
    line = _common.machine_line()
    assert line.startswith("machine: ") and "torch threads" in line and "load average" in line
    assert _common.cpu_description() in line


def test_real_queries_are_parallel_benign_prompts(tmp_path):
    path = _common.write_bench_queries(tmp_path / "q.jsonl", 5, 16, real=True)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 5 and len({r["id"] for r in rows}) == 5
    for r in rows:
        assert set(r) == {"id", "en", _common.REAL_QUERY_LANG} and r["en"].strip() and r["es"] != r["en"]
