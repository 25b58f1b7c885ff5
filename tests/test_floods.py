"""Flood records (--flood-records): a flood's one- and two-packet flows folded into one record per target service
and minute, every other flow written as ever; `all` writes every flow record, as iotscan did before them."""

from __future__ import annotations

import hashlib
import os
import random
import socket
import struct
import time
from collections import Counter
from pathlib import Path

import pytest

from iotscan.detect.flood import SourceSample, looks_unsendable
from iotscan.output.records import FLOOD_FIELD_NAMES, FLOOD_WINDOW_S
from tests.conftest import assert_no_traceback, ndjson, run_iotscan

VICTIM, ROUTER, CLIENTS = "10.0.0.10", "10.0.0.1", ("10.0.0.2", "10.0.0.3", "10.0.0.4")
START_S = 1_700_000_000
FLOOD_SYNS = 3000
ANSWERED_EVERY = 3  # the victim answers every third SYN with a RST: two-packet flows


def _mac(ip: str) -> bytes:
    return bytes([2, 0, 0, 0, 0, int(ip.rsplit(".", 1)[1])])


def _frame(src: str, dst: str, sport: int, dport: int, flags: int, payload: bytes = b"", protocol: int = 6,
           via: str | None = None, to: str | None = None, window: int = 64240) -> bytes:
    """An Ethernet frame of one IPv4 TCP segment or UDP datagram (``via``: the host whose MAC it came from, ``to``:
    the one it goes to, when not its addresses': the router's for a remote host)."""
    if protocol == 6:
        transport = struct.pack("!HHIIBBHHH", sport, dport, 1, 1, 0x50, flags, window, 0, 0) + payload
    else:
        transport = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(transport), 0, 0x4000, 64, protocol, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    return _mac(to or dst) + _mac(via or src) + b"\x08\x00" + ip + transport


def _exchange(client: str, sport: int, t: float) -> list[tuple[float, bytes]]:
    """A whole HTTP exchange of a local client with the victim: handshake, request, answer, close."""
    request, answer = b"GET /status HTTP/1.1\r\nHost: hub\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    packets = [(client, VICTIM, 0x02, b""), (VICTIM, client, 0x12, b""), (client, VICTIM, 0x10, b""),
               (client, VICTIM, 0x18, request), (VICTIM, client, 0x18, answer), (client, VICTIM, 0x11, b""),
               (VICTIM, client, 0x11, b""), (client, VICTIM, 0x10, b"")]
    return [(t + i * 0.002, _frame(src, dst, sport if src == client else 80, 80 if src == client else sport, flags,
                                   payload)) for i, (src, dst, flags, payload) in enumerate(packets)]


def _write(path: Path, frames: list[tuple[float, bytes]]) -> None:
    with path.open("wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        for t, frame in sorted(frames, key=lambda tf: tf[0]):
            f.write(struct.pack("<IIII", START_S + int(t), round((t % 1) * 1e6), len(frame), len(frame)) + frame)


@pytest.fixture(scope="module")
def flood_capture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3,000 spoofed SYNs (one per public source, through the router's MAC) to the hub's port 80 at 1,000 a
    second, a third of them refused, while three local clients keep polling the hub over whole exchanges and
    asking the router for names, before, during and after the flood."""
    rng = random.Random(30)
    frames: list[tuple[float, bytes]] = []
    for i in range(FLOOD_SYNS):
        t = 10.0 + i / 1000
        src, sport = f"11.{i >> 16}.{(i >> 8) & 255}.{i & 255}", rng.randint(1024, 65535)
        frames.append((t, _frame(src, VICTIM, sport, 80, 0x02, via=ROUTER)))
        if i % ANSWERED_EVERY == 0:
            frames.append((t + 0.0005, _frame(VICTIM, src, 80, sport, 0x14, to=ROUTER)))
    for k, client in enumerate(CLIENTS):
        for j in range(12):  # every 2 s from 0 to 22 s: before, during and after the flood (10 to 13 s)
            t = j * 2.0 + k * 0.3
            frames += _exchange(client, 40000 + 100 * k + j, t)
            query = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03hub\x04home\x00\x00\x01\x00\x01"
            frames.append((t + 0.05, _frame(client, ROUTER, 50000 + 100 * k + j, 53, 0, query, protocol=17)))
            frames.append((t + 0.051, _frame(ROUTER, client, 53, 50000 + 100 * k + j, 0, query + b"\0" * 16,
                                             protocol=17)))
    path = tmp_path_factory.mktemp("flood") / "mixed-synflood.pcap"
    _write(path, frames)
    return path


def _run(capture: Path, *args: str, code: int = 0) -> tuple[list[dict], list[dict], dict]:
    proc = run_iotscan("analyze", capture, "-f", "ndjson", *args)
    assert_no_traceback(proc)
    assert proc.returncode == code, proc.stderr.decode()
    records = ndjson(proc.stdout)
    assert records[-1]["event_type"] == "summary"
    return ([r for r in records if r["event_type"] == "flow"], [r for r in records if r["event_type"] == "flood"],
            records[-1])


@pytest.fixture(scope="module")
def both(flood_capture: Path) -> tuple[tuple[list[dict], list[dict], dict], tuple[list[dict], list[dict], dict]]:
    return _run(flood_capture), _run(flood_capture, "--flood-records", "all")


def test_flood_records_add_up_to_the_folded_flows_and_other_flows_are_unchanged(both) -> None:
    (flows, floods, summary), (every, none, whole) = both
    assert none == [] and whole["folded_flows"] == whole["floods"] == 0
    by_id = {r["flow_id"]: r for r in every}
    assert len(by_id) == len(every) == whole["flows"]
    # every flow record written is the one `all` writes, unchanged
    assert all(r == by_id[r["flow_id"]] for r in flows)
    folded = [by_id[i] for i in by_id.keys() - {r["flow_id"] for r in flows}]
    # what is missing is the flood: one- and two-packet flows to the hub's port 80, from the spoofed sources
    assert folded and all(r["dst_ip"] == VICTIM and r["dst_port"] == 80 and r["packets"] <= 2 for r in folded)
    assert all(r["src_ip"].startswith("11.") for r in folded) and len(folded) >= 0.9 * FLOOD_SYNS
    # the local clients' whole exchanges with the flooded hub, and their DNS, keep their records
    kept = [r for r in flows if r["src_ip"] in CLIENTS]
    assert len(kept) == len([r for r in every if r["src_ip"] in CLIENTS]) == 2 * 12 * len(CLIENTS)
    # the summary counts every flow, and how many were folded into how many records
    assert summary["flows"] == whole["flows"] == len(flows) + summary["folded_flows"]
    assert summary["folded_flows"] == sum(f["flows"] for f in floods) == len(folded)
    assert summary["floods"] == len(floods) >= 1
    # the folded flows count as attacks, as their records did
    assert summary["attacks"] == sum(r.get("verdict") == "attack" for r in flows) + len(folded)
    assert summary["attack_families"]["ddos"] >= len(folded)
    # the records add up to the flows they fold
    assert sum(f["packets"] for f in floods) == sum(r["packets"] for r in folded)
    assert sum(f["bytes"] for f in floods) == sum(r["bytes"] for r in folded)
    assert sum(f["answered_flows"] for f in floods) == sum(r["dst2src_packets"] > 0 for r in folded) > 0
    assert min(f["first_seen_ms"] for f in floods) == min(r["first_seen_ms"] for r in folded)
    assert max(f["last_seen_ms"] for f in floods) == max(r["last_seen_ms"] for r in folded)


def test_a_flood_record_says_it_once(both) -> None:
    (flows, floods, _), (every, _, _) = both
    folded = {r["community_id"]: r for r in every if r["flow_id"] not in {f["flow_id"] for f in flows}}
    for flood in floods:
        assert list(flood) == list(FLOOD_FIELD_NAMES)
        assert (flood["dst_ip"], flood["dst_port"], flood["protocol"], flood["family"]) == (VICTIM, 80, 6, "ddos")
        assert flood["dst_mac"] == _mac(VICTIM).hex(":")
        assert flood["reasons"] == ["a flood of one host from many sources (DDoS)"]
        assert flood["window_end_ms"] - flood["window_start_ms"] == FLOOD_WINDOW_S * 1000
        assert flood["window_start_ms"] % (FLOOD_WINDOW_S * 1000) == 0
        assert flood["window_start_ms"] <= flood["first_seen_ms"] < flood["window_end_ms"]
        assert flood["timestamp"].endswith("Z") and flood["source"].endswith("mixed-synflood.pcap")
        assert 900 <= flood["packets_per_s"] <= 1500  # 1,000 SYNs a second and a third as many refusals
        # one flow per spoofed source: HyperLogLog's estimate, and every sampled source a one-off
        assert abs(flood["distinct_sources"] - flood["flows"]) <= 0.03 * flood["flows"]
        assert flood["spoofed_share"] >= 0.95 and flood["top_sources"] == []
        assert len(flood["example_community_ids"]) == 3
        assert all(folded[cid]["dst_port"] == 80 for cid in flood["example_community_ids"])


def test_flood_records_all_reproduces_the_records_of_before() -> None:
    """`--flood-records all` writes the very records iotscan wrote before flood records (the SHA-256 of the records
    but the summary, taken at the commit before them, then with the risk stage's ``risks`` field added and nothing else
    changed): recompute it only when the model or the contract changes."""
    proc = run_iotscan("analyze", "samples/synflood-spoofed.pcap", "-f", "ndjson", "--flood-records", "all",
                       check_code=0)
    lines = proc.stdout.splitlines(keepends=True)
    assert b'"event_type":"summary"' in lines[-1]
    assert hashlib.sha256(b"".join(lines[:-1])).hexdigest() == \
        "3cc86f6853eacb989385332e1cf16d456140564dcf07f72afa46c9ec1ac66ff1"
    every = [r for r in ndjson(b"".join(lines[:-1])) if r.get("family") == "ddos"]
    folded = ndjson(run_iotscan("analyze", "samples/synflood-spoofed.pcap", "-f", "ndjson", check_code=0).stdout)
    # the ddos flows the flood rule named are folded (the family model names a few more ddos, written as flows)
    assert [r["event_type"] for r in folded].count("flood") == 1
    assert 0.95 * len(every) <= folded[-1]["folded_flows"] <= len(every) and folded[-1]["flows"] == 2857


def test_a_floods_flows_are_expired_early_and_established_ones_keep_their_place(flood_capture: Path, both) -> None:
    """With room for 2,000 flows, at most 500 may be embryonic (of at most two packets): the flood's are expired
    early (an emergency, said in the summary), and the local clients' exchanges are whole all the same."""
    flows, _, summary = _run(flood_capture, "--flood-records", "all", "--max-flows", "2000")
    (_, _, _), (every, _, _) = both
    assert [w["code"] for w in summary["warnings"]] == ["flow_emergency"]
    assert "expired early" in summary["warnings"][0]["message"]

    def shape(records: list[dict]) -> Counter:
        return Counter((r["src_ip"], r["src_port"], r["dst_ip"], r["dst_port"], r["packets"]) for r in records)

    assert shape(flows) == shape(every)


def test_fail_on_counts_folded_flows_and_the_table_shows_one_line(flood_capture: Path) -> None:
    _run(flood_capture, "--no-devices", "--fail-on", "ddos", code=1)
    table = run_iotscan("analyze", flood_capture, "-f", "table", check_code=0).stdout.decode()
    section = table[table.index("Floods"):]
    ends = [section.index(title) for title in ("Attacks by family", "Busiest flows") if title in section]
    section = section[:min(ends)]
    rows = [line for line in section.splitlines() if f"{VICTIM}:80/tcp" in line]
    assert len(rows) == 1 and "ddos" in rows[0]
    doc = run_iotscan("analyze", flood_capture, "-f", "json", check_code=0).stdout
    assert b'"floods":[{' in doc


def test_spoofed_looking_sources() -> None:
    for ip in ("0.1.2.3", "127.0.0.9", "224.0.0.1", "255.255.255.255", "240.1.1.1", "192.0.2.7", "198.18.0.1",
               "::", "::1", "ff02::1", "2001:db8::5", VICTIM, "not-an-address"):
        assert looks_unsendable(ip, VICTIM), ip
    for ip in ("11.0.0.1", "8.8.8.8", "10.0.0.2", "2a00:1450::1", "fd00::7"):
        assert not looks_unsendable(ip, VICTIM), ip
    sample = SourceSample()
    for i in range(20_000):  # a botnet of 2,000 sources, 10 flows each, then 5,000 one-off sources
        sample.add(f"11.0.{(i % 2000) >> 8}.{i % 2000 & 255}")
    for i in range(5000):
        sample.add(f"12.0.{i >> 8}.{i & 255}")
    assert len(sample.seen) <= 1024 and sample.level >= 2
    assert all(flows == (10 if ip.startswith("11.") else 1) for ip, flows in sample.seen.items())
    assert 0.6 <= sample.spoofed_share(VICTIM) <= 0.8  # 5,000 of 7,000 sources are one-offs


# -- live: a flood on the loopback interface --------------------------------------------------------


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="live capture on lo needs root (CAP_NET_RAW)")
def test_live_flood_gives_flood_records_and_ordinary_flows_keep_theirs() -> None:
    """Refused connections from 3,000 loopback addresses (127.1.x.y: they and the kernel's refusals stay on lo) to a
    closed port, while a client talks to a listening one: the flood is folded, the exchanges keep their records."""
    from tests.test_live import LiveProcess, _port, _tcp_exchange

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    closed = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connections to it are refused
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    target, service = _port(closed), _port(listener)
    live = LiveProcess("--bpf", f"port {service} or port {target} or port {_port(probe)}", "-f", "ndjson",
                       "--no-devices", "--idle-timeout", "2", "--stats-interval", "1", "--duration", "30")
    try:
        live.wait_ready(_port(probe))
        clients = [_tcp_exchange(listener, 200, 2000)[0]]
        for i in range(3000):  # bounded: 3,000 refused connections in about 3 s
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((f"127.1.{i >> 8}.{i & 255}", 0))
            s.settimeout(1)
            try:
                s.connect(("127.0.0.1", target))
            except OSError:
                pass
            finally:
                s.close()
            if i % 500 == 0:
                clients.append(_tcp_exchange(listener, 200, 2000)[0])
            time.sleep(0.001)
        code, stderr = live.finish(timeout=60)
    finally:
        live.kill()
        for s in (listener, closed, probe):
            s.close()
    assert code == 0, stderr.decode(errors="replace")
    records = live.poll_records()
    floods = [r for r in records if r["event_type"] == "flood"]
    summary = records[-1]
    assert summary["event_type"] == "summary" and summary["folded_flows"] == sum(f["flows"] for f in floods)
    assert floods and all(f["dst_port"] == target and f["family"] in ("ddos", "dos") for f in floods)
    assert sum(f["flows"] for f in floods) >= 2000 and floods[0]["spoofed_share"] >= 0.95  # 127.1.x.y: loopback
    exchanges = {r["src_port"]: r for r in records if r["event_type"] == "flow" and r["dst_port"] == service}
    assert set(clients) <= exchanges.keys()
    assert all(exchanges[p]["verdict"] in ("benign", "attack") and exchanges[p]["packets"] >= 6 for p in clients)
    kinds = Counter(r["event_type"] for r in records)
    assert kinds["flow"] < 1000  # the refused connections are not written one by one


def test_a_floods_probes_are_counted_not_kept_while_a_scans_are() -> None:
    from iotscan.detect.request_pass import SIGNATURES, RequestFindings

    code = next(i for i, s in enumerate(SIGNATURES, start=1) if s.where == "syn")
    findings = RequestFindings(flood_rate=54.0)
    for i in range(1000):  # a flood of scanner-like SYNs at one service, 1,000 a second, one per spoofed source
        findings.add(f"11.0.{i >> 8}.{i & 255}", 1024 + i, VICTIM, 80, START_S * 1000 + i, code)
    for port in range(1, 1001):  # a scan of 1,000 ports of another host in the same second
        findings.add("203.0.113.9", 50000, "10.0.0.20", port, START_S * 1000 + port, code)
    assert 50 <= 1000 - findings.flood_probes <= 60 and findings.kept == 1000 - findings.flood_probes + 1000
    assert RequestFindings().add("11.0.0.1", 1024, VICTIM, 80, 0, code) is None  # no flood rate: every one is kept
