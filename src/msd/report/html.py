"""The self-contained HTML page of `msd report` (no external assets: CSS, JS and PNGs inline).

Sections: the runs and their tables, the plots (base64 PNG), sampled before/after responses
whose verdict changed, and sampled training responses with each token coloured by its DPSW
weight or by its student-teacher divergence (a toggle switches the colouring; hovering a token
shows both numbers). Colour intensity is relative to the largest value in that response.
Tokens show as the text reads, for any tokenizer: a character split over several tokens (byte-level
BPE, byte-fallback SentencePiece) is one box with their mean weight (msd.tokentext).
Every piece of text from records or token batches is HTML-escaped.
"""

from __future__ import annotations

import base64
import hashlib
from html import escape
from pathlib import Path

from msd.eval import metrics as M
from msd.report.runs import row_spans, run_line, section_title, span_means

MAX_CHARS = 400  # of an evaluation response shown in the page

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.8em 0;font-size:13px}th,td{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
.warn{background:#fff4e0;border-left:4px solid #e69500;padding:.4em .8em;margin:.4em 0}
img{max-width:100%;border:1px solid #eee;margin:.5em 0}
.resp{border:1px solid #e3e3e3;border-radius:4px;margin:.5em 0;padding:.4em .6em}
.meta{color:#666;font-size:12px;margin-bottom:.2em}
.toks{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:13px;line-height:1.9}
.t{white-space:pre-wrap;border-radius:2px;padding:1px 0}
.cut::after{content:"\\2026"}
.by-w .t{background:rgba(230,120,0,var(--w))}.by-d .t{background:rgba(40,110,230,var(--d))}
.legend span{display:inline-block;width:70px;height:12px;vertical-align:middle}
.by-w .lg-d,.by-d .lg-w{display:none}
button{margin-right:.5em}.pair{display:grid;grid-template-columns:1fr 1fr;gap:.8em}
.lab{font-weight:600}.safe,.complied{color:#2a7a2a}.unsafe,.refused{color:#b02a2a}.invalid{color:#777}
pre{white-space:pre-wrap;margin:.2em 0;font-size:12.5px}
"""

SCRIPT = """
function colourBy(k){document.body.className='by-'+k;}
"""


def _table(rows: list[list[str]]) -> str:
    head = "".join(f"<th>{escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{escape(c.replace('**', ''))}</td>" for c in r) + "</tr>"
                   for r in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{data}">'


def _pick(keys: list, n: int, salt: str) -> list:
    """n keys chosen deterministically but spread over the set (not just the first ones)."""
    return sorted(keys, key=lambda k: hashlib.sha1(f"{salt}{k}".encode()).hexdigest())[:n]


def _label(r: dict) -> str:
    label = M.record_label(r) or "error"
    return f'<span class="lab {escape(label)}">{escape(label)}</span>'


def _changed_pairs(runs, samples: int) -> str:
    """Responses whose verdict changed between the first and the last run, per language."""
    if len(runs) < 2 or samples <= 0:
        return ""
    first = {M.record_key(r): r for r in runs[0].records}
    last = {M.record_key(r): r for r in runs[-1].records}
    common = [k for k in first if k in last and M.record_label(first[k]) != M.record_label(last[k])]
    if not common:
        return ""
    parts = ["<details><summary>Sampled responses whose verdict changed "
             f"({escape(runs[0].label)} → {escape(runs[-1].label)}; may contain harmful text)</summary>"]
    for lang in sorted({k[1] for k in common}):
        keys = _pick([k for k in common if k[1] == lang], samples, "pairs")
        for k in keys:
            a, b = first[k], last[k]
            parts.append(
                f'<div class="resp"><div class="meta">{escape(lang)} · query {escape(str(k[2]))} · sample {k[3]}</div>'
                f'<pre>{escape(a.get("prompt", "")[:MAX_CHARS])}</pre><div class="pair">'
                f'<div>{escape(runs[0].label)}: {_label(a)}<pre>{escape(a.get("response", "")[:MAX_CHARS])}</pre></div>'
                f'<div>{escape(runs[-1].label)}: {_label(b)}<pre>{escape(b.get("response", "")[:MAX_CHARS])}</pre></div>'
                "</div></div>")
    parts.append("</details>")
    return "\n".join(parts)


def coloured_tokens(row: dict) -> str:
    """A saved response as its text reads (msd.report.runs.row_spans), one coloured box per
    span of whole characters; a character split over several tokens shows their mean weight
    and divergence. Leading spaces stay outside the box, so the colour marks the word only."""
    spans = span_means(row)
    wmax = max((max(0.0, w) for _, w, _, _ in spans), default=0.0) or 1.0
    dmax = max((max(0.0, d) for _, _, d, _ in spans), default=0.0) or 1.0
    out = []
    for text, w, d, n in spans:
        w, d = max(0.0, w), max(0.0, d)
        body = text.lstrip(" ")
        lead = text[:len(text) - len(body)]
        mean = f" (mean of {n} tokens)" if n > 1 else ""
        if not text:  # the bytes of a character cut at the token limit: marked, adds no text
            mean += " · no whole character (cut at the token limit)"
        out.append(f'{lead}<span class="t{"" if text else " cut"}" style="--w:{w / wmax:.3f};--d:{d / dmax:.3f}" '
                   f'title="weight {w:.3f} · divergence {d:.4f}{mean}">{escape(body)}</span>')
    return "".join(out)


def _token_section(trains, samples: int) -> str:
    parts = ["<h2>Training responses, token by token</h2>",
             "<p>Each token of a saved training response, coloured by its DPSW weight (how much the "
             "loss leaned on it; weights average 1 in a response) or by the student–teacher divergence "
             "at that token. Hover a token for both numbers.</p>",
             '<p><button onclick="colourBy(\'w\')">colour by DPSW weight</button>'
             '<button onclick="colourBy(\'d\')">colour by divergence</button></p>',
             '<p class="legend"><span class="lg-w" style="background:linear-gradient(90deg,rgba(230,120,0,0),'
             'rgba(230,120,0,1))"></span><span class="lg-d" style="background:linear-gradient(90deg,'
             'rgba(40,110,230,0),rgba(40,110,230,1))"></span> low → high (relative to the response\'s largest)</p>']
    for run in trains:
        parts.append(f"<h3>{escape(run.label)}</h3>")
        by_group: dict[tuple, list[int]] = {}
        for i, row in enumerate(run.batches):
            by_group.setdefault((int(row.get("step", 0)), str(row.get("lang", "?"))), []).append(i)
        for (step, lang), idx in sorted(by_group.items()):
            for i in _pick(idx, samples, f"{step}{lang}"):
                row = run.batches[i]
                ws = [float(w) for w in row["weights"]]
                parts.append(
                    f'<div class="resp"><div class="meta">step {step} · {escape(lang)} · query '
                    f'{escape(str(row.get("query_id", "?")))} · {escape(str(row.get("mode", "?")))} · '
                    f'{len(ws)} tokens · max weight {max(ws, default=0):.2f}</div>'
                    f'<div class="toks">{coloured_tokens(row)}</div>'
                    f'<details><summary>plain text</summary><pre>'
                    f'{escape("".join(t for t, _, _ in row_spans(row)))}</pre></details></div>')
    return "\n".join(parts)


def render(sections: list[dict], trains, out: Path, *, token_plot: Path | None = None,
           samples: int = 3) -> str:
    body = ["<h1>MSD evaluation report</h1>",
            "<p>Every number is recomputed from the runs' records. ASR = (unsafe + invalid) / n, in %, "
            "with Wilson 95% intervals in brackets; Δ in percentage points against the first run.</p>"]
    for s in sections:
        body.append(f"<h2>{escape(section_title(s))}</h2><ul>")
        body += [f"<li>{escape(run_line(r)[2:].replace('**', '').replace('`', ''))}</li>" for r in s["runs"]]
        body.append("</ul>")
        body += [f'<div class="warn">{escape(w)}</div>' for w in s["warnings"]]
        for title, rows in s["tables"]:
            body += [f"<h3>{escape(title)}</h3>", _table(rows)]
        if s.get("notes"):
            body.append("<h3>How the rates were computed</h3><ul>" + "".join(
                f"<li>{escape(n[2:].replace('**', ''))}</li>" for n in s["notes"]) + "</ul>")
        body += [_img(p, p.stem) for p in s["plots"]]
        if s["kind"] != "utility":
            body.append(_changed_pairs(s["runs"], samples))
    if trains:
        if token_plot:
            body.append(_img(token_plot, "token weights by position"))
        body.append(_token_section(trains, samples))
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>MSD report</title><style>{CSS}</style><script>{SCRIPT}</script></head>"
            f"<body class=\"by-w\">\n" + "\n".join(body) + "\n</body></html>\n")
