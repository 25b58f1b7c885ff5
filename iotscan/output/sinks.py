"""The sink stage: records out as NDJSON, one JSON document, CSV, or tables for a person.

Every sink streams: flows are written as they come; only bounded things (the busiest flows for
the table, device records, counters) are held until the end.
"""

from __future__ import annotations

import csv
import heapq
import io
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, Protocol

import orjson
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from iotscan.output.records import FLOW_FIELD_NAMES

FORMATS = ("table", "ndjson", "json", "csv")
# Distinct sources and targets counted per attack family in the table: beyond, shown as "N+" (a spoofed
# flood has one source per flow, and the table holds only bounded things)
DISTINCT_CAP = 10_000
# The flow tables' columns, most wanted first: on a narrow terminal the last ones are left out
ATTACK_COLUMNS = ("flow_id", "src", "dst", "verdict", "why", "app", "bytes", "packets", "server_name")
BUSIEST_COLUMNS = ("flow_id", "src", "dst", "bytes", "app", "verdict", "packets", "server_name")
_ORJSON_OPTS = orjson.OPT_APPEND_NEWLINE | orjson.OPT_NON_STR_KEYS


class Sink(Protocol):
    def write(self, record: dict[str, Any]) -> None: ...

    def close(self, summary: dict[str, Any]) -> None: ...


def dumps(record: dict[str, Any]) -> bytes:
    return orjson.dumps(record, option=_ORJSON_OPTS)


class NdjsonSink:
    """One JSON object per line; flushed per line when a pipeline reads it live."""

    def __init__(self, out: IO[bytes], flush_each: bool = False) -> None:
        self.out = out
        self.flush_each = flush_each

    def write(self, record: dict[str, Any]) -> None:
        self.out.write(dumps(record))
        if self.flush_each:
            self.out.flush()

    def write_lines(self, lines: bytes) -> None:
        """Records already written as NDJSON elsewhere, whole lines (iotscan.cluster: a worker's), as they are."""
        self.out.write(lines)
        if self.flush_each:
            self.out.flush()

    def close(self, summary: dict[str, Any]) -> None:
        self.write(summary)
        self.out.flush()


class JsonSink:
    """One document, {"flows": [...], "devices": [...], "summary": {...}}, with flows streamed into it."""

    def __init__(self, out: IO[bytes], stream_type: str = "flow") -> None:
        self.out = out
        self.stream_key = _plural(stream_type)
        self.stream_type = stream_type
        self.count = 0
        self.others: dict[str, list[dict[str, Any]]] = {}
        self.out.write(b'{"' + self.stream_key.encode() + b'":[')

    def write(self, record: dict[str, Any]) -> None:
        kind = record.get("event_type", "record")
        if kind != self.stream_type:
            self.others.setdefault(_plural(kind), []).append(record)  # devices, stats: few of them
            return
        if self.count:
            self.out.write(b",\n")
        self.out.write(orjson.dumps(record))
        self.count += 1

    def close(self, summary: dict[str, Any]) -> None:
        self.out.write(b"]")
        for key, records in self.others.items():
            self.out.write(b',"' + key.encode() + b'":' + orjson.dumps(records))
        self.out.write(b',"summary":' + orjson.dumps(summary) + b"}\n")
        self.out.flush()


def _plural(event_type: str) -> str:
    return event_type if event_type.endswith("s") else event_type + "s"


class CsvSink:
    """Rows of one record type with a header; lists are joined with "; "."""

    def __init__(self, out: IO[bytes], columns: Sequence[str], row_type: str = "flow") -> None:
        self.out = out
        self.text = io.TextIOWrapper(out, encoding="utf-8", newline="", write_through=True)
        self.columns = list(columns)
        self.row_type = row_type
        self.writer = csv.writer(self.text)
        if not _appending_to_content(out):  # a file appended to (live -o) has its header already
            self.writer.writerow(self.columns)

    def write(self, record: dict[str, Any]) -> None:
        if record.get("event_type") != self.row_type:
            return
        row = []
        for name in self.columns:
            value = record.get(name)
            if value is None:
                value = ""
            elif isinstance(value, list):
                value = "; ".join(v if isinstance(v, str) else orjson.dumps(v).decode() for v in value)
            elif isinstance(value, bool):
                value = "true" if value else "false"
            row.append(value)
        self.writer.writerow(row)

    def close(self, summary: dict[str, Any]) -> None:
        self.text.flush()
        self.text.detach()
        self.out.flush()


def _appending_to_content(out: IO[bytes]) -> bool:
    try:
        return out.seekable() and out.tell() > 0
    except (OSError, ValueError):
        return False


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


class TableSink:
    """What a person at a terminal wants: attacks first (per family, then the highest-scored flows with the
    reason for each), the busiest flows, devices, a summary panel."""

    TOP = 20

    def __init__(self, out: IO[bytes], width: int | None = None) -> None:
        self.out = out
        self.busiest: list[tuple[int, int, dict[str, Any]]] = []  # min-heap on bytes
        self.attacks: list[tuple[float, int, dict[str, Any]]] = []  # min-heap on score
        self.families: dict[str, _FamilyTally] = {}
        self.devices: list[dict[str, Any]] = []
        self.apps: Counter[str] = Counter()
        self.app_bytes: Counter[str] = Counter()
        self.seq = 0
        self.width = width

    def write(self, record: dict[str, Any]) -> None:
        kind = record.get("event_type")
        if kind == "device":
            self.devices.append(record)
            return
        if kind != "flow":
            return
        self.seq += 1
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
        if self.attacks:
            console.print(family_table(self.families))
            attacks = [r for _, _, r in sorted(self.attacks, reverse=True)]
            total = sum(t.flows for t in self.families.values())
            shown = f"top {len(attacks)} of {total:,}, " if total > len(attacks) else ""
            table, columns = _flow_table(f"Attack flows ({shown}highest score first)", attacks, console.width,
                                         ATTACK_COLUMNS)
            console.print(table)
            if "why" not in columns:  # too narrow for the column: the reasons under the table
                for r in attacks:
                    console.print(f"{r['flow_id']}: {escape('; '.join(r.get('reasons') or []))}")
                console.print()
            commands = [r["inspect"] for r in attacks if r.get("inspect")]
            if commands:  # analyze --explain
                console.print("Their packets, flow by flow:", style="bold")
                for command in commands:
                    console.print(escape(command), soft_wrap=True)
                console.print()
        if self.devices:
            console.print(device_table(self.devices))
        if self.busiest:
            scored = any("verdict" in r for _, _, r in self.busiest)
            console.print(_flow_table(f"Busiest flows (top {min(self.TOP, len(self.busiest))} by bytes)",
                                      [r for _, _, r in sorted(self.busiest, reverse=True)], console.width,
                                      BUSIEST_COLUMNS if scored else [c for c in BUSIEST_COLUMNS if c != "verdict"])[0])
        if self.apps:
            apps = Table(title="Applications", box=box.SIMPLE_HEAD)
            apps.add_column("app")
            apps.add_column("flows", justify="right")
            apps.add_column("bytes", justify="right")
            for app, n in self.apps.most_common(10):
                apps.add_row(escape(app), f"{n:,}", _human_bytes(self.app_bytes[app]))
            console.print(apps)
        console.print(summary_panel(summary))
        self.out.write(text.getvalue().encode())
        self.out.flush()

    def out_is_terminal(self) -> bool:
        isatty = getattr(self.out, "isatty", None)
        return bool(isatty and isatty())


def _push_top(heap: list, item: tuple, size: int) -> None:
    if len(heap) < size:
        heapq.heappush(heap, item)
    elif item[:2] > heap[0][:2]:
        heapq.heapreplace(heap, item)


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n:,.1f} TB"


_PROTOCOL_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmp6", 132: "sctp"}


def _endpoint(ip: str, port: int, protocol: int) -> str:
    address = f"[{ip}]" if ":" in ip else ip
    if protocol in (6, 17, 132):
        return f"{address}:{port}/{_PROTOCOL_NAMES[protocol]}"
    return f"{address} {_PROTOCOL_NAMES.get(protocol, protocol)}"


def family_table(families: dict[str, _FamilyTally]) -> Table:
    table = Table(title="Attacks by family", box=box.SIMPLE_HEAD, title_style="bold red")
    table.add_column("family", no_wrap=True)
    for name in ("flows", "sources", "targets"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("most common first reason", overflow="fold")

    def distinct(seen: set[str]) -> str:
        return f"{len(seen):,}+" if len(seen) >= DISTINCT_CAP else f"{len(seen):,}"

    for family, tally in sorted(families.items(), key=lambda ft: -ft[1].flows):
        reason = tally.reasons.most_common(1)[0][0] if tally.reasons else ""
        table.add_row(escape(family), f"{tally.flows:,}", distinct(tally.sources), distinct(tally.targets),
                      escape(reason))
    return table


@dataclass(frozen=True)
class _Column:
    name: str
    min_width: int
    cell: Callable[[dict[str, Any]], str]  # the cell's Rich markup
    options: dict[str, Any] = field(default_factory=dict)


_FLOW_COLUMNS = {c.name: c for c in (
    # Minimum widths keep identifiers whole (they are copied into `iotscan inspect`); long addresses fold,
    # long names are shortened
    _Column("flow_id", 19, lambda r: escape(str(r["flow_id"])), {"no_wrap": True}),
    _Column("src", 15, lambda r: escape(_endpoint(r["src_ip"], r["src_port"], r["protocol"])), {"overflow": "fold"}),
    _Column("dst", 15, lambda r: escape(_endpoint(r["dst_ip"], r["dst_port"], r["protocol"])), {"overflow": "fold"}),
    _Column("app", 8, lambda r: escape(r.get("app") or ""), {"max_width": 24, "overflow": "ellipsis"}),
    _Column("server_name", 10, lambda r: escape(r.get("server_name") or ""), {"max_width": 30, "overflow": "ellipsis"}),
    _Column("packets", 7, lambda r: f"{r['packets']:,}", {"justify": "right", "no_wrap": True}),
    _Column("bytes", 8, lambda r: _human_bytes(r["bytes"]), {"justify": "right", "no_wrap": True}),
    _Column("verdict", 17, lambda r: _verdict_cell(r), {"no_wrap": True}),
    # the first reason: the one that pushed the score most, or the signature that decided
    _Column("why", 20, lambda r: escape((r.get("reasons") or [""])[0]), {"overflow": "fold"}),
)}
_FLOW_ORDER = tuple(_FLOW_COLUMNS)


def _flow_table(title: str, records: list[dict[str, Any]], width: int, wanted: Sequence[str]
                ) -> tuple[Table, list[str]]:
    """The flows, with the ``wanted`` columns (most wanted first) that fit in ``width``, in table order
    (on a narrow terminal the least wanted go rather than the verdict being cut off), and the names of
    the columns shown."""
    padding = 2
    shown: list[str] = []
    used = 0
    for name in wanted:
        need = _FLOW_COLUMNS[name].min_width + padding
        if not shown or used + need <= width:
            shown.append(name)
            used += need
    columns = [_FLOW_COLUMNS[name] for name in _FLOW_ORDER if name in shown]
    table = Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 1))
    for c in columns:
        table.add_column(c.name, min_width=c.min_width, **c.options)
    for r in records:
        table.add_row(*(c.cell(r) for c in columns))
    return table, shown


def _verdict_cell(record: dict[str, Any]) -> str:
    verdict = record.get("verdict") or ""
    score = f" {record['score']:.2f}" if record.get("score") is not None else ""
    if verdict == "attack":
        return f"[bold red]attack[/] {escape(record.get('family') or '')}{score}"
    return f"{escape(verdict)}{score}"


def device_table(devices: list[dict[str, Any]]) -> Table:
    table = Table(title="Devices", box=box.SIMPLE_HEAD)
    for name in ("mac", "ips", "vendor", "device_type", "model", "confidence", "flows", "evidence"):
        table.add_column(name, no_wrap=name in ("mac", "device_type", "confidence", "flows"),
                         max_width=60 if name == "evidence" else None)
    for d in sorted(devices, key=lambda d: -(d.get("bytes") or 0)):
        seen: dict[str, None] = {}  # the strongest three distinct signals, each in a few words
        for e in d.get("evidence") or []:
            value = str(e.get("value"))
            seen.setdefault(f"{e.get('signal')}={value[:40] + '…' if len(value) > 40 else value}")
        evidence = "; ".join(list(seen)[:3])
        table.add_row(*(escape(v) for v in (
            d.get("mac") or "", ", ".join(d.get("ips") or []), d.get("vendor") or "", d.get("device_type") or "",
            d.get("model") or "", f"{d['confidence']:.2f}" if d.get("confidence") is not None else "",
            f"{d.get('flows') or 0:,}", evidence)))
    return table


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


def make_sink(fmt: str, out: IO[bytes], *, columns: Sequence[str] = FLOW_FIELD_NAMES, row_type: str = "flow",
              flush_each: bool = False) -> Sink:
    if fmt == "ndjson":
        return NdjsonSink(out, flush_each=flush_each)
    if fmt == "json":
        return JsonSink(out, stream_type=row_type)
    if fmt == "csv":
        return CsvSink(out, columns, row_type=row_type)
    return TableSink(out)
