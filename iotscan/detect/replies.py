"""The replies pass: what the network answers a host, read beside the main pass -- DNS answers and ICMP errors.

Three questions of the host-behaviour stage need bytes NFStream does not hand over:

* did a DNS answer name the address a host connects to, before it connected? (Slips's "connection
  without DNS resolution": malware calls its controllers by address, software calls services by name);
* is an ICMP flow from a host an error answering another host's probe (port or host unreachable,
  time exceeded), and which probe? NFStream makes every ICMP error a flow of its own, initiated by the
  host that sent it: without this, a host answering a UDP scan with unreachables looks like one
  sweeping the Internet;
* is a host tunnelling data through DNS? nDPI hands over a flow's first name only, and a tunnel spreads its
  queries over many flows: the names each client asks under each registered domain are counted here.

A BPF filter lets through only DNS answers (UDP from port 53) and ICMP and ICMPv6 errors (destination
unreachable, time exceeded); a small plugin reads the answers' A and AAAA records and the original
header an error quotes. As the other side passes, over a file it runs ahead of the main pass; on an
interface it is one more capture of it. Bounded: at most MAX_RESOLVED addresses and MAX_ERRORS error
pairs, the oldest forgotten first.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from nfstream.plugin import NFPlugin

from iotscan.capture.names import registered_domain
from iotscan.capture.packets import ICMP, ICMP6, read_dns_name, transport_offset, udp_payload
from iotscan.capture.side_pass import SidePass, side_pass
from iotscan.capture.source import MeterConfig

# DNS answers; ICMP destination unreachable (3) and time exceeded (11); ICMPv6 the same (1, 3), its type read
# right behind the fixed header
REPLIES_FILTER = "(udp src port 53) or (icmp and (icmp[0] = 3 or icmp[0] = 11)) or " \
                 "(ip6 and ip6[6] = 58 and (ip6[40] = 1 or ip6[40] = 3))"
MAX_ANSWERS_PER_FLOW = 64  # addresses read of one resolver socket's answers
MAX_ERRORS_PER_FLOW = 64
MAX_RESOLVED = 200_000  # addresses remembered
MAX_ERRORS = 100_000  # (error sender, its receiver) pairs remembered
# A DNS tunnel carries its data in the names it asks: many distinct, long names under one domain. One client
# asking this many distinct names under one registered domain within TUNNEL_WINDOW_MS, their parts under the
# domain this long on average, is a tunnel. Ordinary software asks a few short names per domain (www, api, a
# CDN's): over the benign captures here (IoT Sentinel, the O'Connor lab, the Hue honeypot, the nDPI corpus's
# benign captures) at most 13 distinct names under one domain, their parts 20 characters long on average at most
# (Teams, 6 names); tunnels encode data in long labels (set knowing the DEV split's dnscat2 capture asks 12).
TUNNEL_NAMES = 10
TUNNEL_NAME_CHARS = 24
TUNNEL_WINDOW_MS = 600_000
MAX_TUNNEL_NAMES = 256
_A, _AAAA = 1, 28
_IPV4_ERRORS = (3, 11)
_IPV6_ERRORS = (1, 3)


def dns_question(ip_packet: bytes) -> str | None:
    """The name a DNS response (any outcome) answers, lower-cased; None for anything else. Never raises."""
    datagram = udp_payload(ip_packet)
    if datagram is None:
        return None
    dns = datagram[2]
    if len(dns) < 17 or not dns[2] & 0x80 or not (dns[4] or dns[5]):
        return None
    try:
        return read_dns_name(dns, 12)[0].lower()
    except ValueError:
        return None


def dns_answers(ip_packet: bytes) -> list[tuple[str, str]]:
    """(address, name asked) of each A and AAAA record of a DNS answer in an IPv4 or IPv6 UDP packet; [] for
    anything else. Never raises."""
    datagram = udp_payload(ip_packet)
    if datagram is None:
        return []
    dns = datagram[2]
    try:
        if len(dns) < 12 or not dns[2] & 0x80 or dns[3] & 0x0F:  # not an answer, or an error (NXDOMAIN...)
            return []
        questions, answers = int.from_bytes(dns[4:6], "big"), int.from_bytes(dns[6:8], "big")
        offset, asked = 12, ""
        for _ in range(questions):
            name, offset = read_dns_name(dns, offset)
            asked = asked or name.lower()
            offset += 4
        found = []
        for _ in range(min(answers, MAX_ANSWERS_PER_FLOW)):
            _, offset = read_dns_name(dns, offset)
            if offset + 10 > len(dns):
                break
            rtype, rdlength = int.from_bytes(dns[offset:offset + 2], "big"), int.from_bytes(dns[offset + 8:offset + 10],
                                                                                           "big")
            data = dns[offset + 10:offset + 10 + rdlength]
            offset += 10 + rdlength
            if (rtype == _A and len(data) == 4) or (rtype == _AAAA and len(data) == 16):
                found.append((str(ipaddress.ip_address(data)), asked))
        return found
    except (ValueError, IndexError):
        return []


def icmp_error(ip_packet: bytes) -> tuple[str, str, int, int] | None:
    """What an ICMP or ICMPv6 error quotes of the packet it answers: (its source, its destination, its protocol,
    its destination port: 0 without ports); None for anything else."""
    offset = transport_offset(ip_packet, ICMP, 8)
    if offset is not None:
        if ip_packet[offset] not in _IPV4_ERRORS:
            return None
    else:
        offset = transport_offset(ip_packet, ICMP6, 8)
        if offset is None or ip_packet[offset] not in _IPV6_ERRORS:
            return None
    quoted = ip_packet[offset + 8:]
    try:
        if quoted[0] >> 4 == 4:
            header = (quoted[0] & 0x0F) * 4
            src, dst, proto = (str(ipaddress.IPv4Address(quoted[12:16])), str(ipaddress.IPv4Address(quoted[16:20])),
                               quoted[9])
        elif quoted[0] >> 4 == 6:
            header = 40
            src, dst, proto = (str(ipaddress.IPv6Address(quoted[8:24])), str(ipaddress.IPv6Address(quoted[24:40])),
                               quoted[6])
        else:
            return None
    except (IndexError, ValueError):
        return None
    port = int.from_bytes(quoted[header + 2:header + 4], "big") if proto in (6, 17) and \
        len(quoted) >= header + 4 else 0
    return src, dst, proto, port


class RepliesPlugin(NFPlugin):
    """``flow.udps.answers``: (address, name, time) of the DNS answers a flow carried; ``flow.udps.questions``: (name,
    time) of the questions its responses answered; ``flow.udps.errors``: (time, quoted source, quoted destination,
    protocol, port) of the ICMP errors it carried. Never raises."""

    def on_init(self, packet: Any, flow: Any) -> None:
        flow.udps.answers = []
        flow.udps.errors = []
        flow.udps.questions = []
        self.on_update(packet, flow)

    def on_update(self, packet: Any, flow: Any) -> None:
        try:
            udps = flow.udps
            data = packet.ip_packet
            version = data[0] >> 4 if data else 0
            if (version == 4 and len(data) > 9 and data[9] == 17) or (version == 6 and len(data) > 6 and data[6] == 17):
                if len(udps.answers) < MAX_ANSWERS_PER_FLOW:
                    udps.answers += [(ip, name, packet.time) for ip, name in dns_answers(data)]
                if len(udps.questions) < MAX_ANSWERS_PER_FLOW:
                    name = dns_question(data)
                    if name:
                        udps.questions.append((name, packet.time))
            elif len(udps.errors) < MAX_ERRORS_PER_FLOW:
                quoted = icmp_error(data)
                if quoted is not None:
                    udps.errors.append((packet.time, *quoted))
        except Exception:  # untrusted bytes: a malformed packet must not end the pass
            return


def _reduce(flow: Any) -> tuple[str, str, list[Any], list[Any], list[Any]] | None:
    """What leaves the pass's meter of a flow: its endpoints, answers, errors and questions, if it carried any."""
    udps = flow.udps
    answers, errors, questions = (getattr(udps, "answers", []), getattr(udps, "errors", []),
                                  getattr(udps, "questions", []))
    if not answers and not errors and not questions:
        return None
    return flow.src_ip, flow.dst_ip, answers, errors, questions


@dataclass
class _Tally:
    """The distinct names one client asked under one registered domain within TUNNEL_WINDOW_MS."""

    first_ms: int
    names: set[str] = field(default_factory=set)
    characters: int = 0  # of the distinct names' parts under the domain
    decided_ms: int | None = None  # when they made a tunnel

    def add(self, sub: str, ms: int) -> None:
        if sub in self.names or len(self.names) >= MAX_TUNNEL_NAMES:
            return
        self.names.add(sub)
        self.characters += len(sub)
        if self.decided_ms is None and len(self.names) >= TUNNEL_NAMES \
                and self.characters >= TUNNEL_NAME_CHARS * len(self.names):
            self.decided_ms = ms


@dataclass
class Replies:
    """What the replies pass found: which addresses DNS answers named, to which client, when; and the ICMP
    errors, by (sender, receiver). Filled by the pass's thread while the main one reads it on an interface:
    every operation is one dict call, atomic under the GIL."""

    # (client, address) -> first time an answer to the client named the address (ms); the name
    resolved: OrderedDict[tuple[str, str], tuple[int, str]] = field(default_factory=OrderedDict)
    # address -> first time any answer named it: for clients behind a resolver the capture does not see
    named: OrderedDict[str, int] = field(default_factory=OrderedDict)
    # (error sender, error receiver) -> [(time, quoted protocol, quoted port)]
    errors: OrderedDict[tuple[str, str], list[tuple[int, int, int]]] = field(default_factory=OrderedDict)
    # (client, registered domain) -> the distinct names asked under it (DNS tunnels)
    asked: OrderedDict[tuple[str, str], _Tally] = field(default_factory=OrderedDict)
    clients: set[str] = field(default_factory=set)  # hosts that got a DNS answer (at most MAX_RESOLVED)
    answers_seen: int = 0

    def collect(self, flows: Iterable[Any]) -> Replies:
        # the filter lets only answers and errors through: a flow's first packet, which makes its source, is the
        # resolver's answer or the error's sender's
        for src, dst, answers, errors, questions in flows:
            for ip, name, ms in answers:
                self._resolve(dst, ip, name, ms)
            for name, ms in questions:
                self._ask(dst, name, ms)
            for ms, _quoted_src, _quoted_dst, proto, port in errors:
                entries = self.errors.setdefault((src, dst), [])
                if len(entries) < MAX_ERRORS_PER_FLOW:
                    entries.append((ms, proto, port))
                while len(self.errors) > MAX_ERRORS:
                    self.errors.popitem(last=False)
        return self

    def _resolve(self, client: str, ip: str, name: str, ms: int) -> None:
        self.answers_seen += 1
        if len(self.clients) < MAX_RESOLVED:
            self.clients.add(client)
        key = (client, ip)
        if key not in self.resolved:
            self.resolved[key] = (ms, name)
            while len(self.resolved) > MAX_RESOLVED:
                self.resolved.popitem(last=False)
        if ip not in self.named:
            self.named[ip] = ms
            while len(self.named) > MAX_RESOLVED:
                self.named.popitem(last=False)

    def resolved_before(self, client: str, ip: str, ms: int) -> bool:
        """Whether a DNS answer named ``ip`` before ``ms``: to ``client``, or to anyone."""
        seen = self.resolved.get((client, ip))
        if seen is not None and seen[0] <= ms:
            return True
        first = self.named.get(ip)
        return first is not None and first <= ms

    def _ask(self, client: str, name: str, ms: int) -> None:
        domain = registered_domain(name)
        if domain is None:
            return
        key = (client, domain)
        tally = self.asked.get(key)
        if tally is None or (ms - tally.first_ms > TUNNEL_WINDOW_MS and tally.decided_ms is None):
            tally = self.asked[key] = _Tally(first_ms=ms)
            while len(self.asked) > MAX_RESOLVED:
                self.asked.popitem(last=False)
        tally.add(name[:len(name) - len(domain)], ms)

    def tunnel(self, client: str, name: str | None) -> _Tally | None:
        """The tally of the names ``client`` asked under ``name``'s registered domain, if they make a tunnel."""
        domain = registered_domain(name) if name else None
        tally = self.asked.get((client, domain)) if domain else None
        return tally if tally is not None and tally.decided_ms is not None else None

    def asked_dns(self, client: str) -> bool:
        """Whether ``client`` got a DNS answer in the capture: of a host that never did (one behind DNS over
        HTTPS, a capture cut before) the names of its peers are unknown, not absent."""
        return client in self.clients

    def name_of(self, client: str, ip: str) -> str | None:
        seen = self.resolved.get((client, ip))
        return seen[1] if seen is not None else None

    def is_error(self, sender: str, receiver: str) -> bool:
        """Whether ``sender`` sent ICMP errors to ``receiver`` (an ICMP flow between them answers probes)."""
        return (sender, receiver) in self.errors


def replies_pass(source: str, config: MeterConfig) -> tuple[SidePass, Replies]:
    """The replies pass over one capture file or interface (``config``: the main pass's settings), to start, and
    what it fills as it runs (complete when it ends)."""
    replies = Replies()
    job = side_pass("iotscan-replies", source, config, REPLIES_FILTER, RepliesPlugin(), replies.collect,
                    snaplen=1536, reduce=_reduce)
    return job, replies
