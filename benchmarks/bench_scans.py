"""Scan detection side by side: iotscan's host-behaviour stage against Zeek's scan policy, on the same flows.

Zeek's policy/misc/scan.zeek (Zeek 3 to 7) raises Scan::Address_Scan when one source's failed connection
attempts (no answer, rejected, reset) to one port reach 25 distinct hosts within a 5-minute epoch, and
Scan::Port_Scan when its failed attempts to one host reach 15 distinct ports within one. Zeek is not
installable here, so its logic is applied to the same flows iotscan meters, with the same outcome of each
flow (iotscan.detect.scans.outcome); that logic is a dozen lines (ZeekScanPolicy below).

For each capture: whether each decides, and after how many failed first contacts (iotscan) or failed
attempts (Zeek) of the source. Captures: the labeled scan captures of the manifests (the sources given),
synthetic slow scans (one probe every 2 s, every 60 s: a propagating bot's pace and slower), and benign
captures for false alarms. One command:

    .venv/bin/python benchmarks/bench_scans.py [--source NAME ...] [--benign-source NAME ...]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from corpus import REPO

sys.path.insert(0, str(REPO))

from iotscan.capture.source import flow_block_dtype
from iotscan.cli.common import build_stages, main_pass_config
from iotscan.detect.features import SPLT_PACKETS
from iotscan.detect.hosts import flow_flags
from iotscan.detect.scans import FAILED, TCP, outcome
from iotscan.pipeline import Analysis
from iotscan.stage import Event, Stage
from iotscan.training.manifest import read_manifests, select_sources

ADDR_SCAN_HOSTS, PORT_SCAN_PORTS, EPOCH_MS = 25, 15, 300_000


class ZeekScanPolicy(Stage):
    """scan.zeek's sumstats over failed TCP attempts: distinct hosts per (source, port), distinct ports per
    (source, host), in fixed 5-minute epochs; the first threshold crossed per source, and the attempts it took."""

    def __init__(self) -> None:
        super().__init__()
        self.epoch: dict[str, int] = {}
        self.hosts: dict[tuple[str, int], set[str]] = defaultdict(set)
        self.ports: dict[tuple[str, str], set[int]] = defaultdict(set)
        self.attempts: dict[str, int] = defaultdict(int)
        self.decided: dict[str, tuple[str, int, int]] = {}  # source -> (kind, time ms, failed attempts)
        self.dtype = flow_block_dtype(SPLT_PACKETS)

    def run(self, events: Iterator[Event]) -> Iterator[Event]:
        for event in events:
            record, flow = event
            if record is not None and flow is not None and record["protocol"] == TCP:
                self._observe(record, flow)
            yield event

    def _observe(self, r: dict[str, Any], flow: Any) -> None:
        (src_syn, dst_syn, dst_rst), = flow_flags([flow], self.dtype)
        if outcome(TCP, src_syn, dst_syn, dst_rst, r["src2dst_packets"], r["dst2src_packets"], True) != FAILED:
            return
        src, ms = r["src_ip"], r["first_seen_ms"]
        start = self.epoch.setdefault(src, ms)
        if ms - start >= EPOCH_MS:  # a new epoch: SumStats starts its counts again
            self.epoch[src] = ms
            for key in [k for k in self.hosts if k[0] == src]:
                del self.hosts[key]
            for key in [k for k in self.ports if k[0] == src]:
                del self.ports[key]
        self.attempts[src] += 1
        hosts = self.hosts[(src, r["dst_port"])]
        hosts.add(r["dst_ip"])
        ports = self.ports[(src, r["dst_ip"])]
        ports.add(r["dst_port"])
        if src not in self.decided:
            if len(hosts) >= ADDR_SCAN_HOSTS:
                self.decided[src] = ("Address_Scan", ms, self.attempts[src])
            elif len(ports) >= PORT_SCAN_PORTS:
                self.decided[src] = ("Port_Scan", ms, self.attempts[src])


class _Alerts:
    def __init__(self) -> None:
        self.alerts: list[dict[str, Any]] = []

    def write(self, record: dict[str, Any]) -> None:
        if record.get("event_type") == "alert" and record["kind"] == "scan":
            self.alerts.append(record)

    def close(self, summary: dict[str, Any]) -> None:
        pass


def run(path: Path) -> tuple[dict[str, int], dict[str, int]]:
    """(iotscan's scanners, Zeek's scanners) of one capture: source -> failed contacts or attempts to decide."""
    zeek = ZeekScanPolicy()
    sink = _Alerts()
    analysis = Analysis(sink, stages=[*build_stages(devices=False), zeek])
    analysis.run_files([path], main_pass_config("", score=True))
    analysis.finish()
    ours = {a["host_ip"]: a["evidence"]["failed_first_contacts"] for a in sink.alerts}
    return ours, {src: attempts for src, (_, _, attempts) in zeek.decided.items()}


def slow_scan(path: Path, gap_s: float, targets: int, seed: int) -> None:
    """A bot's propagation at one new address every gap_s seconds (unanswered SYNs, each sent 3 times)."""
    sys.path.insert(0, str(REPO / "tests"))
    from frames import SYN, SYN_ACK, ether, ipv4, tcp, write_timed_pcap

    rng = random.Random(seed)
    frames = [(0.0, ether(ipv4("192.168.1.50", "93.184.216.34", 6, tcp(40000, 443, SYN)))),
              (0.1, ether(ipv4("93.184.216.34", "192.168.1.50", 6, tcp(443, 40000, SYN_ACK))))]
    for i in range(targets):
        host = f"{rng.choice((45, 61, 87, 112, 185))}.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
        for retry in (0, 3, 9):
            frames.append((1 + i * gap_s + retry, ether(ipv4("192.168.1.50", host, 6, tcp(41000 + i, 23, SYN)))))
    write_timed_pcap(path, frames)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", action="append", default=[],
                        help="labeled manifests (default ../shared/datasets/MANIFEST.csv, training/ndpi-corpus.csv)")
    parser.add_argument("--source", action="append", default=[], help="scan captures of these datasets")
    parser.add_argument("--benign-source", action="append", default=[], help="benign captures of these datasets")
    args = parser.parse_args()
    manifests = [Path(m) for m in args.manifest] or [REPO.parent / "shared" / "datasets" / "MANIFEST.csv",
                                                     REPO / "training" / "ndpi-corpus.csv"]
    specs = read_manifests(manifests)
    scans = [s for s in select_sources(specs, args.source) if s.family == "scan"] if args.source else \
        [s for s in specs if s.family == "scan"]
    benign = select_sources(specs, args.benign_source) if args.benign_source else []
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        synthetic = []
        for gap in (2.0, 60.0):
            path = Path(tmp) / f"slow-scan-every-{gap:g}s.pcap"
            slow_scan(path, gap, 40, seed=int(gap))
            synthetic.append(path)
        for path in [*dict.fromkeys(s.path for s in scans), *synthetic]:
            ours, zeek = run(path)
            rows.append((path.name, ours, zeek))
        false_alarms = [0, 0, 0]
        for path in dict.fromkeys(s.path for s in benign if s.label == 0):
            ours, zeek = run(path)
            false_alarms[0] += 1
            false_alarms[1] += len(ours)
            false_alarms[2] += len(zeek)
    print("| capture | iotscan: failed first contacts to decide | Zeek scan.zeek: failed attempts to decide |")
    print("| --- | ---: | ---: |")
    for name, ours, zeek in rows:
        def cell(found: dict[str, int]) -> str:
            return ", ".join(str(v) for v in found.values()) or "not caught"
        print(f"| {name} | {cell(ours)} | {cell(zeek)} |")
    caught = [sum(1 for _, o, _ in rows if o), sum(1 for _, _, z in rows if z)]
    first = [[min(o.values()) for _, o, _ in rows if o], [min(z.values()) for _, _, z in rows if z]]
    print(f"\ncaught: iotscan {caught[0]} of {len(rows)}, Zeek {caught[1]} of {len(rows)}; median probes to decide: "
          f"iotscan {statistics.median(first[0]) if first[0] else '-'}, "
          f"Zeek {statistics.median(first[1]) if first[1] else '-'}")
    if benign:
        print(f"benign captures: {false_alarms[0]}; scan alerts: iotscan {false_alarms[1]}, Zeek {false_alarms[2]}")


if __name__ == "__main__":
    main()
