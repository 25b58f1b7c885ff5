"""Scan detection by connection outcome, at any speed: Threshold Random Walk over first contacts.

Jung, Paxson, Berger and Balakrishnan (IEEE S&P 2004) observed that a benign host's first contacts mostly
succeed and a scanner's mostly fail, and decide with a sequential hypothesis test: each first contact
multiplies a likelihood ratio by ``(1 - THETA_SCANNER) / (1 - THETA_BENIGN)`` when it fails and by
``THETA_SCANNER / THETA_BENIGN`` when it succeeds; the host is a scanner once the ratio reaches
``(DETECTION / FALSE_ALARM)``, and benign (the walk starts again) once it falls to
``(1 - DETECTION) / (1 - FALSE_ALARM)``. With the paper's success probabilities (0.8 benign, 0.2 scanner),
a detection probability of 0.99 and a false-alarm probability of 0.001 (ten times stricter than the
paper's 0.01), five failed first contacts in a row decide. No window of time is involved: a scan of one
probe a minute decides after the same five probes as one of a thousand a second, so long as the host's
state lives (KEY_TTL_S, bounded tables).

A contact is a service: (destination address, port, protocol); ICMP has no port. A retry to the same
service is the same contact, never new evidence (a client retrying a dead service is no scanner). The
outcome is read from the flow: a TCP SYN answered by a SYN-ACK succeeded; refused (RST) or unanswered it
failed; a TCP segment without SYN (an ACK, FIN or NULL probe) that got nothing or a RST failed; UDP and
ICMP succeeded when anything came back, were refused when an ICMP error came back, and otherwise went
unanswered, which counts for less (UNANSWERED_WEIGHT). Flows to multicast or broadcast addresses are no contact. A flow
that is neither (a TCP connection caught after its handshake, with data both ways) is no first contact.
Nor is a failed contact to an address a DNS answer named to the host before (iotscan.detect.hosts decides
that): a scanner enumerates addresses, a device whose cloud service is down tried one it looked up.

Unanswered is read as failed only once the capture has shown answers (``answers_seen``): a capture of one
direction of traffic answers nothing, and every host would look like a scanner. Probes are the exception:
a connection that sent only SYNs, or a TCP segment without SYN alone or with its retry. In a capture of one
direction a connection shows its data, a probe its SYNs.
"""

from __future__ import annotations

import math
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

THETA_BENIGN = 0.8  # a benign host's first contacts succeed this often (Jung et al.)
THETA_SCANNER = 0.2  # a scanner's
DETECTION = 0.99
FALSE_ALARM = 0.001
FAIL_STEP = math.log((1 - THETA_SCANNER) / (1 - THETA_BENIGN))
SUCCESS_STEP = math.log(THETA_SCANNER / THETA_BENIGN)
SCANNER_AT = math.log(DETECTION / FALSE_ALARM)
BENIGN_AT = math.log((1 - DETECTION) / (1 - FALSE_ALARM))
MIN_FAILED = 5  # a decision needs at least this many failed first contacts, whatever the walk says
# UDP and ICMP have no handshake: silence is weaker evidence than a refused or unanswered TCP connection (many
# clients' UDP goes unanswered by design, or is rate-limited), so an unanswered one moves the walk half as far;
# a UDP probe answered by an ICMP unreachable (read in the replies pass) is refused, a whole failure.
UNANSWERED_WEIGHT = 0.5

MAX_SOURCES = 20_000  # sources tracked; beyond, the least recently active is forgotten
MAX_CONTACTS = 4_096  # services remembered per source; beyond, the oldest first contact is forgotten
KEY_TTL_S = 3_600.0  # a source idle this long (capture time) is forgotten: one probe a minute still counts
MAX_EXAMPLES = 5  # evidence flows kept per decision (their community IDs go in the alert)
MAX_SHAPE = 256  # hosts and ports counted per source
# A scan aims: at one port (or a few) of many hosts, or at many ports of one host; a peer-to-peer client's
# failed contacts go to many hosts on as many ports. At least this share of the failed first contacts must
# share one port, or one host.
SCAN_FOCUS = 0.5

SUCCEEDED, FAILED, UNANSWERED, NO_CONTACT = 1, 0, 2, -1
TCP, UDP, ICMP, ICMP6 = 6, 17, 1, 58


def outcome(protocol: int, src_syn: int, dst_syn: int, dst_rst: int, src_packets: int, dst_packets: int,
            answers_seen: bool) -> int:
    """SUCCEEDED, FAILED or NO_CONTACT for one flow seen from its initiator (see the module's docstring)."""
    if protocol == TCP:
        if src_syn:
            if dst_syn:
                return SUCCEEDED
            # a connection that got no answer and sent nothing but SYNs failed, even where the capture shows no
            # answer at all: in a capture of one direction, connections show their data, probes their SYNs
            return FAILED if dst_rst or answers_seen or src_syn >= src_packets else NO_CONTACT
        if src_packets <= 2 and (dst_rst or not dst_packets):  # a lone ACK, FIN or NULL probe, and its retry
            return FAILED
        return NO_CONTACT  # a connection caught after its handshake
    if dst_packets:
        return SUCCEEDED
    return UNANSWERED if answers_seen else NO_CONTACT


@dataclass
class SourceWalk:
    """One source's walk and what it contacted."""

    ratio: float = 0.0  # log-likelihood ratio of "scanner" over "benign" since the walk last started
    last_s: float = 0.0
    contacts: OrderedDict[tuple[str, int, int], int] = field(default_factory=OrderedDict)
    failed: int = 0  # failed first contacts since the walk started
    first_contacts: int = 0
    # the failed first contacts by host and by (port, protocol), at most MAX_SHAPE keys each
    hosts: Counter[str] = field(default_factory=Counter)
    ports: Counter[tuple[int, int]] = field(default_factory=Counter)
    first_ms: int = 0
    last_ms: int = 0
    examples: list[str] = field(default_factory=list)  # community IDs of failed first contacts
    decided_ms: int | None = None  # when the source was decided a scanner


@dataclass(frozen=True)
class ScanDecision:
    """A source just decided a scanner, and the evidence."""

    source: str
    kind: str  # horizontal, vertical or sweep
    failed: int
    first_contacts: int
    hosts: int
    ports: int
    first_ms: int
    decided_ms: int
    examples: tuple[str, ...]
    ratio: float


class ScanTracker:
    """Threshold Random Walk per source, over first contacts; bounded (MAX_SOURCES, MAX_CONTACTS, KEY_TTL_S)."""

    def __init__(self, max_sources: int = MAX_SOURCES, max_contacts: int = MAX_CONTACTS,
                 key_ttl_s: float = KEY_TTL_S) -> None:
        self.max_sources, self.max_contacts, self.key_ttl_s = max_sources, max_contacts, key_ttl_s
        self.sources: OrderedDict[str, SourceWalk] = OrderedDict()
        self.scanners: OrderedDict[str, ScanDecision] = OrderedDict()
        self.now_s = 0.0

    def observe(self, src: str, dst: str, dst_port: int, protocol: int, result: int, first_ms: int,
                community: str | None) -> tuple[bool, ScanDecision | None]:
        """One flow of ``src``: whether it was a first contact (a service it had not contacted), and the
        decision it made (once per source)."""
        if result == NO_CONTACT:
            return False, None
        t = first_ms / 1000.0
        if t > self.now_s:
            self.now_s = t
        walk = self.sources.get(src)
        if walk is None:
            walk = self.sources[src] = SourceWalk(first_ms=first_ms)
            if len(self.sources) > self.max_sources:
                self._expire()
        else:
            self.sources.move_to_end(src)
        walk.last_s = t
        service = (dst, 0 if protocol in (ICMP, ICMP6) else dst_port, protocol)
        if service in walk.contacts:  # a retry, or another connection to a service already contacted
            return False, None
        walk.contacts[service] = result
        if len(walk.contacts) > self.max_contacts:
            walk.contacts.popitem(last=False)
        walk.first_contacts += 1
        if result == SUCCEEDED:
            walk.ratio += SUCCESS_STEP
            if walk.ratio <= BENIGN_AT and walk.decided_ms is None:  # benign so far: the test starts again
                self._restart(walk, first_ms)
            return True, None
        walk.ratio += FAIL_STEP if result == FAILED else FAIL_STEP * UNANSWERED_WEIGHT
        walk.failed += 1
        walk.last_ms = max(walk.last_ms, first_ms)
        if not walk.first_ms or first_ms < walk.first_ms:
            walk.first_ms = first_ms
        if dst in walk.hosts or len(walk.hosts) < MAX_SHAPE:
            walk.hosts[dst] += 1
        if service[1:] in walk.ports or len(walk.ports) < MAX_SHAPE:
            walk.ports[service[1:]] += 1
        if community and len(walk.examples) < MAX_EXAMPLES:
            walk.examples.append(community)
        if walk.decided_ms is None and walk.ratio >= SCANNER_AT and walk.failed >= MIN_FAILED and _shaped(walk):
            walk.decided_ms = first_ms
            decision = ScanDecision(src, _kind(walk), walk.failed, walk.first_contacts, len(walk.hosts),
                                    len(walk.ports), walk.first_ms, first_ms, tuple(walk.examples), walk.ratio)
            self.scanners[src] = decision
            while len(self.scanners) > self.max_sources:
                self.scanners.popitem(last=False)
            return True, decision
        return True, None

    def scanner(self, src: str) -> ScanDecision | None:
        return self.scanners.get(src)

    @staticmethod
    def _restart(walk: SourceWalk, first_ms: int) -> None:
        walk.ratio = 0.0
        walk.failed = walk.first_contacts = 0
        walk.hosts.clear()
        walk.ports.clear()
        walk.examples.clear()
        walk.first_ms = first_ms

    def _expire(self) -> None:
        """Forget sources idle for key_ttl_s, and the least recently active beyond max_sources."""
        horizon = self.now_s - self.key_ttl_s
        while self.sources:
            oldest = next(iter(self.sources.values()))
            if len(self.sources) <= self.max_sources and oldest.last_s >= horizon:
                break
            self.sources.popitem(last=False)

    def tracked(self) -> int:
        return len(self.sources)


def _shaped(walk: SourceWalk) -> bool:
    """Whether the failed first contacts aim as a scan's do (SCAN_FOCUS) rather than spread as a peer-to-peer
    client's."""
    top_port = max(walk.ports.values(), default=0)
    top_host = max(walk.hosts.values(), default=0)
    return max(top_port, top_host) >= SCAN_FOCUS * walk.failed


def _kind(walk: SourceWalk) -> str:
    """A sweep (host discovery: ICMP echo, or a TCP ACK/SYN ping of one port), horizontal (one port or a few,
    many hosts) or vertical (many ports of one host)."""
    protocols = {p for _, p in walk.ports}
    if protocols <= {ICMP, ICMP6}:
        return "sweep"
    top_port = max(walk.ports.values(), default=0)
    top_host = max(walk.hosts.values(), default=0)
    return "vertical" if top_host > top_port else "horizontal"
