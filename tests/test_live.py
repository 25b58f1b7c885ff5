"""`iotscan live` and `iotscan doctor`, for real: capture on the loopback interface `lo`.

Each capture test runs the real CLI in a subprocess with a BPF filter on ports the test owns
(listeners on ephemeral 127.0.0.1 ports), so traffic from other processes on `lo` does not count,
and to the meter the link is quiet whenever the test sends nothing. All traffic is bounded and
goes to 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import gc
import io
import multiprocessing as mp
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from rich.console import Console

from iotscan.capture.source import MeterConfig
from iotscan.live import LiveLimits, LiveRun, _Sample
from iotscan.output.records import LIVE_SUMMARY_FIELDS, STATS_FIELD_NAMES, iso_timestamp
from iotscan.output.sinks import NdjsonSink
from iotscan.pipeline import Analysis
from iotscan.stage import Event, SourceInfo, Stage
from tests.conftest import REPO, SAMPLES, assert_no_traceback, dns_query_message, ndjson, run_iotscan

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="live capture on lo needs root (CAP_NET_RAW)"),
]

NOBODY = 65534
ETH_IP_UDP = 14 + 20 + 8  # Ethernet (lo has an Ethernet link type), IPv4 and UDP headers
ETH_IP_TCP_MIN, TCP_OPTIONS_MAX = 14 + 20 + 20, 40


# -- helpers -------------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("IOTSCAN_DEBUG", None)
    return env


class LiveProcess:
    """`iotscan live lo ...` in a subprocess; stdout records are collected as they arrive."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "iotscan", "live", "lo", *args], cwd=REPO,
                                     env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.lines: queue.Queue[tuple[float, bytes]] = queue.Queue()
        self.records: list[tuple[float, dict]] = []  # (arrival time, record)
        self.stderr_chunks: list[bytes] = []
        self.readers = [threading.Thread(target=self._read, daemon=True),
                        threading.Thread(target=self._read_stderr, daemon=True)]
        for reader in self.readers:
            reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put((time.monotonic(), line))

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for chunk in self.proc.stderr:
            self.stderr_chunks.append(chunk)

    def poll_records(self, wait: float = 0.0) -> list[dict]:
        """Move newly arrived records in; return all so far."""
        deadline = time.monotonic() + wait
        while True:
            try:  # everything already there, then wait for more until the deadline
                at, line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            self.records.append((at, orjson.loads(line)))
        return [r for _, r in self.records]

    def wait_ready(self, probe_port: int, timeout: float = 40.0) -> None:
        """Send probe datagrams until a stats record shows the meter has seen packets."""
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:  # bounded: at most timeout / 0.2 tiny datagrams
                assert self.proc.poll() is None, self.finish()[1].decode(errors="replace")
                probe.sendto(b"probe", ("127.0.0.1", probe_port))
                records = self.poll_records(wait=0.2)
                if any(r["event_type"] == "stats" and r["packets"] > 0 for r in records):
                    return
            pytest.fail("iotscan live did not start capturing in time")
        finally:
            probe.close()

    def finish(self, timeout: float = 30.0) -> tuple[int, bytes]:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail("iotscan live did not stop in time")
        for reader in self.readers:
            reader.join(timeout=5)
        self.poll_records()
        return self.proc.returncode, b"".join(self.stderr_chunks)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _listeners() -> tuple[socket.socket, socket.socket, socket.socket]:
    """A UDP echo-less server, a TCP listener and a probe sink, on ephemeral ports of 127.0.0.1."""
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(4)
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    return udp, tcp, probe


def _port(sock: socket.socket) -> int:
    return sock.getsockname()[1]


def _bpf(*socks: socket.socket) -> str:
    return " or ".join(f"port {_port(s)}" for s in socks)


def _udp_exchange(server: socket.socket, requests: int, request_size: int, replies: int,
                  reply_size: int) -> int:
    """Client sends `requests` datagrams, server answers `replies`; returns the client's port."""
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("127.0.0.1", 0))
    try:
        for _ in range(requests):
            client.sendto(b"q" * request_size, server.getsockname())
        server.settimeout(5)
        peer = None
        for _ in range(requests):
            _, peer = server.recvfrom(65536)
        for _ in range(replies):
            server.sendto(b"r" * reply_size, peer)
        client.settimeout(5)
        for _ in range(replies):
            client.recvfrom(65536)
        return _port(client)
    finally:
        client.close()


def _tcp_exchange(listener: socket.socket, upload: int, download: int,
                  keep_open: bool = False) -> tuple[int, list[socket.socket]]:
    """Client uploads `upload` bytes, server answers with `download`; returns the client's port."""
    client = socket.create_connection(listener.getsockname(), timeout=5)
    conn, _ = listener.accept()
    conn.settimeout(5)
    client.sendall(b"u" * upload)
    got = 0
    while got < upload:
        got += len(conn.recv(65536))
    conn.sendall(b"d" * download)
    got = 0
    while got < download:
        got += len(client.recv(65536))
    port = _port(client)
    if keep_open:
        return port, [client, conn]
    client.close()
    conn.close()
    return port, []


def _flows(records: list[dict], dst_port: int) -> list[dict]:
    return [r for r in records if r["event_type"] == "flow" and r["dst_port"] == dst_port]


def _check_tcp_bytes(flow: dict, upload: int, download: int) -> None:
    """Wire bytes = payload + per-packet headers (Ethernet, IPv4, TCP with 0-40 bytes of options)."""
    for direction, payload in (("src2dst", upload), ("dst2src", download)):
        packets, wire = flow[f"{direction}_packets"], flow[f"{direction}_bytes"]
        assert packets >= 2, flow
        low, high = payload + packets * ETH_IP_TCP_MIN, payload + packets * (ETH_IP_TCP_MIN + TCP_OPTIONS_MAX)
        assert low <= wire <= high, (direction, wire, low, high, flow)
    assert flow["bytes"] == flow["src2dst_bytes"] + flow["dst2src_bytes"]
    assert flow["packets"] == flow["src2dst_packets"] + flow["dst2src_packets"]


def _check_end(records: list[dict], stop_reason: str, every_flow: bool = True) -> dict:
    """The summary comes last and once, with the stop reason; with ``every_flow`` (not --attacks-only), it
    counts the flow records written."""
    assert records, "no records"
    summary = records[-1]
    assert summary["event_type"] == "summary", records[-3:]
    assert [r for r in records if r["event_type"] == "summary"] == [summary]
    assert summary["stop_reason"] == stop_reason, summary
    assert not every_flow or summary["flows"] == sum(r["event_type"] == "flow" for r in records)
    kinds = [r["event_type"] for r in records if r["event_type"] in ("flow", "device")]
    assert kinds == sorted(kinds, key=lambda k: k == "device"), "device records come after every flow"
    assert summary["devices"] == kinds.count("device")
    assert summary["inputs"] == [{"source": "lo", "packets": summary["packets"], "flows": summary["flows"],
                                  "status": "stopped"}]
    assert summary["errors"] == []
    for name, _ in LIVE_SUMMARY_FIELDS:
        assert name in summary
    return summary


# -- capture -------------------------------------------------------------------------------------


def test_live_flows_have_right_ports_and_bytes_and_summary_last():
    udp, tcp, probe = _listeners()
    udp_port, tcp_port, probe_port = map(_port, (udp, tcp, probe))
    live = LiveProcess("--duration", "12", "--format", "ndjson", "--stats-interval", "1",
                       "--idle-timeout", "60", "--bpf", _bpf(udp, tcp, probe))
    try:
        live.wait_ready(probe_port)
        udp_client = _udp_exchange(udp, requests=5, request_size=100, replies=2, reply_size=50)
        tcp_client, _ = _tcp_exchange(tcp, upload=3000, download=1000)
        code, err = live.finish()
    finally:
        live.kill()
        for s in (udp, tcp, probe):
            s.close()
    assert code == 0, err.decode(errors="replace")
    assert b"Traceback" not in err
    records = [r for _, r in live.records]
    summary = _check_end(records, "duration")

    (udp_flow,) = _flows(records, udp_port)
    assert (udp_flow["src_ip"], udp_flow["dst_ip"], udp_flow["protocol"]) == ("127.0.0.1", "127.0.0.1", 17)
    assert udp_flow["src_port"] == udp_client
    assert (udp_flow["src2dst_packets"], udp_flow["src2dst_bytes"]) == (5, 5 * (ETH_IP_UDP + 100))
    assert (udp_flow["dst2src_packets"], udp_flow["dst2src_bytes"]) == (2, 2 * (ETH_IP_UDP + 50))
    assert udp_flow["source"] == "lo" and udp_flow["community_id"].startswith("1:")

    (tcp_flow,) = _flows(records, tcp_port)
    assert tcp_flow["protocol"] == 6 and tcp_flow["src_port"] == tcp_client
    _check_tcp_bytes(tcp_flow, 3000, 1000)

    stats = [r for r in records if r["event_type"] == "stats"]
    assert len(stats) >= 5
    for r in stats:
        assert tuple(r) == STATS_FIELD_NAMES
        assert r["source"] == "lo"
        assert r["timestamp"] == iso_timestamp(r["timestamp_ms"])
    assert [r["packets"] for r in stats] == sorted(r["packets"] for r in stats)
    assert stats[-1]["packets"] <= summary["packets"]
    assert summary["packets"] >= 5 + 2 + 6  # UDP, TCP (handshake, data, close) and probes
    assert summary["dropped_packets"] == 0


def _packet_sockets() -> int:
    with open("/proc/net/packet") as f:
        return len(f.readlines()) - 1  # a header line, then one per packet socket of this namespace


def _live_with_request_pass(duration: str, probe: socket.socket, *socks: socket.socket,
                            extra: tuple[str, ...] = ()) -> LiveProcess:
    """iotscan live on the ports of these sockets, once its main capture and its request pass's both run."""
    sockets_before = _packet_sockets()
    live = LiveProcess("--duration", duration, "--format", "ndjson", "--stats-interval", "1", "--bpf",
                       _bpf(*socks, probe), *extra)
    try:
        live.wait_ready(_port(probe))
        deadline = time.monotonic() + 20
        while _packet_sockets() < sockets_before + 2:  # the main capture and the request pass's
            assert time.monotonic() < deadline, "the request pass did not start capturing"
            time.sleep(0.1)
    except BaseException:
        live.kill()
        raise
    return live


def test_live_reads_requests_exploit_and_dns_tunnel_are_attacks():
    """The request pass on a live interface: a second capture, whose matches reach the flows' records."""
    udp, tcp, probe = _listeners()
    dns_client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dns_client.bind(("127.0.0.1", 0))
    tcp_port, dns_port = map(_port, (tcp, dns_client))
    live = _live_with_request_pass("10", probe, tcp, dns_client)
    try:
        client = socket.create_connection(tcp.getsockname(), timeout=5)
        conn, _ = tcp.accept()
        client.sendall(b"GET /cgi-bin/../../../../etc/passwd HTTP/1.1\r\nHost: cam\r\n\r\n")
        conn.settimeout(5)
        conn.recv(4096)
        conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        client.recv(4096)
        http_client = _port(client)
        client.close()
        conn.close()
        # then an ordinary request between the same two hosts: the exploit's match marks it too
        client = socket.create_connection(tcp.getsockname(), timeout=5)
        conn, _ = tcp.accept()
        client.sendall(b"GET /index.html HTTP/1.1\r\nHost: cam\r\n\r\n")
        conn.recv(4096)
        client.close()
        conn.close()
        # a dnscat2-like tunnel to 127.0.0.1:53 (nobody listens: the queries are on the wire all the same)
        for i in range(4):
            name = f"{i:02x}{'0123456789abcdef' * 2}.t.example.org"  # a 34-hex-digit label
            dns_client.sendto(dns_query_message(name, 16), ("127.0.0.1", 53))
        code, err = live.finish()
    finally:
        live.kill()
        for s in (udp, tcp, probe, dns_client):
            s.close()
    assert code == 0, err.decode(errors="replace")
    records = [r for _, r in live.records]
    _check_end(records, "duration")
    http_flow, later_flow = sorted(_flows(records, tcp_port), key=lambda r: r["first_seen_ms"])
    assert http_flow["src_port"] == http_client
    assert (http_flow["verdict"], http_flow["family"], http_flow["score"]) == ("attack", "exploit", 1.0)
    assert http_flow["reasons"][0] == "HTTP request matched an exploit signature: path traversal"
    assert (later_flow["verdict"], later_flow["family"], later_flow["score"]) == ("attack", "exploit", 1.0)
    assert later_flow["reasons"][0] == \
        "a flow between the same two hosts matched a signature within minutes: path traversal"
    (dns_flow,) = _flows(records, 53)
    assert dns_flow["src_port"] == dns_port and dns_flow["src2dst_packets"] == 4
    assert (dns_flow["verdict"], dns_flow["family"], dns_flow["score"]) == ("attack", "c2", 1.0)
    assert dns_flow["reasons"][0] == "DNS queries matched a tunnel signature: DNS tunnel (encoded names)"


def test_live_reads_risks_an_mqtt_login_in_clear_fails_a_risk_gate():
    """The risk stage on a live interface: the request pass's second capture reads an MQTT CONNECT's credentials
    (its flow leaves that pass at once), and they reach the flow's record; `--fail-on risk:high` exits 1."""
    udp, broker, probe = _listeners()
    broker_port = _port(broker)
    live = _live_with_request_pass("8", probe, broker, extra=("--fail-on", "risk:high"))
    try:
        client = socket.create_connection(broker.getsockname(), timeout=5)
        conn, _ = broker.accept()
        body = b"\x00\x04MQTT\x04\xc2\x00\x3c" + b"\x00\x06sensor" + b"\x00\x04user" + b"\x00\x06secret"
        client.sendall(b"\x10" + bytes([len(body)]) + body)  # CONNECT: user name and password flags
        conn.settimeout(5)
        conn.recv(4096)
        conn.sendall(b"\x20\x02\x00\x00")  # CONNACK: accepted
        client.recv(16)
        mqtt_client = _port(client)
        client.close()
        conn.close()
        code, err = live.finish()
    finally:
        live.kill()
        for s in (udp, broker, probe):
            s.close()
    assert code == 1, err.decode(errors="replace")  # findings at or above --fail-on
    records = [r for _, r in live.records]
    summary = _check_end(records, "duration")
    (flow,) = _flows(records, broker_port)
    assert flow["src_port"] == mqtt_client
    assert flow["risks"][0] == {"risk": "cleartext_credentials", "severity": "high", "detector": "iotscan",
                                "evidence": "MQTT CONNECT (level 4) carrying a user name and a password without TLS"}
    assert summary["risks"]["cleartext_credentials"] == 1


def test_live_reads_bot_commands_and_refused_logins():
    """The request pass's other kinds on a live interface: an IoT bot registering on IRC, a Mirai and a
    BASHLITE bot checking in with their controller, and a broker refusing five logins from one client
    (counted across its connections before any counts). With --attacks-only, only attacks are written: a
    flow of two other hosts is metered, not written."""
    udp, irc, probe = _listeners()
    cnc = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # another host's: the IRC bot's match marks no flow to it
    cnc.bind(("127.0.0.4", 0))
    cnc.listen(4)
    broker = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    broker.bind(("127.0.0.1", 0))
    broker.listen(8)
    quiet = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # a service of another loopback address
    quiet.bind(("127.0.0.3", 0))
    irc_port, broker_port, cnc_port, probe_port = _port(irc), _port(broker), _port(cnc), _port(probe)
    live = _live_with_request_pass("8", probe, irc, broker, quiet, cnc, extra=("--attacks-only",))
    try:
        bot = socket.create_connection(irc.getsockname(), timeout=5)
        conn, _ = irc.accept()
        bot.sendall(b"NICK X86|b9d80f\r\nUSER b9d80f 0 * :x86\r\n")
        conn.settimeout(5)
        conn.recv(4096)
        bot.close()
        conn.close()
        bots = []
        for first, then in ((b"\x00\x00\x00\x01", b"\x06b9d80f"), (b"BUILD MIPS\n", b"PONG\n")):
            bot = socket.create_connection(cnc.getsockname(), timeout=5)
            conn, _ = cnc.accept()
            conn.settimeout(5)
            bot.sendall(first)  # its own segment, as the bots' own send() calls make it
            conn.recv(64)
            bot.sendall(then)
            conn.recv(64)
            bots.append(_port(bot))
            bot.close()
            conn.close()
        for _ in range(5):  # MQTT CONNECT guesses, each refused (CONNACK, return code 5: not authorized)
            client = socket.create_connection(broker.getsockname(), timeout=5)
            conn, _ = broker.accept()
            client.sendall(b"\x10\x10\x00\x04MQTT\x04\xc2\x00\x3c\x00\x00\x00\x00\x00\x00")
            conn.settimeout(5)
            conn.recv(4096)
            conn.sendall(b"\x20\x02\x00\x05")
            client.recv(16)
            client.close()
            conn.close()
        # and an exchange of two other loopback addresses, which the bot's signature does not mark
        other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        other.bind(("127.0.0.2", 0))
        other.sendto(b"status?", quiet.getsockname())
        quiet.settimeout(5)
        _, asker = quiet.recvfrom(64)
        quiet.sendto(b"ok", asker)
        other.close()
        code, err = live.finish()
    finally:
        live.kill()
        for s in (udp, irc, probe, broker, quiet, cnc):
            s.close()
    assert code == 0, err.decode(errors="replace")
    records = [r for _, r in live.records]
    _check_end(records, "duration", every_flow=False)
    (irc_flow,) = _flows(records, irc_port)
    assert (irc_flow["verdict"], irc_flow["family"], irc_flow["score"]) == ("attack", "c2", 1.0)
    assert irc_flow["reasons"][0] == "a bot's command to its controller: IRC bot nick naming its CPU"
    mirai_port, bashlite_port = bots
    checkins = {r["src_port"]: r for r in _flows(records, cnc_port)}
    assert set(checkins) == {mirai_port, bashlite_port}
    assert all((r["verdict"], r["family"], r["score"]) == ("attack", "c2", 1.0) for r in checkins.values())
    assert checkins[mirai_port]["reasons"][0] == "a bot's check-in with its controller: Mirai bot check-in"
    assert checkins[bashlite_port]["reasons"][0] == \
        "a bot's command to its controller: BASHLITE (Gafgyt) bot check-in naming its CPU"
    guesses = _flows(records, broker_port)
    assert len(guesses) == 5
    for flow in guesses:
        assert (flow["verdict"], flow["family"], flow["score"]) == ("attack", "bruteforce", 1.0)
        assert flow["reasons"][0] == "MQTT login refused, 5 or more between the same two hosts within 10 minutes"
    written = [r for r in records if r["event_type"] == "flow"]
    assert all(r["verdict"] == "attack" for r in written)
    assert "127.0.0.2" not in {r["src_ip"] for r in written}
    # the bot's and the guesses' matches are of 127.0.0.1 with itself, no pair of hosts: they mark the flows of
    # their services' ports, not the probes' (another service of the host)
    assert not any(r["dst_port"] == probe_port and r["reasons"][0].startswith("a flow between the same two hosts")
                   for r in written)
    summary = records[-1]
    assert summary["attacks"] == len(written) and summary["flows"] >= len(written) + 1
    assert summary["attack_families"]["bruteforce"] == 5


def test_live_slow_request_heads_are_a_slowloris():
    """A slow-headers DoS on a live interface: eleven connections to one server each send a request head a
    line at a time, 2 s apart, and never the blank line that ends it (the server never answers)."""
    udp, tcp, probe = _listeners()
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(16)  # the kernel completes the handshakes; nobody reads
    port = _port(server)
    clients: list[socket.socket] = []
    live = _live_with_request_pass("16", probe, server)
    try:
        for _ in range(11):
            clients.append(socket.create_connection(server.getsockname(), timeout=5))
            clients[-1].sendall(b"GET / HTTP/1.1\r\nHost: cam\r\n")
        for k in range(3):
            time.sleep(2)
            for client in clients:
                client.sendall(b"X-a: %d\r\n" % k)
        code, err = live.finish()
    finally:
        live.kill()
        for s in (udp, tcp, probe, server, *clients):
            s.close()
    assert code == 0, err.decode(errors="replace")
    records = [r for _, r in live.records]
    _check_end(records, "duration")
    slow = _flows(records, port)
    assert len(slow) == 11
    for flow in slow:
        assert (flow["verdict"], flow["family"], flow["score"]) == ("attack", "dos", 1.0)
        assert flow["reasons"][0] == "HTTP request head held open 5 s or more (slowloris), " \
                                     "11 or more between the same two hosts within 2 minutes"


def test_sigint_flushes_active_flows():
    """With idle and active time-outs far away, the flows can only come out through the flush."""
    udp, tcp, probe = _listeners()
    udp_port, tcp_port, probe_port = map(_port, (udp, tcp, probe))
    live = LiveProcess("--format", "ndjson", "--stats-interval", "1", "--idle-timeout", "600",
                       "--active-timeout", "3600", "--bpf", _bpf(udp, tcp, probe))
    held: list[socket.socket] = []
    try:
        live.wait_ready(probe_port)
        udp_client = _udp_exchange(udp, requests=3, request_size=200, replies=1, reply_size=20)
        tcp_client, held = _tcp_exchange(tcp, upload=1500, download=500, keep_open=True)
        time.sleep(0.5)
        assert not _flows(live.poll_records(wait=0.5), tcp_port), "flow came out before the stop"
        live.proc.send_signal(signal.SIGINT)
        code, err = live.finish()
    finally:
        live.kill()
        for s in (udp, tcp, probe, *held):
            s.close()
    assert code == 0, err.decode(errors="replace")
    assert b"Traceback" not in err
    records = [r for _, r in live.records]
    _check_end(records, "signal")
    (udp_flow,) = _flows(records, udp_port)
    assert udp_flow["src_port"] == udp_client
    assert (udp_flow["src2dst_packets"], udp_flow["src2dst_bytes"]) == (3, 3 * (ETH_IP_UDP + 200))
    (tcp_flow,) = _flows(records, tcp_port)
    assert tcp_flow["src_port"] == tcp_client
    _check_tcp_bytes(tcp_flow, 1500, 500)


def test_idle_flow_expires_on_a_quiet_link_then_sigterm_stops_cleanly():
    idle = 2
    udp, _tcp, probe = _listeners()
    udp_port, probe_port = _port(udp), _port(probe)
    live = LiveProcess("--format", "ndjson", "--stats-interval", "1", "--idle-timeout", str(idle),
                       "--bpf", _bpf(udp, probe))
    try:
        live.wait_ready(probe_port)
        client = _udp_exchange(udp, requests=4, request_size=64, replies=0, reply_size=0)
        sent = time.monotonic()
        flow = None
        while flow is None and time.monotonic() < sent + idle + 15:  # nothing else reaches the meter now
            live.poll_records(wait=0.2)
            flow = next(((at, r) for at, r in live.records
                         if r["event_type"] == "flow" and r["dst_port"] == udp_port), None)
        assert flow is not None, "the idle flow never expired on the quiet link"
        assert live.proc.poll() is None, "the flow must come out while capturing, not at the end"
        delay = flow[0] - sent
        # Idle time-out, plus up to one libpcap block (0.25 s), one batch (0.2 s) and a loaded machine.
        assert idle - 0.5 <= delay <= idle + 4, delay
        assert flow[1]["src_port"] == client and flow[1]["src2dst_bytes"] == 4 * (ETH_IP_UDP + 64)
        live.proc.send_signal(signal.SIGTERM)
        code, err = live.finish()
    finally:
        live.kill()
        for s in (udp, _tcp, probe):
            s.close()
    assert code == 0, err.decode(errors="replace")
    records = [r for _, r in live.records]
    _check_end(records, "signal")
    assert len(_flows(records, udp_port)) == 1


def test_count_stops_and_output_is_appended(tmp_path: Path):
    udp, _tcp, probe = _listeners()
    udp_port = _port(udp)
    out = tmp_path / "live.ndjson"
    out.write_bytes(b'{"event_type":"earlier run"}\n')
    proc = subprocess.Popen([sys.executable, "-m", "iotscan", "live", "lo", "--count", "2",
                             "--idle-timeout", "1", "--duration", "40", "-o", str(out), "--quiet",
                             "--bpf", _bpf(udp)],
                            cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        started = time.monotonic()
        for _ in range(120):  # one new flow every 0.25 s until the count stops the run (bounded)
            if proc.poll() is not None:
                break
            _udp_exchange(udp, requests=1, request_size=10, replies=0, reply_size=0)
            time.sleep(0.25)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        for s in (udp, _tcp, probe):
            s.close()
    assert proc.returncode == 0, stderr.decode(errors="replace")
    assert time.monotonic() - started < 35, "--count did not stop the run"
    assert stdout == b""
    records = ndjson(out.read_bytes())
    assert records[0] == {"event_type": "earlier run"}
    summary = _check_end(records[1:], "count")
    assert summary["flows"] >= 2
    assert all(r["dst_port"] == udp_port for r in records if r["event_type"] == "flow")


# -- errors --------------------------------------------------------------------------------------


def test_unknown_interface_lists_the_interfaces():
    proc = run_iotscan("live", "nosuchif0", "--duration", "1", timeout=60)
    assert proc.returncode == 3
    assert_no_traceback(proc)
    assert proc.stdout == b""
    lines = proc.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("iotscan: error: nosuchif0: no such interface; interfaces here: ")
    assert "lo" in lines[0].split("interfaces here: ", 1)[1].replace(",", " ").split()


def _running_packet_sockets(ns: str) -> int:
    sockets = subprocess.run(["ip", "netns", "exec", ns, "cat", "/proc/net/packet"], capture_output=True,
                             text=True, check=True).stdout.splitlines()[1:]
    return sum(len(f) >= 6 and f[5] == "1" for f in (line.split() for line in sockets))


def _capturing_in(ns: str) -> bool:
    return _running_packet_sockets(ns) > 0


@pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2 (ip) to make a namespace")
def test_interface_that_disappears_ends_with_capture_error():
    """A veth pair inside a namespace the test creates; one end is deleted while iotscan captures it."""
    ns = f"iotscan-test-gone-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        for cmd in (["ip", "link", "add", "va", "type", "veth", "peer", "name", "vb"],
                    ["ip", "link", "set", "va", "up"], ["ip", "link", "set", "vb", "up"]):
            subprocess.run(["ip", "netns", "exec", ns, *cmd], check=True)
        proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "iotscan", "live", "va",
                                 "--format", "ndjson"], cwd=REPO, env=_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 30
            while not _capturing_in(ns):  # a packet socket bound and running in the namespace
                assert proc.poll() is None and time.monotonic() < deadline, "iotscan live did not start"
                time.sleep(0.1)
            subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "del", "va"], check=True)
            rest, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=30)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    assert proc.returncode == 3, err
    assert err.decode().splitlines() == [
        "iotscan: error: va: the capture ended by itself (the interface went down or disappeared)"]
    summary = ndjson(rest)[-1]
    assert summary["event_type"] == "summary" and summary["stop_reason"] == "error"
    assert summary["inputs"][0]["status"] == "error"


def _udp_payloads(capture: Path, src_ip: str, ports: tuple[int, ...]) -> list[tuple[int, int, bytes]]:
    """(source port, destination port, payload) of the UDP datagrams ``src_ip`` sent from ``ports`` in a
    little-endian Ethernet pcap (the sample's layout)."""
    data = capture.read_bytes()
    assert data[:4] == b"\xd4\xc3\xb2\xa1" and int.from_bytes(data[20:24], "little") == 1
    out, pos, src = [], 24, socket.inet_aton(src_ip)
    while pos + 16 <= len(data):
        caplen = int.from_bytes(data[pos + 8:pos + 12], "little")
        frame = data[pos + 16:pos + 16 + caplen]
        pos += 16 + caplen
        if frame[12:14] != b"\x08\x00" or frame[23] != 17 or frame[26:30] != src:
            continue
        udp = frame[14 + (frame[14] & 0x0F) * 4:]
        sport, dport, length = (int.from_bytes(udp[i:i + 2], "big") for i in (0, 2, 4))
        if sport in ports:
            out.append((sport, dport, udp[8:length]))
    return out


@pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2 (ip) to make namespaces")
def test_live_identity_pass_reads_ssdp_and_mdns(tmp_path: Path):
    """Device identity on a live interface: a Hue bridge's own SSDP and mDNS datagrams (from the sample
    capture) sent over a veth pair between two namespaces the test creates; the device record of the
    sender's MAC carries what only the identity pass reads."""
    bridge = "10.10.10.6"  # the Hue bridge in samples/hue-bridge-setup.pcap
    payloads = _udp_payloads(REPO / "samples" / "hue-bridge-setup.pcap", bridge, (1900, 5353))
    assert len(payloads) >= 20
    (tmp_path / "payloads.json").write_text(orjson.dumps([[s, d, p.hex()] for s, d, p in payloads]).decode())
    sender = tmp_path / "send.py"
    sender.write_text(
        "import json, socket, sys\n"
        "socks = {}\n"
        "for sport, dport, hexed in json.load(open(sys.argv[1])):\n"
        "    if sport not in socks:\n"
        "        socks[sport] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "        socks[sport].bind(('10.77.0.2', sport))\n"
        "    socks[sport].sendto(bytes.fromhex(hexed), ('10.77.0.1', dport))\n")
    ns_capture, ns_device = f"iotscan-test-cap-{os.getpid()}", f"iotscan-test-dev-{os.getpid()}"
    for ns in (ns_capture, ns_device):
        subprocess.run(["ip", "netns", "add", ns], check=True)
    proc = None
    try:
        subprocess.run(["ip", "link", "add", "va", "netns", ns_capture, "type", "veth", "peer", "name", "vb",
                        "netns", ns_device], check=True)
        for ns, dev, addr in ((ns_capture, "va", "10.77.0.1/24"), (ns_device, "vb", "10.77.0.2/24")):
            for cmd in (["ip", "addr", "add", addr, "dev", dev], ["ip", "link", "set", dev, "up"]):
                subprocess.run(["ip", "netns", "exec", ns, *cmd], check=True)
        device_mac = orjson.loads(subprocess.run(["ip", "-j", "-n", ns_device, "link", "show", "vb"], check=True,
                                                 capture_output=True).stdout)[0]["address"]
        proc = subprocess.Popen(["ip", "netns", "exec", ns_capture, sys.executable, "-m", "iotscan", "live", "va",
                                 "--no-score", "--format", "ndjson"], cwd=REPO, env=_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 40
        while _running_packet_sockets(ns_capture) < 2:  # the main capture and the identity pass's
            assert proc.poll() is None and time.monotonic() < deadline, "iotscan live did not start both captures"
            time.sleep(0.1)
        subprocess.run(["ip", "netns", "exec", ns_device, sys.executable, str(sender), str(tmp_path / "payloads.json")],
                       check=True, timeout=30)
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
        for ns in (ns_capture, ns_device):
            subprocess.run(["ip", "netns", "del", ns], check=False)
    assert proc.returncode == 0, err.decode(errors="replace")
    records = ndjson(out)
    (device,) = [r for r in records if r["event_type"] == "device" and r["mac"] == device_mac]
    signals = {(e["signal"], e["value"]) for e in device["evidence"]}
    assert ("ssdp_server", "Linux/3.14.0 UPnP/1.0 IpBridge/1.9.0") in signals
    assert ("mdns_txt", "md=BSB002") in signals
    assert (device["vendor"], device["device_type"]) == ("Philips", "hub")
    assert records[-1]["event_type"] == "summary" and not records[-1].get("warnings")


def test_invalid_bpf_is_a_usage_error():
    proc = run_iotscan("live", "lo", "--bpf", "port ((", "--duration", "5", timeout=60)
    assert proc.returncode == 2
    assert_no_traceback(proc)
    assert b"invalid BPF filter" in proc.stderr
    assert ndjson(proc.stdout)[-1]["event_type"] == "summary"


def test_a_capture_buffer_too_large_for_the_engine_is_a_usage_error():
    """NFStream's engine takes the ring's size in bytes as a C int: 2,047 MiB at most."""
    proc = run_iotscan("live", "lo", "--capture-buffer", "2048", "--duration", "1", timeout=60)
    assert proc.returncode == 2
    assert_no_traceback(proc)
    assert b"--capture-buffer" in proc.stderr


def _as_nobody() -> None:
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


def _without_capture_capabilities() -> None:
    """Root without CAP_NET_RAW and CAP_NET_ADMIN, as in a container that was not granted them."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pr_capbset_drop, cap_net_admin, cap_net_raw = 24, 12, 13
    for cap in (cap_net_admin, cap_net_raw):
        if libc.prctl(pr_capbset_drop, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def _run_unprivileged(*args: str) -> subprocess.CompletedProcess[bytes]:
    interpreter = os.path.realpath(sys.executable)
    try:
        if os.getxattr(interpreter, "security.capability"):
            pytest.skip(f"{interpreter} has file capabilities: an unprivileged user can capture")
    except OSError:
        pass
    env = _env()
    env["HOME"] = "/tmp"
    drop = _as_nobody
    try:
        smoke = subprocess.run([sys.executable, "-c", "import iotscan.cli"], cwd="/tmp", env=env,
                               preexec_fn=_as_nobody, capture_output=True, timeout=60)
        usable = smoke.returncode == 0
    except PermissionError:
        usable = False
    if not usable:  # nobody cannot reach the interpreter or the checkout (e.g. under /root): stay root
        drop = _without_capture_capabilities
    return subprocess.run([sys.executable, "-m", "iotscan", *args], cwd="/tmp", env=env,
                          preexec_fn=drop, capture_output=True, timeout=60)


def test_no_privilege_says_what_to_run():
    proc = _run_unprivileged("live", "lo", "--duration", "1")
    assert proc.returncode == 3, proc.stderr
    assert_no_traceback(proc)
    lines = proc.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("iotscan: error: lo: no permission to capture packets.")
    assert "sudo" in lines[0]
    real = os.readlink("/proc/self/exe")  # pytest runs on the same interpreter
    assert f"setcap cap_net_raw,cap_net_admin=eip {real}" in lines[0]


# -- doctor --------------------------------------------------------------------------------------


def _doctor_lines(stdout: bytes) -> dict[str, str]:
    """{check name: "ok" | "warn" | "FAIL"} from doctor's one-line-per-check output."""
    checks = {}
    for line in stdout.decode().splitlines():
        if line.startswith("[") and "]" in line:
            mark, rest = line[1:].split("]", 1)
            words = rest.split()
            name = " ".join(words[:2]) if words[0] == "model" else words[0]  # "model NAME" or one word
            checks[name] = mark.strip()
    return checks


def test_doctor_reports_each_check_and_a_consistent_exit_code():
    proc = run_iotscan("doctor", timeout=120)
    assert_no_traceback(proc)
    checks = _doctor_lines(proc.stdout)
    text = proc.stdout.decode()
    assert checks["libpcap"] == "ok" and "libpcap version" in text
    assert checks["privileges"] == "ok"  # root
    assert checks["interfaces"] in ("ok", "warn") and "lo" in text
    assert "tshark" in checks
    models = {name: mark for name, mark in checks.items() if name.startswith("model ")}
    assert {"model devices", "model flows"} <= set(models), text
    for name, mark in models.items():
        bundled = Path(REPO, "models", name.split()[1] + ".joblib").is_file()
        assert (mark == "ok") == bundled, (name, mark, text)  # a bundled model matches its card here
    if "not bundled" in text:
        assert proc.returncode == 4
    failed = [name for name, mark in checks.items() if mark == "FAIL"]
    assert (proc.returncode == 0) == (not failed), (proc.returncode, failed)
    assert ("All good." in text) == (proc.returncode == 0)


def test_doctor_without_privileges_says_what_to_run():
    proc = _run_unprivileged("doctor")
    assert_no_traceback(proc)
    checks = _doctor_lines(proc.stdout)
    assert checks["privileges"] == "FAIL"
    assert proc.returncode >= 3
    assert b"fix: Run iotscan as root (sudo)" in proc.stdout
    assert b"setcap cap_net_raw,cap_net_admin=eip" in proc.stdout


def test_live_view_shows_why_for_the_latest_attacks() -> None:
    """The view's latest attacks (here, scored flows of a sample capture) carry family, score and first reason;
    the attacks so far are counted by family."""
    records = ndjson(run_iotscan("analyze", SAMPLES / "web-sqli.pcap", "-f", "ndjson", "--no-devices",
                                 check_code=0).stdout)
    attacks = [r for r in records if r.get("verdict") == "attack"]
    assert attacks
    run = LiveRun(NdjsonSink(io.BytesIO()), [], MeterConfig(source="lo"), LiveLimits())
    run._last_view = _Sample(time.monotonic(), 0, 0, 0)
    run.monitor.latest_attacks.extend(attacks)
    run.analysis.state.attack_families.update(r["family"] for r in attacks)
    out = io.StringIO()
    Console(file=out, width=200).print(run._render())
    text = out.getvalue()
    assert "Latest attacks" in text and " why " in text
    assert f"attacks by family: exploit {len(attacks)}" in text
    for r in attacks[-3:]:
        assert r["reasons"][0] in text and f"{r['score']:.2f}" in text


class _FailingStage(Stage):
    """A stage with a bug: it fails at its first event (a flow, or a quiet link's heartbeat)."""

    def run(self, events: Iterator[Event]) -> Iterator[Event]:
        for _ in events:
            raise RuntimeError("a stage's bug")
        yield from ()


def test_a_failing_stage_ends_the_meter() -> None:
    """When a stage fails, the source's iteration is abandoned unclosed (the traceback holds it): the meter
    must still end, or it captures on and the exit waits for it (a hang after the one-line error), and the
    cyclic collector must be on again."""
    analysis = Analysis(NdjsonSink(io.BytesIO()), stages=[_FailingStage()])
    config = MeterConfig(source="lo", live=True)
    try:
        analysis.run_interface(SourceInfo(name="lo", config=config))
    except RuntimeError as exc:
        failure = exc  # its traceback keeps the abandoned iteration alive, as on the CLI's way to its exit
    else:
        pytest.fail("the stage's error was lost")
    assert str(failure) == "a stage's bug"
    assert [p.name for p in mp.active_children()] == []
    assert gc.isenabled()  # the event loop pauses the collector: a failure gives it back


@contextlib.contextmanager
def _udp_capture(*args: str) -> Iterator[tuple[LiveProcess, socket.socket, socket.socket]]:
    """`iotscan live` on lo (NDJSON, flows kept 600 s, no devices, ``args``) watching a UDP listener, ready: yields
    it, the listener and a client socket; killed and closed at the end."""
    udp, tcp, probe = _listeners()
    live = LiveProcess("--format", "ndjson", "--stats-interval", "1", "--idle-timeout", "600", "--no-devices", *args,
                       "--bpf", _bpf(udp, probe))
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        live.wait_ready(_port(probe))
        yield live, udp, client
    finally:
        live.kill()
        for s in (udp, tcp, probe, client):
            s.close()


def _stopped_flow(live: LiveProcess, code: int, err: bytes, udp_port: int) -> tuple[dict, dict]:
    """The summary of a capture stopped by Ctrl-C, and the one flow record of the UDP listener's port."""
    assert code == 0, err.decode(errors="replace")
    records = [r for _, r in live.records]
    summary = _check_end(records, "signal")
    (flow,) = _flows(records, udp_port)
    return summary, flow


def _burst_while_the_meters_wait(buffer_mib: int, datagrams: int, stop_first: bool = False) -> tuple[dict, dict]:
    """``datagrams`` UDP datagrams sent on lo while every meter of `iotscan live --capture-buffer buffer_mib` is
    stopped (SIGSTOP), as a busy meter would be: they can only wait in the kernel's ring buffer. Then the meters go
    on and the capture is stopped (with ``stop_first``, it is stopped, Ctrl-C, before the meters go on). Returns the
    summary and the burst's flow record."""
    import psutil

    with _udp_capture("--capture-buffer", str(buffer_mib)) as (live, udp, client):
        udp_port = _port(udp)
        meters = psutil.Process(live.proc.pid).children(recursive=True)
        assert meters, "no meter process"
        for meter in meters:
            meter.suspend()
        try:
            for _ in range(datagrams):  # bounded, to 127.0.0.1 only
                client.sendto(b"burst...", udp.getsockname())
            if stop_first:
                live.proc.send_signal(signal.SIGINT)
                time.sleep(0.5)
        finally:
            for meter in meters:
                meter.resume()
        if not stop_first:
            time.sleep(1.0)
            live.proc.send_signal(signal.SIGINT)
        code, err = live.finish()
    return _stopped_flow(live, code, err, udp_port)


def test_capture_buffer_holds_a_burst_while_the_meter_is_busy():
    """A burst of 40,000 packets while the meters cannot read: the default 64 MiB ring holds it all, and the flow
    record counts every packet; libpcap's default 2 MiB ring (--capture-buffer 2) drops most of it, and says so."""
    n = 40_000
    summary, burst = _burst_while_the_meters_wait(64, n)
    assert summary["dropped_packets"] == 0
    assert burst["src2dst_packets"] == n
    summary, burst = _burst_while_the_meters_wait(2, n)
    lost = n - burst["src2dst_packets"]
    assert lost > n // 2
    # on lo the kernel queues each packet twice, as sent and as received (libpcap skips the first): both count
    assert lost <= summary["dropped_packets"] <= 2 * lost + 1


def test_a_stop_meters_what_the_kernel_still_holds():
    """Ctrl-C while 40,000 packets wait in the kernel's buffer: they arrived before the stop, so they are metered
    before the capture ends (within 2 s; what is left then would be counted in `unread_packets`)."""
    n = 40_000
    summary, burst = _burst_while_the_meters_wait(64, n, stop_first=True)
    assert burst["src2dst_packets"] == n
    assert summary["dropped_packets"] == summary["unread_packets"] == 0
    assert summary["stop_reason"] == "signal"


def test_packets_just_before_a_stop_are_metered():
    """Ten datagrams, then Ctrl-C at once: libpcap hands packets over by blocks, retired when full or after 250 ms,
    so these are still in the block open at the stop. The meter waits for that block instead of ending on the first
    empty read (which lost all ten)."""
    with _udp_capture() as (live, udp, client):
        udp_port = _port(udp)
        time.sleep(1.0)  # the probes' block is retired: the next packets open a new one
        for _ in range(10):  # bounded, to 127.0.0.1 only
            client.sendto(b"last", udp.getsockname())
        live.proc.send_signal(signal.SIGINT)
        code, err = live.finish()
    _, flow = _stopped_flow(live, code, err, udp_port)
    assert flow["src2dst_packets"] == 10
