"""Held packets (iotscan.capture.hold): once the scoring stage claims a flooded service, the meter makes no NFStream
flow of a packet that opens a flow there while the service receives new flows at a flood's rate; what it sends is
what the flow would have been, and a flow that goes on is the very flow it would have made."""

from __future__ import annotations

import ipaddress
import math
import struct
from pathlib import Path

import pytest

from iotscan.capture.hold import HeldServices, service_key
from iotscan.capture.source import FlowSource
from iotscan.cli.common import main_pass_config
from iotscan.detect.scoring import FLOOD_FLOWS_5S, ScoringStage
from iotscan.output.records import FLOW_ATTRIBUTES, HeldFlow, HeldFlows, MeteredFlow, flow_record
from iotscan.stage import SourceInfo
from tests.frames import ACK, PSH_ACK, RST_ACK, SYN, SYN_ACK, ether, ipv4, tcp, write_timed_pcap

VICTIM, VICTIM6 = "10.0.0.10", "2001:db8::10"
FLOOD_S, RATE = 4.0, 2000  # SYNs a second for FLOOD_S seconds, to each victim
DECAY = math.log(2) / 5  # the flood rule's: a half-life of 5 s
# a flow's numbers and endpoints (FLOW_ATTRIBUTES up to dst2src_bytes): what a held packet alone sends of them
NUMBERS = FLOW_ATTRIBUTES.index("dst2src_bytes") + 1


def _ipv6(src: str, dst: str, payload: bytes) -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, len(payload), 6, 64, ipaddress.IPv6Address(src).packed,
                       ipaddress.IPv6Address(dst).packed) + payload


def _exchange(src: str, sport: int, t: float) -> list[tuple[float, bytes]]:
    """A whole HTTP exchange with the victim: handshake, request, answer, close."""
    steps = [(True, SYN, b""), (False, SYN_ACK, b""), (True, ACK, b""),
             (True, PSH_ACK, b"GET / HTTP/1.1\r\nHost: victim\r\n\r\n"),
             (False, PSH_ACK, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"), (True, ACK, b"")]
    return [(t + i * 0.001, ether(ipv4(src, VICTIM, 6, tcp(sport, 80, flags, payload)) if out else
                                  ipv4(VICTIM, src, 6, tcp(80, sport, flags, payload))))
            for i, (out, flags, payload) in enumerate(steps)]


@pytest.fixture(scope="module")
def flood(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Spoofed SYN floods of an IPv4 and an IPv6 service; every 5th IPv4 SYN refused (a RST: a two-packet flow),
    every 100th a whole exchange from its source; then a trickle of one SYN a second to the IPv4 service."""
    frames: list[tuple[float, bytes]] = []
    for i in range(int(FLOOD_S * RATE)):
        t = 1.0 + i / RATE
        src, sport = f"11.{i >> 16}.{(i >> 8) & 255}.{i & 255}", 1024 + i % 60000
        if i % 100 == 50:
            frames += _exchange(src, sport, t)
            continue
        frames.append((t, ether(ipv4(src, VICTIM, 6, tcp(sport, 80, SYN)))))
        if i % 5 == 0:
            frames.append((t + 0.0002, ether(ipv4(VICTIM, src, 6, tcp(80, sport, RST_ACK)))))
        frames.append((t + 0.0001, ether(_ipv6(f"2001:db8:1::{i + 1:x}", VICTIM6, tcp(sport, 443, SYN)))))
    for k in range(60):  # the flood is over: one SYN a second, which the meter's count soon says is no flood
        frames.append((FLOOD_S + 2.0 + k, ether(ipv4(f"12.0.0.{k + 1}", VICTIM, 6, tcp(40000 + k, 80, SYN)))))
    path = tmp_path_factory.mktemp("hold") / "floods.pcap"
    write_timed_pcap(path, frames)
    return path


def _meter(capture: Path, *services: tuple[str, int, int]) -> list[MeteredFlow | HeldFlows]:
    """What the main pass's meter sends: flows, and the flows it held a batch at a time."""
    source = FlowSource(main_pass_config(str(capture), score=True, risks=True))
    for service in services:  # claimed before the meter starts: it reads them after its first 1,024 packets
        source.hold(*service, FLOOD_FLOWS_5S, DECAY)
    return list(source)


def _flows(items: list[MeteredFlow | HeldFlows]) -> list[MeteredFlow]:
    return [f for item in items for f in (item if type(item) is HeldFlows else [item])]


def _key(flow: MeteredFlow) -> tuple:
    return flow.src_ip, flow.src_port, flow.dst_ip, flow.dst_port, flow.protocol


def test_held_flows_are_the_flows_they_would_have_been(flood: Path) -> None:
    plain = {_key(f): f for f in _meter(flood)}
    items = _meter(flood, (VICTIM, 80, 6), (VICTIM6, 443, 6))
    assert all(type(f) is HeldFlow for item in items if type(item) is HeldFlows for f in item)
    flows = _flows(items)
    assert all(type(f) is MeteredFlow for f in plain.values())
    assert len(flows) == len(plain) and {_key(f) for f in flows} == plain.keys()
    made = [f for f in flows if type(f) is MeteredFlow]
    held = [f for f in flows if type(f) is HeldFlow]
    # what the meter made flows of is what it makes without holding: nDPI's fields, statistics and all
    assert all(f == plain[_key(f)] for f in made)
    # a held packet alone is the one-packet flow it would have been, without nDPI's fields and statistics
    assert all(f[:NUMBERS] == plain[_key(f)][:NUMBERS] and f.bidirectional_packets == 1 for f in held)
    assert all(f.statistics is None and f.application_name == "" for f in held)
    # most of both floods was held (not the SYNs before the meter read the claims, nor the refused and answered)
    syns = int(FLOOD_S * RATE)
    assert sum(f.dst_ip == VICTIM6 for f in held) >= 0.9 * syns
    assert sum(f.dst_ip == VICTIM for f in held) >= 0.9 * (syns * 4 // 5 - syns // 100)
    # a refused SYN and a whole exchange were made flows from their held first packet on, as they would have been
    refused = [f for f in made if f.dst_port == 80 and f.bidirectional_packets == 2]
    exchanges = [f for f in made if f.dst_port == 80 and f.bidirectional_packets == 6]
    assert len(refused) >= 0.9 * syns // 5 and len(exchanges) == syns // 100
    assert all(f.application_name == "HTTP" for f in exchanges)
    # once the flood is over, the meter's count decays (as the flood rule's: about 6,000 halved every 5 s falls
    # below a flood's 54 in some 35 s), and the trickle's SYNs are flows again
    trickle = sorted((f for f in flows if f.src_ip.startswith("12.")), key=lambda f: f.bidirectional_first_seen_ms)
    assert len(trickle) == 60 and type(trickle[0]) is HeldFlow
    assert all(type(f) is MeteredFlow for f in trickle[40:])


def test_a_released_service_is_held_no_more() -> None:
    services = HeldServices()
    services.update(("hold", VICTIM6, 443, 6, 3.0, DECAY))
    services.update(("hold", VICTIM, 80, 6, 3.0, DECAY))
    services.update(("release", VICTIM6, 443, 6))
    assert list(services.services) == [service_key(VICTIM, 80, 6)]
    assert service_key(VICTIM, 80, 6) == (int.from_bytes(ipaddress.IPv4Address(VICTIM).packed, "little"), 0, 80, 6)


def _scored(capture: Path, flows: list[MeteredFlow | HeldFlows]) -> tuple[list[dict], list[dict]]:
    """The flood records and flow records the scoring stage makes of what the meter sent (a flood's folded)."""
    stage = ScoringStage(fold_floods=True)
    stage.begin(SourceInfo(name=capture.name, config=main_pass_config(str(capture), score=True, risks=True)))
    events = ((None, f) if stage.claims(f) else (flow_record(f, str(capture), capture.name), f) for f in flows)
    out = list(stage.run(events))
    return [r for r, f in out if f is None], [r for r, f in out if f is not None]


def test_the_scoring_stage_folds_held_flows_as_it_folds_their_flows(flood: Path) -> None:
    plain = _meter(flood)
    held = _meter(flood, (VICTIM, 80, 6), (VICTIM6, 443, 6))
    assert sum(len(item) for item in held if type(item) is HeldFlows) > 10_000
    (floods, kept), (before, kept_before) = _scored(flood, held), _scored(flood, plain)
    # the same flows are folded, into records that add up the same; the same flows keep their records
    assert {r["flow_id"] for r in kept} == {r["flow_id"] for r in kept_before}
    assert len(floods) == len(before) >= 2

    def totals(records: list[dict]) -> dict[tuple, tuple]:
        fields = ("flows", "packets", "bytes", "answered_flows", "first_seen_ms", "last_seen_ms", "family")
        return {(r["dst_ip"], r["dst_port"], r["window_start_ms"]): tuple(r[f] for f in fields) for r in records}

    assert totals(floods) == totals(before)
    assert sum(r["flows"] for r in floods) + len(kept) == len(plain) == len(_flows(held))
