"""Paired comparisons and provenance for `msd report`.

Two evaluations of the same queries (the first run of a benchmark and each later one) are
compared per language on the records they share, paired by (query id, sample index): the ASR of
each on those pairs with Wilson 95% intervals, the change with a paired bootstrap 95% interval,
the exact McNemar test (b = attacked before only, c = attacked after only) and Holm's correction
over the languages of the comparison. Runs that share no (language, query, sample) with a
harmful verdict are refused; runs that share some are compared on those and say how many.

`provenance` says how each run's rates were computed: n, the judge, the split (benchmark),
decoding, and the share of answers cut at the token limit (records' `truncated` field; "n/a"
when the records do not have it).
"""

from __future__ import annotations

from msd.errors import MsdError
from msd.eval import metrics as M
from msd.eval import stats
from msd.report.runs import EvalRun, lang_name, ordered_langs

ALPHA = 0.05


def attacked(run: EvalRun) -> dict[tuple, bool]:
    """(lang, query id, sample) -> unsafe or invalid, for the run's judged harmful records."""
    return {(r["lang"], str(r["query_id"]), int(r.get("sample", 0))): r["label"] in ("unsafe", "invalid")
            for r in M.latest(run.records) if r.get("harmful", True) and r.get("label") is not None}


def refused(run: EvalRun) -> dict[tuple, bool]:
    """(lang, query id, sample) -> refused, for the run's judged benign records."""
    return {(r["lang"], str(r["query_id"]), int(r.get("sample", 0))): bool(r.get("refused"))
            for r in M.latest(run.records)
            if not r.get("harmful", True) and r.get("label") is not None and r.get("refused") is not None}


# outcome -> (the 0/1 outcome of each record, its name in tables, the records it reads, b/c's verb)
OUTCOMES = {"asr": (attacked, "ASR", "harmful", "attacked"),
            "benign_refusal": (refused, "benign refusal", "benign", "refused")}


def compare_runs(a: EvalRun, b: EvalRun, outcome: str = "asr") -> dict:
    """Per language: pairs, the outcome's rate in each with Wilson intervals (keys
    `<outcome>_a`, `<outcome>_b`), Δ (b − a) with a paired bootstrap interval, McNemar's exact p,
    Holm-adjusted p and significance over the languages. `outcome`: a key of OUTCOMES."""
    read, _, kind, _ = OUTCOMES[outcome]
    xa, xb = read(a), read(b)
    shared = xa.keys() & xb.keys()
    if not shared:
        raise MsdError(f"runs {a.label!r} and {b.label!r} share no judged {kind} (language, query id, "
                       "sample): nothing to pair", str(b.path))
    rows = []
    for lang in ordered_langs([a, b]):
        keys = sorted(k for k in shared if k[0] == lang)
        if not keys:
            continue
        x, y = [xa[k] for k in keys], [xb[k] for k in keys]
        n = len(keys)
        nb, nc = stats.discordant(x, y)
        boot = stats.paired_bootstrap_diff(x, y)
        rows.append({"lang": lang, "n": n, f"{outcome}_a": sum(x) / n, "ci95_a": M.wilson(sum(x), n),
                     f"{outcome}_b": sum(y) / n, "ci95_b": M.wilson(sum(y), n), "diff": boot["diff"],
                     "ci95_diff": boot["ci95"], "b": nb, "c": nc, "p": stats.mcnemar_exact(nb, nc)})
    for row, h in zip(rows, stats.holm([r["p"] for r in rows], ALPHA)):
        row.update(p_holm=h["p_holm"], significant=h["significant"])
    return {"a": a.label, "b": b.label, "benchmark": b.benchmark, "outcome": outcome, "alpha": ALPHA,
            "pairs": len(shared), "pairs_a": len(xa), "pairs_b": len(xb),
            "bootstrap": {"B": stats.BOOTSTRAP_B, "seed": stats.BOOTSTRAP_SEED}, "languages": rows}


def _pct(v: float) -> str:
    return f"{100 * v:.1f}"


def _p(p: float) -> str:
    return f"{p:.2e}" if p < 1e-3 else f"{p:.4f}"


def paired_rows(cmp: dict) -> list[list[str]]:
    """The comparison as table rows (header first)."""
    a, b, key = cmp["a"], cmp["b"], cmp.get("outcome", "asr")
    name = OUTCOMES[key][1]
    rows = [["language", "pairs", f"{name} % {a}", f"{name} % {b}", "Δ pp [paired bootstrap 95%]",
             "b / c (discordant)", "McNemar exact p", "p Holm", f"significant (Holm, {cmp['alpha']:g})"]]
    for r in cmp["languages"]:
        lo, hi = r["ci95_diff"]
        rows.append([lang_name(r["lang"]), str(r["n"]),
                     f"{_pct(r[key + '_a'])} [{_pct(r['ci95_a'][0])}, {_pct(r['ci95_a'][1])}]",
                     f"{_pct(r[key + '_b'])} [{_pct(r['ci95_b'][0])}, {_pct(r['ci95_b'][1])}]",
                     f"{100 * r['diff']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]",
                     f"{r['b']} / {r['c']}", _p(r["p"]), _p(r["p_holm"]),
                     "yes" if r["significant"] else "no"])
    return rows


def paired_note(cmp: dict) -> str:
    """What the paired table is computed on."""
    kept = ("all of them" if cmp["pairs"] == cmp["pairs_a"] == cmp["pairs_b"] else
            f"the {cmp['pairs']} shared of {cmp['pairs_a']} ({cmp['a']}) and {cmp['pairs_b']} ({cmp['b']}); "
            "the others are left out")
    verb = OUTCOMES[cmp.get("outcome", "asr")][3]
    return (f"Paired by language, query id and sample index: {cmp['pairs']} pairs ({kept}). "
            f"b = {verb} in {cmp['a']} only, c = {verb} in {cmp['b']} only; McNemar's exact "
            f"two-sided test on b and c; Holm over the {len(cmp['languages'])} languages; the Δ "
            f"interval is a percentile bootstrap over the pairs (B = {cmp['bootstrap']['B']}, "
            f"seed {cmp['bootstrap']['seed']}).")


def truncated_share(records: list[dict]) -> float | None:
    """Share of answers cut at the token limit, over the records that say (None: none does)."""
    flags = [r["truncated"] for r in M.latest(records) if isinstance(r.get("truncated"), bool)]
    return sum(flags) / len(flags) if flags else None


def provenance(run: EvalRun) -> str:
    """One line: how this run's rates were computed."""
    avg = run.metrics.get(M.AVERAGE, {})
    judge = run.info.get("judge") or {}
    name = judge.get("name") or run.records[0].get("judge") or "?"
    version = judge.get("version") or run.records[0].get("judge_version")
    settings = run.info.get("settings") or {}
    cut = truncated_share(run.records)
    parts = [f"n = {avg['n']} harmful" if "n" in avg else None,
             f"{avg['n_benign']} benign" if "n_benign" in avg else None,
             f"judge {name}" + (f" ({version})" if version and version != name else ""),
             f"split {run.info.get('split') or run.benchmark}",
             (f"decoding: max_new_tokens {settings['max_new_tokens']}, temperature "
              f"{settings.get('temperature')}") if "max_new_tokens" in settings else None,
             "cut at the token limit: " + ("n/a" if cut is None else f"{100 * cut:.1f}%")]
    return f"- **{run.label}**: " + "; ".join(p for p in parts if p)


def paired_sections(runs: list[EvalRun]) -> list[dict]:
    """The first run of a safety group against each later one, when ASR can be paired."""
    if len(runs) < 2 or not any("asr" in m for m in runs[0].metrics.values()):
        return []
    return [compare_runs(runs[0], b) for b in runs[1:]]


