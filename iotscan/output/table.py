"""The terminal table: what a person at a terminal reads after `iotscan analyze` (or `live`, `devices`).

Alerts come first (decisions about hosts, when the host-behaviour stage made some), then attacks (per family,
then the highest-scored flows with the reason for each), floods when a stage wrote some, devices, the busiest
flows, applications and a summary panel. Only
bounded things are held until the end: the top flows, per-family tallies, device records, a sketch of the
run's flow ids (for their short form) and the first alerts.

Narrow terminals (80 to 120 columns) shape the flow tables: the reason ("why") is the column that keeps its
width; addresses stay whole on one line (ip:port, the protocol in its own column); a flow is named by the
shortest prefix of its id, at least 6 digits, that no other flow of the run shares (`iotscan inspect` takes
it); the least wanted columns go first.
"""

from __future__ import annotations

import heapq
import io
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from iotscan.output.records import PROTOCOL_LABELS, endpoint_text, inspect_command

# Distinct sources and targets counted per attack family: beyond, shown as "N+" (a spoofed flood has one
# source per flow, and the table holds only bounded things)
DISTINCT_CAP = 10_000
TOP = 20  # flows per flow table
EVENTS_SHOWN = 10  # alerts (or floods) listed; the rest are counted
WRAP_MIN = 30  # a reason or evidence column narrower than this is not shown: the text goes under the table
GAP = 2  # columns are two spaces apart
# Record types of other stages shown in their own small table; any other unknown type is ignored.
EVENT_TYPES = ("alert", "flood")


# -- short flow ids ------------------------------------------------------------------------------------


class FlowIdPrefixes:
    """The shortest prefix of a flow id's digits, of MIN_DIGITS or more, that no other flow id of the run starts
    with, found in bounded memory: per prefix length a fixed array of saturating counts (0, 1, 2+) indexed by a
    hash of the prefix. A count of 1 proves that prefix unique (any other flow with it would count too); a
    hash collision can only make a prefix longer than needed, never ambiguous. Past MAX_DIGITS (or when every
    length collides, on runs of millions of flows), the whole id."""

    MIN_DIGITS, MAX_DIGITS = 6, 12
    _BITS = 20  # cells per length: 1 MiB each
    _POW10 = np.array([10 ** i for i in range(20)], dtype=np.uint64)
    _MIX = np.uint64(0x9E3779B97F4A7C15)

    def __init__(self) -> None:
        self._lengths = range(self.MIN_DIGITS, self.MAX_DIGITS + 1)
        self._counts = {k: np.zeros(1 << self._BITS, dtype=np.uint8) for k in self._lengths}
        self._pending: list[int] = []

    def add(self, flow_id: int) -> None:
        self._pending.append(flow_id)
        if len(self._pending) >= 4096:
            self._flush()

    def _cells(self, ids: np.ndarray, k: int) -> np.ndarray:
        """The cell of each id's first k digits (fewer for a shorter id: its length is part of the key)."""
        digits = np.searchsorted(self._POW10, ids, side="right").astype(np.int64)  # decimal digits of each id
        cut = np.maximum(digits - k, 0)
        prefix = ids // self._POW10[cut]
        key = prefix * np.uint64(32) + np.minimum(digits, k).astype(np.uint64)
        return (key * self._MIX) >> np.uint64(64 - self._BITS)

    def _flush(self) -> None:
        if not self._pending:
            return
        ids = np.array(self._pending, dtype=np.uint64)
        self._pending = []
        for k, counts in self._counts.items():
            cells, n = np.unique(self._cells(ids, k), return_counts=True)
            counts[cells] = np.minimum(counts[cells].astype(np.int64) + n, 2)

    def short(self, flow_id: int) -> str:
        self._flush()
        text = str(flow_id)
        ids = np.array([flow_id], dtype=np.uint64)
        for k in self._lengths:
            if len(text) <= k:
                return text
            if self._counts[k][self._cells(ids, k)[0]] == 1:
                return text[:k]
        return text


# -- columns and their fit ------------------------------------------------------------------------------


def _plain_width(markup: str) -> int:
    return max((Text.from_markup(line).cell_len for line in markup.split("\n")), default=0)


@dataclass(frozen=True)
class Column:
    """A column of a table whose widths are fitted here, not by Rich (which would wrap an address or cut the
    reason to fit): ``cell`` gives a record's Rich markup. A ``wraps`` column (a reason, evidence) takes the
    width left, at least WRAP_MIN; ``shrink_to`` lets a column be cut short with an ellipsis."""

    name: str
    cell: Callable[[dict[str, Any]], str]
    justify: str = "left"
    wraps: bool = False
    shrink_to: int | None = None
    max_width: int | None = None


@dataclass
class Fit:
    columns: list[Column]
    widths: dict[str, int] = field(default_factory=dict)


def fit_columns(columns: Sequence[Column], required: int, rows: list[dict[str, Any]], width: int) -> Fit | None:
    """The columns that fit in ``width``, given in priority order with the first ``required`` always wanted,
    and their widths; None when the required ones cannot fit whole. A wrapping column gets its natural width
    before any later column gets a place."""
    natural = {}
    for c in columns:
        w = max([_plain_width(c.name), *(_plain_width(c.cell(r)) for r in rows)])
        natural[c.name] = min(w, c.max_width) if c.max_width else w

    def need(chosen: list[Column], wrap_width: int) -> int:
        fixed = sum(natural[c.name] for c in chosen if not c.wraps)
        wrap = sum(min(natural[c.name], wrap_width) for c in chosen if c.wraps)
        return fixed + wrap + GAP * (len(chosen) - 1)

    chosen = list(columns[:required])
    widths = dict(natural)
    if need(chosen, WRAP_MIN) > width:  # narrow what may be narrowed
        for c in chosen:
            if c.shrink_to and need(chosen, WRAP_MIN) > width:
                widths[c.name] = natural[c.name] = min(natural[c.name], c.shrink_to)
        if need(chosen, WRAP_MIN) > width:
            return None
    for c in columns[required:]:
        # an optional wrapping column fits at WRAP_MIN; any other column must leave every wrapping column its
        # natural width
        if need([*chosen, c], WRAP_MIN if c.wraps else 10**6) <= width:
            chosen.append(c)
    left = width - need([c for c in chosen if not c.wraps], 0) - GAP * sum(c.wraps for c in chosen)
    for c in chosen:
        if c.wraps:
            widths[c.name] = min(natural[c.name], left)
    return Fit(chosen, widths)


def fitted_table(title: str, fit: Fit, order: Sequence[str], rows: list[dict[str, Any]], **options: Any) -> Table:
    table = _table(title, **options)
    shown = sorted(fit.columns, key=lambda c: order.index(c.name))
    for c in shown:
        table.add_column(c.name, width=fit.widths[c.name], justify=c.justify,  # type: ignore[arg-type]
                         no_wrap=not c.wraps, overflow="fold" if c.wraps else "ellipsis")
    for r in rows:
        table.add_row(*(c.cell(r) for c in shown))
    return table


# -- flow tables -----------------------------------------------------------------------------------


def address_text(ip: str, port: int, protocol: int) -> str:
    """ip:port (IPv6 in brackets) when the protocol has ports; the protocol has its own column."""
    return endpoint_text(ip, port) if protocol in (6, 17, 132) else ip


def _src(r: dict[str, Any]) -> str:
    return escape(address_text(r["src_ip"], r["src_port"], r["protocol"]))


def _dst(r: dict[str, Any]) -> str:
    return escape(address_text(r["dst_ip"], r["dst_port"], r["protocol"]))


def _proto(r: dict[str, Any]) -> str:
    return escape(str(PROTOCOL_LABELS.get(r["protocol"], r["protocol"])))


def _why(r: dict[str, Any]) -> str:
    """The first reason: the signature or rule that decided, or what pushed the score most."""
    return escape((r.get("reasons") or [""])[0])


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n:,.1f} TB"


def _verdict(r: dict[str, Any]) -> str:
    verdict = r.get("verdict") or ""
    score = f" {r['score']:.2f}" if r.get("score") is not None else ""
    if verdict == "attack":
        return f"[bold red]attack[/] {escape(r.get('family') or '')}{score}"
    return f"{escape(verdict)}{score}"


def _family_score(r: dict[str, Any]) -> str:  # in the attack table every row is an attack
    score = f" {r['score']:.2f}" if r.get("score") is not None else ""
    return f"[bold red]{escape(r.get('family') or 'unknown')}[/]{score}"


def _flow_columns(short: Callable[[dict[str, Any]], str]) -> dict[str, Column]:
    return {c.name: c for c in (
        Column("flow", lambda r: escape(short(r))),
        Column("src", _src),
        Column("dst", _dst),
        Column("proto", _proto),
        # narrow terminals: the protocol under the flow, the responder under the initiator
        Column("flow\nproto", lambda r: f"{escape(short(r))}\n{_proto(r)}"),
        Column("src\ndst", lambda r: f"{_src(r)}\n{_dst(r)}"),
        Column("attack", _family_score),
        Column("verdict", _verdict),
        Column("why", _why, wraps=True),
        Column("app", lambda r: escape(r.get("app") or ""), shrink_to=8, max_width=20),
        Column("bytes", lambda r: human_bytes(r["bytes"]), justify="right"),
        Column("packets", lambda r: f"{r['packets']:,}", justify="right"),
        Column("server_name", lambda r: escape(r.get("server_name") or ""), max_width=30),
    )}


# The flow tables: the columns always wanted (first), then the others by priority. Addresses side by side
# when they fit, else one above the other, else the reasons go under the table.
ATTACK_LAYOUTS = (("flow", "src", "dst", "proto", "attack", "why"), ("flow\nproto", "src\ndst", "attack", "why"),
                  ("flow\nproto", "src\ndst", "attack"))
ATTACK_OPTIONAL = ("app", "bytes", "packets", "server_name")
BUSIEST_LAYOUTS = (("flow", "src", "dst", "proto", "bytes"), ("flow\nproto", "src\ndst", "bytes"))
BUSIEST_OPTIONAL = ("app", "verdict", "packets", "server_name")
FLOW_ORDER = ("flow", "flow\nproto", "src", "dst", "src\ndst", "proto", "attack", "verdict", "why", "app", "bytes",
              "packets", "server_name")


def flow_table(title: str, records: list[dict[str, Any]], width: int, layouts: Sequence[Sequence[str]],
               optional: Sequence[str], short: Callable[[dict[str, Any]], str]) -> tuple[Table, Fit]:
    """The flows with the first layout whose columns fit ``width`` whole, and the fit chosen."""
    columns = _flow_columns(short)
    fit = None
    for layout in layouts:
        fit = fit_columns([columns[n] for n in (*layout, *optional)], len(layout), records, width)
        if fit is not None:
            break
    if fit is None:  # too narrow for the last layout too: let Rich squeeze it
        fit = Fit([columns[n] for n in layouts[-1]])
        fit.widths = {c.name: max(_plain_width(c.name), *(_plain_width(c.cell(r)) for r in records))
                      for c in fit.columns}
    return fitted_table(title, fit, FLOW_ORDER, records), fit


# -- the sink ------------------------------------------------------------------------------------------


class _FamilyTally:
    """One attack family's flows, distinct sources and targets (at most DISTINCT_CAP of each) and first reasons."""

    def __init__(self) -> None:
        self.flows = 0
        self.sources: set[str] = set()
        self.targets: set[str] = set()
        self.reasons: Counter[str] = Counter()  # reasons are a small fixed vocabulary (see scoring.explain)

    def add(self, record: dict[str, Any]) -> None:
        self.flows += 1
        for seen, address in ((self.sources, record["src_ip"]), (self.targets, record["dst_ip"])):
            if len(seen) < DISTINCT_CAP:
                seen.add(address)
        reasons = record.get("reasons")
        if reasons:
            self.reasons[reasons[0]] += 1


def _push_top(heap: list, item: tuple, size: int) -> None:
    if len(heap) < size:
        heapq.heappush(heap, item)
    elif item[:2] > heap[0][:2]:
        heapq.heapreplace(heap, item)


class TableSink:
    """What a person at a terminal wants: attacks first (per family, then the highest-scored flows with the
    reason for each and the command that shows the top one's packets), alerts and floods, devices, the
    busiest flows, applications, a summary panel."""

    TOP = TOP

    def __init__(self, out: IO[bytes], width: int | None = None, inspect_args: Sequence[str] = ()) -> None:
        self.out = out
        self.width = width
        self.inspect_args = tuple(inspect_args)  # analyze's non-default time-outs: flow ids depend on them
        self.busiest: list[tuple[int, int, dict[str, Any]]] = []  # min-heap on bytes
        self.attacks: list[tuple[float, int, dict[str, Any]]] = []  # min-heap on score
        self.families: dict[str, _FamilyTally] = {}
        self.devices: list[dict[str, Any]] = []
        self.events: dict[str, list[dict[str, Any]]] = {}  # alerts, floods: the first EVENTS_SHOWN
        self.event_counts: Counter[str] = Counter()
        self.apps: Counter[str] = Counter()
        self.app_bytes: Counter[str] = Counter()
        self.flow_ids = FlowIdPrefixes()
        self.seq = 0

    def write(self, record: dict[str, Any]) -> None:
        kind = record.get("event_type")
        if kind == "device":
            self.devices.append(record)
            return
        if kind in EVENT_TYPES:
            self.event_counts[kind] += 1
            shown = self.events.setdefault(kind, [])
            if len(shown) < EVENTS_SHOWN:
                shown.append(record)
            return
        if kind != "flow":
            return
        self.seq += 1
        self.flow_ids.add(record["flow_id"])
        app = record.get("app") or "Unknown"
        self.apps[app] += 1
        self.app_bytes[app] += record["bytes"]
        _push_top(self.busiest, (record["bytes"], self.seq, record), self.TOP)
        if record.get("verdict") == "attack":
            _push_top(self.attacks, (record.get("score") or 0.0, self.seq, record), self.TOP)
            family = record.get("family") or "unknown"
            tally = self.families.get(family)
            if tally is None:
                tally = self.families[family] = _FamilyTally()
            tally.add(record)

    def close(self, summary: dict[str, Any]) -> None:
        text = io.StringIO()
        terminal = self.out_is_terminal()
        console = Console(file=text, force_terminal=terminal, width=self.width or (None if terminal else 200),
                          highlight=False)
        # A prefix is unique among the flows this table saw: all of the run's unless --attacks-only kept some out.
        every_flow = self.seq >= (summary.get("flows") or 0)
        prefix = {} if every_flow else None

        def short(r: dict[str, Any]) -> str:
            if prefix is None:
                return str(r["flow_id"])
            if r["flow_id"] not in prefix:
                prefix[r["flow_id"]] = self.flow_ids.short(r["flow_id"])
            return prefix[r["flow_id"]]

        # alerts first: a decision about a host says more than any one flow; then the attacks, then floods
        if "alert" in self.events:
            console.print(event_table("alert", self.events["alert"], self.event_counts["alert"], console.width), "")
        if self.attacks:
            self._print_attacks(console, short)
        for kind in EVENT_TYPES:
            if kind in self.events and kind != "alert":
                console.print(event_table(kind, self.events[kind], self.event_counts[kind], console.width), "")
        if self.devices:
            console.print(device_table(self.devices, console.width), "")
        if self.busiest:
            records = [r for _, _, r in sorted(self.busiest, reverse=True)]
            scored = any("verdict" in r for r in records)
            optional = BUSIEST_OPTIONAL if scored else tuple(c for c in BUSIEST_OPTIONAL if c != "verdict")
            console.print(flow_table(f"Busiest flows (top {len(records)} by bytes)", records, console.width,
                                     BUSIEST_LAYOUTS, optional, short)[0], "")
        if self.apps:
            apps = _table("Applications")
            apps.add_column("app")
            apps.add_column("flows", justify="right")
            apps.add_column("bytes", justify="right")
            for app, n in self.apps.most_common(10):
                apps.add_row(escape(app), f"{n:,}", human_bytes(self.app_bytes[app]))
            console.print(apps, "")
        console.print(summary_panel(summary))
        self.out.write(text.getvalue().encode())
        self.out.flush()

    def _print_attacks(self, console: Console, short: Callable[[dict[str, Any]], str]) -> None:
        console.print(family_table(self.families), "")
        attacks = [r for _, _, r in sorted(self.attacks, reverse=True)]
        total = sum(t.flows for t in self.families.values())
        shown = f"top {len(attacks)} of {total:,}, " if total > len(attacks) else ""
        table, fit = flow_table(f"Attack flows ({shown}highest score first)", attacks, console.width,
                                ATTACK_LAYOUTS, ATTACK_OPTIONAL, short)
        console.print(table, "")
        if "why" not in fit.widths:  # too narrow for the column: the reasons under the table, whole
            for r in attacks:
                console.print(f"{escape(short(r))}: {escape('; '.join(r.get('reasons') or []))}")
            console.print()
        top = attacks[0]
        if os.path.isfile(top["source"]):  # a capture file (not an interface, not stdin): its packets can be shown
            command = inspect_command(top, flow=short(top), extra=self.inspect_args)
            console.print("Packets of the top attack:", style="bold")
            console.print(escape(command), soft_wrap=True)  # a command: never broken over lines
            console.print()
        commands = [r["inspect"] for r in attacks if r.get("inspect")]
        if commands:  # analyze --explain
            console.print("Their packets, flow by flow:", style="bold")
            for command in commands:
                console.print(escape(command), soft_wrap=True)
            console.print()

    def out_is_terminal(self) -> bool:
        isatty = getattr(self.out, "isatty", None)
        return bool(isatty and isatty())


# -- the other tables ---------------------------------------------------------------------------------


def _table(title: str, **options: Any) -> Table:
    """A table in the look of the fitted ones: a rule under the header, columns two spaces apart."""
    return Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 1), collapse_padding=True, show_edge=False,
                 pad_edge=False, **options)


def family_table(families: dict[str, _FamilyTally]) -> Table:
    table = _table("Attacks by family", title_style="bold red")
    table.add_column("family", no_wrap=True)
    for name in ("flows", "sources", "targets"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("most common first reason", overflow="fold", min_width=WRAP_MIN)

    def distinct(seen: set[str]) -> str:
        return f"{len(seen):,}+" if len(seen) >= DISTINCT_CAP else f"{len(seen):,}"

    for family, tally in sorted(families.items(), key=lambda ft: -ft[1].flows):
        reason = tally.reasons.most_common(1)[0][0] if tally.reasons else ""
        table.add_row(escape(family), f"{tally.flows:,}", distinct(tally.sources), distinct(tally.targets),
                      escape(reason))
    return table


def _event_what(r: dict[str, Any]) -> str:
    kind, detail, family = r.get("kind"), r.get("detail"), r.get("family")
    parts = [str(p) for p in (kind, detail) if p] or ([str(family)] if family else [])
    if family and kind and family != kind:
        parts.append(f"({family})")
    return escape(" ".join(parts))


def _event_where(r: dict[str, Any]) -> str:
    """The host an alert is about (and its device type), or the target of a flood."""
    target = r.get("target")
    if isinstance(target, dict):
        ip, port, proto = target.get("ip") or "", target.get("port"), target.get("protocol")
        where = endpoint_text(ip, port) if port else str(ip)
        label = PROTOCOL_LABELS.get(proto, proto) if isinstance(proto, int) else proto
        return escape(f"{where}/{label}" if label and port else where)
    if target:
        return escape(str(target))
    host = r.get("host_ip") or r.get("host_mac") or ""
    return escape(f"{host} ({r['host_device']})" if r.get("host_device") else str(host))


def _event_message(r: dict[str, Any]) -> str:
    if r.get("message"):
        return escape(str(r["message"]))
    counts = [f"{r[k]:,} {k}" for k in ("packets", "flows") if isinstance(r.get(k), int)]
    return escape(", ".join(counts))


def event_table(kind: str, records: list[dict[str, Any]], total: int, width: int, which: str = "first") -> Table:
    """Alerts or floods (records of other stages): when, what, about whom, the message. ``which`` of them the
    records are, when fewer than ``total``."""
    columns = [Column("time", lambda r: escape(str(r.get("timestamp") or "")[11:19])),
               Column("what", _event_what, max_width=28), Column("host/target", _event_where, max_width=40),
               Column("message", _event_message, wraps=True)]
    fit = fit_columns(columns, len(columns), records, width) or Fit(columns, {c.name: len(c.name) for c in columns})
    more = f", {which} {len(records)} of {total:,}" if total > len(records) else ""
    title = f"{kind.capitalize()}s ({total:,}{more})" if more else f"{kind.capitalize()}s ({total:,})"
    return fitted_table(title, fit, [c.name for c in columns], records, title_style="bold red")


def _device_evidence(d: dict[str, Any]) -> str:
    """The strongest three distinct signals, each in a few words."""
    seen: dict[str, None] = {}
    for e in d.get("evidence") or []:
        value = str(e.get("value"))
        seen.setdefault(f"{e.get('signal')}={value[:40] + '…' if len(value) > 40 else value}")
    return escape("; ".join(list(seen)[:3]))


def _device_ips(d: dict[str, Any]) -> str:
    ips = d.get("ips") or []
    return escape(ips[0] + (f" +{len(ips) - 1}" if len(ips) > 1 else "")) if ips else ""


DEVICE_COLUMNS = (  # in priority order
    Column("mac", lambda d: escape(d.get("mac") or "")),
    Column("type", lambda d: escape(d.get("device_type") or "")),
    Column("ip", _device_ips),
    Column("model or vendor", lambda d: escape(d.get("model") or d.get("vendor") or ""), shrink_to=12, max_width=32),
    Column("evidence", _device_evidence, wraps=True),
    Column("conf", lambda d: f"{d['confidence']:.2f}" if d.get("confidence") is not None else "", justify="right"),
    Column("flows", lambda d: f"{d.get('flows') or 0:,}", justify="right"),
)


def device_table(devices: list[dict[str, Any]], width: int = 200) -> Table:
    rows = sorted(devices, key=lambda d: -(d.get("bytes") or 0))
    fit = fit_columns(DEVICE_COLUMNS, 4, rows, width) or Fit(list(DEVICE_COLUMNS[:4]))
    if not fit.widths:
        fit.widths = {c.name: max(len(c.name), *(_plain_width(c.cell(d)) for d in rows)) for c in fit.columns}
    order = ("mac", "ip", "type", "model or vendor", "conf", "flows", "evidence")
    return fitted_table("Devices", fit, order, rows)


def summary_panel(summary: dict[str, Any]) -> Panel:
    lines = [
        f"packets  {summary.get('packets') or 0:,}    flows  {summary.get('flows') or 0:,}    "
        f"devices  {summary.get('devices') or 0:,}    attacks  {summary.get('attacks') or 0:,}",
        f"elapsed  {summary.get('elapsed_s') or 0:.2f} s    {summary.get('packets_per_s') or 0:,.0f} packets/s",
    ]
    for w in summary.get("warnings") or []:
        lines.append(f"[yellow]warning[/] {escape(str(w.get('source')))}: {escape(str(w.get('message')))}")
    for e in summary.get("errors") or []:
        lines.append(f"[red]error[/] {escape(str(e.get('source')))}: {escape(str(e.get('message')))}")
    return Panel("\n".join(lines), title="Summary", expand=False)
