"""The view `iotscan live` shows on a terminal while it captures: rates and counters, the busiest flows active
now (updated every second, long before their records are written), the latest attacks, alerts and floods, and
the devices seen. Rendered from plain data (LiveViewData) by the live run's ticker thread, never per flow.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.console import Group, RenderableType
from rich.markup import escape
from rich.text import Text

from iotscan.output.records import PROTOCOL_LABELS, is_local_address
from iotscan.output.table import Column, Fit, address_text, event_table, fit_columns, fitted_table, human_bytes

ACTIVE_SHOWN = 8
ATTACKS_SHOWN = 5
EVENTS_SHOWN = 3
DEVICES_SHOWN = 6


@dataclass
class DeviceSeen:
    """A local device the live run has seen: its first local address, flows and bytes of ended flows, and the
    host name it gave in DHCP, if it did."""

    mac: str
    ip: str
    flows: int = 0
    bytes: int = 0
    hostname: str | None = None


@dataclass
class LiveViewData:
    interface: str
    elapsed_s: float
    limits: str  # what stops the capture
    packets_per_s: float
    flows_per_s: float
    active_flows: int
    packets: int
    flows: int
    attacks: int
    drops: int
    families: dict[str, int] = field(default_factory=dict)
    active: Any = None  # the meter's latest snapshot (iotscan.capture.active.ActiveSnapshot), or None
    latest_attacks: Sequence[dict[str, Any]] = ()  # oldest first
    events: Sequence[dict[str, Any]] = ()  # the latest alerts and floods, oldest first
    event_counts: dict[str, int] = field(default_factory=dict)  # all of them, by event type
    devices: dict[str, DeviceSeen] = field(default_factory=dict)
    vendor: Callable[[str], str | None] = lambda mac: None  # a MAC's vendor, when known


def _device_label(mac: str, data: LiveViewData) -> str:
    seen = data.devices.get(mac)
    name = (seen.hostname if seen else None) or data.vendor(mac)
    return f"{name} {mac}" if name else mac


def _local_device(flow: Any, data: LiveViewData) -> str:
    """The local end of an active flow, as a device: its host name or vendor and MAC."""
    for ip, mac in ((flow.src_ip, flow.src_mac), (flow.dst_ip, flow.dst_mac)):
        if is_local_address(ip) or ip.startswith("127.") or ip == "::1":
            return escape(_device_label(mac, data))
    return ""


def active_table(data: LiveViewData, width: int) -> RenderableType:
    snapshot = data.active
    if snapshot is None or not snapshot.flows:
        return Text("No traffic in the last second." if snapshot is not None else "Waiting for traffic...",
                    style="dim")
    per_s = 1000 / max(snapshot.window_ms, 1)
    flows = [f for f in snapshot.flows if f.recent_packets][:ACTIVE_SHOWN]
    if not flows:
        return Text("No traffic in the last second.", style="dim")
    rows = [{"flow": f} for f in flows]
    columns = [
        Column("src", lambda r: escape(address_text(r["flow"].src_ip, r["flow"].src_port, r["flow"].protocol))),
        Column("dst", lambda r: escape(address_text(r["flow"].dst_ip, r["flow"].dst_port, r["flow"].protocol))),
        Column("bytes/s", lambda r: human_bytes(r["flow"].recent_bytes * per_s), justify="right"),
        Column("pkts/s", lambda r: f"{r['flow'].recent_packets * per_s:,.0f}", justify="right"),
        Column("app", lambda r: escape(r["flow"].app or ""), shrink_to=8, max_width=20),
        Column("device", lambda r: _local_device(r["flow"], data), shrink_to=17, max_width=40),
        Column("proto", lambda r: escape(str(PROTOCOL_LABELS.get(r["flow"].protocol, r["flow"].protocol)))),
    ]
    fit = fit_columns(columns, 4, rows, width) or Fit(columns[:4], {c.name: 21 for c in columns[:4]})
    order = ("app", "src", "dst", "proto", "device", "pkts/s", "bytes/s")
    return fitted_table(f"Active now: the busiest flows of the last second ({snapshot.active:,} active)", fit,
                        order, rows, title_justify="left", title_style="bold")


def attacks_table(data: LiveViewData, width: int) -> RenderableType:
    if not data.latest_attacks:
        return Text("No attacks seen.", style="green")
    rows = list(reversed(data.latest_attacks))[:ATTACKS_SHOWN]
    columns = [
        Column("time", lambda r: time.strftime("%H:%M:%S", time.localtime(r["last_seen_ms"] / 1000))),
        Column("src", lambda r: escape(address_text(r["src_ip"], r["src_port"], r["protocol"]))),
        Column("dst", lambda r: escape(address_text(r["dst_ip"], r["dst_port"], r["protocol"]))),
        Column("family", lambda r: f"[bold red]{escape(str(r.get('family') or ''))}[/]"),
        Column("score", lambda r: f"{r['score']:.2f}" if isinstance(r.get("score"), float) else ""),
        Column("why", lambda r: escape((r.get("reasons") or [""])[0]), wraps=True),  # the first reason
        Column("app", lambda r: escape(r.get("app") or ""), max_width=20),
    ]
    fit = fit_columns(columns, 6, rows, width) or Fit(columns[:6], {c.name: 21 for c in columns[:6]})
    order = ("time", "src", "dst", "app", "family", "score", "why")
    return fitted_table("Latest attacks", fit, order, rows, title_justify="left", title_style="bold red")


def devices_table(data: LiveViewData, width: int) -> RenderableType:
    rows = sorted(data.devices.values(), key=lambda d: -d.bytes)[:DEVICES_SHOWN]
    columns = [
        Column("mac", lambda d: escape(d.mac)),
        Column("ip", lambda d: escape(d.ip)),
        Column("name or vendor", lambda d: escape(d.hostname or data.vendor(d.mac) or ""), shrink_to=10,
               max_width=30),
        Column("flows", lambda d: f"{d.flows:,}", justify="right"),
        Column("bytes", lambda d: human_bytes(d.bytes), justify="right"),
    ]
    fit = fit_columns(columns, 2, rows, width) or Fit(columns[:2], {"mac": 17, "ip": 15})
    return fitted_table(f"Devices seen ({len(data.devices):,}; flows and bytes of ended flows)", fit,
                        [c.name for c in columns],
                        rows, title_justify="left", title_style="bold")


def render_live_view(data: LiveViewData, width: int) -> Group:
    header = Text.from_markup(f"[bold]iotscan live[/] {escape(data.interface)}   "
                              f"{time.strftime('%H:%M:%S', time.gmtime(data.elapsed_s))}   {escape(data.limits)}",
                              style="cyan")
    counters = Text.from_markup(
        f"[bold]{data.packets_per_s:,.0f}[/] packets/s   [bold]{data.flows_per_s:,.1f}[/] flows/s   "
        f"[bold]{data.active_flows:,}[/] active flows   [bold]{len(data.devices):,}[/] devices seen\n"
        f"{data.packets:,} packets   {data.flows:,} flows   {data.attacks:,} attacks   "
        f"[{'bold red' if data.drops else 'green'}]{data.drops:,}[/] kernel drops")
    parts: list[RenderableType] = [header, counters, "", active_table(data, width), "", attacks_table(data, width)]
    if data.families:
        parts.append(Text.from_markup("attacks by family: " + ", ".join(
            f"[bold red]{escape(family)}[/] {n:,}" for family, n in sorted(data.families.items(),
                                                                           key=lambda fn: -fn[1]))))
    for kind in ("alert", "flood"):
        events = [r for r in data.events if r.get("event_type") == kind][-EVENTS_SHOWN:]
        if events:
            parts += ["", event_table(kind, list(reversed(events)), data.event_counts.get(kind, len(events)), width,
                                       "latest")]
    if data.devices:
        parts += ["", devices_table(data, width)]
    return Group(*parts)
