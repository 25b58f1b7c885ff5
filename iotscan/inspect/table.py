"""The terminal view of `iotscan inspect`: a header per flow, then a tree per packet.
"""

from __future__ import annotations

import datetime as dt
import io
import shutil
from typing import IO, Any

from iotscan.inspect.fields import PACKET_FIELDS
from iotscan.output.records import PROTOCOL_LABELS as _PROTOCOL_LABELS
from iotscan.output.records import endpoint_text as _endpoint

# -- terminal view --------------------------------------------------------------------------------


def hexdump(data: bytes, width: int = 16) -> str:
    """Offset, hex bytes and printable ASCII, as tshark -x and xxd show them."""
    lines = []
    for off in range(0, len(data), width):
        chunk = data[off:off + width]
        hexpart = " ".join(f"{b:02x}" for b in chunk)
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"{off:04x}  {hexpart:<{width * 3 - 1}}  {text}")
    return "\n".join(lines)


# Field-name prefixes shown as one line each in the terminal view, in this order.
_GROUPS = ("tcp", "icmp", "dns", "http", "ssdp", "tls", "mqtt", "dhcp", "coap", "telnet", "irc", "ftp", "tftp")
_FRAME_KEYS = {name for name, _ in PACKET_FIELDS} | {"ttl", "payload_length", "payload_hex", "expert"}
_LONG_VALUE = 300


def _show_value(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        if value and isinstance(value[0], dict):  # DNS answers
            return "; ".join(" ".join(str(v) for v in (a.get("type"), a.get("data")) if v) for a in value)
        return ", ".join(str(v) for v in value)
    text = str(value)
    if isinstance(value, str) and (any(ord(c) < 32 for c in text) or text != text.strip()):
        text = repr(text)[1:-1]  # telnet data, MQTT payloads: show control characters
    return text if len(text) <= _LONG_VALUE else text[:_LONG_VALUE] + f"... ({len(text):,} chars)"


class PacketTableSink:
    """The terminal view: a header per flow, then one Rich tree per packet, printed as it comes."""

    def __init__(self, out: IO[bytes], width: int | None = None) -> None:
        from rich.console import Console

        self.out = out
        isatty = getattr(out, "isatty", None)
        self.terminal = bool(isatty and isatty())
        self.width = width or (shutil.get_terminal_size((120, 24)).columns if self.terminal else 120)
        self.buffer = io.StringIO()
        self.console = Console(file=self.buffer, force_terminal=self.terminal, width=self.width, highlight=False,
                               soft_wrap=False)
        self.flow: dict[str, Any] | None = None
        self.first_packet_s: dict[int, dt.datetime] = {}  # flow_id -> time of its first packet shown

    def _flush(self) -> None:
        self.out.write(self.buffer.getvalue().encode())
        self.out.flush()
        self.buffer.seek(0)
        self.buffer.truncate()

    def write(self, record: dict[str, Any]) -> None:
        kind = record.get("event_type")
        if kind == "flow":
            self.flow = record
            self.console.print(_flow_header(record))
        elif kind == "packet":
            self.console.print(self._packet_tree(record))
        self._flush()

    def _packet_tree(self, r: dict[str, Any]) -> Any:
        from rich.markup import escape
        from rich.tree import Tree

        arrow = {"src2dst": "[cyan]→[/]", "dst2src": "[magenta]←[/]"}.get(r.get("direction") or "", "?")
        at = dt.datetime.strptime(r["timestamp"], "%Y-%m-%dT%H:%M:%S.%f%z")
        first = self.first_packet_s.setdefault(r["flow_id"], at)
        when = at.strftime("%H:%M:%S.%f")
        rel = f"+{(at - first).total_seconds():.6f}s"
        head = (f"[bold]#{r['frame_number']}[/]  {when}  [dim]{rel}[/]  {arrow}  {r['length']:,} B  "
                f"[dim]{escape(' / '.join(r['layers']))}[/]")
        tree = Tree(head, guide_style="dim")
        basics = [f"{k}={_show_value(r[k])}" for k in ("ttl", "payload_length", "reassembled_frames")
                  if r.get(k) is not None]
        groups: dict[str, list[str]] = {}
        for key, value in r.items():
            if key in _FRAME_KEYS or value is None:
                continue
            prefix, _, name = key.partition("_")
            if prefix in _GROUPS:
                groups.setdefault(prefix, []).append(f"{name}={_show_value(value)}")
        if basics and not groups.get("tcp"):
            tree.add(f"[dim]{escape('  '.join(basics))}[/]")
        for prefix in _GROUPS:
            if prefix in groups:
                line = "  ".join(groups[prefix])
                if prefix == "tcp" and basics:
                    line += "  " + "  ".join(basics)
                tree.add(f"[green]{prefix}[/]  {escape(line)}")
        for message in r.get("expert") or []:
            tree.add(f"[yellow]{escape(message)}[/]")
        if r.get("payload_hex"):
            tree.add(escape(hexdump(bytes.fromhex(r["payload_hex"]))))
        return tree

    def close(self, summary: dict[str, Any]) -> None:
        from rich.markup import escape

        lines = [f"[bold]{summary.get('packets') or 0:,}[/] packets of {summary.get('flows') or 0} "
                 f"flow{'s' if summary.get('flows') != 1 else ''} in {summary.get('elapsed_s') or 0:.2f} s"]
        if summary.get("limited"):
            lines[0] += " (--limit reached)"
        for w in summary.get("warnings") or []:
            lines.append(f"[yellow]warning[/] {escape(str(w.get('message')))}")
        for e in summary.get("errors") or []:
            lines.append(f"[red]error[/] {escape(str(e.get('message')))}")
        self.console.print("\n".join(lines))
        self._flush()


def _flow_header(r: dict[str, Any]) -> Any:
    from rich.markup import escape
    from rich.panel import Panel

    proto = _PROTOCOL_LABELS.get(r["protocol"], str(r["protocol"]))
    start = dt.datetime.fromtimestamp(r["first_seen_ms"] / 1000, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")
    facts = [f"{_endpoint(r['src_ip'], r['src_port'])} → {_endpoint(r['dst_ip'], r['dst_port'])}  {proto}",
             f"app {r.get('app') or '?'}" + (f"  server {r['server_name']}" if r.get("server_name") else ""),
             f"{r['packets']:,} packets ({r['src2dst_packets']:,} → / {r['dst2src_packets']:,} ←)  "
             f"{r['bytes']:,} B  from {start[:-3]} UTC for {r['duration_ms'] / 1000:.3f} s",
             f"community_id {r.get('community_id') or '-'}"]
    return Panel(escape("\n".join(facts)), title=f"flow {r['flow_id']}", title_align="left", expand=False)
