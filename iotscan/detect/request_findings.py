"""What the request pass found: the flows whose packets matched a signature, and the marks a match leaves on
a pair of hosts (iotscan.detect.request_pass says what is read and why a match marks a pair)."""

from __future__ import annotations

import bisect
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from iotscan.detect.request_signatures import RequestSignature, signature

MAX_FINDINGS = 100_000  # flows with a match kept per source; beyond, the oldest endpoints are forgotten
# A match also marks the two hosts' other flows (an exploit's callbacks and downloads, a scanner's other
# probes), as Suricata's xbits tracked by ip_pair do: the flows active between this long before the match ...
PAIR_BEFORE_MATCH_MS = 60_000
# ... and this long after it. The first is shorter than the default idle timeout (120 s): on an interface a
# flow expires, and is scored, at least that long after its last packet, so a match this soon after is known.
# Both define the pair_signature feature: a change needs a new FEATURE_SCHEMA_VERSION and model.
PAIR_AFTER_MATCH_MS = 120_000
# A matching flow as the pass saw it (src_ip, src_port, dst_ip, dst_port, protocol; src sent its first packet
# the filter let through), and a mark of a pair of hosts: (match time ms, signature code, the matching flow)
Flow5 = tuple[str, int, str, int, int]
Mark = tuple[int, int, Flow5]


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


