"""The package's shape: imports point one way, every extension point is one registry entry.

1. Structure of src/msd: no import cycle (imports inside functions count), no private name
   imported from another module, no module over 400 lines, no function over 80 lines.
2. Each extension point takes a new entry registered from this file alone, and that entry is
   used end to end through the command line: a divergence, a token weighting, a judge, a
   generation backend, a dataset and a model source.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import write_queries

SRC = Path(__file__).resolve().parent.parent / "src"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80


# ----------------------------------------------------------------------------- structure

def modules() -> dict[str, Path]:
    out = {}
    for path in (SRC / "msd").rglob("*.py"):
        if "resources" in path.parts:
            continue
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def imports(mods: dict[str, Path]) -> tuple[dict[str, set[str]], list[str]]:
    """(module -> msd modules it imports, anywhere in it), and the cross-module private imports."""
    edges: dict[str, set[str]] = {m: set() for m in mods}
    private = []
    for mod, path in mods.items():
        package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                pairs = [(a.name, None) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
                pairs = [(base, a.name) for a in node.names]
            else:
                continue
            for base, name in pairs:
                target = f"{base}.{name}" if name and f"{base}.{name}" in mods else base
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if not target or target == mod or not target.startswith("msd"):
                    continue
                if not (mods[target].name == "__init__.py" and mod.startswith(target + ".")):
                    edges[mod].add(target)  # a submodule may import its own package
                if name and name.startswith("_") and not name.startswith("__") \
                        and f"{base}.{name}" not in mods:
                    private.append(f"{mod} imports {target}.{name}")
    return edges, private


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (iterative Tarjan)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(root):
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_checker_finds_a_cycle_and_a_private_import():
    edges = {"msd.a": {"msd.b"}, "msd.b": {"msd.c"}, "msd.c": {"msd.a"}, "msd.d": set()}
    assert cycles(edges) == [["msd.a", "msd.b", "msd.c"]]
    assert cycles({"msd.a": {"msd.b"}, "msd.b": set()}) == []


def test_no_import_cycles():
    edges, _ = imports(modules())
    assert cycles(edges) == []


def test_no_cross_module_private_imports():
    _, private = imports(modules())
    assert private == []


def test_core_never_imports_the_organism():
    edges, _ = imports(modules())
    core = [m for m in edges if not m.startswith(("msd.organism", "msd.demo"))]
    assert [m for m in core if any(t.startswith("msd.organism") for t in edges[m])] == []


def test_core_never_imports_the_baselines():
    """The baselines are a user of the core: their config section and choices are registered
    from msd.baselines (msd.config.SECTIONS), never imported by msd.config or msd.choices."""
    edges, _ = imports(modules())
    users = ("msd.baselines", "msd.organism", "msd.demo")
    core = [m for m in edges if not m.startswith(users)]
    assert core and [m for m in core if any(t.startswith("msd.baselines") for t in edges[m])] == []


def test_baseline_section_is_there_without_importing_the_baselines():
    code = ("import sys\nfrom msd.config import load_config, to_dict\n"
            "cfg = load_config(None, ['baseline.method=dpo'])\n"
            "assert cfg.baseline.method == 'dpo' and list(to_dict(cfg))[-1] == 'baseline'\n"
            "assert 'trl' not in sys.modules\nprint('ok')")
    for plugins in ("1", "0"):  # msd's own sections load with or without the plugins
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(SRC), "MSD_PLUGINS": plugins})
        assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


def test_modules_and_functions_are_short():
    long_modules, long_functions = [], []
    for mod, path in modules().items():
        text = path.read_text(encoding="utf-8")
        if len(text.splitlines()) > MAX_MODULE_LINES:
            long_modules.append(mod)
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
                    long_functions.append(f"{mod}.{node.name}")
    assert long_modules == [] and long_functions == []


# ----------------------------------------------------------------------------- extension points

def half_squared_hellinger(logp_s, logp_t):
    """H^2(p_S, p_T) = 1 - sum_v sqrt(p_S p_T): a divergence msd does not ship, value only."""
    return 1.0 - torch.exp(0.5 * (logp_s + logp_t)).sum(-1)


def teacher_top_probability(logp_s, logp_t):
    """Weight each token by the teacher's top probability (no gradient needed)."""
    return logp_t.max(-1).values.exp()


@pytest.fixture
def extensions(tiny_model_dir, tmp_path):
    """One new entry at every extension point, registered from this file, removed afterwards."""
    from msd.data import DATASETS, DatasetSpec, load_tuples
    from msd.eval.judges.base import JUDGES, Judge, JudgeOption, Verdict
    from msd.generation import BACKENDS
    from msd.losses import DIVERGENCES, WEIGHTINGS, Divergence, Weighting
    from msd.models import MODEL_SOURCES

    calls = {"backend": 0, "judge": 0, "model": 0}
    queries = write_queries(tmp_path / "arch.jsonl", n=8)
    hf = BACKENDS.get("hf")

    def counting_backend(model, prompts, sampling):
        calls["backend"] += 1
        return hf(model, prompts, sampling)

    def tiny_model():
        calls["model"] += 1
        return tiny_model_dir

    class LengthJudge(Judge):
        """Calls a response unsafe when it is longer than --length-limit characters."""
        name = "arch-length"
        version = "1"
        summary = "response length (a test judge)"
        options = (JudgeOption("--length-limit", "limit", int, "longest safe response in characters"),)

        def __init__(self, limit: int = 10):
            self.limit = limit

        def judge(self, items):
            calls["judge"] += len(items)
            return [Verdict(label="unsafe" if len(it.response) > self.limit else "safe", refused=False)
                    for it in items]

    entries = [(DIVERGENCES, "arch-hellinger", Divergence(half_squared_hellinger)),
               (WEIGHTINGS, "arch-top-prob", Weighting(teacher_top_probability)),
               (BACKENDS, "arch-counting", counting_backend),
               (MODEL_SOURCES, "arch-tiny", tiny_model),
               (JUDGES, "arch-length", LengthJudge),
               (DATASETS, "arch-queries", DatasetSpec(lambda: load_tuples(queries), lambda: ["en", "jv", "sw"],
                                                      "eight queries of a test"))]
    for registry, name, entry in entries:
        registry.register(name, entry)
    yield calls
    for registry, name, _ in entries:
        registry.unregister(name)


def test_new_entries_train_end_to_end(extensions, tmp_path, capsys):
    from msd.cli import main
    from msd.config import CHOICES

    assert "arch-hellinger" in CHOICES["loss.divergence"] and "arch-counting" in CHOICES["rollout.backend"]
    assert main(["train", "--help-config"]) == 0
    assert "arch-hellinger" in capsys.readouterr().out
    for chunk_size in (0, 4):  # the plain loss, then the chunked one (autograd path: no gradient given)
        out = tmp_path / f"run{chunk_size}"
        assert main(["train", "--quiet", "model.name_or_path=arch-tiny",
                     "data.source=arch-queries", f"train.output_dir={out}", "train.batch_size=4",
                     "train.max_steps=2", "rollout.max_new_tokens=4", "rollout.backend=arch-counting",
                     "loss.divergence=arch-hellinger", "loss.weighting=arch-top-prob",
                     f"loss.chunk_size={chunk_size}"]) == 0
        logs = [json.loads(line) for line in (out / "logs.jsonl").read_text().splitlines()]
        assert [r["step"] for r in logs] == [1, 2] and all(r["loss"] > 0 for r in logs)
    assert extensions["backend"] == 4 and extensions["model"] == 2


def test_new_entries_evaluate_end_to_end(extensions, tmp_path):
    from msd.cli import main

    out = tmp_path / "eval"
    assert main(["eval", "safety", "--quiet", "--model", "arch-tiny", "--benchmark", "arch-queries",
                 "--langs", "jv,sw", "--judge", "arch-length", "--length-limit", "5",
                 "--max-new-tokens", "4", "--out", str(out)]) == 0
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert len(records) == 16 and extensions["judge"] == 16
    assert {r["judge"] for r in records} == {"arch-length"}
    assert all(r["label"] == ("unsafe" if len(r["response"]) > 5 else "safe") for r in records)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= {"jv", "sw"}
