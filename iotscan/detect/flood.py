"""Flood records: the one- and two-packet flows of a flood that the scoring stage named, folded into one record
per target service and window of capture time instead of a flow record each (--flood-records summary).

A spoofed flood turns every packet into a flow: a million flow records that say one thing, each one scored,
explained and written (about 115 us of the main process's time apiece). Suricata keeps inspecting in an
emergency mode, ntopng raises one alert per victim; iotscan says the flood once per target and minute, and
spends little on each of its flows:

* flows are scored as ever; an attack the flood rule named (family dos or ddos: scoring.rule_families) with at
  most FOLD_MAX_PACKETS packets is folded into the record of its target service and window, and from then on
  the service is *claimed*;
* a claimed service's later flows of at most FOLD_MAX_PACKETS packets from sources the context tracker does not
  know (a spoofed flood's: one flow per source) are taken before they are made flow records (Stage.claims):
  no record, no device stage, no features, no model. Their context is still counted, in order with the other
  flows' (ContextTracker.observe_batch: in their destination's tables only, as their source and channel would
  be keys of one flow each), and they are folded as flows of the flood while their target receives flows at
  the flood rule's rate; the first found below it ends the claim (it and the others taken by then are folded as
  the flood's last). The meter is told of each claim and its end: it holds a claimed service's new flows, and sends
  the packets that stay alone as HeldFlows, folded whatever their source (iotscan.capture.hold);
* any other flow (from a known source, a bystander's, an established exchange: more packets) is scored and
  written as ever.

A record covers the flows that started in one window (records.FLOOD_WINDOW_S of capture time, aligned) and is
written once no flow of it can still come: flows reach the stage in the order they went idle, so once one has come
that ended an idle timeout after the window, or at the end of the capture; on a live interface also when the
clock says so. Open records are bounded (MAX_OPEN_RECORDS, each a few KB to some 50 KB): beyond, floods of
further targets are written as flow records, and a warning says so.
"""

from __future__ import annotations

import ipaddress
import math
import zlib
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from iotscan.detect.context import ContextTracker
from iotscan.output.records import FLOOD_WINDOW_S, FLOW_ATTRIBUTES, community_id, flood_record

if TYPE_CHECKING:
    from iotscan.capture.source import FlowSource

FLOOD_FAMILIES = frozenset(("dos", "ddos"))
FOLD_MAX_PACKETS = 2  # a flood's flows: a SYN, a probe, a request, and perhaps the target's answer
WINDOW_MS = FLOOD_WINDOW_S * 1000
MAX_OPEN_RECORDS = 4096  # flood records being made at once (targets x windows)
TOP = 5  # top sources and ports listed
EXAMPLES = 3  # example Community IDs
HLL_LG_K = 12  # 4,096 registers: 1.6% relative standard error
FREQUENT_LG_MAP = 7  # 96 counters: an item is listed once its count is surely above ~3.5% of the flows
SAMPLE_SOURCES = 1024  # the distinct sample that the spoofed share is measured on

Service = tuple[str, int, int]  # destination address, port, protocol
# positions of a MeteredFlow's fields (records.FLOW_ATTRIBUTES)
_SRC_IP, _SRC_PORT, _FIRST, _LAST, _PACKETS, _BYTES, _BACK = (FLOW_ATTRIBUTES.index(name) for name in (
    "src_ip", "src_port", "bidirectional_first_seen_ms", "bidirectional_last_seen_ms", "bidirectional_packets",
    "bidirectional_bytes", "dst2src_packets"))

# Addresses no host sends from (RFC 6890's special-purpose ranges that are no valid source, and the
# documentation and benchmarking ones, which never appear on a real network)
_NOT_SENDERS = [ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "192.0.2.0/24", "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32")]


def looks_unsendable(ip: str, target: str) -> bool:
    """Whether no real host sends from ``ip`` to ``target``: unspecified, loopback, multicast, broadcast or
    reserved, a documentation or benchmarking range, or the target's own address (a LAND attack)."""
    if ip == target:
        return True
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return True
    return address.is_unspecified or address.is_loopback or address.is_multicast or address.is_reserved or any(
        address in network for network in _NOT_SENDERS if network.version == address.version)


class SourceSample:
    """A distinct sample of sources with their flows (Gibbons' distinct sampling): the sources whose address hash
    starts with ``level`` zero bits, at most SAMPLE_SOURCES (the level rises when there are more), each counted from
    its first flow, as every source of the sample was taken at its first flow. Unlike the first sources seen, it
    is a fair sample of all of them, whatever their order."""

    __slots__ = ("level", "seen")

    def __init__(self) -> None:
        self.level = 0
        self.seen: dict[str, int] = {}

    def add(self, ip: str) -> None:
        seen = self.seen
        n = seen.get(ip)
        if n is not None:
            seen[ip] = n + 1
        elif _address_hash(ip) >> (32 - self.level) == 0:
            seen[ip] = 1
            if len(seen) > SAMPLE_SOURCES:
                self.level += 1
                shift = 32 - self.level
                self.seen = {a: c for a, c in seen.items() if _address_hash(a) >> shift == 0}

    def spoofed_share(self, target: str) -> float:
        """The share of the sampled sources that look spoofed (see records.FLOOD_FIELDS)."""
        if not self.seen:
            return 0.0
        spoofed = sum(1 for ip, flows in self.seen.items() if flows == 1 or looks_unsendable(ip, target))
        return spoofed / len(self.seen)


def _address_hash(ip: str) -> int:
    """A 32-bit hash of an address whose top bits are fair coins: CRC-32 mixed by Knuth's multiplication (whose top
    bits depend on all of the CRC's)."""
    return (zlib.crc32(ip.encode()) * 0x9E3779B1) & 0xFFFFFFFF


class FloodTally:
    """The record of one target service and window in the making."""

    __slots__ = ("answered", "bytes", "dst_mac", "examples", "families", "first_ms", "flows", "last_ms", "packets",
                 "sample", "service", "sources", "top_ports", "top_sources", "window")

    def __init__(self, service: Service, window: int, dst_mac: str) -> None:
        import datasketches  # only once a flood is folded: its import costs every run

        self.service, self.window, self.dst_mac = service, window, dst_mac
        self.flows = self.packets = self.bytes = self.answered = 0
        self.first_ms, self.last_ms = 1 << 62, 0
        self.families: Counter[str] = Counter()
        self.sources = datasketches.hll_sketch(HLL_LG_K, datasketches.HLL_8)
        self.top_sources = datasketches.frequent_strings_sketch(FREQUENT_LG_MAP)
        self.top_ports = datasketches.frequent_strings_sketch(FREQUENT_LG_MAP)
        self.sample = SourceSample()
        self.examples: list[str] = []

    def add(self, src_ip: str, src_port: int, first_ms: int, last_ms: int, packets: int, nbytes: int,
            answered: bool, family: str) -> None:
        self.flows += 1
        self.packets += packets
        self.bytes += nbytes
        self.answered += answered
        if first_ms < self.first_ms:
            self.first_ms = first_ms
        if last_ms > self.last_ms:
            self.last_ms = last_ms
        self.families[family] += 1
        self.sources.update(src_ip)
        self.top_sources.update(src_ip)
        self.top_ports.update(str(src_port))
        self.sample.add(src_ip)
        if len(self.examples) < EXAMPLES:
            dst_ip, dst_port, protocol = self.service
            cid = community_id(src_ip, dst_ip, protocol, src_port, dst_port)
            if cid is not None:
                self.examples.append(cid)

    def add_claimed(self, flows: list[Any], families: list[str]) -> None:
        """``add`` for flows claimed before they were made records (MeteredFlows), a batch at a time."""
        columns = list(zip(*flows, strict=True))
        srcs, sports = columns[_SRC_IP], columns[_SRC_PORT]
        self.flows += len(flows)
        self.packets += sum(columns[_PACKETS])
        self.bytes += sum(columns[_BYTES])
        self.answered += sum(1 for n in columns[_BACK] if n)
        self.first_ms = min(self.first_ms, *columns[_FIRST])
        self.last_ms = max(self.last_ms, *columns[_LAST])
        self.families.update(families)
        hll, top, ports, sample = self.sources.update, self.top_sources.update, self.top_ports.update, self.sample.add
        for ip, port in zip(srcs, sports, strict=True):
            hll(ip)
            top(ip)
            ports(str(port))
            sample(ip)
        dst_ip, dst_port, protocol = self.service
        for ip, port in zip(srcs[:EXAMPLES - len(self.examples)], sports, strict=False):
            cid = community_id(ip, dst_ip, protocol, port, dst_port)
            if cid is not None:
                self.examples.append(cid)

    def record(self, source: str, reasons: dict[str, str]) -> dict[str, Any]:
        family = self.families.most_common(1)[0][0]
        dst_ip, dst_port, protocol = self.service
        span_s = (self.last_ms - self.first_ms) / 1000.0
        return flood_record(
            source=source, dst_ip=dst_ip, dst_port=dst_port, protocol=protocol, dst_mac=self.dst_mac, family=family,
            reasons=[reasons[family]], window_start_ms=self.window * WINDOW_MS,
            window_end_ms=(self.window + 1) * WINDOW_MS, first_seen_ms=self.first_ms, last_seen_ms=self.last_ms,
            flows=self.flows, packets=self.packets, bytes=self.bytes, answered_flows=self.answered,
            packets_per_s=round(self.packets / span_s, 1) if span_s > 0 else 0.0,
            distinct_sources=round(self.sources.get_estimate()),
            spoofed_share=round(self.sample.spoofed_share(dst_ip), 4),
            top_sources=[{"ip": ip, "flows": low} for ip, low in _frequent(self.top_sources)],
            top_src_ports=[{"port": int(port), "flows": low} for port, low in _frequent(self.top_ports)],
            example_community_ids=list(self.examples))


def _frequent(sketch: Any) -> list[tuple[str, int]]:
    """The items surely above the sketch's error, with the lower bound of their count, most first (at most TOP)."""
    import datasketches

    items = sketch.get_frequent_items(datasketches.frequent_items_error_type.NO_FALSE_POSITIVES)
    return [(item, int(low)) for item, _estimate, low, _high in items[:TOP]]


class FloodFolder:
    """The flood records of one source (a capture or an interface) in the making, and which services' flows are
    claimed before they are made flow records (see the module's docstring)."""

    def __init__(self, source: str, tracker: ContextTracker, idle_timeout_s: float, flood_flows: float,
                 reasons: dict[str, str], warn: Callable[[str], None], live: bool = False,
                 meter: FlowSource | None = None) -> None:
        self.source = source
        self.meter = meter  # told which services are claimed: it holds their new flows (iotscan.capture.hold)
        self.live = live  # keep a snapshot of the open records for a live view
        self.tracker = tracker
        self.idle_ms = int(idle_timeout_s * 1000)
        self.flood_flows = flood_flows  # the flood rule's flows to the target in its shorter window
        self.reasons = reasons
        self.warn = warn
        self.claimed: set[Service] = set()
        self.tallies: dict[tuple[Service, int], FloodTally] = {}
        self.ended_until_ms = 0  # the flows that ended before this have reached the stage
        self.folded = 0
        self.full = False
        self.ongoing: list[dict[str, Any]] = []  # a snapshot of the open records, for a live view

    def claims(self, flow: Any) -> bool:
        """Whether to take ``flow`` (a MeteredFlow) before it is made a flow record: a flow of a claimed service of
        at most FOLD_MAX_PACKETS packets, from a source the tracker does not know, while the target still
        receives flows at the flood rule's rate (as far as the tracker has counted)."""
        if (flow.dst_ip, flow.dst_port, flow.protocol) not in self.claimed \
                or flow.bidirectional_packets > FOLD_MAX_PACKETS:
            return False
        tracker = self.tracker
        if flow.src_ip in tracker.src:
            return False
        state = tracker.dst.get(flow.dst_ip)
        if state is None:
            return False
        elapsed = flow.bidirectional_last_seen_ms / 1000.0 - state[0]
        flows = state[1] * math.exp(-elapsed * tracker.rates[0]) if elapsed > 0 else state[1]
        return flows + 1.0 >= self.flood_flows

    def fold(self, service: Service, dst_mac: str, src_ip: str, src_port: int, first_ms: int, last_ms: int,
             packets: int, nbytes: int, answered: bool, family: str) -> bool:
        """Count one scored flow in the record of its service and window, and claim the service; False when no
        more records may be opened (the flow is then written as a flow record)."""
        key = (service, first_ms // WINDOW_MS)
        tally = self.tallies.get(key)
        if tally is None:
            if len(self.tallies) >= MAX_OPEN_RECORDS:
                if not self.full:
                    self.full = True
                    self.warn(f"floods of more than {MAX_OPEN_RECORDS:,} targets and windows at once: the flows of "
                              "further ones are written as flow records")
                return False
            tally = self.tallies[key] = FloodTally(service, key[1], dst_mac)
        tally.add(src_ip, src_port, first_ms, last_ms, packets, nbytes, answered, family)
        self.folded += 1
        if service not in self.claimed:
            self.claimed.add(service)
            if self.meter is not None:
                self.meter.hold(*service, self.flood_flows, self.tracker.rates[0])
        return True

    def fold_claimed(self, flows: list[Any], families: list[str], flooded: list[bool]) -> None:
        """Count flows claimed before they were made records (MeteredFlows, in order), with the families the flood
        rule gives them and whether their target still received flows at a flood's rate; the first of a service
        found below it is its flood's last (the service's later flows are scored again)."""
        groups: dict[tuple[Service, int], tuple[list[Any], list[str]]] = {}
        for flow, family, still in zip(flows, families, flooded, strict=True):
            service = (flow.dst_ip, flow.dst_port, flow.protocol)
            group = groups.get((service, flow.bidirectional_first_seen_ms // WINDOW_MS))
            if group is None:
                group = groups[(service, flow.bidirectional_first_seen_ms // WINDOW_MS)] = ([], [])
            group[0].append(flow)
            group[1].append(family)
            if not still:
                self.release(service)
        for key, (members, member_families) in groups.items():
            tally = self.tallies.get(key)
            if tally is None:  # a claimed service's: opened beyond MAX_OPEN_RECORDS too (at most twice as many)
                tally = self.tallies[key] = FloodTally(key[0], key[1], members[0].dst_mac)
            tally.add_claimed(members, member_families)
        self.folded += len(flows)

    def release(self, service: Service) -> None:
        """The service's target no longer receives flows at a flood's rate: its flows are scored again."""
        if service in self.claimed:
            self.claimed.discard(service)
            if self.meter is not None:
                self.meter.release(*service)

    def closed(self, ended_ms: int) -> list[dict[str, Any]]:
        """The records that no flow can come to any more, now that the flows that ended until ``ended_ms`` have
        come (removed from the open ones)."""
        if ended_ms > self.ended_until_ms:
            self.ended_until_ms = ended_ms
        horizon = self.ended_until_ms - self.idle_ms
        done = [key for key, tally in self.tallies.items() if (tally.window + 1) * WINDOW_MS <= horizon]
        records = [self.tallies.pop(key).record(self.source, self.reasons) for key in sorted(done, key=_by_time)]
        self._snapshot()
        return records

    def flush(self) -> list[dict[str, Any]]:
        """Every open record: the capture ended."""
        records = [self.tallies[key].record(self.source, self.reasons) for key in sorted(self.tallies, key=_by_time)]
        self.tallies.clear()
        self.claimed.clear()
        self._snapshot()
        return records

    def _snapshot(self) -> None:
        """The open records as a live view shows them, replaced whole: another thread reads the list."""
        if not self.live:
            return
        self.ongoing = [{"dst_ip": t.service[0], "dst_port": t.service[1], "protocol": t.service[2],
                         "family": t.families.most_common(1)[0][0], "flows": t.flows, "packets": t.packets,
                         "first_seen_ms": t.first_ms, "last_seen_ms": t.last_ms}
                        for t in self.tallies.values()]


def _by_time(key: tuple[Service, int]) -> tuple[int, Service]:
    return key[1], key[0]
