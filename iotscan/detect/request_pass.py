"""The request pass: the few packets whose bytes name an attack -- HTTP requests, DNS queries, scanners'
probes, bots' commands, refused logins -- matched against signatures, beside the main pass.

A web exploit (path traversal, command, SQL or script injection, a log4j lookup, a probe for secret
files) is in the request, not in the flow's sizes and timing: to flow statistics and context it is
one ordinary short HTTP exchange. A DNS tunnel is in its query names and types: nDPI hands over only
a flow's first name, and a tunnel's first query can look ordinary. A scanner's probe is in one
packet's header: a TCP segment with none of SYN, ACK and RST (NULL, FIN, XMAS), which no connection
sends; the raw SYN of nmap and masscan (window 1024, no DF: Suricata's ET SCAN NMAP -sS rule); nmap's
host-discovery ping without data (Snort's ICMP PING NMAP rule). An IoT bot on IRC names its CPU in
its nick, so that its herder knows which binary to push, and a BASHLITE (Gafgyt) bot in its first line
("BUILD MIPS"); a Mirai bot checks in with the same 4 bytes every time (00 00 00 01, then its id).
Password guessing shows in the server's refusals: an MQTT broker's CONNACK refusing the credentials, a
telnet server's "Login incorrect"; fail2ban's defaults decide how many make an attack (5 between the
same two hosts within 10 minutes).
SSH hides its refusals, so there the count is of connections, with the threshold of Suricata's ET
SCAN Potential SSH Scan rule (5 within 2 minutes), between the same two hosts. A shell script or a
Windows executable sent raw over TCP is a loader's, a reverse shell's or a stager's (nDPI flags the
first as a possible exploit). A slow-headers DoS (slowloris) holds many requests open by sending their
head a line at a time, seconds apart, and never the blank line that ends it: the pass follows the
short segments ending a line that come after an unfinished request head (HEAD_LINE_FILTER), and a head
still unfinished HEAD_HELD_MS after it began, with HEAD_HELD_SEGMENTS segments sent, is held open.

nDPI does not hand these bytes over through NFStream, and a plugin on the main pass would run for
every packet (+57% time), so a second pass over the same file (see iotscan.capture.side_pass.SidePass) reads
only the packets REQUEST_FILTER lets through: a BPF filter drops every other packet in C. Over IPv6
the filter finds the TCP header behind the fixed header only, so packets with IPv6 extension headers
are not read. Signatures are data (iotscan/data/request_signatures.json).

The parsers read untrusted bytes: every packet is parsed inside a catch-all, and what is kept per
flow is one small integer.
"""

from __future__ import annotations

import bisect
import json
import re
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus

from nfstream.plugin import NFPlugin

from iotscan.capture.packets import TcpSegment, echo_request_data, read_dns_name, tcp_segment, udp_payload
from iotscan.capture.side_pass import SidePass, side_pass
from iotscan.capture.source import MeterConfig
from iotscan.detect.request_risks import (
    MAX_RISK_READS,
    MQTT_CONNECT,
    RiskFinding,
    RiskFindings,
    http_request_risks,
    local_resolver,
    mqtt_connect_credentials,
    mqtt_connect_filter,
)

METHODS = (b"GET ", b"POST", b"PUT ", b"HEAD", b"DELE", b"OPTI", b"PATC")
# A bot's first lines to its controller: an IRC client's registration (NICK, USER), a BASHLITE (Gafgyt) bot's
# "BUILD <its CPU>" (its source: sockprintf(mainCommSock, "BUILD %s", getBuild()))
BOT_LINE_STARTS = (b"NICK", b"USER", b"BUIL")
# A Mirai bot's check-in, its first segment to its controller (its source: send(fd_serv, "\x00\x00\x00\x01",
# 4, MSG_NOSIGNAL), then its id's length and its id)
BOT_CHECKIN = b"\x00\x00\x00\x01"
SSH_IDENTIFICATION = b"SSH-"  # the line each side of an SSH connection starts with: one per connection
# A segment that starts a file: a script ("#!") or a Windows executable ("MZ"), sent raw over a connection by a
# loader, a reverse shell or an exploit kit's stager (or as an HTTP download's body, when the headers went alone)
FILE_STARTS = (b"#!", b"MZ")
TELNET_PORTS = (23, 2323)  # Mirai's
# The first 4 TCP payload bytes, after the TCP options. libpcap's tcp[] indexes IPv4 only, so over
# IPv6 the offset is counted from the fixed header: a packet with extension headers is not read.
_PAYLOAD_START = "tcp[((tcp[12:1] & 0xf0) >> 2):4]"
_PAYLOAD_START6 = "ip6[(40 + ((ip6[52:1] & 0xf0) >> 2)):4]"


def _payload_starts(start: str) -> str:
    """A request's, a bot's first line's or an SSH identification's first four bytes, a file's first two,
    an MQTT CONNACK (type 2, length 2) refusing a login (return code 4, bad user name or password, or 5,
    not authorized), or the start of an MQTT CONNECT (for the risk stage: request_risks)."""
    prefixes = " or ".join(f"{start} = 0x{m.hex()}" for m in (*METHODS, *BOT_LINE_STARTS, SSH_IDENTIFICATION))
    files = " or ".join(f"{start} & 0xffff0000 = 0x{m.hex()}0000" for m in FILE_STARTS)
    return f"({prefixes} or {files} or {start} & 0xffff00fe = 0x20020004 or {mqtt_connect_filter(start)})"


# TCP payload lengths. BPF ends the whole filter with "no" at a load past the packet's end, so a test that
# reads the payload comes after its length test: else a shorter segment would be dropped whatever followed.
_TCP4_DATA = "(ip[2:2] - ((ip[0] & 0xf) << 2) - ((tcp[12] & 0xf0) >> 2))"
_TCP6_DATA = "(ip6[4:2] - ((ip6[52] & 0xf0) >> 2))"
PAYLOAD_FILTER = f"(ip and tcp and {_TCP4_DATA} >= 4 and {_payload_starts(_PAYLOAD_START)}) or " \
                 f"(ip6 and ip6[6] = 6 and {_TCP6_DATA} >= 4 and {_payload_starts(_PAYLOAD_START6)})"
# A segment of BOT_CHECKIN's 4 bytes and no more
CHECKIN_FILTER = f"(ip and tcp and {_TCP4_DATA} = 4 and {_PAYLOAD_START} = 0x{BOT_CHECKIN.hex()}) or " \
                 f"(ip6 and ip6[6] = 6 and {_TCP6_DATA} = 4 and {_PAYLOAD_START6} = 0x{BOT_CHECKIN.hex()})"
# TCP segments with none of SYN, ACK and RST (0x16): only the first segment of a connection lacks ACK,
# and it carries SYN (or, answering a stray segment, RST)
PROBE_FILTER = "(ip and tcp and tcp[13] & 0x16 = 0) or (ip6 and ip6[6] = 6 and ip6[53] & 0x16 = 0)"
# SYNs (without ACK) of window 1024 and, over IPv4, without DF: what nmap's and masscan's raw probes send
SYN_FILTER = "(ip and tcp and tcp[13] & 0x12 = 2 and tcp[14:2] = 1024 and ip[6] & 0x40 = 0) or " \
             "(ip6 and ip6[6] = 6 and ip6[53] & 0x12 = 2 and ip6[54:2] = 1024)"
# echo requests without data (ordinary pings carry some: 56 bytes from Linux, 32 from Windows)
ECHO_FILTER = "(icmp and icmp[0] = 8 and ip[2:2] = ((ip[0] & 0xf) << 2) + 8) or " \
              "(ip6 and ip6[6] = 58 and ip6[40] = 128 and ip6[4:2] = 8)"
# what a telnet server sends (segments with data)
_TELNET_SOURCE = " or ".join(f"tcp src port {port}" for port in TELNET_PORTS)
TELNET_FILTER = f"(ip and ({_TELNET_SOURCE}) and {_TCP4_DATA} > 0) or (ip6 and ({_TELNET_SOURCE}) and {_TCP6_DATA} > 0)"
# Short segments that end a line (CRLF): a request head's next lines, when its first segment did not end it.
# A slow-headers DoS sends one line at a time; other short lines (SMTP, FTP, IRC commands, chunk sizes) match
# no signature.
MAX_HEAD_LINE_BYTES = 256
HEAD_LINE_FILTER = f"(ip and tcp and {_TCP4_DATA} > 0 and {_TCP4_DATA} <= {MAX_HEAD_LINE_BYTES} and " \
                   f"ip[ip[2:2] - 2:2] = 0x0d0a) or " \
                   f"(ip6 and ip6[6] = 6 and {_TCP6_DATA} > 0 and {_TCP6_DATA} <= {MAX_HEAD_LINE_BYTES} and " \
                   f"ip6[38 + ip6[4:2]:2] = 0x0d0a)"
# The payload tests last: a load past a packet's end ends the whole filter (see _TCP4_DATA), which once kept
# the probes behind the HTTP expression from ever matching; a test compares the whole filter with its parts
REQUEST_FILTER = f"({PROBE_FILTER}) or ({SYN_FILTER}) or ({ECHO_FILTER}) or ({TELNET_FILTER}) or " \
                 f"(udp dst port 53) or ({PAYLOAD_FILTER}) or ({HEAD_LINE_FILTER}) or ({CHECKIN_FILTER})"

MAX_REQUESTS_PER_FLOW = 32  # keep-alive connections and reused DNS sockets carry several; the first ones tell
# A request head still unfinished this long after its first segment, with this many segments of it sent, is
# held open (HAProxy's anti-DoS example: "timeout http-request 5s  # A complete request may never take that
# long"); the signature then asks for several such requests between two hosts (ModSecurity's slowloris rule:
# 11 connections of one address reading headers)
HEAD_HELD_MS = 5_000
HEAD_HELD_SEGMENTS = 3
HEAD_END = b"\r\n\r\n"
MAX_HEAD_BYTES = 4096  # of one request segment
MAX_FINDINGS = 100_000  # flows with a match kept per source; beyond, the oldest endpoints are forgotten
# A match also marks the two hosts' other flows (an exploit's callbacks and downloads, a scanner's other
# probes), as Suricata's xbits tracked by ip_pair do: the flows active between this long before the match ...
PAIR_BEFORE_MATCH_MS = 60_000
# ... and this long after it. The first is shorter than the default idle timeout (120 s): on an interface a
# flow expires, and is scored, at least that long after its last packet, so a match this soon after is known.
# Both define the pair_signature feature: a change needs a new FEATURE_SCHEMA_VERSION and model.
PAIR_AFTER_MATCH_MS = 120_000
# An exploit request often names the host the victim is to call next: the loader it downloads from, the LDAP
# server of a log4j lookup. The flows between the request's server and each IPv4 literal in the request
# (at most this many) are marked as the pair's are.
MAX_NAMED_HOSTS = 4
# A matching flow as the pass saw it (src_ip, src_port, dst_ip, dst_port, protocol; src sent its first packet
# the filter let through), and a mark of a pair of hosts: (match time ms, signature code, the matching flow)
Flow5 = tuple[str, int, str, int, int]
Mark = tuple[int, int, Flow5]
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\w.])")


# What each kind of signature reads ("where" in the signatures file), and what a person reads first
# about a flow that matched one of that kind
_REASONS = {
    "target": "HTTP request matched {kind} signature: {name}",  # the request target
    "head": "HTTP request matched {kind} signature: {name}",  # the request line and headers
    "body": "HTTP request matched {kind} signature: {name}",  # what follows the headers in the request's segment
    "dns": "DNS queries matched a tunnel signature: {name}",  # a query: "example.com a"
    "tcp-flags": "TCP flags no connection uses: {name}",  # a segment's flags without SYN, ACK and RST: "fpu"
    "syn": "a scanning tool's probe: {name}",  # a SYN's header (see SYN_FILTER): "window 1024 df 0"
    "echo": "a scanning tool's probe: {name}",  # an echo request (see ECHO_FILTER): "echo-request data 0"
    "line": "a bot's command to its controller: {name}",  # a segment starting with BOT_LINE_STARTS
    "checkin": "a bot's check-in with its controller: {name}",  # a BOT_CHECKIN segment, as hex: "00000001"
    "ssh": "{name}",  # an SSH identification line: "ssh-2.0-openssh_9.6"
    "file": "{name}",  # a segment starting with "#!" or "mz" (FILE_STARTS), lower-cased
    "reply": "{name}",  # a server's segment: an MQTT CONNACK ("mqtt connack 5"), a telnet server's text
    "held": "{name}",  # a request head held open (see HEAD_HELD_MS): "request head held open"
}
# What each family's tools are called in the reasons of HTTP signatures
_TOOL = {"scan": "a scanner", "bruteforce": "a password guesser"}


@dataclass(frozen=True)
class RequestSignature:
    name: str
    family: str
    where: str  # what it reads: see _REASONS
    needs: tuple[str, ...]  # the pattern is tried only when the text holds one of these (none: always)
    pattern: re.Pattern[str]  # lower case, searched in lower-cased text
    min_count: int = 1  # packets of one flow that must match: one odd DNS name is no tunnel
    # matching flows between the same two hosts that must come within pair_window_ms: one refused login
    # is a typo, five within minutes are guesses
    min_pair_count: int = 1
    pair_window_ms: int = 0

    @property
    def marks_pair(self) -> bool:
        """Whether a match marks the two hosts' other flows: not a DNS one, whose hosts are a client and
        its resolver, which carries every name the client looks up."""
        return self.where != "dns"

    @property
    def reason(self) -> str:
        """What a person reads first about a flow that matched."""
        reason = _REASONS[self.where].format(kind=_TOOL.get(self.family, "an exploit"), name=self.name)
        if self.min_pair_count > 1:
            reason += f", {self.min_pair_count} or more between the same two hosts within " \
                      f"{self.pair_window_ms // 60_000} minutes"
        return reason

    @property
    def pair_reason(self) -> str:
        """What a person reads first about another flow of two hosts one of whose flows matched."""
        return f"a flow between the same two hosts matched a signature within minutes: {self.name}"

    @property
    def names_hosts(self) -> bool:
        """Whether the hosts a matching request names are marked: an exploit's, whose victim calls them."""
        return self.family == "exploit" and self.where in ("target", "head", "body")

    @property
    def named_reason(self) -> str:
        """What a person reads first about a flow between an exploited host and a host the exploit named."""
        return f"the other host was named in an exploit request this host received within minutes: {self.name}"


def _signatures_path() -> Path:
    try:
        return Path(str(resources.files("iotscan.data"))) / "request_signatures.json"
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[1] / "data" / "request_signatures.json"


def _load() -> list[RequestSignature]:
    data = json.loads(_signatures_path().read_text())
    signatures = [RequestSignature(s["name"], s["family"], s["where"], tuple(s["needs"]), re.compile(s["pattern"]),
                                   s.get("min_count", 1), s.get("min_pair_count", 1), s.get("pair_window_s", 0) * 1000)
                  for s in data["signatures"]]
    unknown = {s.where for s in signatures} - _REASONS.keys()
    if unknown:
        raise ValueError(f"request signatures: unknown 'where' {sorted(unknown)}")
    return signatures


# Loaded at import, so the meter process (a fork) has them compiled; a broken file is a broken install.
SIGNATURES: list[RequestSignature] = _load()
# (code, signature) of HTTP requests, the target ones first: the head is decoded only when they all miss
_HTTP = sorted(((c, s) for c, s in enumerate(SIGNATURES, start=1) if s.where in ("target", "head", "body")),
               key=lambda cs: cs[1].where != "target")


def _of_kind(where: str) -> list[tuple[int, RequestSignature]]:
    return [(c, s) for c, s in enumerate(SIGNATURES, start=1) if s.where == where]


_DNS, _FLAGS, _SYN, _ECHO, _LINE, _CHECKIN, _SSH, _FILE, _REPLY, _HELD = (
    _of_kind(w) for w in ("dns", "tcp-flags", "syn", "echo", "line", "checkin", "ssh", "file", "reply", "held"))
HEAD_HELD_TEXT = "request head held open"
# TCP flag bits by the letter tcp-flags signatures read them as ("fpu": FIN, PSH and URG)
FLAG_LETTERS = ((0x01, "f"), (0x02, "s"), (0x04, "r"), (0x08, "p"), (0x10, "a"), (0x20, "u"), (0x40, "e"),
                (0x80, "c"))
# DNS query types by number, for the text DNS signatures read; others read as "type<number>"
QTYPES = {1: "a", 2: "ns", 5: "cname", 6: "soa", 10: "null", 12: "ptr", 13: "hinfo", 15: "mx", 16: "txt",
          28: "aaaa", 33: "srv", 35: "naptr", 64: "svcb", 65: "https", 255: "any"}


def signature(code: int) -> RequestSignature | None:
    """The signature a flow's request code stands for (0: none)."""
    return SIGNATURES[code - 1] if 0 < code <= len(SIGNATURES) else None


def _matches(sig: RequestSignature, text: str) -> bool:
    return (not sig.needs or any(n in text for n in sig.needs)) and sig.pattern.search(text) is not None


def _decoded(text: str) -> str:
    """The text in lower case, with its percent-decoding once and twice beside it when it has any."""
    text = text.lower()
    if "%" not in text and "+" not in text:
        return text
    once = unquote_plus(text).lower()
    return f"{text}\n{once}\n{unquote_plus(once).lower()}"


def match_request(payload: bytes) -> int:
    """The code (position + 1) of the first signature an HTTP request segment matches, or 0: target
    signatures first, then the others in their order. "head" reads the whole segment, "body" what
    follows the headers in it (a small form's body rides in the segment of its headers)."""
    head = payload[:MAX_HEAD_BYTES].decode("latin-1")
    line_end = head.find("\r\n")
    parts = (head if line_end < 0 else head[:line_end]).split(" ", 2)
    if len(parts) < 2:
        return 0
    texts = {"target": _decoded(parts[1])}
    for code, sig in _HTTP:
        text = texts.get(sig.where)
        if text is None:
            if sig.where == "body":
                end = head.find("\r\n\r\n")
                text = _decoded(head[end + 4:]) if end >= 0 else ""
            else:
                text = _decoded(head)
            texts[sig.where] = text
        if text and _matches(sig, text):
            return code
    return 0


def dns_query(ip_packet: bytes) -> str | None:
    """The text DNS signatures read of a DNS query in an IPv4 or IPv6 UDP packet: the lower-cased
    name, a space and the type ("example.com a"); None for anything else (answers included)."""
    datagram = udp_payload(ip_packet)
    if datagram is None:
        return None
    dns = datagram[2]
    if len(dns) < 17 or dns[2] & 0xF8 or not (dns[4] or dns[5]):  # an answer, not a standard query, or no question
        return None
    try:
        name, end = read_dns_name(dns, 12)
    except ValueError:  # malformed, or a pointer loop
        return None
    if end + 2 > len(dns):  # truncated before the type
        return None
    qtype = int.from_bytes(dns[end:end + 2], "big")
    return f"{name.lower()} {QTYPES.get(qtype, f'type{qtype}')}"


def _first_match(signatures: list[tuple[int, RequestSignature]], text: str) -> int:
    for code, sig in signatures:
        if _matches(sig, text):
            return code
    return 0


def match_query(text: str) -> int:
    """The code of the first DNS signature a query's text (see dns_query) matches, or 0."""
    return _first_match(_DNS, text)


def flag_text(flags: int) -> str:
    """The text tcp-flags signatures read: the letters of the flags set, in FLAG_LETTERS order."""
    return "".join(letter for bit, letter in FLAG_LETTERS if flags & bit)


def named_hosts(payload: bytes) -> tuple[str, ...]:
    """The IPv4 literals an HTTP request segment names (decoded as its signatures read it), first ones
    first, at most MAX_NAMED_HOSTS."""
    found = dict.fromkeys(_IPV4.findall(_decoded(payload[:MAX_HEAD_BYTES].decode("latin-1"))))
    return tuple(found)[:MAX_NAMED_HOSTS]


def reply_text(payload: bytes) -> str:
    """The text reply signatures read of a server's segment: "mqtt connack <return code>" for an MQTT
    CONNACK, else the lower-cased text (a telnet server's)."""
    if payload[:2] == b"\x20\x02" and len(payload) >= 4:
        return f"mqtt connack {payload[3]}"
    return payload[:MAX_HEAD_BYTES].decode("latin-1").lower()


def match_packet(ip_packet: bytes) -> int:
    """The code of the signature one packet of the pass matches (an HTTP request segment, a DNS
    query, a probe's header, a bot's command, a server's reply), or 0."""
    return read_packet(ip_packet, tcp_segment(ip_packet)) or 0


def read_packet(ip_packet: bytes, segment: TcpSegment | None) -> int | None:
    """match_packet's code, given the packet's TCP segment parsed already (None: no TCP); None for a segment
    that none of its signatures reads: a short line that HEAD_LINE_FILTER let through for a request head,
    outside one."""
    if segment is not None:
        start = segment.payload[:4]
        if start in METHODS:
            return match_request(segment.payload)
        if start in BOT_LINE_STARTS:
            return _first_match(_LINE, segment.payload[:MAX_HEAD_BYTES].decode("latin-1").lower())
        if segment.payload == BOT_CHECKIN:
            return _first_match(_CHECKIN, segment.payload.hex())
        if start == SSH_IDENTIFICATION:
            return _first_match(_SSH, segment.payload[:255].split(b"\r\n", 1)[0].decode("latin-1").lower())
        if start[:2] in FILE_STARTS:
            return _first_match(_FILE, segment.payload[:MAX_HEAD_BYTES].decode("latin-1").lower())
        if not segment.flags & 0x16:  # none of SYN, ACK and RST
            return _first_match(_FLAGS, flag_text(segment.flags))
        if segment.flags & 0x12 == 0x02:  # a SYN
            return _first_match(_SYN, f"window {segment.window} df {int(segment.dont_fragment)}")
        if segment.src_port in TELNET_PORTS or segment.payload[:2] == b"\x20\x02":  # a server's, by its filter
            return _first_match(_REPLY, reply_text(segment.payload))
        return None
    data = echo_request_data(ip_packet)
    if data is not None:
        return _first_match(_ECHO, f"echo-request data {data}")
    text = dns_query(ip_packet)
    return match_query(text) if text is not None else 0


class RequestPlugin(NFPlugin):
    """``flow.udps.request_signature``: the code of the first signature that the flow's requests
    matched, as many times as it asks (``min_count``) among the first MAX_REQUESTS_PER_FLOW; and
    ``flow.udps.named_hosts``: the hosts the matching request names, for an exploit's signature.

    With ``expire_on_match`` (a live interface) a flow leaves the meter at its match, so the finding
    is known long before the main pass's copy of the flow expires and is scored.
    Never raises: a packet that fails to parse matches nothing.
    """

    def __init__(self, expire_on_match: bool = False) -> None:
        super().__init__()
        self.expire_on_match = expire_on_match

    def on_init(self, packet: Any, flow: Any) -> None:
        flow.udps.request_signature = 0
        flow.udps.requests_read = 0
        flow.udps.signature_hits = {}
        flow.udps.named_hosts = ()
        flow.udps.head = None  # an unfinished request head: (its sender's direction, start ms, segments)
        # when the first packet read came: the match's time (a head line outside a head, not read, may come first)
        flow.udps.first_read_ms = 0
        flow.udps.risks = ()  # request_risks.RiskFinding of the risk stage's
        flow.udps.risk_reads = 0
        self.on_update(packet, flow)

    def on_update(self, packet: Any, flow: Any) -> None:
        try:
            udps = flow.udps
            segment = tcp_segment(packet.ip_packet)
            if segment is not None and udps.risk_reads < MAX_RISK_READS and segment.payload:
                self._read_risks(segment.payload, packet, flow)
            if udps.request_signature or udps.requests_read >= MAX_REQUESTS_PER_FLOW:
                return
            code = self._follow_head(segment, packet, udps)
            if code is None:
                code = read_packet(packet.ip_packet, segment)
                if code is None:  # a short line of no request head: not one of the requests read
                    return
            if not udps.requests_read:
                udps.first_read_ms = packet.time
            udps.requests_read += 1
            if code:
                hits = udps.signature_hits[code] = udps.signature_hits.get(code, 0) + 1
                sig = SIGNATURES[code - 1]
                if hits >= sig.min_count:
                    udps.request_signature = code
                    if sig.names_hosts:
                        udps.named_hosts = named_hosts(tcp_segment(packet.ip_packet).payload)
                    if self.expire_on_match:
                        flow.expiration_id = -1  # NFStream's custom expiration
        except Exception:  # untrusted bytes: a malformed packet must not end the pass
            return

    def _read_risks(self, payload: bytes, packet: Any, flow: Any) -> None:
        """The risk findings of a request segment or an MQTT CONNECT (request_risks), into ``flow.udps.risks``."""
        if payload[:4] in METHODS:
            found = http_request_risks(payload, to=flow.src_ip if packet.direction else flow.dst_ip)
        elif payload[0] == MQTT_CONNECT:
            evidence = mqtt_connect_credentials(payload)
            found = [("cleartext_credentials", evidence)] if evidence else []
        else:
            return
        udps = flow.udps
        udps.risk_reads += 1
        new = tuple((risk, evidence, packet.src_ip, flow.dst_port if packet.direction else flow.src_port)
                    for risk, evidence in found if not any(r[0] == risk for r in udps.risks))
        if new:
            udps.risks += new
            if self.expire_on_match:
                flow.expiration_id = -1

    @staticmethod
    def _follow_head(segment: TcpSegment | None, packet: Any, udps: Any) -> int | None:
        """Follow a request head across segments: a request segment that does not end its head starts one
        (None: the request is matched as any other packet); a later segment of its sender continues it, or
        ends it with the blank line. The code of the held-open signature once the head is held open, else
        0 for a continuation; None for the packets read_packet reads."""
        if segment is None or not segment.payload:
            return None
        if segment.payload[:4] in METHODS:
            udps.head = None if HEAD_END in segment.payload else (packet.direction, packet.time, 1)
            return None
        head = udps.head
        if head is None or packet.direction != head[0]:
            return None
        if HEAD_END in segment.payload or segment.payload.startswith(b"\r\n"):
            udps.head = None
            return 0
        direction, started, segments = head
        udps.head = (direction, started, segments + 1)
        if segments + 1 >= HEAD_HELD_SEGMENTS and packet.time - started >= HEAD_HELD_MS:
            udps.head = None
            return _first_match(_HELD, HEAD_HELD_TEXT)
        return 0


@dataclass
class RequestFindings:
    """The flows of a source whose requests matched a signature, by (client, server) endpoints, and the
    times of the matches that mark a pair of hosts (RequestSignature.marks_pair), by pair (_pair_keys: a
    host's traffic with itself by the match's ports instead).

    A signature that asks for several matching flows between two hosts (min_pair_count) holds its
    matches back until enough have come within its window; then they count, and so does every later
    one within the window of the last. An exploit's match also marks, by_named, the pairs of its
    server (the exploited host) and each host its request names.

    Filled by the pass's thread while the main one reads it on a live interface: each operation is
    one dict or list call, atomic under the GIL. At most MAX_FINDINGS matches are kept in each table
    (the oldest endpoints or pairs go first), so a capture that never ends stays bounded. The tables are
    OrderedDicts, whose oldest key is found at once: a plain dict finds its first key past every key
    deleted before it, which made a flood of matching flows quadratic (300,000 spoofed scanner SYNs:
    40 s, most of it here).
    """

    by_endpoints: OrderedDict[tuple[str, int, str, int], list[tuple[int, int]]] = field(default_factory=OrderedDict)
    # (time, code, the matching flow's Flow5) of each mark, sorted by time
    by_pair: OrderedDict[tuple[str, str], list[Mark]] = field(default_factory=OrderedDict)
    by_named: OrderedDict[tuple[str, str], list[Mark]] = field(default_factory=OrderedDict)
    # matches held back, by (pair, code): (first_ms, flow), and until when a pair's matches count at once
    held: OrderedDict[tuple[tuple[str, str], int], deque[tuple[int, Flow5]]] = field(default_factory=OrderedDict)
    counting_until: OrderedDict[tuple[tuple[str, str], int], int] = field(default_factory=OrderedDict)
    risks: RiskFindings = field(default_factory=RiskFindings)  # for the risk stage (request_risks)
    matched: int = 0
    kept: int = 0
    pair_kept: int = 0
    named_kept: int = 0
    held_kept: int = 0
    forgotten: int = 0  # matches let go for newer ones

    def add(self, src_ip: str, src_port: int, dst_ip: str, dst_port: int, first_ms: int, code: int,
            named: tuple[str, ...] = (), protocol: int = 6) -> None:
        self.matched += 1
        sig = signature(code)
        flow = (src_ip, src_port, dst_ip, dst_port, protocol)
        for host in named:  # the request went from src to dst: dst is the exploited host
            if host not in (src_ip, dst_ip):
                _mark(self.by_named, _pair(dst_ip, host), (first_ms, code, flow))
                self.named_kept = _bounded(self.by_named, self.named_kept + 1)
        counted = self._counted(sig, code, flow, first_ms) if sig and sig.min_pair_count > 1 else [(first_ms, flow)]
        for seen_ms, seen in counted:
            self._keep(seen, seen_ms, code, sig)

    def _counted(self, sig: RequestSignature, code: int, flow: Flow5, first_ms: int) -> list[tuple[int, Flow5]]:
        """The matches of a signature asking for several flows between two hosts that count now: this one
        when it comes within the window of the last that counted, all those held back when it makes
        enough, else none (it is held back, unless its connection already is)."""
        key = (_pair(flow[0], flow[2]), code)
        if first_ms <= self.counting_until.get(key, -1):
            self.counting_until[key] = max(self.counting_until[key], first_ms + sig.pair_window_ms)
            return [(first_ms, flow)]
        held = self.held.setdefault(key, deque())
        if any(seen == flow for _, seen in held):
            return []  # the same connection again (on an interface a flow leaves the pass at each match): one
        held.append((first_ms, flow))
        self.held_kept += 1
        while held and held[0][0] < first_ms - sig.pair_window_ms:
            held.popleft()
            self.held_kept -= 1
        if len(held) < sig.min_pair_count:
            self.held_kept = _bounded(self.held, self.held_kept)
            return []
        del self.held[key]
        self.held_kept -= len(held)
        self.counting_until[key] = first_ms + sig.pair_window_ms
        while len(self.counting_until) > MAX_FINDINGS:
            del self.counting_until[next(iter(self.counting_until))]
        return list(held)

    def _keep(self, flow: Flow5, first_ms: int, code: int, sig: RequestSignature | None) -> None:
        self.kept += 1
        self.by_endpoints.setdefault(flow[:4], []).append((first_ms, code))
        while self.kept > MAX_FINDINGS:
            oldest = self.by_endpoints.pop(next(iter(self.by_endpoints)))
            self.kept -= len(oldest)
            self.forgotten += len(oldest)
        if sig is not None and sig.marks_pair:
            for key in _pair_keys(*flow[:4]):
                _mark(self.by_pair, key, (first_ms, code, flow))
                self.pair_kept = _bounded(self.by_pair, self.pair_kept + 1)

    def collect(self, matches: Iterable[tuple[Any, ...]]) -> RequestFindings:
        """Add the pass's matches, risk findings and DNS queries between local hosts (see _match) as they come;
        this object at the end."""
        for match in matches:
            src_ip, src_port, dst_ip, dst_port, first_ms, code, named, protocol, risks, first_seen_ms = match
            if code:
                self.add(src_ip, src_port, dst_ip, dst_port, first_ms, code, named, protocol)
            if risks:
                self.risks.add(src_ip, src_port, dst_ip, dst_port, first_seen_ms, risks)
            elif not code:  # a query between local hosts: the destination is one of the network's resolvers
                self.risks.census.add(src_ip, dst_ip)
        return self

    def code(self, src_ip: str, src_port: int, dst_ip: str, dst_port: int, first_ms: int, last_ms: int) -> int:
        """The signature code of a main-pass flow: a match of the same endpoints (either direction)
        whose first request falls within the flow's lifetime; 0 if none."""
        for key in ((src_ip, src_port, dst_ip, dst_port), (dst_ip, dst_port, src_ip, src_port)):
            for seen_ms, code in self.by_endpoints.get(key, ()):
                if first_ms <= seen_ms <= last_ms:
                    return code
        return 0

    def pair_code(self, src_ip: str, src_port: int, dst_ip: str, dst_port: int, first_ms: int, last_ms: int) -> int:
        """The code of the earliest match marking the flow's two hosts (see _pair_keys) while the flow was active,
        or up to PAIR_BEFORE_MATCH_MS after its end or PAIR_AFTER_MATCH_MS before its start (any protocol);
        0 if none."""
        mark = self._pair_mark(src_ip, src_port, dst_ip, dst_port, first_ms, last_ms)
        return mark[1] if mark is not None else 0

    def _pair_mark(self, src_ip: str, src_port: int, dst_ip: str, dst_port: int, first_ms: int,
                   last_ms: int) -> Mark | None:
        marks = [_earliest_mark(self.by_pair.get(key), first_ms, last_ms)
                 for key in _pair_keys(src_ip, src_port, dst_ip, dst_port)]
        return min((m for m in marks if m is not None), default=None)

    def named_code(self, src_ip: str, dst_ip: str, first_ms: int, last_ms: int) -> int:
        """The same as pair_code, for a flow between an exploited host and a host its exploit named."""
        return _earliest(self.by_named.get(_pair(src_ip, dst_ip)), first_ms, last_ms)

    def marking_flow(self, src_ip: str, src_port: int, dst_ip: str, dst_port: int, first_ms: int, last_ms: int,
                     named: bool) -> Flow5 | None:
        """The flow whose match gave a flow its pair_code (or, ``named``, its named_code): the one a person
        looks at next. None if there is no such mark."""
        mark = _earliest_mark(self.by_named.get(_pair(src_ip, dst_ip)), first_ms, last_ms) if named \
            else self._pair_mark(src_ip, src_port, dst_ip, dst_port, first_ms, last_ms)
        return mark[2] if mark is not None else None

    def codes(self, src_ip: str, src_port: int, dst_ip: str, dst_port: int, first_ms: int, last_ms: int,
              own: bool) -> tuple[int, int, int]:
        """code (if ``own``: the flow's protocol is one the pass matches), pair_code and named_code at once:
        this runs for every flow scored."""
        pair = (src_ip, dst_ip) if src_ip <= dst_ip else (dst_ip, src_ip)
        pair_code = _earliest(self.by_pair.get(pair), first_ms, last_ms) if src_ip != dst_ip \
            else self.pair_code(src_ip, src_port, dst_ip, dst_port, first_ms, last_ms)  # loopback: see _pair_keys
        return (self.code(src_ip, src_port, dst_ip, dst_port, first_ms, last_ms) if own else 0, pair_code,
                _earliest(self.by_named.get(pair), first_ms, last_ms))


def _pair(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a <= b else (b, a)


def _pair_keys(src_ip: str, src_port: int, dst_ip: str, dst_port: int) -> tuple[tuple[str, str], ...]:
    """The keys of RequestFindings.by_pair a flow is marked by: its two hosts; but a host's traffic with itself
    (loopback) is no pair of hosts, and a match there marks the flows that share one of its ports on that host
    (its service's), not every flow of the host with itself."""
    if src_ip != dst_ip:
        return (_pair(src_ip, dst_ip),)
    return ((src_ip, f"port {src_port}"), (src_ip, f"port {dst_port}"))


def _mark(table: OrderedDict[tuple[str, str], list[Mark]], key: tuple[str, str], mark: Mark) -> None:
    """Adds a mark to a table of marks under one key (a pair of hosts, or a host's port: see _pair_keys)."""
    bisect.insort(table.setdefault(key, []), mark)  # matches come roughly, not exactly, in time order


def _bounded(table: OrderedDict[Any, Any], kept: int) -> int:
    """Drops a table's oldest keys until it holds at most MAX_FINDINGS entries (``kept``: how many it holds,
    over all keys); returns how many it holds then."""
    while kept > MAX_FINDINGS:
        kept -= len(table.pop(next(iter(table))))
    return kept


def _earliest_mark(marks: list[Mark] | None, first_ms: int, last_ms: int) -> Mark | None:
    """The earliest of a pair's marks from PAIR_AFTER_MATCH_MS before first_ms to PAIR_BEFORE_MATCH_MS after
    last_ms; None if none."""
    if not marks:
        return None
    i = bisect.bisect_left(marks, (first_ms - PAIR_AFTER_MATCH_MS,))
    return marks[i] if i < len(marks) and marks[i][0] <= last_ms + PAIR_BEFORE_MATCH_MS else None


def _earliest(marks: list[Mark] | None, first_ms: int, last_ms: int) -> int:
    """The code of _earliest_mark; 0 if none."""
    mark = _earliest_mark(marks, first_ms, last_ms)
    return mark[1] if mark is not None else 0


def _match(flow: Any) -> tuple[str, int, str, int, int, int, tuple[str, ...], int, tuple[RiskFinding, ...], int] \
        | None:
    """What leaves the pass's meter of a flow: its endpoints, start, signature code and named hosts if it
    matched (RequestFindings.add's arguments), its risk findings, and its start; nothing for a flow with none of
    them, but for a DNS query between two local hosts (the census of the network's resolvers)."""
    udps = flow.udps
    code = getattr(udps, "request_signature", 0)
    risks = getattr(udps, "risks", ())
    if not code and not risks and not (flow.protocol == 17 and flow.dst_port == 53
                                       and local_resolver(flow.src_ip, flow.dst_ip)):
        return None
    return (flow.src_ip, flow.src_port, flow.dst_ip, flow.dst_port, udps.first_read_ms, code, udps.named_hosts,
            flow.protocol, risks, flow.bidirectional_first_seen_ms)


def request_pass(source: str, config: MeterConfig) -> tuple[SidePass, RequestFindings]:
    """The request pass over one capture file or interface (``config``: the main pass's settings), to
    start, and the findings it fills as it runs (complete when it ends)."""
    findings = RequestFindings()
    job = side_pass("iotscan-requests", source, config, REQUEST_FILTER, RequestPlugin(expire_on_match=config.live),
                    findings.collect, snaplen=MAX_HEAD_BYTES + 128, reduce=_match)
    return job, findings


def read_requests(path: str, config: MeterConfig) -> RequestFindings:
    """Run the request pass over one capture file, here."""
    job, _ = request_pass(path, config)
    return job.outcome()
