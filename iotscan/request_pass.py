"""The request pass: HTTP requests, DNS queries and odd TCP flags matched against signatures, beside
the main pass.

A web exploit (path traversal, command, SQL or script injection, a log4j lookup, a probe for secret
files) is in the request, not in the flow's sizes and timing: to flow statistics and context it is
one ordinary short HTTP exchange. A DNS tunnel is in its query names and types: nDPI hands over only
a flow's first name, and a tunnel's first query can look ordinary. A NULL, FIN or XMAS scan is in
one packet's flags: a TCP segment with none of SYN, ACK and RST, which no connection sends. nDPI
does not hand the request target over through NFStream, and a plugin on the main pass would run for
every packet (+57% time), so a second pass over the same file (see iotscan.source.SidePass) reads
only TCP segments whose payload starts with an HTTP method, UDP datagrams to port 53 and TCP
segments without SYN, ACK and RST: a BPF filter drops every other packet in C. Over IPv6 the filter
finds the TCP header behind the fixed header only, so packets with IPv6 extension headers are not
read. Signatures are data (iotscan/data/request_signatures.json).

The parsers read untrusted bytes: every packet is parsed inside a catch-all, and what is kept per
flow is one small integer.
"""

from __future__ import annotations

import bisect
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus

from nfstream.plugin import NFPlugin

from iotscan.packets import read_dns_name, tcp_segment, udp_payload
from iotscan.source import MeterConfig, SidePass, side_pass

METHODS = (b"GET ", b"POST", b"PUT ", b"HEAD", b"DELE", b"OPTI", b"PATC")
# The first 4 TCP payload bytes, after the TCP options. libpcap's tcp[] indexes IPv4 only, so over
# IPv6 the offset is counted from the fixed header: a packet with extension headers is not read.
_PAYLOAD_START = "tcp[((tcp[12:1] & 0xf0) >> 2):4]"
_PAYLOAD_START6 = "ip6[(40 + ((ip6[52:1] & 0xf0) >> 2)):4]"


def _starts_with_method(start: str) -> str:
    return "(" + " or ".join(f"{start} = 0x{m.hex()}" for m in METHODS) + ")"


HTTP_FILTER = f"(ip and tcp and {_starts_with_method(_PAYLOAD_START)}) or " \
              f"(ip6 and ip6[6] = 6 and {_starts_with_method(_PAYLOAD_START6)})"
# TCP segments with none of SYN, ACK and RST (0x16): only the first segment of a connection lacks ACK,
# and it carries SYN (or, answering a stray segment, RST)
PROBE_FILTER = "(ip and tcp and tcp[13] & 0x16 = 0) or (ip6 and ip6[6] = 6 and ip6[53] & 0x16 = 0)"
# HTTP last: libpcap's optimizer mishandles an expression after one with a packet-dependent offset
# (the probes were never matched behind it); a test compares the whole filter with its parts
REQUEST_FILTER = f"({PROBE_FILTER}) or (udp dst port 53) or ({HTTP_FILTER})"

MAX_REQUESTS_PER_FLOW = 32  # keep-alive connections and reused DNS sockets carry several; the first ones tell
MAX_HEAD_BYTES = 4096  # of one request segment
MAX_FINDINGS = 100_000  # flows with a match kept per source; beyond, the oldest endpoints are forgotten
# A match also marks the two hosts' other flows (an exploit's callbacks and downloads, a scanner's other
# probes), as Suricata's xbits tracked by ip_pair do: the flows active between this long before the match ...
PAIR_BEFORE_MATCH_MS = 60_000
# ... and this long after it. The first is shorter than the default idle timeout (120 s): on an interface a
# flow expires, and is scored, at least that long after its last packet, so a match this soon after is known.
# Both define the pair_signature feature: a change needs a new FEATURE_SCHEMA_VERSION and model.
PAIR_AFTER_MATCH_MS = 120_000


@dataclass(frozen=True)
class RequestSignature:
    name: str
    family: str
    # "target" (the request target), "head" (request line and headers), "body" (what follows the headers in
    # the request's segment), "dns" (a query) or "tcp-flags"
    where: str
    needs: tuple[str, ...]  # the pattern is tried only when the text holds one of these (none: always)
    pattern: re.Pattern[str]  # lower case, searched in lower-cased text
    min_count: int = 1  # requests of one flow that must match: one odd DNS name is no tunnel

    @property
    def marks_pair(self) -> bool:
        """Whether a match marks the two hosts' other flows: not a DNS one, whose hosts are a client and
        its resolver, which carries every name the client looks up."""
        return self.where != "dns"

    @property
    def reason(self) -> str:
        """What a person reads first about a flow that matched."""
        if self.where == "dns":
            return f"DNS queries matched a tunnel signature: {self.name}"
        if self.where == "tcp-flags":
            return f"TCP flags no connection uses: {self.name}"
        kind = "a scanner" if self.family == "scan" else "an exploit"
        return f"HTTP request matched {kind} signature: {self.name}"

    @property
    def pair_reason(self) -> str:
        """What a person reads first about another flow of two hosts one of whose flows matched."""
        return f"a flow between the same two hosts matched a signature within minutes: {self.name}"


def _signatures_path() -> Path:
    try:
        return Path(str(resources.files("iotscan.data"))) / "request_signatures.json"
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent / "data" / "request_signatures.json"


def _load() -> list[RequestSignature]:
    data = json.loads(_signatures_path().read_text())
    return [RequestSignature(s["name"], s["family"], s["where"], tuple(s["needs"]), re.compile(s["pattern"]),
                             s.get("min_count", 1))
            for s in data["signatures"]]


# Loaded at import, so the meter process (a fork) has them compiled; a broken file is a broken install.
SIGNATURES: list[RequestSignature] = _load()
# (code, signature) of HTTP requests, the target ones first: the head is decoded only when they all miss
_HTTP = sorted(((c, s) for c, s in enumerate(SIGNATURES, start=1) if s.where in ("target", "head", "body")),
               key=lambda cs: cs[1].where != "target")
_DNS = [(c, s) for c, s in enumerate(SIGNATURES, start=1) if s.where == "dns"]
_FLAGS = [(c, s) for c, s in enumerate(SIGNATURES, start=1) if s.where == "tcp-flags"]
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


def match_packet(ip_packet: bytes) -> int:
    """The code of the signature one packet of the pass matches (an HTTP request segment, a DNS
    query, a TCP segment's flags), or 0."""
    segment = tcp_segment(ip_packet)
    if segment is not None:
        flags, payload = segment
        if payload[:4] in METHODS:
            return match_request(payload)
        return _first_match(_FLAGS, flag_text(flags))
    text = dns_query(ip_packet)
    return match_query(text) if text is not None else 0


class RequestPlugin(NFPlugin):
    """``flow.udps.request_signature``: the code of the first signature that the flow's requests
    matched, as many times as it asks (``min_count``) among the first MAX_REQUESTS_PER_FLOW.

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
        self.on_update(packet, flow)

    def on_update(self, packet: Any, flow: Any) -> None:
        try:
            udps = flow.udps
            if udps.request_signature or udps.requests_read >= MAX_REQUESTS_PER_FLOW:
                return
            udps.requests_read += 1
            code = match_packet(packet.ip_packet)
            if code:
                hits = udps.signature_hits[code] = udps.signature_hits.get(code, 0) + 1
                if hits >= SIGNATURES[code - 1].min_count:
                    udps.request_signature = code
                    if self.expire_on_match:
                        flow.expiration_id = -1  # NFStream's custom expiration
        except Exception:  # untrusted bytes: a malformed packet must not end the pass
            return


@dataclass
class RequestFindings:
    """The flows of a source whose requests matched a signature, by (client, server) endpoints, and the
    times of the matches that mark a pair of hosts (RequestSignature.marks_pair), by pair.

    Filled by the pass's thread while the main one reads it on a live interface: each operation is
    one dict or list call, atomic under the GIL. At most MAX_FINDINGS matches are kept in each table
    (the oldest endpoints or pairs go first), so a capture that never ends stays bounded.
    """

    by_endpoints: dict[tuple[str, int, str, int], list[tuple[int, int]]] = field(default_factory=dict)
    by_pair: dict[tuple[str, str], list[tuple[int, int]]] = field(default_factory=dict)  # sorted by time
    matched: int = 0
    kept: int = 0
    pair_kept: int = 0
    forgotten: int = 0  # matches let go for newer ones

    def add(self, src_ip: str, src_port: int, dst_ip: str, dst_port: int, first_ms: int, code: int) -> None:
        self.matched += 1
        self.kept += 1
        self.by_endpoints.setdefault((src_ip, src_port, dst_ip, dst_port), []).append((first_ms, code))
        while self.kept > MAX_FINDINGS:
            oldest = self.by_endpoints.pop(next(iter(self.by_endpoints)))
            self.kept -= len(oldest)
            self.forgotten += len(oldest)
        sig = signature(code)
        if sig is not None and sig.marks_pair:
            times = self.by_pair.setdefault(_pair(src_ip, dst_ip), [])
            bisect.insort(times, (first_ms, code))  # the pass's flows expire roughly, not exactly, in time order
            self.pair_kept += 1
            while self.pair_kept > MAX_FINDINGS:
                self.pair_kept -= len(self.by_pair.pop(next(iter(self.by_pair))))

    def collect(self, matches: Iterable[tuple[str, int, str, int, int, int]]) -> RequestFindings:
        """Add the pass's matches (see _match) as they come; this object at the end."""
        for match in matches:
            self.add(*match)
        return self

    def code(self, src_ip: str, src_port: int, dst_ip: str, dst_port: int, first_ms: int, last_ms: int) -> int:
        """The signature code of a main-pass flow: a match of the same endpoints (either direction)
        whose first request falls within the flow's lifetime; 0 if none."""
        for key in ((src_ip, src_port, dst_ip, dst_port), (dst_ip, dst_port, src_ip, src_port)):
            for seen_ms, code in self.by_endpoints.get(key, ()):
                if first_ms <= seen_ms <= last_ms:
                    return code
        return 0

    def pair_code(self, src_ip: str, dst_ip: str, first_ms: int, last_ms: int) -> int:
        """The code of the earliest match marking the flow's two hosts while the flow was active, or up
        to PAIR_BEFORE_MATCH_MS after its end or PAIR_AFTER_MATCH_MS before its start (any protocol);
        0 if none."""
        times = self.by_pair.get(_pair(src_ip, dst_ip))
        if not times:
            return 0
        i = bisect.bisect_left(times, (first_ms - PAIR_AFTER_MATCH_MS,))
        return times[i][1] if i < len(times) and times[i][0] <= last_ms + PAIR_BEFORE_MATCH_MS else 0


def _pair(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a <= b else (b, a)


def _match(flow: Any) -> tuple[str, int, str, int, int, int] | None:
    """What leaves the pass's meter of a flow: its endpoints, start and signature code if it matched
    (RequestFindings.add's arguments), else nothing."""
    code = getattr(flow.udps, "request_signature", 0)
    if not code:
        return None
    return flow.src_ip, flow.src_port, flow.dst_ip, flow.dst_port, flow.bidirectional_first_seen_ms, code


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
