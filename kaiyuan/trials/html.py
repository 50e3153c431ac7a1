"""A self-contained HTML trial report: inline SVG plots drawn here, no scripts, works offline."""

from __future__ import annotations

import html
from typing import Any

W = 560
COLORS = {"incumbent": "#6b7280", "candidate": "#2563eb", "win": "#16a34a", "tie": "#a3a3a3", "loss": "#dc2626"}


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _num(v: Any, fmt: str = ".3f") -> str:
    return "-" if v is None else format(v, fmt)


def rate_bars(rates: dict[str, dict[str, float]], title: str, keys: list[str]) -> str:
    """Horizontal bars with 95% CI whiskers, values in [0, 1]."""
    h = 30 * len(keys) + 40
    x0, span = 120, W - 160
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" role="img" aria-label="{_e(title)}">',
             f'<text x="4" y="16" font-size="13" font-weight="bold">{_e(title)}</text>']
    for i, k in enumerate(keys):
        r = rates.get(k)
        if not r or r.get("rate") is None:
            continue
        y = 30 + i * 30
        w = max(0.0, min(1.0, r["rate"])) * span
        color = COLORS.get(k, "#2563eb")
        parts.append(f'<text x="4" y="{y + 14}" font-size="12">{_e(k)}</text>')
        parts.append(f'<rect x="{x0}" y="{y}" width="{w:.1f}" height="18" fill="{color}" opacity="0.8"/>')
        if r.get("lo") is not None and r.get("hi") is not None:
            lo, hi = x0 + r["lo"] * span, x0 + r["hi"] * span
            parts.append(f'<line x1="{lo:.1f}" x2="{hi:.1f}" y1="{y + 9}" y2="{y + 9}" stroke="black" stroke-width="1.5"/>')
            for xx in (lo, hi):
                parts.append(f'<line x1="{xx:.1f}" x2="{xx:.1f}" y1="{y + 3}" y2="{y + 15}" stroke="black"/>')
        parts.append(f'<text x="{x0 + span + 6}" y="{y + 14}" font-size="11">{r["rate"]:.2f}</text>')
    parts.append(f'<line x1="{x0}" x2="{x0}" y1="26" y2="{h - 8}" stroke="#999"/>')
    parts.append("</svg>")
    return "".join(parts)


def latency_hist(samples: dict[str, list[float]], bins: int = 24) -> str:
    vals = [v for s in samples.values() for v in s]
    if not vals:
        return "<p>No latency samples.</p>"
    lo, hi = min(vals), max(vals)
    width = (hi - lo) / bins or 1.0
    h, x0, y0, ph = 200, 40, 170, 140
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" role="img" aria-label="latency distributions">',
             '<text x="4" y="16" font-size="13" font-weight="bold">Latency distribution (ms)</text>']
    counts: dict[str, list[float]] = {}
    for name, s in samples.items():
        hist = [0] * bins
        for v in s:
            hist[min(int((v - lo) / width), bins - 1)] += 1
        counts[name] = [x / max(1, len(s)) for x in hist]
    top = max((max(c) for c in counts.values()), default=1) or 1
    bw = (W - x0 - 10) / bins
    for j, (name, c) in enumerate(counts.items()):
        for i, f in enumerate(c):
            bh = f / top * ph
            parts.append(f'<rect x="{x0 + i * bw + j * bw / 2:.1f}" y="{y0 - bh:.1f}" width="{bw / 2 - 1:.1f}" height="{bh:.1f}" '
                         f'fill="{COLORS.get(name, "#333")}" opacity="0.8"><title>{_e(name)}</title></rect>')
        parts.append(f'<text x="{W - 150}" y="{20 + j * 14}" font-size="11" fill="{COLORS.get(name, "#333")}">■ {_e(name)}</text>')
    parts.append(f'<line x1="{x0}" x2="{W - 10}" y1="{y0}" y2="{y0}" stroke="#999"/>')
    parts.append(f'<text x="{x0}" y="{y0 + 16}" font-size="11">{lo:.0f}</text><text x="{W - 50}" y="{y0 + 16}" font-size="11">{hi:.0f}</text>')
    parts.append("</svg>")
    return "".join(parts)


def cost_bars(cost: dict[str, Any]) -> str:
    inc, cand = cost.get("incumbent_per_1k_usd"), cost.get("candidate_per_1k_usd")
    if inc is None and cand is None:
        return "<p>No prices known: set <code>prices</code> in the trial or the price catalog.</p>"
    top = max(v for v in (inc, cand) if v is not None) or 1.0
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="100" role="img" aria-label="cost per 1000 requests">',
             '<text x="4" y="16" font-size="13" font-weight="bold">Cost per 1,000 requests (USD)</text>']
    for i, (name, v) in enumerate((("incumbent", inc), ("candidate", cand))):
        y = 30 + i * 30
        parts.append(f'<text x="4" y="{y + 14}" font-size="12">{name}</text>')
        if v is not None:
            parts.append(f'<rect x="100" y="{y}" width="{v / top * (W - 200):.1f}" height="18" fill="{COLORS[name]}"/>')
            parts.append(f'<text x="{106 + v / top * (W - 200):.1f}" y="{y + 14}" font-size="11">${v:.4f}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _candidate_section(c: dict[str, Any]) -> str:
    out = [f"<h2>Candidate {_e(c['candidate'])}</h2>"]
    v = c.get("verdict") or {}
    verdict = v.get("verdict", "no_data")
    out.append(f'<p class="verdict {_e(verdict)}"><b>Verdict: {_e(verdict.replace("_", " "))}</b> '
               f"on {_e(v.get('metric'))} (margin {_e(v.get('margin'))}); "
               f"{'fixed-horizon interval (planned n=' + _e(v.get('planned_n')) + ')' if v.get('method') == 'fixed_horizon' else 'anytime-valid interval'} "
               f"[{_num(v.get('lo'))}, {_num(v.get('hi'))}] against threshold {_num(v.get('threshold'))}"
               + (f", reached after {_e(v['decided_at'])} results" if v.get("decided_at") else "")
               + (f"; probably needs about {_e(v['items_needed'])} more results" if verdict == "inconclusive" and v.get("items_needed") else "")
               + ".</p>")
    f = c["failures"]
    out.append(f"<p>{c['pairs']} pairs; candidate failures: {f['candidate']}; incumbent failures: {f['incumbent']}.</p>")
    if f.get("candidate_errors"):
        out.append("<ul>" + "".join(f"<li><code>{_e(x)}</code></li>" for x in f["candidate_errors"]) + "</ul>")
    j = c.get("judge")
    if j:
        out.append(f"<p>Judge: {j['n']} judged, <b>{j['unparsable']} unparsable</b> (excluded); statuses {_e(j['status_counts'])}.</p>")
        if j.get("rates"):
            out.append(rate_bars(j["rates"], "Candidate vs incumbent (judge, 95% CI)", ["win", "tie", "loss"]))
        for ex in j.get("unparsable_examples") or []:
            out.append(f"<details><summary>unparsable judge output, item {_e(ex['item'])}</summary><pre>{_e(ex['judge_output'])}</pre></details>")
    for label, s in c["scorers"].items():
        if s.get("means"):
            m = s["means"]
            out.append(rate_bars({"incumbent": m["incumbent"], "candidate": m["candidate"]}, f"{label}: share correct (95% CI)",
                                 ["incumbent", "candidate"]))
            d = m["difference"]
            out.append(f"<p>{_e(label)}: difference {d['rate']:+.3f} [{_num(d['lo'])}, {_num(d['hi'])}], n={s['n']}.</p>")
    lat = c["latency_ms"]
    out.append(latency_hist(lat.get("samples") or {}))
    out.append(f"<p>Latency p50 {_num(lat['incumbent']['p50'], '.1f')} → {_num(lat['candidate']['p50'], '.1f')} ms "
               f"(Δ {_num(lat.get('p50_diff_ms'), '+.1f')}); p95 {_num(lat['incumbent']['p95'], '.1f')} → "
               f"{_num(lat['candidate']['p95'], '.1f')} ms (Δ {_num(lat.get('p95_diff_ms'), '+.1f')}).</p>")
    out.append(cost_bars(c["cost"]))
    p = c["cost"].get("projection") or {}
    if p.get("savings_usd") is not None:
        out.append(f"<p>Projected monthly at {p['requests_per_month']:,.1f} requests ({_e(p.get('volume_source'))}): "
                   f"${p['incumbent_usd']:.2f} → ${p['candidate_usd']:.2f}, saving ${p['savings_usd']:.2f} "
                   f"({_num(p.get('savings_pct'), '.1f')}%).</p>")
    if c.get("disagreements"):
        out.append("<h3>Largest disagreements</h3><table><tr><th>item</th><th>request</th><th>incumbent</th><th>candidate</th><th>judge</th></tr>")
        for d in c["disagreements"]:
            out.append(f"<tr><td>{_e(d['item'])}</td><td><pre>{_e(d['request'])}</pre></td><td><pre>{_e(d['incumbent'])}</pre></td>"
                       f"<td><pre>{_e(d['candidate'])}</pre></td><td>{_num(d.get('judge_score'), '.2f')}</td></tr>")
        out.append("</table>")
    return "\n".join(out)


def _order_text(o: dict[str, Any]) -> str:
    if o.get("order") == "shuffled":
        return f"replayed in a seeded random order (seed {o.get('seed')})"
    if o.get("order") == "dataset":
        return "replayed in the dataset's own order: the verdict covers the items replayed so far"
    return "results in arrival order: under drift the verdict covers the traffic seen so far"


def render_html(rep: dict[str, Any]) -> str:
    spend = rep["spend"]
    cap = spend.get("cap_usd")
    body = [f"<h1>Trial {_e(rep['trial'])}</h1>",
            f"<p>Mode {_e(rep['mode'])}; incumbent <b>{_e(rep['incumbent'])}</b>; candidates {_e(', '.join(rep['candidates']))}; "
            f"{rep['results']} results; confidence {rep['confidence']:.0%}; "
            f"{_e(_order_text(rep.get('order') or {}))}.</p>",
            f"<p>Trial spend ${spend['total_usd']:.4f}" + (f" of a ${cap:.2f} cap" if cap is not None else "") + ".</p>"]
    body += [_candidate_section(c) for c in rep["by_candidate"]]
    a = rep.get("after_promotion")
    if a:
        body.append(f"<h2>After promotion</h2><p>{a['results']} answers; error rate {a['error_rate']:.3f}; "
                    f"p95 {_num(a.get('p95_ms'), '.1f')} ms; judged loss rate {_num(a.get('loss_rate'))} "
                    f"({a['judged']} judged).</p>")
    if rep.get("routing"):
        body.append("<h2>Routing history</h2><ul>" + "".join(
            f"<li>{_e(r['action'])} → {_e(r['candidate'])} steps {_e(r['steps'])} by {_e(r.get('actor'))}"
            f"{': ' + _e(r['note']) if r.get('note') else ''}</li>" for r in rep["routing"]) + "</ul>")
    style = ("body{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;color:#111}"
             "table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:4px;vertical-align:top;font-size:12px}"
             "pre{white-space:pre-wrap;margin:0}.verdict.non_inferior{color:#15803d}.verdict.inferior{color:#b91c1c}")
    title = _e(f"Kaiyuan trial {rep['trial']}")
    return (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{title}</title><style>{style}</style></head>"
            f"<body>{''.join(body)}</body></html>")

