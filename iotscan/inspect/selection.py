"""Which flow `iotscan inspect` shows: a flow id, community id or 5-tuple parsed into a selector, the
NFStream pass that finds the flow, tshark's display filter for its packets, and, for `analyze --explain`,
the inspect command of a flow record.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import re
import signal
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from iotscan.capture.side_pass import bpf_forms
from iotscan.capture.source import FlowSource, MeterConfig
from iotscan.errors import InputError
from iotscan.output.records import community_id, five_tuple_text, flow_record, inspect_command
from iotscan.stage import Event, SourceInfo, Stage

_PROTOCOL_NAMES = {"tcp": 6, "udp": 17, "icmp": 1, "icmpv6": 58, "ipv6-icmp": 58, "sctp": 132, "gre": 47,
                   "esp": 50, "igmp": 2}
_PORT_PROTOCOLS = {6: "tcp", 17: "udp", 132: "sctp"}


# -- which flow -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FiveTuple:
    src_ip: str
    src_port: int
    dst_ip: str
    dst_port: int
    protocol: int

    def __str__(self) -> str:
        return five_tuple_text(self.src_ip, self.src_port, self.dst_ip, self.dst_port, self.protocol)

    def matches(self, record: dict[str, Any]) -> bool:
        ours = (self.src_ip, self.src_port, self.dst_ip, self.dst_port)
        theirs = (record["src_ip"], record["src_port"], record["dst_ip"], record["dst_port"])
        reverse = (record["dst_ip"], record["dst_port"], record["src_ip"], record["src_port"])
        return record["protocol"] == self.protocol and ours in (theirs, reverse)


def five_tuple_bpf(t: FiveTuple) -> str:
    """A BPF filter passing the packets of a 5-tuple (both directions), so that the flow pass meters nothing
    else. Tunnelled packets do not pass: find_flows then meters everything."""
    ipv6 = ":" in t.src_ip
    proto = {**_PORT_PROTOCOLS, 1: "icmp", 58: "icmp6"}.get(t.protocol, f"{'ip6' if ipv6 else 'ip'} proto {t.protocol}")
    match = f"{proto} and host {t.src_ip} and host {t.dst_ip}"
    if t.protocol in _PORT_PROTOCOLS:
        match += f" and port {t.src_port} and port {t.dst_port}"
    return match


_ENDPOINT = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.%\w]+)\]|(?P<v4>[0-9.]+))(?::(?P<port>\d+))?$")


def _parse_endpoint(text: str, whole: str) -> tuple[str, int]:
    m = _ENDPOINT.match(text.strip())
    if not m:
        hint = " (write IPv6 addresses in brackets: [2001:db8::1]:443)" if text.count(":") > 1 else ""
        raise InputError(f"bad 5-tuple {whole!r}: cannot read the endpoint {text!r}{hint}")
    raw_ip = m.group("v6") or m.group("v4")
    try:
        ip = ipaddress.ip_address(raw_ip)
    except ValueError:
        raise InputError(f"bad 5-tuple {whole!r}: {raw_ip!r} is not an IP address") from None
    if m.group("v6") and ip.version != 6:
        raise InputError(f"bad 5-tuple {whole!r}: brackets are for IPv6 addresses")
    port = int(m.group("port") or 0)
    if port > 65535:
        raise InputError(f"bad 5-tuple {whole!r}: port {port} is out of range")
    return str(ip), port


def parse_five_tuple(text: str) -> FiveTuple:
    """SRC[:PORT]-DST[:PORT]/PROTO, IPv6 in brackets; PROTO is a name (tcp, udp, icmp...) or a number."""
    head, sep, proto_text = text.strip().rpartition("/")
    if not sep or not head:
        raise InputError(f"bad 5-tuple {text!r}: expected SRC:PORT-DST:PORT/PROTO, e.g. "
                         "192.168.1.10:5353-224.0.0.251:5353/udp")
    proto_text = proto_text.strip().lower()
    if proto_text.isdigit() and int(proto_text) < 256:
        protocol = int(proto_text)
    elif proto_text in _PROTOCOL_NAMES:
        protocol = _PROTOCOL_NAMES[proto_text]
    else:
        raise InputError(f"bad 5-tuple {text!r}: unknown protocol {proto_text!r} (tcp, udp, icmp, icmpv6, sctp "
                         "or a number)")
    parts = head.split("-")
    if len(parts) != 2:
        raise InputError(f"bad 5-tuple {text!r}: expected exactly one '-' between the two endpoints")
    (src_ip, src_port), (dst_ip, dst_port) = (_parse_endpoint(p, text) for p in parts)
    if ipaddress.ip_address(src_ip).version != ipaddress.ip_address(dst_ip).version:
        raise InputError(f"bad 5-tuple {text!r}: mixes IPv4 and IPv6")
    if protocol not in _PORT_PROTOCOLS and (src_port or dst_port):
        raise InputError(f"bad 5-tuple {text!r}: protocol {proto_text} has no ports")
    return FiveTuple(src_ip, src_port, dst_ip, dst_port, protocol)


# A flow id's first digits name it when no other flow of the capture starts with them (the table shows ids so).
# Full ids have 19 digits, a few 18 or fewer: digits matching a whole id name that flow whatever else matches.
MIN_PREFIX_DIGITS = 6


@dataclass(frozen=True)
class FlowSelector:
    """What the user asked for: one flow id (or its first digits), a community id, or a 5-tuple (both
    directions)."""

    flow_id: int | None = None
    community_id: str | None = None
    five_tuple: FiveTuple | None = None
    flow_id_prefix: str | None = None

    @classmethod
    def parse(cls, flow: str | None, five_tuple: str | None) -> FlowSelector:
        """FLOW and/or --5tuple. Both: the flow (or community) id among the flows of that 5-tuple,
        which lets the flow pass skip every other packet (what `inspect_command` writes)."""
        tuple_ = parse_five_tuple(five_tuple) if five_tuple else None
        if not flow:
            if tuple_ is None:
                raise InputError("missing FLOW: a flow_id or community_id from `iotscan analyze`, or --5tuple "
                                 "SRC:PORT-DST:PORT/PROTO")
            return cls(five_tuple=tuple_)
        text = flow.strip()
        if text.isdigit():
            value = int(text)
            if value >= 1 << 63:
                raise InputError(f"bad flow id {text}: flow ids are 63-bit numbers")
            if len(text) >= 19:
                return cls(flow_id=value, five_tuple=tuple_)
            if len(text) < MIN_PREFIX_DIGITS:
                raise InputError(f"bad flow id {text}: give a flow_id, or at least its first {MIN_PREFIX_DIGITS} "
                                 "digits")
            return cls(flow_id_prefix=text, five_tuple=tuple_)
        if re.fullmatch(r"1:[A-Za-z0-9+/]{27}=", text):
            return cls(community_id=text, five_tuple=tuple_)
        if "/" in text and "-" in text:
            if tuple_ is not None:
                raise InputError("give the 5-tuple once: as FLOW or as --5tuple")
            return cls(five_tuple=parse_five_tuple(text))
        raise InputError(f"bad FLOW {text!r}: expected a flow_id (digits), a community_id (1:...=) or a 5-tuple "
                         "SRC:PORT-DST:PORT/PROTO")

    @property
    def unique(self) -> bool:
        """A flow id names one flow; a community id or 5-tuple may name several (one per idle period), and a
        prefix is known to name one only once every flow has been seen."""
        return self.flow_id is not None

    def exact(self, record: dict[str, Any]) -> bool:
        """The record is the flow whose whole id was given (as a prefix, digits of an id shorter than 19)."""
        return self.flow_id_prefix is not None and str(record["flow_id"]) == self.flow_id_prefix

    def describe(self) -> str:
        among = f" among the flows of {self.five_tuple}" if self.five_tuple is not None else ""
        if self.flow_id is not None:
            return f"id {self.flow_id}{among}"
        if self.flow_id_prefix is not None:
            return f"an id starting with {self.flow_id_prefix}{among}"
        if self.community_id is not None:
            return f"community id {self.community_id}{among}"
        return f"5-tuple {self.five_tuple}"

    def matches(self, record: dict[str, Any]) -> bool:
        if self.five_tuple is not None and not self.five_tuple.matches(record):
            return False
        if self.flow_id is not None:
            return record["flow_id"] == self.flow_id
        if self.flow_id_prefix is not None:
            return str(record["flow_id"]).startswith(self.flow_id_prefix)
        if self.community_id is not None:
            return record["community_id"] == self.community_id
        return True


@dataclass
class FoundFlow:
    """A flow record and the earliest time its packets can have (see flow_filter)."""

    record: dict[str, Any]
    not_before_ms: int


def _meter_key(flow: Any) -> tuple:
    ends = sorted([(flow.src_ip, flow.src_port), (flow.dst_ip, flow.dst_port)])
    return flow.protocol, flow.vlan_id, getattr(flow, "tunnel_id", 0), *ends


@dataclass
class FlowLookup:
    """The flows found, and whether the flow pass saw every packet of the capture (see flows_filter)."""

    flows: list[FoundFlow]
    saw_every_packet: bool


def find_flows(capture: str, selector: FlowSelector, config: MeterConfig, stop_after: int = 0) -> FlowLookup:
    """Meter the capture and return the flows the selector matches, in time order.

    Same meter, same record builder and same timeouts as ``analyze``, hence the same flow ids.
    The meter stops at the first match for a flow id, after ``stop_after`` matches otherwise. With
    a 5-tuple, a BPF filter keeps every other packet out of the meter; if nothing matches (the
    5-tuple was tunnelled, say), the capture is metered again without it.
    """
    if selector.five_tuple is not None and not config.bpf:
        for bpf in bpf_forms(five_tuple_bpf(selector.five_tuple)):
            try:
                found = _find_flows(capture, selector, replace(config, bpf=bpf), stop_after)
            except InputError:  # "vlan" rejected (Linux cooked, raw IP...): the plain filter, else no filter
                continue
            if found:
                return FlowLookup(found, saw_every_packet=False)
            break
    return FlowLookup(_find_flows(capture, selector, config, stop_after), saw_every_packet=not config.bpf)


def _find_flows(capture: str, selector: FlowSelector, config: MeterConfig, stop_after: int) -> list[FoundFlow]:
    base = os.path.basename(capture)
    source = FlowSource(config)
    flows = iter(source)
    found: list[FoundFlow] = []
    wanted_cid = selector.community_id
    if selector.five_tuple is not None:
        t = selector.five_tuple
        wanted_cid = community_id(t.src_ip, t.dst_ip, t.protocol, t.src_port, t.dst_port)
    idle_ms = config.idle_timeout * 1000
    cut_by_active: dict[tuple, int] = {}  # key -> last_seen_ms of a flow cut by the active timeout
    try:
        for flow in flows:
            key = _meter_key(flow)
            predecessor_last = cut_by_active.pop(key, None) if cut_by_active else None
            if flow.expiration_id == 1:  # its successor (same key) starts right after it
                cut_by_active[key] = flow.bidirectional_last_seen_ms
            # Cheap pre-check: one hash instead of a whole record per flow.
            if wanted_cid is not None and flow.protocol not in (1, 58) and wanted_cid != community_id(
                    flow.src_ip, flow.dst_ip, flow.protocol, flow.src_port, flow.dst_port):
                continue
            record = flow_record(flow, capture, base)
            if not selector.matches(record):
                continue
            first = record["first_seen_ms"]
            # A flow of the same key before this one ended at least idle_timeout earlier, or, cut by
            # the active timeout, just before it.
            not_before = predecessor_last + 1 if predecessor_last is not None else first - idle_ms + 1
            found.append(FoundFlow(record, min(not_before, first)))
            if selector.exact(record):  # a whole id given as digits: that flow, whatever else starts with them
                found = [found[-1]]
                break
            if selector.unique or (stop_after and len(found) >= stop_after):
                break
    finally:
        if source.pid is not None and found and (selector.unique or stop_after or selector.exact(found[0].record)):
            # Found early: the rest of the capture is of no interest; don't let the meter flush it.
            with contextlib.suppress(OSError):
                os.kill(source.pid, signal.SIGKILL)
        close = getattr(flows, "close", None)
        if close is not None:
            close()
    found.sort(key=lambda f: (f.record["first_seen_ms"], f.record["flow_id"]))
    return found


# -- the display filter ---------------------------------------------------------------------------


def _iso_ms(ms: int) -> str:
    secs, frac = divmod(ms, 1000)
    return dt.datetime.fromtimestamp(secs, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S") + f".{frac:03d}Z"


def _epoch_ms(ms: int) -> str:
    secs, frac = divmod(ms, 1000)
    return f"{secs}.{frac:03d}"


# ICMP errors quote the headers of the packet they are about, which the 5-tuple filter would match;
# they belong to an ICMP flow. (Written without sets: tshark 3.x and 4.x separate set items differently.)
_ICMP_ERRORS = " || ".join([*(f"icmp.type=={t}" for t in (3, 4, 5, 11, 12)), "(icmpv6.type>=1 && icmpv6.type<=4)"])


def flow_filter(flow: FoundFlow, time_syntax: str = "iso", any_time: bool = False) -> str:
    """The tshark display filter of one flow: both directions of its 5-tuple, its VLAN, and its
    time window, so that flows of the same 5-tuple at other times (or VLANs) are left out.

    The window ends with the flow's last packet (NFStream truncates to the millisecond, and its
    times never run ahead of the capture's: it holds time still when a capture's timestamps step
    back). It starts at ``not_before_ms``, not at the first packet: a packet whose timestamp
    stepped back belongs to the flow although it is older than ``first_seen_ms``, and the flow
    before of the same key ended at least the idle timeout earlier (or, cut by the active timeout,
    right before; find_flows knows which).

    ``time_syntax``: "iso" (frame.time with UTC ISO 8601 text, tshark >= 4.0) or "epoch"
    (frame.time_epoch in seconds, tshark < 4.2). ``any_time`` leaves the window out.
    """
    record = flow.record
    a, b = record["src_ip"], record["dst_ip"]
    pa, pb = record["src_port"], record["dst_port"]
    proto = record["protocol"]
    ipf = "ipv6" if record.get("ip_version") == 6 or ":" in a else "ip"
    transport = _PORT_PROTOCOLS.get(proto)
    if transport:
        fwd = f"{ipf}.src=={a} && {ipf}.dst=={b} && {transport}.srcport=={pa} && {transport}.dstport=={pb}"
        rev = f"{ipf}.src=={b} && {ipf}.dst=={a} && {transport}.srcport=={pb} && {transport}.dstport=={pa}"
        what = f"(({fwd}) || ({rev})) && !({_ICMP_ERRORS})"
    else:
        pair = f"(({ipf}.src=={a} && {ipf}.dst=={b}) || ({ipf}.src=={b} && {ipf}.dst=={a}))"
        if proto == 1:
            what = f"{pair} && icmp"
        elif proto == 58:
            what = f"{pair} && icmpv6"
        else:
            what = f"{pair} && {'ipv6.nxt' if ipf == 'ipv6' else 'ip.proto'}=={proto}"
    if record.get("vlan_id"):
        what += f" && vlan.id=={record['vlan_id']}"
    if any_time:
        return what
    end = record["last_seen_ms"] + 1
    return f"{what} && {_time_at_least(flow.not_before_ms, time_syntax)} && {_time_at_least(end, time_syntax, '<')}"


def _time_at_least(ms: int, time_syntax: str, op: str = ">=") -> str:
    return f'frame.time {op} "{_iso_ms(ms)}"' if time_syntax == "iso" else f"frame.time_epoch {op} {_epoch_ms(ms)}"


# When the flow pass saw only the 5-tuple's packets, its clock did not see the others: the first IP
# packet after the flows' end proves them complete only if the capture's time does not step back
# by more than this.
MARKER_SLACK_MS = 60_000


def flows_filter(flows: list[FoundFlow], time_syntax: str = "iso", any_time: bool = False,
                 marker_after_ms: int | None = None, marker: bool = True) -> str:
    """The display filter of the flows' packets, plus, unless ``any_time`` or not ``marker``, every IP packet from
    ``marker_after_ms`` (default: the flows' end): once tshark shows that one, no packet of the flows
    can follow, and the caller stops tshark instead of letting it dissect the rest of the capture.

    Why: NFStream's clock never steps back (a packet older than the newest one seen counts as of
    that time), so every packet a full flow pass put in the flows was read before any IP packet
    stamped later than their end.
    """
    parts = list(dict.fromkeys(flow_filter(f, time_syntax, any_time) for f in flows))
    packets = parts[0] if len(parts) == 1 else " || ".join(f"({p})" for p in parts)
    if any_time or not marker:
        return packets
    after = flows_end_ms(flows) if marker_after_ms is None else marker_after_ms
    return f"({packets}) || ((ip || ipv6) && {_time_at_least(after, time_syntax)})"


def flows_end_ms(flows: list[FoundFlow]) -> int:
    """The first millisecond after the flows' last packet."""
    return max(f.record["last_seen_ms"] for f in flows) + 1


# -- for analyze --explain ------------------------------------------------------------------------


def record_five_tuple(record: dict[str, Any]) -> str:
    """A flow record's 5-tuple as --5tuple takes it."""
    return str(FiveTuple(record["src_ip"], record["src_port"], record["dst_ip"], record["dst_port"],
                         record["protocol"]))


class InspectCommandStage(Stage):
    """`analyze --explain`: every attack flow of a capture file gets its `iotscan inspect` command."""

    def __init__(self, idle_timeout: int = 120, active_timeout: int = 1800) -> None:
        super().__init__()
        self.idle_timeout, self.active_timeout = idle_timeout, active_timeout
        self._readable = True

    def begin(self, source: SourceInfo) -> None:
        # stdin or a pipe was read from a temporary copy, gone by the time a person inspects (a compressed file
        # is copied again by inspect)
        self._readable = source.capture is None or not source.capture.spooled or os.path.isfile(source.name)
        if not self._readable:
            self.warn(source.name, "explain", "no inspect commands for this input: inspect reads a capture file, "
                                              "so save or decompress it first")

    def run(self, events: Iterator[Event]) -> Iterator[Event]:
        if not self._readable:
            yield from events
            return
        for event in events:
            record = event[0]
            if record is not None and record.get("verdict") == "attack":
                record["inspect"] = inspect_command(record, idle_timeout=self.idle_timeout,
                                                    active_timeout=self.active_timeout)
            yield event
