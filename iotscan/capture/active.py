"""What a live view shows of the flows still active: a bounded snapshot of the busiest ones, made by the meter.

Flow records leave the meter when flows end (an idle time-out of two minutes, by default), so a person watching
an interface would see nothing of what is talking now. When asked (``MeterConfig.active_every_ms``), the meter
sends, every so often, the flows that carried the most bytes since the previous snapshot. It costs nothing per
packet: the snapshot is taken where the meter already scans for idle flows (every 10 ms of capture time), and it
walks only the flows active since the previous one, which the flow table's last-activity order puts at its end.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from typing import Any, NamedTuple

ACTIVE_TOP = 10  # flows per snapshot
SCAN_LIMIT = 20_000  # flows looked at per snapshot at most (a flood): beyond, the busiest may be missed


class ActiveFlow(NamedTuple):
    """One active flow as a live view shows it. ``recent_*`` count since the previous snapshot."""

    src_ip: str
    src_port: int
    src_mac: str
    dst_ip: str
    dst_port: int
    dst_mac: str
    protocol: int
    app: str | None  # nDPI's application once detected, else None
    first_seen_ms: int
    last_seen_ms: int
    packets: int
    bytes: int
    recent_packets: int
    recent_bytes: int


class ActiveSnapshot(NamedTuple):
    at_ms: int  # capture time of the snapshot
    window_ms: int  # since the previous snapshot: recent_* are over this
    active: int  # flows in the meter's table
    scanned: int  # flows active in the window, looked at
    flows: list[ActiveFlow]  # the busiest in the window, most bytes first


def take_snapshot(cache: OrderedDict[Any, Any], since_ms: int, now_ms: int, ffi: Any,
                  top: int = ACTIVE_TOP) -> ActiveSnapshot:
    """The ``top`` flows of ``cache`` (NFStream flows in last-activity order, oldest first) with the most bytes
    since ``since_ms``. Each flow remembers its counts at its last snapshot (``shown_bytes``, ``shown_packets``:
    slots of the meter's flow class, 0 when it starts), so a flow seen for the first time counts from its start.
    A few C field reads and two slot writes per flow looked at: the walk is what a snapshot costs."""
    busiest_heap: list[tuple[int, int, int, Any]] = []  # (recent bytes, order, recent packets, flow), smallest first
    scanned = 0
    for flow in reversed(cache.values()):
        c = flow._C
        if c.bidirectional_last_seen_ms < since_ms or scanned >= SCAN_LIMIT:
            break
        scanned += 1
        total_bytes, total_packets = c.bidirectional_bytes, c.bidirectional_packets
        recent = total_bytes - flow.shown_bytes
        if len(busiest_heap) < top:
            heapq.heappush(busiest_heap, (recent, scanned, total_packets - flow.shown_packets, flow))
        elif recent > busiest_heap[0][0]:
            heapq.heapreplace(busiest_heap, (recent, scanned, total_packets - flow.shown_packets, flow))
        flow.shown_bytes, flow.shown_packets = total_bytes, total_packets
    busiest = []
    for recent_bytes, _, recent_packets, flow in sorted(busiest_heap, reverse=True):
        c = flow._C
        text = ffi.string
        app = text(c.application_name).decode("utf-8", errors="ignore") or None
        busiest.append(ActiveFlow(
            text(c.src_ip_str).decode(errors="ignore"), c.src_port, text(c.src_mac_str).decode(errors="ignore"),
            text(c.dst_ip_str).decode(errors="ignore"), c.dst_port, text(c.dst_mac_str).decode(errors="ignore"),
            c.protocol, app, c.bidirectional_first_seen_ms, c.bidirectional_last_seen_ms,
            c.bidirectional_packets, c.bidirectional_bytes, recent_packets, recent_bytes))
    return ActiveSnapshot(now_ms, now_ms - since_ms, len(cache), scanned, busiest)
