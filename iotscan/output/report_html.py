"""The report's page: one self-contained HTML file made from a ReportBuilder's bounded summaries.

Everything is inline (CSS, SVG figures) and a Content-Security-Policy forbids any load, so that opening the
report fetches nothing. There is no JavaScript. Every value from a record is escaped: a capture's server names
and user agents are the attacker's words.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from iotscan import __version__
from iotscan.output import report_plots as plots
from iotscan.output.report import (
    DISTINCT,
    GRAPH_PAIRS,
    SAMPLES_PER_FAMILY,
    TIMELINE_SOURCES,
    TRACKED_SOURCES,
    FamilyTally,
    short,
)

if TYPE_CHECKING:
    from iotscan.output.report import ReportBuilder

_PROTOCOLS = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmp6", 132: "sctp"}
PAIRS_LISTED = 15
APPS_LISTED = 12
EVIDENCE_LISTED = 8
CELL = 120  # longest text of a device's evidence or risk shown

CSS = """
:root{--ink:#1d2733;--muted:#5f6b7a;--line:#dde3ea;--bg:#f6f8fa;--red:#c0392b;--ok:#1e8449}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:var(--ink);
background:#fff}
header{background:#1d2733;color:#fff;padding:18px 28px}
header h1{margin:0 0 4px;font-size:22px}
header p{margin:0;color:#c6cfd9;font-size:13px}
nav{position:sticky;top:0;z-index:1;background:#fff;border-bottom:1px solid var(--line);padding:8px 28px}
nav a{margin-right:16px;color:#1f6fb2;text-decoration:none;font-weight:600;font-size:13px}
main{max-width:1240px;margin:0 auto;padding:8px 28px 40px}
section{margin-top:28px}
h2{font-size:18px;border-bottom:2px solid var(--line);padding-bottom:4px}
h3{font-size:15px;margin:20px 0 6px}
.tiles{display:flex;flex-wrap:wrap;gap:12px}
.tile{background:var(--bg);border:1px solid var(--line);border-radius:6px;padding:10px 16px;min-width:130px}
.tile b{display:block;font-size:22px}
.tile span{color:var(--muted);font-size:12px}
.tile.alarm b{color:var(--red)}
table{border-collapse:collapse;width:100%;margin:8px 0;font-size:13px}
th,td{border-bottom:1px solid var(--line);padding:5px 8px;text-align:left;vertical-align:top}
th{background:var(--bg);font-weight:600}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr:nth-child(even) td{background:#fbfcfd}
.chip{display:inline-block;border-radius:3px;padding:0 6px;color:#fff;font-size:12px;font-weight:600}
.free,ul.reasons,details{overflow-wrap:anywhere}
.mono,code{font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-size:12px;overflow-wrap:anywhere}
code.cmd{display:block;background:var(--bg);border:1px solid var(--line);padding:3px 6px;user-select:all}
.muted{color:var(--muted)}
.note{background:#fff8e1;border-left:4px solid #f0b429;padding:6px 10px;margin:8px 0}
.error{background:#fdecea;border-left:4px solid var(--red);padding:6px 10px;margin:8px 0}
figure{margin:10px 0}
figure svg{display:block;width:100%;height:auto}
figcaption{color:var(--muted);font-size:12px}
ul.reasons{margin:0;padding-left:16px}
details summary{cursor:pointer;color:#1f6fb2}
.bar{display:inline-block;height:8px;background:#1f6fb2;border-radius:2px;vertical-align:middle;margin-right:4px}
.met{color:var(--ok);font-weight:600}.missed{color:var(--red);font-weight:600}
"""


def e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _n(value: Any) -> str:
    return f"{value:,}" if isinstance(value, (int, float)) else e(value)


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return ""


def _pct(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "n/a"
    return f"{value * 100:.2f}%" if 0 < value < 0.01 else f"{value * 100:.1f}%"


def _time(ms: Any) -> str:
    if not isinstance(ms, (int, float)):
        return ""
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def free(value: Any) -> str:
    """Text from a record, which may be one long word: it may break anywhere rather than widen the page."""
    return f'<span class="free">{e(value)}</span>'


def _chip(series: str) -> str:
    return f'<span class="chip" style="background:{plots.colour(series)}">{e(series)}</span>'


def _distinct(seen: set[str], cap: int = DISTINCT) -> str:
    return f"{len(seen):,}+" if len(seen) >= cap else f"{len(seen):,}"


def _endpoint(ip: Any, port: Any, protocol: Any) -> str:
    address = f"[{ip}]" if ":" in str(ip) else str(ip)
    return f"{address}:{port}" if protocol in (6, 17, 132) else address


def table(head: Sequence[str], rows: Iterable[Sequence[str]], numeric: Sequence[int] = ()) -> str:
    """A table; cells are HTML already (escape values with e()); columns in ``numeric`` align right."""
    cls = [' class="n"' if i in numeric else "" for i in range(len(head))]
    out = ["<table><thead><tr>", *(f"<th{c}>{h}</th>" for c, h in zip(cls, head, strict=True)), "</tr></thead><tbody>"]
    for row in rows:
        out += ["<tr>", *(f"<td{c}>{cell}</td>" for c, cell in zip(cls, row, strict=True)), "</tr>"]
    out.append("</tbody></table>")
    return "".join(out)


def figure(svg: str, caption: str) -> str:
    return f"<figure>{svg}<figcaption>{caption}</figcaption></figure>"


# -- sections ------------------------------------------------------------------------------------------------


def summary_section(b: ReportBuilder) -> str:
    s = b.totals.merged
    tiles = [("packets", s.get("packets")), ("flows", s.get("flows")), ("devices", s.get("devices")),
             ("attack flows", s.get("attacks"))]
    tiles += [(name, s[name]) for name in ("alerts", "floods") if name in s]
    if b.counts.get("flood") and "floods" not in s:
        tiles.append(("floods", b.counts["flood"]))
    out = ['<div class="tiles">']
    for name, value in tiles:
        alarm = " alarm" if name in ("attack flows", "alerts", "floods") and value else ""
        out.append(f'<div class="tile{alarm}"><b>{_n(value or 0)}</b><span>{e(name)}</span></div>')
    if b.span:
        out.append(f'<div class="tile"><b style="font-size:14px">{_time(b.span[0])}<br>{_time(b.span[1])}</b>'
                   "<span>first and last flow (UTC)</span></div>")
    out.append("</div>")
    if b.families:
        out.append("<h3>Attacks by family</h3>")
        out.append(table(["family", "flows", "sources", "targets", "first", "last", "most common first reason"],
                         (_family_row(name, t) for name, t in _by_flows(b.families)), numeric=(1, 2, 3)))
    kinds = s.get("alert_kinds")
    if kinds:
        out.append("<h3>Alerts by kind</h3>" + table(["kind", "alerts"], ((e(k), _n(n)) for k, n in kinds.items()),
                                                     numeric=(1,)))
    out.append(_listed(b, "inputs", "Inputs", ["source", "packets", "flows", "status"],
                       lambda i: (f'<span class="mono">{e(i.get("source"))}</span>', _n(i.get("packets", "")),
                                  _n(i.get("flows", "")), e(i.get("status")))))
    for key, cls in (("errors", "error"), ("warnings", "note")):
        for item in s.get(key) or []:
            item = item if isinstance(item, dict) else {"message": item}
            out.append(f'<div class="{cls}"><b>{e(key[:-1])}</b> <span class="mono">{e(item.get("source"))}'
                       f"</span> {e(item.get('message'))}</div>")
        more = b.totals.listed[key] - len(s.get(key) or [])
        if more > 0:
            out.append(f'<p class="muted">and {more:,} more {e(key)}</p>')
    for note in _notes(b):
        out.append(f'<div class="note">{note}</div>')
    return "".join(out)


def _family_row(name: str, t: FamilyTally) -> list[str]:
    reason = t.reasons.top(1)
    return [_chip(name), _n(t.flows), _distinct(t.sources), _distinct(t.targets), _time(t.first_ms),
            _time(t.last_ms), free(reason[0][0]) if reason else ""]


def _by_flows(families: dict[str, FamilyTally]) -> list[tuple[str, FamilyTally]]:
    return sorted(families.items(), key=lambda ft: -ft[1].flows)


def _listed(b: ReportBuilder, key: str, title: str, head: list[str], row: Any) -> str:
    items = [i for i in b.totals.merged.get(key) or [] if isinstance(i, dict)]
    if not items:
        return ""
    more = b.totals.listed[key] - len(items)
    tail = f'<p class="muted">and {more:,} more</p>' if more > 0 else ""
    listed = table(head, map(row, items), numeric=(1, 2)) + tail
    if len(items) > 10:  # a directory of captures: folded
        listed = f"<details><summary>{len(items) + max(more, 0):,} {e(key)}</summary>{listed}</details>"
    return f"<h3>{e(title)}</h3>" + listed


def _notes(b: ReportBuilder) -> list[str]:
    notes = [e(n) for n in b.notes]
    if b.unreadable:
        notes.append(f"{b.unreadable:,} records lacked fields the report reads and were left out.")
    others = {k: n for k, n in b.counts.items() if k not in ("flow", "device", "alert", "flood")}
    if others:
        notes.append("Other records, not shown: " + ", ".join(f"{e(k)} {n:,}" for k, n in others.items()) + ".")
    return notes


def timeline_section(b: ReportBuilder) -> str:
    tracks = sorted(b.sources.items(), key=lambda st: -st[1].flows)[:TIMELINE_SOURCES]
    if not tracks:
        return '<p class="muted">No flows.</p>'
    order = ["benign", "unscored", "other verdicts", *(name for name, _ in _by_flows(b.families))]
    shown = len(tracks)
    more = (f" The {shown} sources with the most flows are drawn, of {b.sources_seen:,}."
            if b.sources_seen > shown else "")
    tracked = (f" (the sources drawn are chosen among the {TRACKED_SOURCES} largest kept while reading)"
               if b.sources_seen > TRACKED_SOURCES else "")
    return figure(plots.timeline(tracks, order),
                  "Flows by the time of their first packet (UTC), stacked: benign below, attack families above; "
                  f"▼ marks an alert or a flood.{more}{tracked}")


def verdicts_section(b: ReportBuilder) -> str:
    out = []
    if b.scores:
        threshold = (b.totals.merged.get("model") or {}).get("threshold", b.threshold)
        out.append(figure(plots.scores(b.scores, threshold if isinstance(threshold, (int, float)) else None),
                          "Flows per score bin (a symmetric log scale), by verdict. A flow at or above the threshold "
                          "is an attack; a matched signature scores 1."))
    else:
        out.append('<p class="muted">No flow was scored (analysed with --no-score, or records without scores).</p>')
    apps = b.apps.top(APPS_LISTED)
    if apps:
        out.append("<h3>Applications (nDPI)</h3>")
        out.append(table(["application", "flows", "bytes"], ((free(a), _n(v[0]), _bytes(v[1])) for a, v in apps),
                         numeric=(1, 2)))
    return "".join(out)


def devices_section(b: ReportBuilder) -> str:
    devices = [d for _, _, d in sorted(b.devices, reverse=True)]
    if not devices:
        return '<p class="muted">No device records (analysed with --no-devices, or no local device sent traffic).</p>'
    rows = []
    for d in devices:
        mac, ips = d.get("mac"), [str(ip) for ip in d.get("ips") or []]
        attacks = (b.device_attacks.items.get(mac) or [0])[0]
        alerts = b.device_alerts.items.get(mac) or next(
            (b.device_alerts.items[ip] for ip in ips if ip in b.device_alerts.items), None)
        floods = sum(b.flood_targets.items.get(ip, [0])[0] for ip in ips)
        conf = d.get("confidence")
        conf_cell = (f'<span class="bar" style="width:{min(max(conf, 0), 1) * 40:.0f}px"></span>{conf:.2f}'
                     if isinstance(conf, (int, float)) else "")
        findings = []
        if attacks:
            findings.append(f"{attacks:,} attack flows")
        if alerts:
            findings.append("alerts: " + ", ".join(f"{e(k)} {n:,}" for k, n in alerts[1].most_common()))
        if floods:
            findings.append(f"target of {floods:,} floods")
        findings += [_risk(r) for r in (d.get("risks") or [])[:5]]
        rows.append([f'<span class="mono">{e(mac)}</span><br><span class="muted">{e(", ".join(ips[:4]))}</span>',
                     e(d.get("device_type")), free(d.get("vendor")), free(d.get("model")), conf_cell,
                     _n(d.get("flows") or 0), _bytes(d.get("bytes") or 0),
                     f'<span class="free">{"<br>".join(findings)}</span>',
                     _evidence(d.get("evidence") or [])])
    seen = b.counts["device"]
    tail = f'<p class="muted">The {len(devices):,} devices with the most bytes are listed, of {seen:,}.</p>' \
        if seen > len(devices) else ""
    return table(["device", "type", "vendor", "model", "confidence", "flows", "bytes", "attacks, alerts, risks",
                  "evidence"], rows, numeric=(5, 6)) + tail


def _risk(risk: Any) -> str:
    if isinstance(risk, dict):
        text = risk.get("message") or risk.get("risk") or risk.get("name") or ", ".join(
            f"{k}: {v}" for k, v in risk.items())
        return f"risk: {e(short(str(text), CELL))}"
    return f"risk: {e(short(str(risk), CELL))}"


def _evidence(evidence: list[Any]) -> str:
    items = [x for x in evidence if isinstance(x, dict)][:EVIDENCE_LISTED]
    if not items:
        return ""
    lines = "".join(f"<li><b>{e(short(str(x.get('signal')), CELL))}</b> {e(short(str(x.get('value')), CELL))} → "
                    f"{e(short(str(x.get('points_to')), CELL))}</li>" for x in items)
    first = items[0]
    return (f"<details><summary>{e(short(str(first.get('signal')), CELL))}: "
            f"{e(short(str(first.get('points_to')), CELL))}</summary>"
            f'<ul class="reasons">{lines}</ul></details>')


OTHER_PEERS = "\0other peers"


def talk_section(b: ReportBuilder) -> str:
    pairs = b.pairs.top(GRAPH_PAIRS)
    if not pairs:
        return '<p class="muted">No flow with a local end.</p>'
    others = other_peers(b, pairs)
    drawn = [(local, peer, v[0], v[2]) for (local, peer), v in pairs] + [o[:4] for o in others]
    labels = _labels(b, {n for p in drawn for n in p[:2]})
    labels[OTHER_PEERS] = f"other peers ({sum(o[4] for o in others):,} flows)"
    out = [figure(plots.talk(sorted(drawn, key=lambda p: -p[2]), labels),
                  f"The {len(pairs)} pairs of a local host (left) and a peer (right) that exchanged the most bytes, "
                  "and what each of those hosts exchanged with all its other peers; a line is as thick as the bytes "
                  "(log scale), red when the pair exchanged attack flows.")]
    rows = []
    for (local, peer), (size, flows, attacks, packets, name) in b.pairs.top(PAIRS_LISTED):
        attack_cell = f'<span class="missed">{attacks:,}</span>' if attacks else "0"
        rows.append([free(labels.get(local, local)), free(labels.get(peer, peer)),
                     f'<span class="mono">{e(name)}</span>', _n(flows), _n(packets), _bytes(size), attack_cell])
    out.append(table(["local host", "peer", "name seen", "flows", "packets", "bytes", "attack flows"], rows,
                     numeric=(3, 4, 5, 6)))
    notes = []
    if b.flows_without_pair:
        notes.append(f"{b.flows_without_pair:,} flows had no local end (neither address private, link-local or "
                     "unique-local) and are not drawn.")
    if b.pairs.cut_weight:
        notes.append(f"More pairs than the {b.pairs.capacity:,} kept: a pair's figures may miss what it exchanged "
                     f"before the lightest were cut (at most {_bytes(b.pairs.cut_weight)} at each cut).")
    return "".join(out) + "".join(f'<p class="muted">{e(n)}</p>' for n in notes)


def other_peers(b: ReportBuilder, pairs: list[tuple[tuple[str, str], list[Any]]]
                ) -> list[tuple[str, str, int, int, int]]:
    """For each local host of ``pairs``, what it exchanged with all the peers not in them (a flood's thousands of
    sources): (host, OTHER_PEERS, bytes, attack flows, flows), when there is any."""
    out = []
    for local in dict.fromkeys(local for (local, _), _ in pairs):
        host = b.hosts.items.get(local)
        if host is None:  # a host cut from the counts: its total is not known
            continue
        mine = [v for ends, v in pairs if local in ends]
        flows = host[1] - sum(v[1] for v in mine)
        if flows > 0:
            # (a host or a pair cut from its counts and counted again may leave them short: never below 0)
            out.append((local, OTHER_PEERS, max(0, host[0] - sum(v[0] for v in mine)),
                        max(0, host[2] - sum(v[2] for v in mine)), flows))
    return out


def _labels(b: ReportBuilder, nodes: set[str]) -> dict[str, str]:
    """A node (a device's MAC, or an address) as a person reads it: a device's type and model, or the address."""
    devices = {d.get("mac"): d for _, _, d in b.devices}
    labels = {}
    for node in nodes:
        d = devices.get(node)
        if d is not None:
            kind = d.get("device_type") if d.get("device_type") != "unknown" else None
            what = d.get("model") or " ".join(str(x) for x in (d.get("vendor"), kind) if x)
            ip = (d.get("ips") or [node])[0]
            labels[node] = f"{what} ({ip})" if what else f"{ip} ({node})"
    return labels


def attacks_section(b: ReportBuilder) -> str:
    if not b.families:
        scored = bool(b.scores)
        return f'<p class="muted">{"No flow was judged an attack." if scored else "No flow was scored."}</p>'
    out = [f'<p class="muted">The {SAMPLES_PER_FAMILY} highest-scored flows of each family, with the reasons of the '
           "verdict and the command that shows their packets.</p>"]
    for name, t in _by_flows(b.families):
        out.append(f"<h3>{_chip(name)} {t.flows:,} flows, {_distinct(t.sources)} sources, "
                   f"{_distinct(t.targets)} targets, {_bytes(t.bytes)}</h3>")
        rows = []
        for score, _, _, r in sorted(t.samples, key=lambda s: s[:3], reverse=True):
            what = free(" ".join(str(x) for x in (r.get("app"), r.get("server_name")) if x))
            command = (f'<code class="cmd">{e(r["inspect"])}</code>' if r.get("inspect") else
                       '<span class="muted">no command: not a capture file that can be read again</span>')
            reasons = "".join(f"<li>{e(x)}</li>" for x in r.get("reasons") or [])
            rows.append([f"{_time(r.get('first_seen_ms'))}<br><span class=\"muted mono\">{e(r.get('source'))}</span>",
                         f'<span class="mono">{e(_endpoint(r.get("src_ip"), r.get("src_port"), r.get("protocol")))}'
                         f" → {e(_endpoint(r.get('dst_ip'), r.get('dst_port'), r.get('protocol')))}</span> "
                         f'<span class="muted">{e(_PROTOCOLS.get(r.get("protocol"), r.get("protocol")))}</span>'
                         f"<br>{what}", f"{score:.2f}", f'<ul class="reasons">{reasons}</ul>' + command])
        out.append(table(["first packet (UTC), source", "flow", "score", "why, and its packets"], rows,
                         numeric=(2,)))
    return "".join(out)


def alerts_section(b: ReportBuilder) -> str:
    out = []
    if b.alerts:
        rows = [[_time(a.get("decided_ms") or a.get("first_seen_ms")), e(a.get("kind")), e(a.get("detail")),
                 _chip(str(a.get("family"))) if a.get("family") else "", f"{a.get('score') or 0:.2f}",
                 f'<span class="mono">{e(a.get("host_ip"))}</span> {e(a.get("host_device"))}',
                 free(a.get("message")) + '<ul class="reasons">' + "".join(f"<li>{e(x)}</li>" for x in
                                                                        a.get("reasons") or []) + "</ul>"]
                for _, _, a in sorted(b.alerts, key=lambda x: x[:2], reverse=True)]
        out.append(f"<h3>Alerts ({b.counts['alert']:,}, highest score first)</h3>")
        out.append(table(["decided (UTC)", "kind", "detail", "family", "score", "host", "message"], rows,
                         numeric=(4,)))
    if b.floods:
        rows = []
        for _, _, f in sorted(b.floods, key=lambda x: x[:2], reverse=True):
            where = " ".join(str(f[k]) for k in ("dst_ip", "dst_port", "protocol") if f.get(k) is not None)
            rows.append([_time(f.get("first_seen_ms")), _chip(str(f.get("family") or "flood")),
                         f'<span class="mono">{e(where)}</span>', _n(f.get("packets")), _n(f.get("flows")),
                         _n(f.get("distinct_sources") or f.get("sources")), free(f.get("source"))])
        out.append(f"<h3>Floods ({b.counts['flood']:,}, most packets first)</h3>")
        out.append(table(["first (UTC)", "family", "target", "packets", "flows", "sources", "capture"], rows,
                         numeric=(3, 4, 5)))
    return "".join(out)


def model_section(b: ReportBuilder) -> str:
    out = []
    card = b.cards.get("flows")
    if card:
        out.append(_flow_card(card, b.totals.merged.get("model") or {}))
    devices = b.cards.get("devices")
    if devices:
        out.append(_device_card(devices))
    if not out:
        return '<p class="muted">No model card to quote.</p>'
    out.append('<p class="muted">From the models\' cards; <code>iotscan model info</code> prints the whole flow '
               "model card.</p>")
    return "".join(out)


def _flow_card(card: dict[str, Any], used: dict[str, Any]) -> str:
    if used.get("sha256") and card.get("sha256") and used["sha256"] != card["sha256"]:
        return (f'<div class="note">The flows were scored by a model ({e(used.get("name"))}, SHA-256 '
                f'<span class="mono">{e(str(used["sha256"])[:16])}…</span>) other than the one whose card is at '
                "hand: its figures are not quoted.</div>")
    loso = ((card.get("evaluation") or {}).get("leave_one_source_out") or {}).get("model") or {}
    targets = card.get("targets") or {}
    sources = (card.get("data") or {}).get("sources") or {}
    captures = sum(s.get("captures") or 0 for s in sources.values() if isinstance(s, dict))
    flows = sum(s.get("flows") or 0 for s in sources.values() if isinstance(s, dict))
    threshold = used.get("threshold", card.get("threshold"))
    out = [f"<h3>Flow classifier: {e(card.get('name'))}</h3>",
           f"<p>Trained {e(card.get('created'))} on {captures:,} captures ({flows:,} flows) of {len(sources)} "
           f"sources; threshold {e(threshold)}; SHA-256 <span class=\"mono\">{e(str(card.get('sha256'))[:16])}…"
           "</span>. Leave one source out (each source scored by a model that never saw it: what a user on another "
           "network sees):</p>"]
    rows = []
    for label, key, better in (("attack recall per capture", "attack_recall_per_capture", max),
                               ("benign false-positive rate per flow", "benign_fpr_per_flow", min),
                               ("family accuracy per capture", "family_accuracy_per_capture", max),
                               ("attack recall per flow", "attack_recall_per_flow", None),
                               ("macro-F1", "macro_f1", None)):
        value, target = loso.get(key), targets.get(key)
        verdict = ""
        if isinstance(value, (int, float)) and isinstance(target, (int, float)):
            met = value >= target if better is max else value <= target
            verdict = f'<span class="{"met" if met else "missed"}">{"met" if met else "not met"}</span>'
        shown = f"{value:.3f}" if key == "macro_f1" and isinstance(value, float) else _pct(value)
        rows.append([e(label), shown, ("≥ " if better is max else "≤ ") + _pct(target) if target else "", verdict])
    out.append(table(["figure", "value", "target", ""], rows, numeric=(1, 2)))
    per_class = {k: v for k, v in (loso.get("per_class") or {}).items() if isinstance(v, dict)}
    if per_class:
        out.append(figure(plots.per_class(per_class), "Recall and precision per class, leave one source out."))
    thin = card.get("thin_families")
    if thin:
        out.append(f'<p class="muted">Thin families (fewer than 3 attack captures in training): {e(", ".join(thin))}.'
                   "</p>")
    return "".join(out)


def _device_card(card: dict[str, Any]) -> str:
    evaluation = card.get("evaluation") or {}
    known, novel = evaluation.get("known_models") or {}, evaluation.get("leave_one_model_out") or {}
    rows = [[e("device type accuracy"), _pct(known.get("type_accuracy"))],
            [e("model accuracy"), _pct(known.get("model_accuracy"))],
            [e("model macro-F1"), f"{known['model_macro_f1']:.3f}" if isinstance(known.get("model_macro_f1"), float)
             else "n/a"],
            [e("precision when a model is named"), _pct(known.get("model_precision_when_answered"))]]
    if novel.get("units"):
        rows.append([e("models never seen: wrong model named"),
                     f"{novel.get('wrong_model_named', 0):,} of {novel['units']:,} units"])
    data = card.get("data") or {}
    return (f"<h3>Device model: {e(card.get('name'))}</h3><p>{_n(data.get('units'))} units of "
            f"{_n(data.get('labels_count'))} products; {e(evaluation.get('split'))}. On known products "
            f"({_n(known.get('units'))} units):</p>" + table(["figure", "value"], rows, numeric=(1,)))


SECTIONS = (("summary", "Summary", summary_section), ("timeline", "Timeline", timeline_section),
            ("verdicts", "Verdicts", verdicts_section), ("devices", "Devices", devices_section),
            ("talk", "Who talks to whom", talk_section), ("attacks", "Attack flows", attacks_section),
            ("alerts", "Alerts and floods", alerts_section), ("model", "The models", model_section))


def render_page(b: ReportBuilder) -> str:
    parts = [(anchor, title, make(b)) for anchor, title, make in SECTIONS]
    parts = [p for p in parts if p[2]]
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    nav = "".join(f'<a href="#{a}">{e(t)}</a>' for a, t, _ in parts)
    body = "".join(f'<section id="{a}"><h2>{e(t)}</h2>{content}</section>' for a, t, content in parts)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; "
            "img-src data:\">"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{e(b.title)}</title><style>{CSS}</style></head><body>"
            f"<header><h1>{e(b.title)}</h1><p>iotscan {e(__version__)} · generated {generated}</p></header>"
            f"<nav>{nav}</nav><main>{body}</main></body></html>\n")
