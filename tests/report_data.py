"""Synthetic record streams for the HTML report's tests: the record schema, made up, as many as wanted, generated
(never held), with what makes bounds matter (a spoofed flood's one-flow sources, endless peers, names and record
types) and what a page must survive (markup, mathtext and very long strings in the attacker's fields)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

from iotscan.output.records import FLOW_FIELD_NAMES, iso_timestamp

HOSTILE = ("<script>alert(1)</script>", "$\\frac{1}{0}$ costs $5", "x" * 5000, '"><img src=http://203.0.113.9/x>')
FAMILIES = ("ddos", "dos", "scan", "bruteforce", "c2", "exploit", "spoofing")
START_MS = 1_700_000_000_000


def flows(count: int, sources: int = 20, seed: int = 0) -> Iterator[dict[str, Any]]:
    """``count`` flow records from ``sources`` captures read one after another over three days; 40% attacks of
    the seven families and of 30 made-up ones, most from spoofed one-flow sources; 5,000 application names."""
    rng = random.Random(seed)
    span = 3 * 86_400_000
    for i in range(count):
        source = i * sources // count
        first = START_MS + source * span // sources + rng.randrange(span // sources)
        attack = rng.random() < 0.4
        if attack:
            src_ip = f"{rng.randrange(1, 224)}.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)}"
            dst_ip = f"192.168.1.{rng.randrange(2, 20)}"
        else:
            src_ip = f"192.168.{rng.randrange(4)}.{rng.randrange(2, 254)}"
            dst_ip = f"{rng.randrange(1, 224)}.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)}"
        family = rng.choice(FAMILIES) if rng.random() < 0.9 else f"made-up-{rng.randrange(30)}"
        record: dict[str, Any] = dict.fromkeys(FLOW_FIELD_NAMES)
        record.update(
            timestamp=iso_timestamp(first), event_type="flow", flow_id=rng.getrandbits(63), source=f"cap-{source}.pcap",
            first_seen_ms=first, last_seen_ms=first + 10, duration_ms=10, src_ip=src_ip, src_port=rng.randrange(65536),
            dst_ip=dst_ip, dst_port=rng.choice((80, 443, 53, 1883)), protocol=rng.choice((6, 17)), ip_version=4,
            vlan_id=0, app=f"App-{rng.randrange(5000)}", app_guessed=False,
            server_name=rng.choice(HOSTILE) if rng.random() < 0.01 else f"host{rng.randrange(10**6)}.example",
            packets=rng.randrange(1, 50), bytes=rng.randrange(60, 100_000), src_device=None, dst_device=None,
            verdict="attack" if attack else "benign", score=rng.uniform(0.8, 1) if attack else rng.uniform(0, 0.8),
            family=family if attack else None, evidence_community_id=None,
            reasons=[rng.choice(HOSTILE) if rng.random() < 0.01 else f"reason {rng.randrange(200)}",
                     "unusual packet sizes"] if attack else [])
        yield record


def others(devices: int = 1000, alerts: int = 1000, floods: int = 300, kinds: int = 100,
           seed: int = 1) -> Iterator[dict[str, Any]]:
    """Device, alert and flood records, and records of types the report does not know, beyond every cap."""
    rng = random.Random(seed)
    for i in range(devices):
        mac = f"02:00:00:00:{i >> 8:02x}:{i & 255:02x}"
        yield {"timestamp": iso_timestamp(START_MS), "event_type": "device", "mac": mac,
               "ips": [f"192.168.{i >> 8}.{i & 255}"], "vendor": rng.choice(HOSTILE), "device_type": "camera",
               "model": None, "confidence": rng.random(), "flows": i, "bytes": rng.randrange(10**9),
               "evidence": [{"signal": "mac_vendor", "value": h, "points_to": h} for h in HOSTILE] * 5,
               "risks": [{"message": rng.choice(HOSTILE)}, "default credentials"]}
    for i in range(alerts):
        yield {"timestamp": iso_timestamp(START_MS + i), "event_type": "alert", "source": f"cap-{i % 20}.pcap",
               "kind": rng.choice(("scan", "compromised", "anomaly")), "detail": "horizontal", "family": "scan",
               "score": rng.random(), "host_ip": f"192.168.1.{i % 20 + 2}", "host_mac": None, "host_device": None,
               "message": rng.choice(HOSTILE), "reasons": list(HOSTILE), "evidence": {"ports": i},
               "first_seen_ms": START_MS + i, "decided_ms": START_MS + i}
    for i in range(floods):
        yield {"timestamp": iso_timestamp(START_MS + i), "event_type": "flood", "source": f"cap-{i % 20}.pcap",
               "dst_ip": f"192.168.1.{i % 20 + 2}", "dst_port": 80, "protocol": 6, "family": "ddos",
               "first_seen_ms": START_MS + i, "packets": rng.randrange(10**6), "flows": rng.randrange(10**5)}
    for i in range(kinds):
        yield {"timestamp": iso_timestamp(START_MS), "event_type": f"future-{i}"}
