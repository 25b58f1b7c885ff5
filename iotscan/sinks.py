"""The sink stage: records out as NDJSON, one JSON document, CSV, or tables for a person.

Every sink streams: flows are written as they come; only bounded things (the busiest flows for
the table, device records, counters) are held until the end.
"""

from __future__ import annotations

import csv
import heapq
import io
from collections import Counter
from collections.abc import Sequence
from typing import IO, Any, Protocol

import orjson
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from iotscan.records import FLOW_FIELD_NAMES

FORMATS = ("table", "ndjson", "json", "csv")
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


class TableSink:
    """What a person at a terminal wants: attacks first, the busiest flows, devices, a summary panel."""

    TOP = 20

    def __init__(self, out: IO[bytes], width: int | None = None) -> None:
        self.out = out
        self.busiest: list[tuple[int, int, dict[str, Any]]] = []  # min-heap on bytes
        self.attacks: list[tuple[float, int, dict[str, Any]]] = []  # min-heap on score
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

    def close(self, summary: dict[str, Any]) -> None:
        text = io.StringIO()
        terminal = self.out_is_terminal()
        console = Console(file=text, force_terminal=terminal, width=self.width or (None if terminal else 200),
                          highlight=False)
        if self.attacks:
            attacks = [r for _, _, r in sorted(self.attacks, reverse=True)]
            console.print(_flow_table("Attack flows (highest score first)", attacks, verdicts=True))
            commands = [r["inspect"] for r in attacks if r.get("inspect")]
            if commands:  # analyze --explain
                console.print("Their packets, flow by flow:", style="bold")
                for command in commands:
                    console.print(escape(command), soft_wrap=True)
                console.print()
        if self.devices:
            console.print(device_table(self.devices))
        if self.busiest:
            console.print(_flow_table(f"Busiest flows (top {min(self.TOP, len(self.busiest))} by bytes)",
                                      [r for _, _, r in sorted(self.busiest, reverse=True)],
                                      verdicts=any("verdict" in r for _, _, r in self.busiest)))
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


def _flow_table(title: str, records: list[dict[str, Any]], verdicts: bool) -> Table:
    table = Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 1))
    # Minimum widths keep identifiers whole (they are copied into `iotscan inspect`); long addresses
    # fold, long names are shortened.
    table.add_column("flow_id", no_wrap=True, min_width=19)
    table.add_column("src", min_width=15, overflow="fold")
    table.add_column("dst", min_width=15, overflow="fold")
    table.add_column("app", min_width=8, max_width=24, overflow="ellipsis")
    table.add_column("server_name", min_width=10, max_width=30, overflow="ellipsis")
    table.add_column("packets", justify="right", no_wrap=True, min_width=7)
    table.add_column("bytes", justify="right", no_wrap=True, min_width=8)
    if verdicts:
        table.add_column("verdict", no_wrap=True, min_width=17)
    for r in records:
        row = [escape(str(v)) for v in (
            r["flow_id"], _endpoint(r["src_ip"], r["src_port"], r["protocol"]),
            _endpoint(r["dst_ip"], r["dst_port"], r["protocol"]), r.get("app") or "", r.get("server_name") or "",
            f"{r['packets']:,}", _human_bytes(r["bytes"]))]
        if verdicts:
            row.append(_verdict_cell(r))
        table.add_row(*row)
    return table


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
