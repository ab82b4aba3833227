"""PNG plots for `msd report` (matplotlib, Agg backend, no display needed).

Each function takes metrics already computed from records and writes PNGs atomically;
nothing here reads a model or a judge. Percentages on every axis.
"""

from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path

from msd.eval import metrics as M
from msd.io import atomic_write_bytes
from msd.report.runs import ordered_langs

COLOURS = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C"]
UNSAFE, INVALID = "#C44E52", "#B8B8B8"


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Labels are text, never markup: `$...$` in a run label, a folder or benchmark name is shown
    # as typed (fixed bug: it was read as mathtext and crashed the report).
    plt.rcParams.update({"font.size": 10, "axes.spines.top": False, "axes.spines.right": False,
                         "text.parse_math": False, "text.usetex": False})
    return plt


def save_figure(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    pyplot().close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _slug(text: str) -> str:
    """A file-name part unique to `text`: the text itself when it is a short lower-case name,
    else a readable slug plus a hash of the exact text. Fixed bug: "a b" and "a_b" shared one
    plot file, so one report section showed the other's plot."""
    if re.fullmatch(r"[a-z0-9_.-]{1,60}", text) and not re.search(r"-[0-9a-f]{12}$", text):
        return text
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:48].lower() or "run"
    return f"{slug}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def _width(n_groups: int, n_bars: int) -> float:
    return min(18.0, max(6.0, 0.35 * n_groups * max(n_bars, 2) + 1.5))


def grouped_bars(ax, groups: list[str], series: list[tuple[str, list, list | None]], ylabel: str) -> None:
    """Bars per group (x) and series (colour); values in [0, 1] shown as %, optional
    (lo, hi) whiskers. Missing values (None) leave a gap."""
    n = max(len(series), 1)
    width = 0.8 / n
    top = 0.0
    for k, (label, values, cis) in enumerate(series):
        xs = [i - 0.4 + width * (k + 0.5) for i in range(len(groups))]
        keep = [j for j, v in enumerate(values) if v is not None]
        ys = [100 * values[j] for j in keep]
        err = None
        if cis:
            err = [[max(0.0, ys[i] - 100 * cis[j][0]) for i, j in enumerate(keep)],
                   [max(0.0, 100 * cis[j][1] - ys[i]) for i, j in enumerate(keep)]]
        top = max([top] + ys + ([y + e for y, e in zip(ys, err[1])] if err else []))
        ax.bar([xs[j] for j in keep], ys, width * 0.95, label=label, color=COLOURS[k % len(COLOURS)],
               yerr=err, capsize=2 if err else 0, error_kw={"elinewidth": 0.8, "ecolor": "#333"})
        zeros = [xs[j] for i, j in enumerate(keep) if ys[i] == 0]  # a 0% bar would be invisible
        ax.plot(zeros, [0] * len(zeros), ls="none", marker="_", ms=max(4.0, 120 * width / max(len(groups), 1) ** 0.5),
                mew=3, color=COLOURS[k % len(COLOURS)], clip_on=False)
    ax.set_xticks(range(len(groups)))
    slanted = len(groups) > 8 or sum(len(g) for g in groups) > 40
    ax.set_xticklabels(groups, rotation=45 if slanted else 0, ha="right" if slanted else "center")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, min(105.0, max(10.0, 1.15 * top)))  # small rates stay readable
    ax.grid(axis="y", alpha=0.3)
    if len(series) > 1:
        ax.legend(frameon=False, fontsize=9)
    if M.AVERAGE in groups:  # set the average apart
        ax.axvline(groups.index(M.AVERAGE) - 0.5, color="#999", lw=0.8, ls="--")


def _series(runs, langs: list[str], key: str, with_ci: bool = False):
    return [(r.label, [r.metrics.get(lang, {}).get(key) for lang in langs],
             [M.interval(r.metrics.get(lang, {}), key) or (0, 0) for lang in langs] if with_ci else None)
            for r in runs]


def plot_section(section: dict, out: Path) -> list[Path]:
    """The PNGs of one (kind, benchmark) group of runs."""
    runs, bench = section["runs"], section["benchmark"]
    if section["kind"] == "utility":
        return [plot_utility(runs, out / "utility.png")]
    plt = pyplot()
    langs = ordered_langs(runs)
    paths = []
    if any("asr" in r.metrics.get(lang, {}) for r in runs for lang in langs):
        groups = langs + [M.AVERAGE]
        fig, ax = plt.subplots(figsize=(_width(len(groups), len(runs)), 4))
        grouped_bars(ax, groups, _series(runs, groups, "asr", with_ci=True), "ASR (%)")
        judge = (runs[-1].info.get("judge") or {}).get("name", "")
        ax.set_title(f"Attack success rate by language — {bench}" + (f" (judge: {judge})" if judge else "")
                     + "\nlower is better; whiskers: Wilson 95% interval")
        paths.append(save_figure(fig, out / f"asr_{_slug(bench)}.png"))
        paths.append(plot_split(runs, groups, bench, out / f"asr_split_{_slug(bench)}.png"))
    if any("benign_refusal" in r.metrics.get(lang, {}) for r in runs for lang in langs):
        groups = langs + [M.AVERAGE]
        fig, ax = plt.subplots(figsize=(_width(len(groups), len(runs)), 4))
        grouped_bars(ax, groups, _series(runs, groups, "benign_refusal", with_ci=True), "refused (%)")
        ax.set_title(f"Refusals of benign requests — {bench}\nlower is better; whiskers: Wilson 95% interval")
        paths.append(save_figure(fig, out / f"overrefusal_{_slug(bench)}.png"))
    return paths


def plot_split(runs, groups: list[str], bench: str, path: Path) -> Path:
    """One panel per run: unsafe (bottom) and invalid (top) share per language."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(runs), figsize=(max(6.0, 0.45 * len(groups) + 1.5) * min(len(runs), 2), 4),
                             sharey=True, squeeze=False)
    for ax, run in zip(axes[0], runs):
        unsafe = [100 * (run.metrics.get(g, {}).get("unsafe_rate") or 0) for g in groups]
        invalid = [100 * (run.metrics.get(g, {}).get("invalid_rate") or 0) for g in groups]
        xs = range(len(groups))
        ax.bar(xs, unsafe, 0.7, color=UNSAFE, label="unsafe")
        ax.bar(xs, invalid, 0.7, bottom=unsafe, color=INVALID, hatch="//", edgecolor="#888", label="invalid")
        tops = [u + i for u, i in zip(unsafe, invalid)]  # = ASR; its Wilson interval as whiskers
        cis = [M.interval(run.metrics.get(g, {}), "asr") or (t / 100, t / 100) for g, t in zip(groups, tops)]
        ax.errorbar(list(xs), tops, yerr=[[max(0.0, t - 100 * lo) for t, (lo, _) in zip(tops, cis)],
                                          [max(0.0, 100 * hi - t) for t, (_, hi) in zip(tops, cis)]],
                    fmt="none", ecolor="#333", elinewidth=0.8, capsize=2)
        ax.set_xticks(list(xs))
        ax.set_xticklabels(groups, rotation=45 if len(groups) > 6 else 0,
                           ha="right" if len(groups) > 6 else "center")
        ax.set_title(run.label)
        ax.set_ylim(0, 105)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("share of responses (%)")
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.suptitle(f"Unsafe vs invalid responses — {bench} (ASR = unsafe + invalid; whiskers: its Wilson "
                 "95% interval)", y=1.04)
    fig.legend(handles, names, loc="upper center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    return save_figure(fig, path)


def plot_utility(runs, path: Path) -> Path:
    """Scores per task; with two or more runs, a second panel with the deltas (pp)."""
    plt = pyplot()
    tasks = list(dict.fromkeys(t for r in runs for t in r.metrics if t != M.AVERAGE))
    n_panels = 2 if len(runs) > 1 else 1
    fig, axes = plt.subplots(1, n_panels, figsize=(_width(len(tasks), len(runs)) * (1 if n_panels == 1 else 1.6), 4),
                             squeeze=False)
    grouped_bars(axes[0][0], tasks, _series(runs, tasks, "score", with_ci=True), "score (%)")
    axes[0][0].set_title("Utility by task")
    if n_panels == 2:
        ax = axes[0][1]
        base = runs[0]
        for k, run in enumerate(runs[1:], start=1):
            deltas = [100 * ((run.metrics.get(t, {}).get("score") or 0) - (base.metrics.get(t, {}).get("score") or 0))
                      for t in tasks]
            width = 0.8 / (len(runs) - 1)
            xs = [i - 0.4 + width * (k - 0.5) for i in range(len(tasks))]
            ax.bar(xs, deltas, width * 0.95, color=COLOURS[k % len(COLOURS)], label=f"{run.label} − {base.label}")
        ax.axhline(0, color="#333", lw=0.8)
        ax.set_xticks(range(len(tasks)))
        ax.set_xticklabels(tasks, rotation=45, ha="right")
        ax.set_ylabel("Δ score (percentage points)")
        ax.set_title("Utility change (higher is better)")
        ax.legend(frameon=False, fontsize=9, loc="best")
        ax.grid(axis="y", alpha=0.3)
        lo, hi = ax.get_ylim()
        ax.set_ylim(min(lo, -1.0), max(hi, 1.0) * 1.15)  # room for the legend
    return save_figure(fig, path)


def plot_token_weights(trains, out: Path, max_pos: int = 64) -> Path | None:
    """Mean DPSW weight and mean divergence by response position, per sampling mode."""
    by_mode: dict[str, list[list[tuple[float, float]]]] = {}
    for run in trains:
        for row in run.batches:
            by_mode.setdefault(f"{run.label}: {row.get('mode', '?')}" if len(trains) > 1 else row.get("mode", "?"),
                               []).append(list(zip(row["weights"], row["divergence"])))
    if not by_mode:
        return None
    plt = pyplot()
    fig, (ax_w, ax_d) = plt.subplots(1, 2, figsize=(11, 3.6))
    for k, (mode, rows) in enumerate(sorted(by_mode.items())):
        sums: dict[int, list[float]] = {}
        for row in rows:
            for pos, (w, d) in enumerate(row[:max_pos]):
                s = sums.setdefault(pos, [0.0, 0.0, 0])
                s[0] += float(w)
                s[1] += float(d)
                s[2] += 1
        pos = sorted(sums)
        colour = COLOURS[k % len(COLOURS)]
        ax_w.plot(pos, [sums[p][0] / sums[p][2] for p in pos], color=colour, label=f"{mode} ({len(rows)} responses)")
        ax_d.plot(pos, [sums[p][1] / sums[p][2] for p in pos], color=colour, label=mode)
    ax_w.axhline(1.0, color="#999", lw=0.8, ls="--")
    ax_w.set(xlabel="response token position", ylabel="mean DPSW weight", title="Where DPSW puts its weight")
    ax_d.set(xlabel="response token position", ylabel="mean divergence", title="Student–teacher divergence")
    ax_w.legend(frameon=False, fontsize=8)
    for ax in (ax_w, ax_d):
        ax.grid(alpha=0.3)
    return save_figure(fig, out / "token_weights.png")
