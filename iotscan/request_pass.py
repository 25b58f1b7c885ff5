"""The request pass: HTTP requests matched against exploit signatures, beside the main pass.

A web exploit (path traversal, command, SQL or script injection, a log4j lookup, a probe for secret
files) is in the request, not in the flow's sizes and timing: to flow statistics and context it is
one ordinary short HTTP exchange. nDPI does not hand the request target over through NFStream, and
a plugin on the main pass would run for every packet (+57% time), so a second pass over the same
file (see iotscan.source.SidePass) reads only TCP segments whose payload starts with an HTTP method:
a BPF filter drops every other packet in C. libpcap cannot index a TCP payload behind an IPv6
header, so the pass reads IPv4 requests. Signatures are data (iotscan/data/request_signatures.json).

The parsers read untrusted bytes: every packet is parsed inside a catch-all, and what is kept per
flow is one small integer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus

from nfstream.plugin import NFPlugin

from iotscan.source import MeterConfig, SidePass, side_pass

METHODS = (b"GET ", b"POST", b"PUT ", b"HEAD", b"DELE", b"OPTI", b"PATC")
_PAYLOAD_START = "tcp[((tcp[12:1] & 0xf0) >> 2):4]"  # the first 4 payload bytes, after the TCP options
REQUEST_FILTER = "tcp and (" + " or ".join(f"{_PAYLOAD_START} = 0x{m.hex()}" for m in METHODS) + ")"

MAX_REQUESTS_PER_FLOW = 32  # keep-alive connections carry several; the first ones tell
MAX_HEAD_BYTES = 4096  # of one request segment
MAX_FINDINGS = 100_000  # flows with a match kept per capture; more are counted, not kept


@dataclass(frozen=True)
class RequestSignature:
    name: str
    family: str
    where: str  # "target" (the request target) or "head" (request line and headers)
    needs: tuple[str, ...]  # the pattern is tried only when the text holds one of these
    pattern: re.Pattern[str]  # lower case, searched in lower-cased text


def _signatures_path() -> Path:
    try:
        return Path(str(resources.files("iotscan.data"))) / "request_signatures.json"
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent / "data" / "request_signatures.json"


def _load() -> list[RequestSignature]:
    data = json.loads(_signatures_path().read_text())
    return [RequestSignature(s["name"], s["family"], s["where"], tuple(s["needs"]), re.compile(s["pattern"]))
            for s in data["signatures"]]


# Loaded at import, so the meter process (a fork) has them compiled; a broken file is a broken install.
SIGNATURES: list[RequestSignature] = _load()
# (code, signature), the target ones first: the head is decoded only when they all miss
_BY_PLACE = sorted(enumerate(SIGNATURES, start=1), key=lambda cs: cs[1].where != "target")


def signature(code: int) -> RequestSignature | None:
    """The signature a flow's request code stands for (0: none)."""
    return SIGNATURES[code - 1] if 0 < code <= len(SIGNATURES) else None


def _decoded(text: str) -> str:
    """The text in lower case, with its percent-decoding once and twice beside it when it has any."""
    text = text.lower()
    if "%" not in text and "+" not in text:
        return text
    once = unquote_plus(text).lower()
    return f"{text}\n{once}\n{unquote_plus(once).lower()}"


def match_request(payload: bytes) -> int:
    """The code (position + 1) of the first signature an HTTP request segment matches, or 0: target
    signatures first, then head ones."""
    head = payload[:MAX_HEAD_BYTES].decode("latin-1")
    line_end = head.find("\r\n")
    parts = (head if line_end < 0 else head[:line_end]).split(" ", 2)
    if len(parts) < 2:
        return 0
    texts = {"target": _decoded(parts[1])}
    for code, sig in _BY_PLACE:
        text = texts.get(sig.where)
        if text is None:
            text = texts[sig.where] = _decoded(head)
        if any(n in text for n in sig.needs) and sig.pattern.search(text):
            return code
    return 0


def _tcp_payload(ip_packet: bytes) -> bytes:
    """The TCP payload of an IPv4 packet (b"" for anything else)."""
    if len(ip_packet) < 40 or ip_packet[0] >> 4 != 4 or ip_packet[9] != 6:
        return b""
    ihl = (ip_packet[0] & 0x0F) * 4
    if ihl < 20 or len(ip_packet) < ihl + 20:
        return b""
    return ip_packet[ihl + (ip_packet[ihl + 12] >> 4) * 4:]


class RequestPlugin(NFPlugin):
    """``flow.udps.request_signature``: the code of the first signature a request of the flow matched.

    Never raises: a packet that fails to parse matches nothing.
    """

    def on_init(self, packet: Any, flow: Any) -> None:
        flow.udps.request_signature = 0
        flow.udps.requests_read = 0
        self.on_update(packet, flow)

    def on_update(self, packet: Any, flow: Any) -> None:
        try:
            udps = flow.udps
            if udps.request_signature or udps.requests_read >= MAX_REQUESTS_PER_FLOW:
                return
            udps.requests_read += 1
            payload = _tcp_payload(packet.ip_packet)
            if payload[:4] in METHODS:
                udps.request_signature = match_request(payload)
        except Exception:  # untrusted bytes: a malformed packet must not end the pass
            return


@dataclass
class RequestFindings:
    """The flows of a capture whose requests matched a signature, by (client, server) endpoints."""

    by_endpoints: dict[tuple[str, int, str, int], list[tuple[int, int]]] = field(default_factory=dict)
    matched: int = 0
    dropped: int = 0  # matches beyond MAX_FINDINGS

    def add(self, src_ip: str, src_port: int, dst_ip: str, dst_port: int, first_ms: int, code: int) -> None:
        self.matched += 1
        if self.matched > MAX_FINDINGS:
            self.dropped += 1
            return
        self.by_endpoints.setdefault((src_ip, src_port, dst_ip, dst_port), []).append((first_ms, code))

    def code(self, src_ip: str, src_port: int, dst_ip: str, dst_port: int, first_ms: int, last_ms: int) -> int:
        """The signature code of a main-pass TCP flow: a match of the same endpoints (either direction)
        whose first request falls within the flow's lifetime; 0 if none."""
        for key in ((src_ip, src_port, dst_ip, dst_port), (dst_ip, dst_port, src_ip, src_port)):
            for seen_ms, code in self.by_endpoints.get(key, ()):
                if first_ms <= seen_ms <= last_ms:
                    return code
        return 0


def collect(flows: Iterable[Any]) -> RequestFindings:
    result = RequestFindings()
    for flow in flows:
        code = getattr(flow.udps, "request_signature", 0)
        if code:
            result.add(flow.src_ip, flow.src_port, flow.dst_ip, flow.dst_port, flow.bidirectional_first_seen_ms,
                       code)
    return result


def _matched(flow: Any) -> bool:
    """Only flows with a match leave the pass's meter: the others cost pickling for nothing."""
    return bool(getattr(flow.udps, "request_signature", 0))


def request_pass(path: str, config: MeterConfig) -> SidePass:
    """The request pass over one capture file (``config``: the main pass's settings), to start."""
    return side_pass("iotscan-requests", path, config, REQUEST_FILTER, RequestPlugin(), collect,
                     snaplen=MAX_HEAD_BYTES + 128, keep=_matched)


def read_requests(path: str, config: MeterConfig) -> RequestFindings:
    """Run the request pass over one capture file, here."""
    return request_pass(path, config).outcome()
