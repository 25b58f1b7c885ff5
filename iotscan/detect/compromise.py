"""A compromised device: indicators that hold on any network, combined into one suspicion per host.

An infected IoT device or computer calls its controller, fetches its next stage, scans for more victims
and floods on command; none of that needs to look odd in one flow, and the flow model learnt the
flows of a handful of networks. What holds on any network is behaviour over time, so each local host
gathers evidence of these kinds (in the way Slips accumulates evidence into a threat level), each with
its weight and how strongly it showed:

* ``no_dns`` -- new connections to public addresses that no DNS answer named before (Slips's
  "connection without DNS resolution"): software calls services by name, malware its controllers by
  address. Ports every device uses by address (DNS, NTP, DHCP...) do not count;
* ``protocol`` -- a protocol hosts of an IoT network have no business speaking to the Internet: IRC (bots'
  command channels), outbound telnet (Mirai's propagation), SMTP (spam bots);
* ``raw`` -- such a connection in a protocol nDPI does not know, on a port no Internet service is known by
  (CLOUD_PORTS): a bot's own command channel, where software speaks HTTP, TLS, MQTT or one of the hundreds of
  protocols nDPI names;
* ``fan_out`` -- many distinct public addresses contacted within a few minutes (a device calls a few
  clouds; a bot propagates or floods);
* ``beacon`` -- a channel repeated at regular intervals (RITA's measure). IoT heartbeats are beacons
  (a beacon rule alone flagged 14.6% of benign flows here), so it weighs little and never decides alone;
* ``scan`` -- the host was decided a scanner (iotscan.detect.scans).

A host is decided compromised when its evidence holds at least two different kinds and their weighted
sum reaches SUSPICION_AT: never on one weak indicator. Evidence decays (HALF_LIFE_S), so a device that
once did something odd years ago in capture time is forgiven. State is bounded: MAX_HOSTS local hosts,
MAX_CHANNELS channels each.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field

# Destination ports a host may use by address without asking DNS: DNS itself, NTP, DHCP, SSDP, mDNS, LLMNR,
# NetBIOS, and 0 (protocols without ports)
NO_DNS_NEEDED = frozenset((0, 53, 67, 68, 123, 137, 138, 1900, 5353, 5355))
# Outbound to a public address: IRC, telnet (Mirai's ports), SMTP
SUSPECT_PORTS = {6667: "IRC", 6697: "IRC", 23: "telnet", 2323: "telnet", 25: "SMTP"}
SUSPECT_APPS = ("IRC",)
WEIGHTS = {"scan": 0.7, "protocol": 0.7, "no_dns": 0.5, "raw": 0.4, "fan_out": 0.4, "beacon": 0.3}
# nDPI's names for "no protocol recognised"
UNKNOWN_APPS = frozenset(("", "Unknown"))
# The ports of the Internet's own services, which devices' clouds speak their own protocols over too (a lighting
# hub's binary protocol to its cloud on port 80, by address): an unknown protocol there is no bot's channel
CLOUD_PORTS = frozenset((80, 443, 8080, 8443, 1883, 8883, 5683, 5684))
SUSPICION_AT = 1.0
MIN_KINDS = 2
NO_DNS_FULL = 3  # distinct destinations reached without DNS at which that evidence is at full strength
FAN_OUT_WINDOW_S = 300.0
FAN_OUT_AT = 32  # distinct public addresses within FAN_OUT_WINDOW_S
BEACON_MIN_REPEATS = 6
BEACON_MAX_CV = 0.2  # deviation of the intervals over their mean
BEACON_MIN_INTERVAL_S = 1.0  # faster is a burst of connections, not a beacon
HALF_LIFE_S = 3_600.0
MAX_HOSTS = 4_096
MAX_CHANNELS = 256
MAX_PEERS = 512
MAX_EXAMPLES = 5
KINDS = tuple(WEIGHTS)


@dataclass
class _Channel:
    """A host's repeated connections to one service, for the beacon measure."""

    count: int = 0
    last_s: float = 0.0
    mean: float = 0.0  # running mean of the intervals
    dev: float = 0.0  # running mean absolute deviation


@dataclass
class HostEvidence:
    """One local host's evidence, by kind: strength in [0, 1], decayed since it was last updated."""

    strength: dict[str, float] = field(default_factory=dict)
    updated_s: dict[str, float] = field(default_factory=dict)
    why: dict[str, str] = field(default_factory=dict)
    family: dict[str, str] = field(default_factory=dict)  # the attack family each kind's evidence points to
    no_dns: OrderedDict[tuple[str, int], float] = field(default_factory=OrderedDict)
    peers: OrderedDict[str, float] = field(default_factory=OrderedDict)  # public address -> last contact (s)
    channels: OrderedDict[tuple[str, int, int], _Channel] = field(default_factory=OrderedDict)
    suspect_services: set[tuple[str, int]] = field(default_factory=set)  # what the evidence flows went to
    examples: list[str] = field(default_factory=list)
    first_ms: int = 0
    last_s: float = 0.0
    decided_ms: int | None = None


@dataclass(frozen=True)
class CompromiseDecision:
    host: str
    family: str
    score: float
    reasons: tuple[str, ...]
    kinds: tuple[str, ...]
    evidence: dict[str, float]
    first_ms: int
    decided_ms: int
    examples: tuple[str, ...]


class CompromiseTracker:
    """Evidence per local host, and the decision when it is enough."""

    def __init__(self, max_hosts: int = MAX_HOSTS) -> None:
        self.max_hosts = max_hosts
        self.hosts: OrderedDict[str, HostEvidence] = OrderedDict()
        self.decided: OrderedDict[str, CompromiseDecision] = OrderedDict()

    def host(self, ip: str, first_ms: int) -> HostEvidence:
        ev = self.hosts.get(ip)
        if ev is None:
            ev = self.hosts[ip] = HostEvidence(first_ms=first_ms)
            while len(self.hosts) > self.max_hosts:
                self.hosts.popitem(last=False)
        else:
            self.hosts.move_to_end(ip)
        return ev

    def observe(self, host: str, dst: str, dst_port: int, protocol: int, app: str, first_ms: int, fresh: bool,
                public: bool, resolved: bool | None, community: str | None) -> tuple[str | None,
                                                                                     CompromiseDecision | None]:
        """One flow a local host started: the family of the suspect activity it belongs to (None: none), and the
        decision it made (once per host). ``fresh``: a new connection (its start seen); ``public``: the
        destination is on the Internet; ``resolved``: a DNS answer named it before the flow (None: unknown, as
        for a host that never asked DNS in the capture)."""
        t = first_ms / 1000.0
        ev = self.host(host, first_ms)
        ev.last_s = max(ev.last_s, t)
        evidence: str | None = None
        if public:
            ev.peers[dst] = t
            ev.peers.move_to_end(dst)
            horizon = t - FAN_OUT_WINDOW_S
            while ev.peers and (len(ev.peers) > MAX_PEERS or next(iter(ev.peers.values())) < horizon):
                ev.peers.popitem(last=False)
            if len(ev.peers) >= FAN_OUT_AT:
                self._add(ev, "fan_out", 1.0, t, f"{len(ev.peers)} public addresses within "
                                                  f"{FAN_OUT_WINDOW_S / 60:.0f} minutes", "scan")
                evidence = "scan"
            suspect = SUSPECT_PORTS.get(dst_port) if protocol == 6 else None
            if app.split(".")[0] in SUSPECT_APPS:
                suspect = app.split(".")[0]
            if suspect is not None:
                evidence = "scan" if suspect == "telnet" else "c2"  # telnet out: Mirai's propagation
                self._add(ev, "protocol", 1.0, t, f"{suspect} to the Internet ({dst}:{dst_port})", evidence)
                ev.suspect_services.add((dst, dst_port))
            if fresh and resolved is False and dst_port not in NO_DNS_NEEDED:
                key = (dst, dst_port)
                if key not in ev.no_dns:
                    ev.no_dns[key] = t
                    if len(ev.no_dns) > MAX_CHANNELS:
                        ev.no_dns.popitem(last=False)
                n = len(ev.no_dns)
                self._add(ev, "no_dns", min(1.0, n / NO_DNS_FULL), t,
                          f"{n} public address{'es' if n > 1 else ''} reached without a DNS answer naming "
                          f"{'them' if n > 1 else 'it'} (e.g. {dst}:{dst_port})")
                ev.suspect_services.add(key)
                evidence = evidence or "c2"
                if app.split(".")[0] in UNKNOWN_APPS and dst_port not in CLOUD_PORTS:
                    self._add(ev, "raw", 1.0, t, f"a protocol nDPI does not know, to {dst}:{dst_port} by address")
            if self._beacon(ev, (dst, dst_port, protocol), t):
                ev.suspect_services.add((dst, dst_port))
                evidence = evidence or "c2"
        if evidence and community and len(ev.examples) < MAX_EXAMPLES:
            ev.examples.append(community)
        decision = self._decide(host, ev, first_ms, t)
        if evidence is None and ev.decided_ms is not None and (dst, dst_port) in ev.suspect_services:
            evidence = "c2"
        return evidence, decision

    def scanned(self, host: str, first_ms: int, message: str) -> CompromiseDecision | None:
        """The scan tracker decided ``host`` a scanner: evidence of its own kind."""
        t = first_ms / 1000.0
        ev = self.host(host, first_ms)
        self._add(ev, "scan", 1.0, t, message, "scan")
        return self._decide(host, ev, first_ms, t)

    def _beacon(self, ev: HostEvidence, key: tuple[str, int, int], t: float) -> bool:
        ch = ev.channels.get(key)
        if ch is None:
            ch = ev.channels[key] = _Channel(last_s=t)
            if len(ev.channels) > MAX_CHANNELS:
                ev.channels.popitem(last=False)
            ch.count = 1
            return False
        gap = t - ch.last_s
        if gap <= 0:
            return False
        ch.count += 1
        ch.last_s = t
        if ch.count == 2:
            ch.mean = gap
        else:
            ch.dev += (abs(gap - ch.mean) - ch.dev) / min(ch.count - 1, 8)
            ch.mean += (gap - ch.mean) / min(ch.count - 1, 8)
        if ch.count >= BEACON_MIN_REPEATS and ch.mean >= BEACON_MIN_INTERVAL_S and ch.dev <= BEACON_MAX_CV * ch.mean:
            self._add(ev, "beacon", 1.0, t, f"connections to {key[0]}:{key[1]} every {ch.mean:.0f} s, "
                                            f"{ch.count} times")
            return True
        return False

    @staticmethod
    def _add(ev: HostEvidence, kind: str, strength: float, t: float, why: str, family: str = "c2") -> None:
        if strength >= _decayed(ev, kind, t):
            ev.strength[kind] = strength
            ev.updated_s[kind] = t
            ev.why[kind] = why
            ev.family[kind] = family

    def _decide(self, host: str, ev: HostEvidence, first_ms: int, t: float) -> CompromiseDecision | None:
        if ev.decided_ms is not None:
            return None
        present = {k: _decayed(ev, k, t) for k in ev.strength}
        present = {k: s for k, s in present.items() if s > 0.05}
        score = sum(WEIGHTS[k] * s for k, s in present.items())
        if len(present) < MIN_KINDS or score < SUSPICION_AT:
            return None
        ev.decided_ms = first_ms
        kinds = tuple(sorted(present, key=lambda k: -WEIGHTS[k] * present[k]))
        decision = CompromiseDecision(host, ev.family[kinds[0]], min(1.0, score / (SUSPICION_AT * 2)),
                                      tuple(ev.why[k] for k in kinds), kinds, {k: round(present[k], 2) for k in kinds},
                                      ev.first_ms, first_ms, tuple(ev.examples))
        self.decided[host] = decision
        while len(self.decided) > self.max_hosts:
            self.decided.popitem(last=False)
        return decision


def _decayed(ev: HostEvidence, kind: str, t: float) -> float:
    strength = ev.strength.get(kind, 0.0)
    if not strength:
        return 0.0
    return strength * math.exp(-math.log(2) * max(0.0, t - ev.updated_s[kind]) / HALF_LIFE_S)
