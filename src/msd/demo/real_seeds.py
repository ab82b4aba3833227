"""`msd demo --model NAME --seeds N`: the real-model demo over N seeds, and its seed table.

Layout of --out:
    seed_<S>/            one real-model demo (msd.demo.real) per seed: summary.json, report.md,
                         the record folders
    seeds.json, seeds.md the seed table below

Before training and with the teacher prompt, decoding is greedy: those figures do not depend on
the seed (the table says so when a seed's differ). After MSD, per language: each seed's held-out
ASR, the mean over seeds with a Student t 95% interval, where the mean of 1, 3, 5 or 10 new seeds
should fall (msd.eval.stats.rerun_interval), and the change from before: its mean over seeds
with the t interval, the two-sided one-sample t test over seeds of after − before (Holm over the
languages), and in how many seeds that seed's exact McNemar test on the same queries was
significant after Holm. Language fidelity (all answers) and benign refusal likewise, without
tests. With --baselines, each baseline's held-out ASR per language against MSD's, paired by seed.

A seed whose summary.json records the same seed, model, settings and overrides (and baselines,
when asked) is kept; any other is run again from an empty folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from msd.demo.seedtable import fmt_p, spread
from msd.eval import stats


def run_real_seeds(name: str, out: Path, seeds: list[int], overrides=(), progress: bool = True,
                   baselines: bool = False) -> dict:
    """Run each seed still missing, then write and return the seed table."""
    from msd.demo.real import run_real_demo
    from msd.io import ensure_writable_dir

    out = ensure_writable_dir(out)
    for seed in seeds:
        folder = out / f"seed_{seed}"
        if _done(folder, name, seed, list(overrides), baselines):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        if progress:
            print(f"msd demo: seed {seed} of {name}", flush=True)
        run_real_demo(name, folder, seed=seed, overrides=overrides, progress=progress, baselines=baselines)
    return write_table(out)


def _done(folder: Path, name: str, seed: int, overrides: list, baselines: bool) -> bool:
    from msd.demo.real import REAL_DEMOS, spec_settings

    try:
        s = json.loads((folder / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    return (s.get("model") == name and s.get("seed") == seed and s.get("overrides") == overrides
            and s.get("settings") == spec_settings(REAL_DEMOS[name]) and (bool(s.get("baselines")) or not baselines))


def load(out: Path) -> dict[int, dict]:
    """seed -> summary.json of every finished seed under `out`."""
    runs = {}
    for path in sorted(out.glob("seed_*/summary.json")):
        s = json.loads(path.read_text())
        runs[int(s["seed"])] = s
    return dict(sorted(runs.items()))


# rate -> the count its Wilson interval is over, in a summary's language entry
COUNTS = {"asr": "n", "benign_refusal": "n_benign", "fidelity_all": "n_answers"}


def _spread(values: list[float], lo: float = 0.0, hi: float = 1.0, counts: list[int] | None = None) -> dict:
    """Mean over seeds with its t interval and rerun intervals; for a rate, also the Wilson
    interval of the records pooled over seeds (`counts`: each seed's n), shown where the seeds
    all agree or there is one (a t interval of width 0 says nothing)."""
    from msd.eval.metrics import wilson

    out = spread(values, lo, hi)
    if counts and all(counts):
        n = sum(counts)
        out["pooled"] = {"n": n, "ci95": wilson(sum(v * k for v, k in zip(values, counts)), n)}
    return out


def seed_table(runs: dict[int, dict]) -> dict:
    """Per language: before, teacher, after per seed with intervals, and the tests of the change."""
    if not runs:
        from msd.errors import MsdError

        raise MsdError("no finished seed (seed_<S>/summary.json) to tabulate")
    first = next(iter(runs.values()))
    langs = first["languages"]
    table: dict = {"model": first["model"], "seeds": list(runs), "languages": langs, "per_language": {}}
    for c in [c for codes in langs.values() for c in codes]:
        before = [s["before"][c]["asr"] for s in runs.values()]
        after = [s["after"][c]["asr"] for s in runs.values()]
        teacher = [s["teacher_before"].get(c, {}).get("asr") for s in runs.values()]
        entry = {"before": before[0], "before_same_in_every_seed": len(set(before)) == 1,
                 "teacher": teacher[0], "after": _spread(after, counts=_counts(runs, c, "asr"))}
        if len(runs) >= 2:
            change = [a - b for a, b in zip(after, before)]
            entry["change"] = {**_spread(change, -1.0, 1.0), **stats.paired_t_test(before, after),
                               "test": "one-sample t over seeds of after - before"}
        mcnemar = [next((r for r in s.get("paired", {}).get("MSD: after vs before", {}).get("languages", [])
                         if r["lang"] == c), None) for s in runs.values()]
        entry["mcnemar_per_seed"] = [None if r is None else {k: r[k] for k in ("b", "c", "p", "p_holm", "significant")}
                                     for r in mcnemar]
        for key in ("fidelity_all", "benign_refusal"):
            values = [s["after"][c].get(key) for s in runs.values()]
            if all(v is not None for v in values):
                entry[key] = {"before": first["before"][c].get(key),
                              "after": _spread(values, counts=_counts(runs, c, key))}
        table["per_language"][c] = entry
    xs = [s["after"].get("xstest_en", {}).get("benign_refusal") for s in runs.values()]
    if all(v is not None for v in xs):
        table["xstest_en"] = {"before": first["before"]["xstest_en"].get("benign_refusal"),
                              "after": _spread(xs, counts=[s["after"]["xstest_en"].get("n_benign") or 0
                                                           for s in runs.values()])}
    tested = [c for c, e in table["per_language"].items() if "change" in e]
    for c, h in zip(tested, stats.holm([table["per_language"][c]["change"]["p"] for c in tested])):
        table["per_language"][c]["change"].update(p_holm=h["p_holm"], significant=h["significant"])
    table["baselines"] = _baselines(runs)
    return table


def _counts(runs: dict[int, dict], lang: str, key: str) -> list[int]:
    return [s["after"][lang].get(COUNTS[key]) or 0 for s in runs.values()]


def _baselines(runs: dict[int, dict]) -> dict:
    """method -> lang -> its held-out ASR over the seeds that ran it, against MSD's on those seeds."""
    with_b = {s: r["baselines"] for s, r in runs.items() if r.get("baselines")}
    methods = sorted({m for b in with_b.values() for m in b if m != "msd_on_policy"})
    out: dict = {}
    for m in methods:
        seeds = [s for s, b in with_b.items() if m in b]
        out[m] = {"seeds": seeds}
        for c in [c for codes in next(iter(runs.values()))["languages"].values() for c in codes]:
            msd = [with_b[s]["msd_on_policy"][c]["asr"] for s in seeds]
            own = [with_b[s][m][c]["asr"] for s in seeds]
            row = {"asr": _spread(own, counts=[with_b[s][m][c].get("n") or 0 for s in seeds])}
            if len(seeds) >= 2:
                row["vs_msd"] = {**stats.paired_t_test(msd, own), "test": "paired t over seeds"}
            out[m][c] = row
    return out


def _ci(m: dict) -> str:
    """mean [t interval over seeds]; where the seeds agree or there is one, the pooled Wilson
    interval (marked W)."""
    if m.get("sd"):
        return f"{m['mean']:.2f} [{m['ci95'][0]:.2f}, {m['ci95'][1]:.2f}]"
    if m.get("pooled"):
        lo, hi = m["pooled"]["ci95"]
        return f"{m['mean']:.2f} [W {lo:.2f}, {hi:.2f}]"
    return f"{m['mean']:.2f}"


def markdown(table: dict) -> str:
    seeds = ", ".join(map(str, table["seeds"]))
    lines = [f"# msd demo --model {table['model']} over seeds {seeds}", "",
             "Held-out ASR per language. Before and with the teacher prompt: greedy, the same in every "
             "seed. After MSD: each seed's value; the mean over seeds [Student t 95% interval]; "
             "where the seeds agree, the Wilson interval of the records pooled over seeds (W); "
             "where the mean of 3 new seeds should fall (95% t prediction interval). Change: after − "
             "before, mean over seeds [t interval], two-sided one-sample t test over seeds (p, Holm over "
             "the languages; * significant at 5%), and the seeds whose own exact McNemar test on the "
             "same queries is significant after Holm.", "",
             "| language | role | before | teacher prompt | after, per seed | after, mean [95%] | "
             "3 new seeds | change [95%] | p (Holm) | McNemar significant |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    roles = {c: role for role, codes in table["languages"].items() for c in codes}
    for c, e in table["per_language"].items():
        a, ch = e["after"], e.get("change")
        mc = [m for m in e["mcnemar_per_seed"] if m is not None]
        rerun = a["rerun"].get("3")
        lines.append(
            f"| {c} | {roles[c]} | {e['before']:.2f}{'' if e['before_same_in_every_seed'] else ' (differs by seed)'} | "
            + ("–" if e["teacher"] is None else f"{e['teacher']:.2f}") + " | "
            + ", ".join(f"{v:.2f}" for v in a["values"]) + f" | {_ci(a)} | "
            + (f"[{rerun[0]:.2f}, {rerun[1]:.2f}]" if rerun else "–") + " | "
            + (f"{ch['mean']:+.2f}" + (f" [{ch['ci95'][0]:+.2f}, {ch['ci95'][1]:+.2f}]" if ch.get("ci95") else "")
               + f" | {fmt_p(ch['p'])} ({fmt_p(ch['p_holm'])}){' *' if ch['significant'] else ''}" if ch else "– | –")
            + f" | {sum(m['significant'] for m in mc)} of {len(mc)} |")
    lines += ["", "| language | fidelity (all answers) before | after, mean [95%] | benign refusal before | "
              "after, mean [95%] |", "|---|---|---|---|---|"]
    for c, e in table["per_language"].items():
        cells = []
        for key in ("fidelity_all", "benign_refusal"):
            f = e.get(key)
            cells += ["–", "–"] if not f else [
                "–" if f["before"] is None else f"{f['before']:.2f}", _ci(f["after"])]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    if table.get("xstest_en"):
        x = table["xstest_en"]
        lines.append(f"| XSTest safe prompts (en) | – | – | "
                     + ("–" if x["before"] is None else f"{x['before']:.2f}") + f" | {_ci(x['after'])} |")
    if table["baselines"]:
        lines += ["", "Baselines: held-out ASR, mean over the seeds that ran them [95%]; p: paired t test over "
                  "seeds against MSD on those seeds.", "",
                  "| method | seeds | " + " | ".join(table["per_language"]) + " |",
                  "|---|---|" + "---|" * len(table["per_language"])]
        for m, rows in table["baselines"].items():
            cells = [_ci(rows[c]["asr"]) + (f", p {fmt_p(rows[c]['vs_msd']['p'])}" if "vs_msd" in rows[c] else "")
                     for c in table["per_language"]]
            lines.append(f"| {m} | {len(rows['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_table(out: Path) -> dict:
    from msd.io import atomic_write_json, atomic_write_text

    table = seed_table(load(out))
    atomic_write_json(out / "seeds.json", table)
    text = markdown(table)
    atomic_write_text(out / "seeds.md", text)
    print("\n" + text)
    return table
