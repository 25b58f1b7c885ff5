"""The host-behaviour stage: scans by connection outcome (Threshold Random Walk), compromised devices, DNS
tunnels, alert records; on crafted and real captures."""

from __future__ import annotations

import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest

from iotscan.detect import compromise, scans
from iotscan.detect.compromise import CompromiseTracker
from iotscan.detect.replies import dns_answers, dns_question, icmp_error
from iotscan.detect.scans import FAILED, NO_CONTACT, SUCCEEDED, UNANSWERED, ScanTracker, outcome
from iotscan.output.records import ALERT_FIELD_NAMES
from tests.conftest import DATASETS, REPO, SAMPLES, assert_no_traceback, ndjson, require_shared, run_iotscan
from tests.frames import ACK, PSH_ACK, SYN, SYN_ACK, dns_message, ether, ipv4, tcp, udp, write_timed_pcap

BOT, GATEWAY, CNC = "192.168.1.50", "192.168.1.1", "93.184.216.34"
BOT_MAC, GATEWAY_MAC = b"\x02\x11\x22\x33\x44\x50", b"\x02\x11\x22\x33\x44\x01"


def test_read_ahead_keeps_the_order_and_stops_when_ready_or_at_its_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    """While the replies pass runs, the host stage reads the next events ahead instead of waiting idle; it takes
    them in the same order as ever."""
    from iotscan.detect import hosts

    source = hosts._ReadAhead(iter([(i, None) for i in range(10)]))  # type: ignore[list-item]
    assert next(source) == (0, None)
    source.fill(lambda: len(source.ahead) >= 3)
    assert [e[0] for e in source.ahead] == [1, 2, 3]
    monkeypatch.setattr(hosts, "READ_AHEAD", 5)
    source.fill(lambda: False)
    assert [e[0] for e in source.ahead] == [1, 2, 3, 4, 5]
    assert [e[0] for e in source] == list(range(1, 10))
    source.fill(lambda: False)  # at the end: nothing, and no error
    assert not source.ahead


# -- Threshold Random Walk ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "expected"), [
    ((6, 1, 1, 0, 1, 1, True), SUCCEEDED),  # SYN answered by SYN-ACK
    ((6, 1, 0, 1, 1, 1, False), FAILED),  # refused, even in a capture that shows no other answer
    ((6, 5, 0, 0, 5, 0, True), FAILED),  # SYN retried, never answered
    ((6, 5, 0, 0, 5, 0, False), FAILED),  # ... in a capture of one direction too: it sent only SYNs
    ((6, 1, 0, 0, 12, 0, False), NO_CONTACT),  # a connection seen one way, its data sent: unknown
    ((6, 0, 0, 1, 1, 1, True), FAILED),  # an ACK probe answered by RST
    ((6, 0, 0, 0, 1, 0, False), FAILED),  # an ACK probe: one segment, whatever the capture shows
    ((6, 0, 0, 0, 40, 30, True), NO_CONTACT),  # a connection caught after its handshake
    ((17, 0, 0, 0, 1, 1, True), SUCCEEDED), ((17, 0, 0, 0, 1, 0, True), UNANSWERED),
    ((1, 0, 0, 0, 1, 0, False), NO_CONTACT),
])
def test_outcome_of_a_flow(args: tuple, expected: int) -> None:
    assert outcome(*args) == expected


def _walk(tracker: ScanTracker, src: str, contacts: list[tuple[str, int, int]], start_ms: int = 0,
          gap_ms: int = 1000) -> list[int]:
    """Feed contacts (dst, port, result); the indices of the ones that decided."""
    decided = []
    for i, (dst, port, result) in enumerate(contacts):
        _, decision = tracker.observe(src, dst, port, 6, result, start_ms + i * gap_ms, f"id{i}")
        if decision is not None:
            decided.append(i)
    return decided


def test_five_failed_first_contacts_decide_and_retries_are_no_evidence() -> None:
    tracker = ScanTracker()
    # a client retrying one closed port a thousand times contacted one service: no evidence
    assert _walk(tracker, "10.0.0.9", [("10.0.0.1", 8080, FAILED)] * 1000) == []
    # a scanner: the fifth failed first contact decides, with the paper's test (0.8 / 0.2, here PF 0.001)
    assert _walk(tracker, "10.0.0.66", [(f"10.0.1.{i}", 23, FAILED) for i in range(20)]) == [4]
    decision = tracker.scanner("10.0.0.66")
    assert decision is not None and decision.kind == "horizontal" and decision.failed == 5
    assert decision.examples == ("id0", "id1", "id2", "id3", "id4")
    assert scans.MIN_FAILED == 5 and pytest.approx(6.9, abs=0.01) == scans.SCANNER_AT


def test_successes_keep_a_host_benign_and_vertical_scans_are_named() -> None:
    tracker = ScanTracker()
    # a host whose first contacts mostly succeed (one in three fails): never a scanner
    mixed = [(f"10.0.2.{i}", 443, FAILED if i % 3 == 0 else SUCCEEDED) for i in range(300)]
    assert _walk(tracker, "10.0.0.7", mixed) == []
    # many ports of one host
    assert _walk(tracker, "10.0.0.8", [("10.0.0.1", port, FAILED) for port in range(1, 30)]) == [4]
    assert tracker.scanner("10.0.0.8").kind == "vertical"


def test_unanswered_udp_weighs_half_and_peer_to_peer_is_no_scan() -> None:
    tracker = ScanTracker()
    udp_sweep = [(f"10.0.3.{i}", 161, UNANSWERED) for i in range(40)]
    assert _walk(tracker, "10.0.0.5", udp_sweep) == [9]  # ten unanswered datagrams, not five
    # a peer-to-peer client: failed contacts to many hosts on as many ports, no focus
    peers = [(f"10.0.4.{i}", 10_000 + 7 * i, FAILED) for i in range(200)]
    assert _walk(tracker, "10.0.0.6", peers) == []


def test_a_slow_scan_of_one_probe_a_minute_decides_as_a_fast_one() -> None:
    tracker = ScanTracker()
    slow = [(f"10.0.5.{i}", 2323, FAILED) for i in range(30)]
    assert _walk(tracker, "10.0.0.4", slow, gap_ms=60_000) == [4]


def test_scan_state_is_bounded_under_a_million_spoofed_sources() -> None:
    tracker = ScanTracker()
    tracemalloc.start()
    try:
        for i in range(1_000_000):
            tracker.observe(f"{10 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}.1", "10.9.9.9", 80, 6, FAILED, i, None)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert tracker.tracked() <= scans.MAX_SOURCES
    assert peak < 64 * 2**20, peak  # the bound, not the flood, sets the memory


# -- a compromised device ------------------------------------------------------------------------------------

def test_one_weak_indicator_never_decides() -> None:
    tracker = CompromiseTracker()
    # a device calling many clouds by address (no DNS) on one port: one kind of evidence, however strong
    for i in range(50):
        _, decision = tracker.observe("192.168.1.9", f"52.1.2.{i}", 8883, 6, "TLS", i * 60_000, True, True,
                                         False, None)
        assert decision is None
    # a heartbeat every 30 s for an hour: a beacon, alone
    for i in range(120):
        assert tracker.observe("192.168.1.10", "52.9.9.9", 443, 6, "TLS", i * 30_000, True, True, True, None)[1] is None
    assert not tracker.decided


def test_irc_with_a_beacon_decides_and_marks_the_channel() -> None:
    tracker = CompromiseTracker()
    decided = None
    for i in range(12):
        family, decision = tracker.observe(BOT, CNC, 6667, 6, "IRC", i * 9_000, True, True, True, f"c{i}")
        assert family == "c2"
        decided = decided or decision
    assert decided is not None and decided.kinds == ("protocol", "beacon")
    assert decided.reasons[0] == f"IRC to the Internet ({CNC}:6667)"
    # later flows of the host to that service are the activity; its ordinary DNS is not
    assert tracker.observe(BOT, CNC, 6667, 6, "IRC", 200_000, True, True, True, None)[0] == "c2"
    assert tracker.observe(BOT, "8.8.8.8", 53, 17, "DNS", 200_000, True, True, None, None)[0] is None


def test_compromise_state_is_bounded() -> None:
    tracker = CompromiseTracker(max_hosts=100)
    for i in range(5000):
        tracker.observe(f"10.{i >> 8}.{i & 255}.1", "52.1.1.1", 4444, 6, "", i, True, True, False, None)
    assert len(tracker.hosts) <= 100
    assert compromise.MAX_CHANNELS * compromise.MAX_HOSTS <= 2**21  # channels per host times hosts


# -- what the replies pass reads -------------------------------------------------------------------------------

def test_dns_answers_and_questions_are_read() -> None:
    answer = ipv4(GATEWAY, BOT, 17, udp(53, 40000, dns_message("cnc.example.net", (CNC, "93.184.216.35"))))
    assert dns_answers(answer) == [(CNC, "cnc.example.net"), ("93.184.216.35", "cnc.example.net")]
    assert dns_question(answer) == "cnc.example.net"
    query = ipv4(BOT, GATEWAY, 17, udp(40000, 53, dns_message("cnc.example.net")))
    assert dns_answers(query) == [] and dns_question(query) is None
    nxdomain = ipv4(GATEWAY, BOT, 17, udp(53, 40000, dns_message("x.example.net", rcode=3)))
    assert dns_answers(nxdomain) == [] and dns_question(nxdomain) == "x.example.net"
    assert dns_answers(answer[:-3]) == [(CNC, "cnc.example.net")]  # a truncated record is not read, no error


def test_icmp_errors_quote_the_probe() -> None:
    probe = ipv4(BOT, "10.0.0.2", 17, udp(40000, 161, b"\x30\x26"))
    unreachable = ipv4("10.0.0.2", BOT, 1, struct.pack("!BBHI", 3, 3, 0, 0) + probe[:28])
    assert icmp_error(unreachable) == (BOT, "10.0.0.2", 17, 161)
    echo = ipv4(BOT, "10.0.0.2", 1, struct.pack("!BBHHH", 8, 0, 0, 1, 1) + bytes(56))
    assert icmp_error(echo) is None and icmp_error(unreachable[:30]) is None


# -- the stage, end to end ----------------------------------------------------------------------------------------

def _mirai_like_capture(path: Path, targets: int = 40) -> list[str]:
    """A bot that resolves and calls its controller, then propagates as Mirai does: unanswered SYNs (each sent
    5 times) to public addresses on telnet ports, one new address every 2 seconds. Returns the targets."""
    frames: list[tuple[float, bytes]] = []

    def add(t: float, src: str, dst: str, proto: int, payload: bytes) -> None:
        src_mac, dst_mac = (BOT_MAC, GATEWAY_MAC) if src == BOT else (GATEWAY_MAC, BOT_MAC)
        frames.append((t, ether(ipv4(src, dst, proto, payload), src_mac, dst_mac)))

    add(0.0, BOT, GATEWAY, 17, udp(40001, 53, dns_message("cnc.example.net")))
    add(0.02, GATEWAY, BOT, 17, udp(53, 40001, dns_message("cnc.example.net", (CNC,))))
    add(0.1, BOT, CNC, 6, tcp(40002, 443, SYN))
    add(0.2, CNC, BOT, 6, tcp(443, 40002, SYN_ACK))
    add(0.21, BOT, CNC, 6, tcp(40002, 443, ACK))
    add(0.22, BOT, CNC, 6, tcp(40002, 443, PSH_ACK, b"\x16\x03\x01" + bytes(60)))
    add(0.3, CNC, BOT, 6, tcp(443, 40002, PSH_ACK, b"\x16\x03\x03" + bytes(90)))
    rng = random.Random(7)
    hosts = []
    for i in range(targets):
        host = f"{rng.choice((45, 61, 87, 112, 185))}.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
        hosts.append(host)
        start, port = 2.0 + 2.0 * i, rng.choice((23, 23, 2323))
        for retry in (0, 1, 3, 7, 15):
            add(start + retry, BOT, host, 6, tcp(41000 + i, port, SYN))
    write_timed_pcap(path, frames)
    return hosts


def test_a_slow_propagation_scan_is_decided_within_ten_contacts_and_its_flows_marked(tmp_path: Path) -> None:
    capture = tmp_path / "mirai-like.pcap"
    targets = _mirai_like_capture(capture)
    proc = run_iotscan("analyze", capture, "-f", "ndjson", check_code=0)
    records = ndjson(proc.stdout)
    alerts = [r for r in records if r["event_type"] == "alert"]
    scan = [a for a in alerts if a["kind"] == "scan"]
    assert len(scan) == 1 and list(scan[0]) == list(ALERT_FIELD_NAMES)
    alert = scan[0]
    assert (alert["host_ip"], alert["detail"], alert["family"]) == (BOT, "horizontal", "scan")
    assert alert["host_device"] == "02:11:22:33:44:50"
    # decided within the first 10 unanswered first contacts (they start 2 s apart from t = 2 s)
    assert alert["evidence"]["failed_first_contacts"] <= 10
    assert alert["decided_ms"] - 1_700_000_000_000 <= (2 + 2 * 9) * 1000
    flows = [r for r in records if r["event_type"] == "flow"]
    probes = [r for r in flows if r["dst_ip"] in targets]
    assert len(probes) == len(targets) and all(r["verdict"] == "attack" and r["family"] == "scan" for r in probes)
    assert all(r["evidence_community_id"] in alert["evidence_community_ids"] for r in probes
               if r["reasons"][0].startswith("this host's first contacts mostly fail"))
    # the bot's resolved call to its controller is no probe
    [cnc] = [r for r in flows if r["dst_ip"] == CNC]
    assert not (cnc["reasons"] or [""])[0].startswith("this host's first contacts")
    summary = records[-1]
    assert summary["alerts"] == len(alerts) and summary["alert_kinds"]["scan"] == 1
    # --fail-on counts alerts
    assert run_iotscan("analyze", capture, "-f", "ndjson", "--fail-on", "scan").returncode == 1


def test_a_dns_tunnel_is_one_alert_and_its_queries_are_marked() -> None:
    proc = run_iotscan("analyze", SAMPLES / "dns-tunnel-dnscat2.pcap", "-f", "ndjson", check_code=0)
    records = ndjson(proc.stdout)
    [alert] = [r for r in records if r["event_type"] == "alert"]
    assert (alert["kind"], alert["detail"], alert["family"]) == ("compromised", "dns_tunnel", "c2")
    assert alert["evidence"]["distinct_names"] >= 10 and alert["evidence"]["mean_name_characters"] >= 24
    queries = [r for r in records if r["event_type"] == "flow" and r["dst_port"] == 53]
    assert queries and all(r["verdict"] == "attack" and r["family"] == "c2" for r in queries)


def test_benign_samples_raise_no_alert_and_the_table_shows_alerts_first(tmp_path: Path) -> None:
    proc = run_iotscan("analyze", SAMPLES / "hue-bridge-setup.pcap", SAMPLES / "tplink-hs110-setup.pcap",
                       SAMPLES / "edimax-sp2101w-setup.pcap", "-f", "ndjson", check_code=0)
    records = ndjson(proc.stdout)
    assert not [r for r in records if r["event_type"] == "alert"] and records[-1]["alerts"] == 0
    capture = tmp_path / "mirai-like.pcap"
    _mirai_like_capture(capture, targets=12)
    table = run_iotscan("analyze", capture, "-f", "table", env={"COLUMNS": "120"}, check_code=0).stdout.decode()
    # the bot is decided a scanner, and a compromised device (telnet out to addresses no DNS answer named)
    assert table.index("Alerts (2)") < table.index("Attacks by family")
    assert f"{BOT} is scanning (horizontal)" in table and f"{BOT} behaves as a compromised device" in table


def test_the_hosts_stage_can_be_left_out_and_bad_input_stays_one_line(tmp_path: Path) -> None:
    capture = tmp_path / "mirai-like.pcap"
    _mirai_like_capture(capture, targets=12)
    proc = run_iotscan("analyze", capture, "-f", "ndjson", "--no-hosts", check_code=0)
    records = ndjson(proc.stdout)
    assert not [r for r in records if r["event_type"] == "alert"] and "alerts" not in records[-1]
    broken = tmp_path / "broken.pcap"
    broken.write_bytes(capture.read_bytes()[:900])
    proc = run_iotscan("analyze", broken, "-f", "ndjson")
    assert_no_traceback(proc)
    assert proc.returncode == 0 and ndjson(proc.stdout)[-1]["inputs"][0]["status"] == "truncated"


def test_pipeline_evaluation_runs_every_stage_on_a_labeled_source() -> None:
    require_shared("datasets", "sgr")
    proc = run_iotscan("model", "evaluate", DATASETS / "MANIFEST.csv", "--pipeline", "--source", "sgr", "--json",
                       "-q", check_code=0, timeout=600)
    import orjson

    result = orjson.loads(proc.stdout)
    # the ACK ping sweep of a /24 (256 one-segment probes to port 80) is decided by the host stage: the flow
    # model alone catches none of it (training/unseen-baseline.md)
    sweep = next(e for e in result["per_capture"] if e["capture"].endswith("hs-tcp_ackPingSweepRand.pcapng"))
    assert sweep["attack_recall"] > 0.95 and sweep["family_accuracy"] == 1.0


# -- live on lo: the same decisions as analyze ----------------------------------------------------------------------

@pytest.mark.root
@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="live capture on lo needs root")
def test_live_decides_as_analyze_nmap_scans_are_scans_and_a_retry_loop_is_none(tmp_path: Path) -> None:
    """On lo, with real tools: nmap SYN scans of closed ports at -T4 and slowed to one probe every 2 s, from
    127.0.0.5; curl retrying a closed port 30 times from 127.0.0.7 (a client retrying a dead service). Live and
    analyze (of the same packets, recorded by tcpdump) decide the same: the scanner, not the client."""
    for tool in ("nmap", "tcpdump", "curl"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (./install.sh installs it)")
    scanner, client, target = "127.0.0.5", "127.0.0.7", "127.0.0.6"
    bpf = f"host {scanner} or host {client}"
    recording = tmp_path / "lo.pcap"
    tcpdump = subprocess.Popen(["tcpdump", "-i", "lo", "-w", str(recording), "-U", bpf], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    live = subprocess.Popen([sys.executable, "-m", "iotscan", "live", "lo", "--bpf", bpf, "--idle-timeout", "3",
                             "--format", "ndjson", "--duration", "75"], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        time.sleep(12)  # the meters and their side passes start
        subprocess.run(["nmap", "-n", "-Pn", "-sS", "-T4", "-e", "lo", "-S", scanner, "-p", "41001-41008", target],
                       capture_output=True, timeout=60, check=False)
        subprocess.run(["nmap", "-n", "-Pn", "-sS", "-T4", "--scan-delay", "2s", "--max-retries", "0", "-e", "lo",
                        "-S", scanner, "-p", "42001-42008", "127.0.0.8"], capture_output=True, timeout=60,
                       check=False)
        for _ in range(30):  # bounded: 30 attempts at a port nothing listens on
            subprocess.run(["curl", "-s", "-m", "1", "--interface", client, f"http://{target}:41999/"],
                           capture_output=True, timeout=10, check=False)
            time.sleep(0.1)
        time.sleep(4)  # the last flows idle out
        live.send_signal(signal.SIGINT)  # stops as Ctrl-C does: what is active is flushed, then the summary
        out, err = live.communicate(timeout=120)
    finally:
        if live.poll() is None:
            live.kill()
        tcpdump.terminate()
        tcpdump.wait(timeout=10)
    assert live.returncode == 0, err.decode(errors="replace")[-2000:]
    live_records = ndjson(out)
    offline = ndjson(run_iotscan("analyze", recording, "-f", "ndjson", "--idle-timeout", "3", check_code=0).stdout)

    def decisions(records: list[dict]) -> set[tuple[str, str, str]]:
        return {(r["kind"], r["host_ip"], r["detail"]) for r in records if r["event_type"] == "alert"}

    assert decisions(live_records) == decisions(offline) == {("scan", scanner, "vertical")}
    for records in (live_records, offline):
        retries = [r for r in records if r["event_type"] == "flow" and r["src_ip"] == client]
        assert len(retries) >= 25 and all(r["verdict"] == "benign" for r in retries)
        probes = [r for r in records if r["event_type"] == "flow" and r["src_ip"] == scanner]
        assert sum(r["verdict"] == "attack" and r["family"] == "scan" for r in probes) >= 12
