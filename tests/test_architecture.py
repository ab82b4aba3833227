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
