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

import re
from typing import Any
from urllib.parse import unquote_plus

from nfstream.plugin import NFPlugin

from iotscan.capture.packets import TcpSegment, echo_request_data, read_dns_name, tcp_segment, udp_payload
from iotscan.capture.side_pass import SidePass, side_pass
from iotscan.capture.source import MeterConfig
from iotscan.detect.request_findings import RequestFindings
from iotscan.detect.request_signatures import SIGNATURES, RequestSignature

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
ELF_START = b"\x7fELF"  # a Linux executable (any CPU), as IoT loaders fetch their bot binary
RESPONSE_START = b"HTTP"  # an HTTP response: its body may start a file in the headers' segment
SHELL_STARTS = (b"Micr", b"uid=")  # a command shell's banner ("Microsoft Windows [Version"), an id command's output
TELNET_PORTS = (23, 2323)  # Mirai's
FTP_PORT = 21
# The first 4 TCP payload bytes, after the TCP options. libpcap's tcp[] indexes IPv4 only, so over
# IPv6 the offset is counted from the fixed header: a packet with extension headers is not read.
_PAYLOAD_START = "tcp[((tcp[12:1] & 0xf0) >> 2):4]"
_PAYLOAD_START6 = "ip6[(40 + ((ip6[52:1] & 0xf0) >> 2)):4]"


def _payload_starts(start: str) -> str:
    """A request's, a bot's first line's or an SSH identification's first four bytes, a file's first two,
    or an MQTT CONNACK (type 2, length 2) refusing a login (return code 4, bad user name or password, or 5,
    not authorized)."""
    prefixes = " or ".join(f"{start} = 0x{m.hex()}" for m in (*METHODS, *BOT_LINE_STARTS, SSH_IDENTIFICATION,
                                                                ELF_START, RESPONSE_START, *SHELL_STARTS))
    files = " or ".join(f"{start} & 0xffff0000 = 0x{m.hex()}0000" for m in FILE_STARTS)
    return f"({prefixes} or {files} or {start} & 0xffff00fe = 0x20020004)"


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
# an FTP server refusing a login: "530 " or "530-"
FTP_REPLY_FILTER = f"(ip and tcp src port {FTP_PORT} and {_TCP4_DATA} >= 4 and " \
                   f"{_PAYLOAD_START} & 0xffffff00 = 0x{b'530'.hex()}00)"
# a TFTP data block (opcode 3) that starts an ELF file, over IPv4
TFTP_FILTER = f"(ip and udp and udp[4:2] >= 16 and udp[8:2] = 3 and udp[12:4] = 0x{ELF_START.hex()})"
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
                 f"(udp dst port 53) or ({PAYLOAD_FILTER}) or ({HEAD_LINE_FILTER}) or ({CHECKIN_FILTER}) or " \
                 f"({FTP_REPLY_FILTER}) or ({TFTP_FILTER})"

MAX_REQUESTS_PER_FLOW = 32  # keep-alive connections and reused DNS sockets carry several; the first ones tell
# A request head still unfinished this long after its first segment, with this many segments of it sent, is
# held open (HAProxy's anti-DoS example: "timeout http-request 5s  # A complete request may never take that
# long"); the signature then asks for several such requests between two hosts (ModSecurity's slowloris rule:
# 11 connections of one address reading headers)
HEAD_HELD_MS = 5_000
HEAD_HELD_SEGMENTS = 3
HEAD_END = b"\r\n\r\n"
MAX_HEAD_BYTES = 4096  # of one request segment
# An exploit request often names the host the victim is to call next: the loader it downloads from, the LDAP
# server of a log4j lookup. The flows between the request's server and each IPv4 literal in the request
# (at most this many) are marked as the pair's are.
MAX_NAMED_HOSTS = 4
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\w.])")


# (code, signature) of HTTP requests, the target ones first: the head is decoded only when they all miss
_HTTP = sorted(((c, s) for c, s in enumerate(SIGNATURES, start=1) if s.where in ("target", "head", "body")),
               key=lambda cs: cs[1].where != "target")


def _of_kind(where: str) -> list[tuple[int, RequestSignature]]:
    return [(c, s) for c, s in enumerate(SIGNATURES, start=1) if s.where == where]


_DNS, _FLAGS, _SYN, _ECHO, _LINE, _CHECKIN, _SSH, _FILE, _SHELL, _REPLY, _FTP_REPLY, _HELD = (
    _of_kind(w) for w in ("dns", "tcp-flags", "syn", "echo", "line", "checkin", "ssh", "file", "shell", "reply",
                          "ftp-reply", "held"))
HEAD_HELD_TEXT = "request head held open"
# TCP flag bits by the letter tcp-flags signatures read them as ("fpu": FIN, PSH and URG)
FLAG_LETTERS = ((0x01, "f"), (0x02, "s"), (0x04, "r"), (0x08, "p"), (0x10, "a"), (0x20, "u"), (0x40, "e"),
                (0x80, "c"))
# DNS query types by number, for the text DNS signatures read; others read as "type<number>"
QTYPES = {1: "a", 2: "ns", 5: "cname", 6: "soa", 10: "null", 12: "ptr", 13: "hinfo", 15: "mx", 16: "txt",
          28: "aaaa", 33: "srv", 35: "naptr", 64: "svcb", 65: "https", 255: "any"}


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
        if start[:2] in FILE_STARTS or start == ELF_START:
            return _first_match(_FILE, segment.payload[:MAX_HEAD_BYTES].decode("latin-1").lower())
        if start == RESPONSE_START:
            return _response_file(segment.payload)
        if start in SHELL_STARTS:
            return _first_match(_SHELL, segment.payload[:MAX_HEAD_BYTES].decode("latin-1").lower())
        if not segment.flags & 0x16:  # none of SYN, ACK and RST
            return _first_match(_FLAGS, flag_text(segment.flags))
        if segment.flags & 0x12 == 0x02:  # a SYN
            return _first_match(_SYN, f"window {segment.window} df {int(segment.dont_fragment)}")
        if segment.src_port == FTP_PORT:  # by its filter: a refusal
            return _first_match(_FTP_REPLY, segment.payload[:MAX_HEAD_BYTES].decode("latin-1").lower())
        if segment.src_port in TELNET_PORTS or segment.payload[:2] == b"\x20\x02":  # a server's, by its filter
            return _first_match(_REPLY, reply_text(segment.payload))
        return None
    data = echo_request_data(ip_packet)
    if data is not None:
        return _first_match(_ECHO, f"echo-request data {data}")
    datagram = udp_payload(ip_packet)  # a TFTP data block (TFTP_FILTER): opcode 3, block number, an ELF file's start
    if datagram is not None and datagram[2][:2] == b"\x00\x03" and datagram[2][4:8] == ELF_START:
        return _first_match(_FILE, datagram[2][4:MAX_HEAD_BYTES].decode("latin-1").lower())
    text = dns_query(ip_packet)
    return match_query(text) if text is not None else 0


_HOST_HEADER = re.compile(rb"\r\nhost:[ \t]*([^\r\n]*)", re.IGNORECASE)
_ADDRESS = re.compile(rb"^(\[[0-9a-f:.]+\]|[0-9.]+)(:\d+)?$", re.IGNORECASE)


def _names_server(request: bytes) -> bool:
    """Whether an HTTP request's Host header names its server (not an address)."""
    found = _HOST_HEADER.search(request, 0, MAX_HEAD_BYTES)
    return found is not None and bool(found.group(1).strip()) and not _ADDRESS.match(found.group(1).strip())


def _response_file(payload: bytes) -> int | None:
    """The file signature an HTTP response's body matches, when the body starts in the headers' segment; None
    for any other response (not a packet the pass reads)."""
    end = payload.find(HEAD_END, 0, MAX_HEAD_BYTES)
    body = payload[end + 4:end + 4 + MAX_HEAD_BYTES] if end >= 0 else b""
    if body[:2] in FILE_STARTS or body[:4] == ELF_START:
        return _first_match(_FILE, body.decode("latin-1").lower())
    return None


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
        flow.udps.named_server = False  # an HTTP request of the flow named its server (a Host header with a name)
        self.on_update(packet, flow)

    def on_update(self, packet: Any, flow: Any) -> None:
        try:
            udps = flow.udps
            if udps.request_signature or udps.requests_read >= MAX_REQUESTS_PER_FLOW:
                return
            segment = tcp_segment(packet.ip_packet)
            if segment is not None and segment.payload[:4] in METHODS and not udps.named_server:
                udps.named_server = _names_server(segment.payload)
            code = self._follow_head(segment, packet, udps)
            if code is None:
                code = read_packet(packet.ip_packet, segment)
                if code is None:  # a short line of no request head: not one of the requests read
                    return
            if not udps.requests_read:
                udps.first_read_ms = packet.time
            udps.requests_read += 1
            if code and SIGNATURES[code - 1].by_address_only and udps.named_server:
                code = 0  # a file fetched from a server called by name: an update, not a loader's bot
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


def _match(flow: Any) -> tuple[str, int, str, int, int, int, tuple[str, ...], int] | None:
    """What leaves the pass's meter of a flow: its endpoints, start, signature code and named hosts if it
    matched (RequestFindings.add's arguments), else nothing."""
    code = getattr(flow.udps, "request_signature", 0)
    if not code:
        return None
    return (flow.src_ip, flow.src_port, flow.dst_ip, flow.dst_port, flow.udps.first_read_ms, code,
            flow.udps.named_hosts, flow.protocol)


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
