"""What a device does, aggregated over all of its flows, and the features the device model reads.

``DeviceActivity`` is updated once per flow with a handful of dict and counter operations (the
per-flow budget is a few microseconds); everything costly happens once per device at the end, in
``device_features``. The features are the one feature list of the device model: training
(iotscan/training/devices.py) and scoring (iotscan/devices/fingerprint.py) both call it.

Features describe behaviour and self-descriptions, never a lab: no addresses, no MACs, no
absolute times, and names that embed a unit's MAC or serial number are generalised first.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Iterable, Mapping
from typing import Any

from iotscan.capture.names import registered_domain

FEATURE_SCHEMA_VERSION = 2  # 2: the model and kind a device reports to its vendor cloud

_MAX_KEYS = 64  # distinct service ports / apps kept per device
_MAX_NAMES = 256  # distinct server names kept per device
_MAX_PEERS = 1024  # distinct peers counted per device
_MAX_VALUES = 16  # distinct user agents, JA4s, DHCP values kept per device
_MAX_IPS = 16
_EPHEMERAL = 49152
PEER_LOCAL, PEER_REMOTE, PEER_GROUP = 0, 1, 2
_NEVER = 1 << 62  # first_ms before any flow
# The flow-record fields add() reads, fetched in one C call.
_FIELDS = operator.itemgetter("bytes", "packets", "first_seen_ms", "last_seen_ms", "duration_ms", "protocol",
                              "src_port", "dst_port", "src2dst_bytes", "dst2src_bytes", "app", "server_name",
                              "ip_version")
_PROTO_NAMES = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmp6", 2: "igmp"}

# Buckets of per-flow histograms; each counts flows, turned into fractions at the end.
_SIZE_BINS = 8  # mean packet size of the flow, 200-byte bins
_PKT_BINS = 8  # log2 of packets per flow
_DUR_BINS = 8  # flow duration, factor-8 bins from <1 ms
_GAP_BINS = 7  # time between flows of one service, factor-8 bins from <1 s


class DeviceActivity:
    """Counters of one local device's flows. Memory is bounded whatever the capture size."""

    __slots__ = (
        "apps", "bytes", "dhcp_fingerprints", "dhcp_hostnames", "dur_bins", "first_ms", "first_start", "flows", "gaps",
        "initiated", "ips", "ipv6", "ja4s", "last_ms", "last_start", "local_peers", "multicast", "names",
        "packets", "pkt_bins", "ports", "remote_flows", "remote_peers", "sends_local", "sent_bytes",
        "served_apps", "size_bins", "source", "sources", "user_agents",
    )

    def __init__(self) -> None:
        self.flows = 0
        self.bytes = 0
        self.packets = 0
        self.sent_bytes = 0
        self.initiated = 0
        self.remote_flows = 0
        self.multicast = 0
        self.ipv6 = 0
        self.first_ms = _NEVER
        self.last_ms = 0
        self.sends_local = False  # sent traffic from a local address: what makes a MAC a device
        self.source = ""  # the capture or interface of the last flow
        self.sources: list[str] = []
        self.ips: dict[str, int] = {}
        self.ports: dict[tuple[int, int, bool], int] = {}  # (proto, service port, device is the server)
        self.apps: dict[str, int] = {}
        self.served_apps: dict[str, int] = {}  # apps of flows in which the device is the server
        self.names: dict[str, int] = {}
        self.remote_peers: set[str] = set()
        self.local_peers: set[str] = set()
        self.user_agents: dict[str, int] = {}
        self.ja4s: dict[str, int] = {}
        self.dhcp_hostnames: dict[str, int] = {}
        self.dhcp_fingerprints: dict[str, int] = {}
        self.size_bins = [0] * _SIZE_BINS
        self.pkt_bins = [0] * _PKT_BINS
        self.dur_bins = [0] * _DUR_BINS
        self.gaps = [0] * _GAP_BINS
        self.last_start: dict[tuple[int, int, bool], int] = {}
        self.first_start: dict[tuple[int, int, bool], int] = {}  # a service's first flow: merge() needs it

    def add(self, r: Mapping[str, Any], as_src: bool, peer_ip: str, peer_kind: int) -> None:
        """Count one flow in which this device is the initiator (as_src) or the responder.

        ``peer_kind``: PEER_LOCAL, PEER_REMOTE or PEER_GROUP (multicast or broadcast). This runs for
        every flow: plain dict and integer operations only.
        """
        (nbytes, npackets, first, last, duration, proto, sport, dport, s2d_bytes, d2s_bytes, app, name,
         version) = _FIELDS(r)
        self.flows += 1
        self.bytes += nbytes
        self.packets += npackets
        if first < self.first_ms:
            self.first_ms = first
        if last > self.last_ms:
            self.last_ms = last
        if as_src:
            self.initiated += 1
            self.sent_bytes += s2d_bytes
            own, peer = sport, dport
        else:
            self.sent_bytes += d2s_bytes
            own, peer = dport, sport
        # The service is the lower port: direction-robust when a capture starts mid-connection.
        server = own < peer
        key = (proto, own, True) if server else (proto, peer if peer < _EPHEMERAL else 0, False)
        ports = self.ports
        if key in ports:
            ports[key] += 1
            starts = self.last_start
            self.gaps[_gap_bin(first - starts[key])] += 1
            starts[key] = first
        elif len(ports) < _MAX_KEYS:
            ports[key] = 1
            self.last_start[key] = self.first_start[key] = first
        else:  # past the cap, one bucket per protocol keeps the protocol mix exact
            other = (proto, -1, False)
            ports[other] = ports.get(other, 0) + 1
        app = app or "Unknown"
        apps = self.apps
        if app in apps:
            apps[app] += 1
        elif len(apps) < _MAX_KEYS:
            apps[app] = 1
        if server:
            _bump(self.served_apps, app)
        elif name:  # a name the device asked for (as a DNS server, names are others' questions)
            names = self.names
            if name in names:
                names[name] += 1
            elif len(names) < _MAX_NAMES:
                names[name] = 1
        if peer_kind == PEER_LOCAL:
            if len(self.local_peers) < _MAX_PEERS:
                self.local_peers.add(peer_ip)
        elif peer_kind == PEER_GROUP:
            self.multicast += 1
        else:
            self.remote_flows += 1
            if len(self.remote_peers) < _MAX_PEERS:
                self.remote_peers.add(peer_ip)
        if version == 6:
            self.ipv6 += 1
        if npackets:
            self.size_bins[min(nbytes // npackets // 200, _SIZE_BINS - 1)] += 1
            self.pkt_bins[min((npackets - 1).bit_length(), _PKT_BINS - 1)] += 1
        # Flow duration in bins of a factor 8: <1 ms, <8 ms, <64 ms, <0.5 s, <4 s, <33 s, <4 min, more.
        self.dur_bins[min((duration.bit_length() + 2) // 3, _DUR_BINS - 1)] += 1
        if as_src:
            if r["ja4"]:
                _bump(self.ja4s, r["ja4"])
            if r["user_agent"]:
                _bump(self.user_agents, r["user_agent"])
            if own == 68:  # a DHCP client's own announcement; a server's reply may rename it
                if r["dhcp_hostname"]:
                    _bump(self.dhcp_hostnames, r["dhcp_hostname"])
                if r["dhcp_fingerprint"]:
                    _bump(self.dhcp_fingerprints, r["dhcp_fingerprint"])

    def seen_in(self, source: str) -> None:
        self.source = source
        if source not in self.sources and len(self.sources) < _MAX_VALUES:
            self.sources.append(source)

    def add_ip(self, ip: str) -> None:
        if ip in self.ips:
            self.ips[ip] += 1
        elif len(self.ips) < _MAX_IPS:
            self.ips[ip] = 1

    def merge(self, later: DeviceActivity) -> None:
        """Add the activity of the same device in a later capture, as if its flows had come after these.

        The device stage counts each capture apart and merges the captures in input order, in one process
        or from many (iotscan.cluster): the same code either way. Where no cap is reached this gives what
        counting all the flows in one table would: sums, and a service's first flow in the later capture
        is timed against its last one here (the gap histogram). Caps apply at the merge as at a flow.
        """
        for name in ("flows", "bytes", "packets", "sent_bytes", "initiated", "remote_flows", "multicast", "ipv6"):
            setattr(self, name, getattr(self, name) + getattr(later, name))
        self.first_ms = min(self.first_ms, later.first_ms)
        self.last_ms = max(self.last_ms, later.last_ms)
        self.sends_local = self.sends_local or later.sends_local
        for source in later.sources:
            self.seen_in(source)
        for ip, count in later.ips.items():
            _add_count(self.ips, ip, count, _MAX_IPS)
        ports, starts = self.ports, self.last_start
        for key, count in later.ports.items():
            if key in ports:
                ports[key] += count
                if key in starts and key in later.first_start:  # not the bucket of the ports past the cap
                    gap = later.first_start[key] - starts[key]
                    self.gaps[_gap_bin(gap)] += 1
                    starts[key] = later.last_start[key]
            elif len(ports) < _MAX_KEYS or key not in later.first_start:
                ports[key] = count
                if key in later.first_start:
                    self.first_start[key], starts[key] = later.first_start[key], later.last_start[key]
            else:  # past the cap, the protocol's bucket
                other = (key[0], -1, False)
                ports[other] = ports.get(other, 0) + count
        for name, cap in _CAPPED_COUNTERS:
            mine = getattr(self, name)
            for value, count in getattr(later, name).items():
                _add_count(mine, value, count, cap)
        for name in ("remote_peers", "local_peers"):
            peers = getattr(self, name)
            for peer in getattr(later, name):
                if len(peers) >= _MAX_PEERS:
                    break
                peers.add(peer)
        for name in ("size_bins", "pkt_bins", "dur_bins", "gaps"):
            bins = getattr(self, name)
            for i, count in enumerate(getattr(later, name)):
                bins[i] += count


# The counters of values kept up to a cap, and the cap (as add() keeps them)
_CAPPED_COUNTERS = (("apps", _MAX_KEYS), ("served_apps", _MAX_VALUES), ("names", _MAX_NAMES),
                    ("user_agents", _MAX_VALUES), ("ja4s", _MAX_VALUES), ("dhcp_hostnames", _MAX_VALUES),
                    ("dhcp_fingerprints", _MAX_VALUES))


def _gap_bin(gap: int) -> int:
    """log2 bins of the time since the service's previous flow: <1 s, <8 s, <1 min, <9 min..."""
    bits = (gap if gap >= 0 else -gap).bit_length()
    return 0 if bits <= 10 else min((bits - 8) // 3, _GAP_BINS - 1)


def _add_count(counter: dict[str, int], value: str, count: int, cap: int) -> None:
    if value in counter:
        counter[value] += count
    elif len(counter) < cap:
        counter[value] = count


def _bump(counter: dict[str, int], value: str) -> None:
    if value in counter:
        counter[value] += 1
    elif len(counter) < _MAX_VALUES:
        counter[value] = 1


# -- generalising names ----------------------------------------------------------------------------

_MAC_IN_TEXT = re.compile(r"(?:[0-9a-f]{2}[:-]){5}[0-9a-f]{2}", re.IGNORECASE)
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.IGNORECASE)
_LONG_DIGITS = re.compile(r"\d{5,}")
# A free-standing run of 6+ hex digits with both letters and digits: a MAC tail, a serial, an id.
_HEX_RUN = re.compile(r"(?<![0-9a-z])(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{6,}(?![0-9a-z])",
                      re.IGNORECASE)


def generalise(value: str, mac: str = "") -> str:
    """A unit-free form of a self-description: MAC suffixes, serials, UUIDs and long numbers become #.

    "ESP_07AEFB" (MAC 5c:cf:7f:07:ae:fb) -> "esp_#", "KEQ0817541" -> "keq#", "HS110(EU)" stays "hs110(eu)".
    """
    text = value.lower()
    if mac:
        hexmac = mac.replace(":", "").replace("-", "").lower()
        for tail in (hexmac, hexmac[2:], hexmac[4:], hexmac[6:], hexmac[8:]):
            if len(tail) >= 4 and tail in text:
                text = text.replace(tail, "#")
    text = _MAC_IN_TEXT.sub("#", text)
    text = _UUID.sub("#", text)
    text = _LONG_DIGITS.sub("#", text)
    text = _HEX_RUN.sub("#", text)
    return re.sub(r"#+", "#", text)


def name_tokens(value: str) -> list[str]:
    """Words of a generalised name: "dch-s150" -> ["dch", "s150"]; "#" and 1-char pieces are dropped."""
    return [t for t in re.split(r"[^a-z0-9]+", value) if len(t) > 1]


# -- features ----------------------------------------------------------------------------------------

NUMERIC_FEATURES: tuple[str, ...] = (
    "frac_tcp", "frac_udp", "frac_icmp", "frac_other_proto", "frac_ipv6", "frac_initiated", "frac_remote",
    "frac_multicast_or_broadcast", "log_bytes_per_flow", "log_packets_per_flow", "mean_packet_size",
    "sent_byte_fraction", "log_distinct_services", "log_distinct_remote_peers", "log_distinct_local_peers",
    "log_distinct_domains", "remote_peers_per_flow", "frac_device_is_server",
    *(f"size_bin_{i}" for i in range(_SIZE_BINS)),
    *(f"packets_bin_{i}" for i in range(_PKT_BINS)),
    *(f"duration_bin_{i}" for i in range(_DUR_BINS)),
    *(f"gap_bin_{i}" for i in range(_GAP_BINS)),
)

# Token families that describe who the device is (used for the "have I seen anything like this" check).
IDENTITY_PREFIXES = ("hostname=", "hostword=", "dhcp_vendor=", "mdns", "ssdp", "ua=", "domain=", "ja4=",
                     "oui=", "dhcp_fp=", "cloud_")


def numeric_features(a: DeviceActivity) -> dict[str, float]:
    """Composition of the device's traffic: fractions and per-flow shapes, not absolute volumes."""
    n = max(a.flows, 1)
    protos: dict[int, int] = {}
    for (proto, _port, _server), count in a.ports.items():
        protos[proto] = protos.get(proto, 0) + count
    tcp, udp = protos.get(6, 0), protos.get(17, 0)
    icmp = protos.get(1, 0) + protos.get(58, 0)
    served = sum(c for (_p, _port, server), c in a.ports.items() if server)
    out: dict[str, float] = {
        "frac_tcp": tcp / n, "frac_udp": udp / n, "frac_icmp": icmp / n,
        "frac_other_proto": (a.flows - tcp - udp - icmp) / n, "frac_ipv6": a.ipv6 / n,
        "frac_initiated": a.initiated / n, "frac_remote": a.remote_flows / n,
        "frac_multicast_or_broadcast": a.multicast / n,
        "log_bytes_per_flow": math.log1p(a.bytes / n), "log_packets_per_flow": math.log1p(a.packets / n),
        "mean_packet_size": a.bytes / max(a.packets, 1) / 1500.0,
        "sent_byte_fraction": a.sent_bytes / max(a.bytes, 1),
        "log_distinct_services": math.log1p(len(a.ports)),
        "log_distinct_remote_peers": math.log1p(len(a.remote_peers)),
        "log_distinct_local_peers": math.log1p(len(a.local_peers)),
        "log_distinct_domains": math.log1p(len({d for d in map(registered_domain, a.names) if d})),
        "remote_peers_per_flow": len(a.remote_peers) / n,
        "frac_device_is_server": served / n,
    }
    for prefix, bins in (("size_bin_", a.size_bins), ("packets_bin_", a.pkt_bins),
                         ("duration_bin_", a.dur_bins)):
        for i, count in enumerate(bins):
            out[f"{prefix}{i}"] = count / n
    gaps = max(sum(a.gaps), 1)
    for i, count in enumerate(a.gaps):
        out[f"gap_bin_{i}"] = count / gaps
    return out


def signal_values(a: DeviceActivity | None,
                  hints: Mapping[str, Mapping[str, int]] | None) -> dict[str, list[str]]:
    """Every self-description of a device by signal, from the flow records and the identity pass."""
    values: dict[str, dict[str, None]] = {}

    def put(signal: str, items: Iterable[str]) -> None:
        bucket = values.setdefault(signal, {})
        for item in items:
            if item:
                bucket.setdefault(item, None)

    if hints:
        for signal, counted in hints.items():
            put(signal, counted)
    if a is not None:
        put("dhcp_hostname", a.dhcp_hostnames)
        put("dhcp_fingerprint", a.dhcp_fingerprints)
        put("user_agent", a.user_agents)
        put("ja4", a.ja4s)
        put("app", a.apps)
        put("server_name", a.names)
        put("domain", (d for d in map(registered_domain, a.names) if d))
        put("listen_port", (f"{_PROTO_NAMES.get(p, p)}/{port}" for (p, port, server) in a.ports if server))
        put("app_server", a.served_apps)
    return {k: list(v) for k, v in values.items() if v}


def device_features(a: DeviceActivity, hints: Mapping[str, Mapping[str, int]] | None, mac: str,
                    oui_org: str | None) -> dict[str, float]:
    """The feature dict of one device: numeric composition plus generalised tokens (value 1 or a fraction).

    ``oui_org`` is the IEEE registry's organisation for the MAC (None when locally administered).
    """
    features = numeric_features(a)
    n = max(a.flows, 1)
    for (proto, port, server), count in a.ports.items():
        kind = "listen" if server else "port"
        features[f"{kind}={_PROTO_NAMES.get(proto, proto)}/{port}"] = count / n
    for app, count in a.apps.items():
        features[f"app={app}"] = count / n
        base = app.split(".", 1)[0]
        features[f"proto={base}"] = features.get(f"proto={base}", 0.0) + count / n
    signals = signal_values(a, hints)
    for signal, items in signals.items():
        for item in items:
            if signal in ("dhcp_hostname", "mdns_host", "mdns_instance", "dhcp_fqdn"):
                general = generalise(item, mac)
                features[f"hostname={general}"] = 1.0
                for word in name_tokens(general):
                    features[f"hostword={word}"] = 1.0
            elif signal == "dhcp_vendor_class":
                features[f"dhcp_vendor={generalise(item, mac)}"] = 1.0
            elif signal == "dhcp_fingerprint":
                features[f"dhcp_fp={item}"] = 1.0
            elif signal == "user_agent" or signal == "ssdp_user_agent":
                features[f"ua={generalise(item, mac)}"] = 1.0
            elif signal == "ja4":
                features[f"ja4={item}"] = 1.0
            elif signal == "domain":
                features[f"domain={item}"] = 1.0
            elif signal == "server_name":
                general = generalise(item, mac)
                if general.endswith(".local"):
                    features[f"mdns_name={general}"] = 1.0
                elif registered_domain(item):
                    features[f"host={re.sub(r'[0-9]+', '#', general)}"] = 1.0
            elif signal.startswith(("mdns_", "ssdp_", "cloud_")):
                features[f"{signal}={generalise(item, mac)}"] = 1.0
    if oui_org:
        features[f"oui={oui_org.lower()}"] = 1.0
    else:
        features["oui=locally-administered"] = 1.0
    return features


# What a device says about itself or whom it names (identity tokens and the server names it resolves):
# left out of the type model's features, which must carry over to models it has not seen.
_NAMING_PREFIXES = (*IDENTITY_PREFIXES, "host=")


def identity_tokens(features: Mapping[str, float]) -> set[str]:
    return {k for k in features if k.startswith(IDENTITY_PREFIXES)}


def behaviour_only(features: Mapping[str, float]) -> dict[str, float]:
    """The features of what a device does (traffic composition, services, protocols), without its names:
    the type model's features."""
    return {k: v for k, v in features.items() if not k.startswith(_NAMING_PREFIXES)}
