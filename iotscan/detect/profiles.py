"""Device baselines: what each local device normally does, learnt from its flows, kept as plain JSON.

A baseline file (``site.baseline.json``) holds one profile per local device, by MAC: its identity as the
device stage fingerprinted it; its remote peers by name where DNS, SNI or the HTTP host gave one, else by
address, each with the services (protocol/port) and applications it used in each direction; its local
peers; the registered domains it asked DNS about; its flows per hour of the day (UTC); a sample of its
per-minute statistics (``WINDOW_FEATURES``) and the density model fitted on them (iotscan.detect.density).
Nothing in it is a pickle: counts, names, times and the model's numbers, readable and editable.

Learning and scoring read flows through the same code (``flow_sides``, ``Window``), so that what was
learnt and what is compared with it are measured alike. Counts are per flow; everything is bounded
(``MAX_PEERS`` per kind, ``SAMPLE_WINDOWS`` minutes) whatever the capture size.
"""

from __future__ import annotations

import functools
import ipaddress
import math
import os
import random
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson

from iotscan.capture.names import registered_domain
from iotscan.errors import InputError, OutputError
from iotscan.output.records import PROTOCOL_LABELS, is_local_address, iso_timestamp

FORMAT = "iotscan-baseline"
VERSION = 1
WINDOW_MS = 60_000  # the statistics are per device and minute of capture time (by flow end)
SAMPLE_WINDOWS = 512  # minutes kept per device (a uniform reservoir of all its minutes)
MAX_PEERS = 512  # remote peers kept per device (then local ones): the most used first
MAX_ITEMS = 64  # services or applications kept per peer, registered domains per device: the most used
MAX_SOURCES = 64
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_DNS_APPS = frozenset({"DNS", "MDNS", "LLMNR", "NetBIOS"})  # their server_name is the name asked, not the peer's

# (name, meaning, how a reason says it): a device's statistics over one minute, the density model's inputs.
WINDOW_FEATURES: tuple[tuple[str, str, str], ...] = (
    ("flows_out", "flows the device started", "{} flows started"),
    ("flows_in", "flows other hosts started with the device", "{} flows received"),
    ("peers_out", "distinct addresses it contacted", "{} distinct destinations"),
    ("services_out", "distinct protocol/port pairs it contacted", "{} distinct destination ports"),
    ("unanswered_out", "flows it started that got no answer", "{} unanswered flows"),
    ("peers_in", "distinct addresses that contacted it", "{} distinct hosts contacting it"),
    ("packets_out", "packets it sent", "{} packets sent"),
    ("bytes_out", "bytes it sent", "{} bytes sent"),
    ("bytes_in", "bytes it received", "{} bytes received"),
)
FEATURE_NAMES = tuple(name for name, _, _ in WINDOW_FEATURES)
N_FEATURES = len(WINDOW_FEATURES)
_SET_CAP = 4096  # distinct addresses or ports remembered per minute (a flood's spoofed sources are endless)


DYNAMIC_PORTS = 49152  # IANA's dynamic range: a client's own ports, or a long connection NFStream cut in two


@functools.lru_cache(maxsize=65536)  # per flow, of few distinct values: cached
def service_key(protocol: int, port: int) -> str:
    """"tcp/443", "udp/53", "tcp/dynamic" (ports from 49152: nobody's service); "icmp" or "proto/47" for
    protocols without ports."""
    label = PROTOCOL_LABELS.get(protocol)
    if protocol in (6, 17, 132):
        return f"{label}/{port}" if port < DYNAMIC_PORTS else f"{label}/dynamic"
    return label or f"proto/{protocol}"


@functools.lru_cache(maxsize=65536)
def clean_name(name: str | None) -> str | None:
    """A peer's name as a baseline keeps it: lower case, no trailing dot or port; None for an address."""
    if not name:
        return None
    name = name.strip().lower().rstrip(".")
    if name.startswith("[") or name.count(":") > 1:  # an IPv6 literal
        return None
    name = name.split(":", 1)[0]
    if not name or "." not in name or name.replace(".", "").isdigit():
        return None
    return name


class Side:
    """One local device's view of a flow: who started it (``out``: the device, as far as the ports tell), the
    peer and what was used."""

    __slots__ = ("app", "device", "is_src", "named", "out", "peer", "peer_ip", "remote", "service")

    def __init__(self, device: str, out: bool, is_src: bool, peer: str, peer_ip: str, remote: bool, named: bool,
                 service: str, app: str | None) -> None:
        self.device, self.out, self.is_src, self.peer, self.peer_ip = device, out, is_src, peer, peer_ip
        self.remote, self.named, self.service, self.app = remote, named, service, app


NameOf = Callable[[str, str], "str | None"]  # (client address, peer address) -> the name DNS gave it


@functools.lru_cache(maxsize=65536)
def local_scope(ip: str) -> bool:
    """A peer on the local network: a local address, multicast, or the limited broadcast."""
    if is_local_address(ip) or ip == "255.255.255.255":
        return True
    try:
        return ipaddress.ip_address(ip).is_multicast
    except ValueError:
        return False


def flow_sides(r: dict[str, Any], name_of: NameOf | None) -> list[Side]:
    """The profiled views of a flow record: one per end that is a local device (the device stage's
    ``src_device``/``dst_device``).

    NFStream's initiator is whoever sent the flow's first packet seen: a reply split from its request (a
    long connection idle past the time-out, a VLAN tag on one direction) starts at the server. So a flow from
    a well-known port to a client's port (below 1024 to 1024 or above, or to the dynamic range) is read the
    other way round: its service is the lower port."""
    sides = []
    app = r["app"]
    base = _app_base(app) if app and not r["app_guessed"] else None
    protocol, sport, dport = r["protocol"], r["src_port"], r["dst_port"]
    reply = protocol in (6, 17) and ((sport < 1024 <= dport) or (sport < DYNAMIC_PORTS <= dport))
    service = service_key(protocol, sport if reply else dport)
    for is_src in (True, False):
        device = r.get("src_device") if is_src else r.get("dst_device")
        if device is None:
            continue
        out = is_src != reply
        peer_ip, peer_device = (r["dst_ip"], r.get("dst_device")) if is_src else (r["src_ip"], r.get("src_device"))
        remote = False
        named = False
        if peer_device is not None:
            peer = peer_device
        elif local_scope(peer_ip):
            peer = peer_ip
        else:
            remote = True
            name = clean_name(r["server_name"]) if out and base not in _DNS_APPS else None
            if name is None and name_of is not None:
                name = clean_name(name_of(r["src_ip"] if is_src else r["dst_ip"], peer_ip))
            named = name is not None
            peer = name or peer_ip
        sides.append(Side(device, out, is_src, peer, peer_ip, remote, named, service, base))
    return sides


@functools.lru_cache(maxsize=4096)
def _app_base(app: str) -> str | None:
    """nDPI's master protocol of "TLS.Google" ("TLS"); None for "Unknown"."""
    base = app.split(".", 1)[0]
    return None if base == "Unknown" else base


def dns_domain(side: Side, r: dict[str, Any]) -> str | None:
    """The registered domain a device's DNS query flow asked about."""
    app = r["app"]
    if side.out and side.service in ("udp/53", "tcp/53") and app and app.split(".", 1)[0] == "DNS" \
            and r["server_name"]:
        return registered_domain(r["server_name"])
    return None


class Window:
    """One device's statistics over one minute (WINDOW_FEATURES), as flows ending in it come."""

    __slots__ = ("counts", "index", "outside", "peers_in", "peers_out", "services_out")

    def __init__(self, index: int) -> None:
        self.index = index
        self.counts = [0] * N_FEATURES
        self.outside = False  # whether the counts left the device's envelope (scoring: iotscan.detect.baseline)
        self.peers_out: set[str] = set()
        self.services_out: set[str] = set()
        self.peers_in: set[str] = set()

    def add(self, side: Side, r: dict[str, Any]) -> None:
        c = self.counts
        sent_packets, sent, received = (r["src2dst_packets"], r["src2dst_bytes"], r["dst2src_bytes"]) if side.is_src \
            else (r["dst2src_packets"], r["dst2src_bytes"], r["src2dst_bytes"])
        c[6] += sent_packets
        c[7] += sent
        c[8] += received
        if side.out:
            c[0] += 1
            if len(self.peers_out) < _SET_CAP:
                self.peers_out.add(side.peer_ip)
            c[2] = len(self.peers_out)
            if len(self.services_out) < _SET_CAP:
                self.services_out.add(side.service)
            c[3] = len(self.services_out)
            if side.is_src and not r["dst2src_packets"]:
                c[4] += 1
        else:
            c[1] += 1
            if len(self.peers_in) < _SET_CAP:
                self.peers_in.add(side.peer_ip)
            c[5] = len(self.peers_in)


def window_of(r: dict[str, Any]) -> int:
    return r["last_seen_ms"] // WINDOW_MS


# -- learning ---------------------------------------------------------------------------------------------


class DeviceTally:
    """What learning counts of one device's flows; ``profile()`` turns it into its JSON form."""

    __slots__ = (
        "days",
        "dns",
        "first_ms",
        "flows",
        "hours",
        "last_ms",
        "local",
        "remote",
        "rng",
        "sample",
        "seen_windows",
        "window",
    )

    def __init__(self, seed: str) -> None:
        self.flows = 0
        self.first_ms = 0
        self.last_ms = 0
        self.remote: dict[str, dict[str, Any]] = {}
        self.local: dict[str, dict[str, Any]] = {}
        self.dns: dict[str, int] = {}
        self.hours = [0] * 24
        self.days: set[int] = set()
        self.window: Window | None = None
        self.sample: list[list[int]] = []
        self.seen_windows = 0
        self.rng = random.Random(seed)  # the reservoir's: the same captures give the same file

    def add(self, side: Side, r: dict[str, Any]) -> None:
        ms = r["last_seen_ms"]
        if not self.flows or r["first_seen_ms"] < self.first_ms:
            self.first_ms = r["first_seen_ms"]
        self.last_ms = max(self.last_ms, ms)
        self.flows += 1
        self.hours[(ms // 3_600_000) % 24] += 1
        self.days.add(ms // 86_400_000)
        peers = self.remote if side.remote else self.local
        peer = peers.get(side.peer)
        if peer is None:
            if len(peers) >= 4 * MAX_PEERS:  # learning keeps more than it writes: the most used are written
                return
            peer = peers[side.peer] = {"out": {}, "in": {}, "apps": {}, "first_ms": r["first_seen_ms"],
                                       "last_ms": ms, "named": side.named}
        services = peer["out" if side.out else "in"]
        services[side.service] = services.get(side.service, 0) + 1
        if side.app:
            peer["apps"][side.app] = peer["apps"].get(side.app, 0) + 1
        peer["first_ms"] = min(peer["first_ms"], r["first_seen_ms"])
        peer["last_ms"] = max(peer["last_ms"], ms)
        if side.out:
            domain = dns_domain(side, r)
            if domain is not None:
                self.dns[domain] = self.dns.get(domain, 0) + 1
        index = ms // WINDOW_MS
        window = self.window
        if window is None or index > window.index:
            if window is not None:
                self.close_window()
            window = self.window = Window(index)
        window.add(side, r)

    def close_window(self) -> None:
        """Keep the minute in the reservoir (Algorithm R: every minute equally likely to stay)."""
        if self.window is None:
            return
        self.seen_windows += 1
        if len(self.sample) < SAMPLE_WINDOWS:
            self.sample.append(list(self.window.counts))
        else:
            j = self.rng.randrange(self.seen_windows)
            if j < SAMPLE_WINDOWS:
                self.sample[j] = list(self.window.counts)
        self.window = None

    def profile(self) -> dict[str, Any]:
        self.close_window()
        return {
            "identity": {},
            "first_seen": iso_timestamp(self.first_ms), "last_seen": iso_timestamp(self.last_ms),
            "days_active": len(self.days), "flows": self.flows,
            "remote": _peers_json(self.remote, MAX_PEERS), "local": _peers_json(self.local, MAX_PEERS),
            "dns": _top(self.dns, 4 * MAX_ITEMS),
            "hours": list(self.hours),
            "windows": {"count": self.seen_windows, "sample": self.sample},
        }


def _top(counts: dict[str, int], n: int) -> dict[str, int]:
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n])


def _peer_flows(peer: dict[str, Any]) -> int:
    return sum(peer["out"].values()) + sum(peer["in"].values())


def _peers_json(peers: dict[str, dict[str, Any]], n: int) -> dict[str, dict[str, Any]]:
    ranked = sorted(peers.items(), key=lambda kv: (-_peer_flows(kv[1]), kv[0]))[:n]
    out = {}
    for key, p in ranked:
        entry: dict[str, Any] = {"out": _top(p["out"], MAX_ITEMS), "in": _top(p["in"], MAX_ITEMS),
                                 "apps": _top(p["apps"], MAX_ITEMS),
                                 "first_seen": iso_timestamp(p["first_ms"]), "last_seen": iso_timestamp(p["last_ms"])}
        if "named" in p and not _MAC.match(key):
            entry["by"] = "name" if p["named"] else "address"
        out[key] = entry
    return out


# -- merging (learning again over new captures) --------------------------------------------------------------


def _add_counts(a: dict[str, int], b: dict[str, int], n: int) -> dict[str, int]:
    merged = dict(a)
    for k, v in b.items():
        merged[k] = merged.get(k, 0) + v
    return _top(merged, n)


def _merge_peers(a: dict[str, dict[str, Any]], b: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    merged = {k: dict(v) for k, v in a.items()}
    for key, p in b.items():
        q = merged.get(key)
        if q is None:
            merged[key] = dict(p)
            continue
        q["out"] = _add_counts(q["out"], p["out"], MAX_ITEMS)
        q["in"] = _add_counts(q["in"], p["in"], MAX_ITEMS)
        q["apps"] = _add_counts(q["apps"], p["apps"], MAX_ITEMS)
        q["first_seen"] = min(q["first_seen"], p["first_seen"])
        q["last_seen"] = max(q["last_seen"], p["last_seen"])
        if "by" in q or "by" in p:
            q["by"] = "name" if "name" in (q.get("by"), p.get("by")) else "address"
    ranked = sorted(merged.items(), key=lambda kv: (-_peer_flows(kv[1]), kv[0]))[:MAX_PEERS]
    return dict(ranked)


def merge_windows(a: dict[str, Any], b: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """Two uniform samples of minutes as one uniform sample of their union (each side drawn in proportion to
    the minutes it stands for)."""
    na, nb = a["count"], b["count"]
    sa, sb = list(a["sample"]), list(b["sample"])
    if len(sa) + len(sb) <= SAMPLE_WINDOWS:
        return {"count": na + nb, "sample": sa + sb}
    take_a = round(SAMPLE_WINDOWS * na / max(1, na + nb))
    take_a = min(len(sa), max(SAMPLE_WINDOWS - len(sb), take_a))
    return {"count": na + nb, "sample": rng.sample(sa, take_a) + rng.sample(sb, min(len(sb), SAMPLE_WINDOWS - take_a))}


def merge_profiles(a: dict[str, Any], b: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """Profile ``a`` updated with ``b`` (learnt later, or elsewhere); the model is fitted again by the caller."""
    identity = dict(a.get("identity") or {})
    for k, v in (b.get("identity") or {}).items():
        if v not in (None, "", [], "unknown") or k not in identity:
            identity[k] = v
    return {
        "identity": identity,
        "first_seen": min(a["first_seen"], b["first_seen"]), "last_seen": max(a["last_seen"], b["last_seen"]),
        "days_active": a["days_active"] + b["days_active"], "flows": a["flows"] + b["flows"],
        "remote": _merge_peers(a["remote"], b["remote"]), "local": _merge_peers(a["local"], b["local"]),
        "dns": _add_counts(a["dns"], b["dns"], 4 * MAX_ITEMS),
        "hours": [x + y for x, y in zip(a["hours"], b["hours"], strict=True)],
        "windows": merge_windows(a["windows"], b["windows"], rng),
    }


def new_baseline() -> dict[str, Any]:
    return {"format": FORMAT, "version": VERSION, "generator": "", "updated": "", "span": None, "sources": [],
            "window_s": WINDOW_MS // 1000, "features": list(FEATURE_NAMES), "devices": {}}


def merge_baselines(old: dict[str, Any], new: dict[str, Any], fit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """``old`` updated with what ``new`` learnt (its span, sources, devices); ``fit`` refits a changed profile."""
    rng = random.Random("iotscan-baseline-merge")
    out = dict(old)
    devices = dict(old["devices"])
    for mac, profile in new["devices"].items():
        devices[mac] = merge_profiles(devices[mac], profile, rng) if mac in devices else profile
        fit(devices[mac])
    out["devices"] = dict(sorted(devices.items()))
    spans = [s for s in (old.get("span"), new.get("span")) if s]
    if spans:
        first, last = min(s["first_seen"] for s in spans), max(s["last_seen"] for s in spans)
        out["span"] = span_json(first, last)
    out["sources"] = list(dict.fromkeys([*old.get("sources", []), *new.get("sources", [])]))[-MAX_SOURCES:]
    return out


def span_json(first: str, last: str) -> dict[str, Any]:
    days = (parse_time(last) - parse_time(first)) / 86_400_000
    return {"first_seen": first, "last_seen": last, "days": round(days, 3)}


def parse_time(text: str) -> int:
    """ISO 8601 UTC as iotscan writes it ("2021-03-08T15:22:15.831Z") to epoch milliseconds."""
    import calendar

    date, _, rest = text.partition("T")
    clock, _, fraction = rest.rstrip("Z").partition(".")
    moment = time.strptime(f"{date}T{clock}", "%Y-%m-%dT%H:%M:%S")
    return calendar.timegm(moment) * 1000 + int((fraction + "000")[:3] or 0)


# -- the file: load, check, save ----------------------------------------------------------------------------


class BadBaseline(InputError):
    """A baseline file that cannot be used: one line saying where and what."""


def _fail(path: str, where: str, what: str) -> BadBaseline:
    return BadBaseline(f"{path}: {where}: {what}" if where else f"{path}: {what}")


def _check_counts(path: str, where: str, value: Any) -> None:
    if not isinstance(value, dict):
        raise _fail(path, where, f"must be an object of counts, not {type(value).__name__}")
    for k, v in value.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise _fail(path, f"{where}[{k!r}]", f"must be a count (a whole number >= 0), not {v!r}")


def _check_time(path: str, where: str, value: Any) -> None:
    try:
        parse_time(value)
    except (TypeError, ValueError, AttributeError):
        raise _fail(path, where, f"must be an ISO 8601 UTC time like 2024-05-01T12:00:00.000Z, not {value!r}") \
            from None


def _check_peers(path: str, where: str, peers: Any) -> None:
    if not isinstance(peers, dict):
        raise _fail(path, where, "must be an object of peers")
    for key, p in peers.items():
        at = f"{where}[{key!r}]"
        if not isinstance(p, dict):
            raise _fail(path, at, "must be an object")
        for field in ("out", "in", "apps"):
            _check_counts(path, f"{at}.{field}", p.get(field, {}))
        for field in ("first_seen", "last_seen"):
            _check_time(path, f"{at}.{field}", p.get(field))
        if p.get("by", "name") not in ("name", "address"):
            raise _fail(path, f"{at}.by", f"must be \"name\" or \"address\", not {p.get('by')!r}")


def check_profile(path: str, mac: str, d: Any) -> None:
    """Every field scoring reads, with its type; the first problem is the error."""
    where = f"devices[{mac!r}]"
    if not _MAC.match(mac):
        raise _fail(path, where, "a device is named by its MAC address in lower case (aa:bb:cc:dd:ee:ff)")
    if not isinstance(d, dict):
        raise _fail(path, where, "must be an object")
    for field in ("first_seen", "last_seen"):
        _check_time(path, f"{where}.{field}", d.get(field))
    for field in ("flows", "days_active"):
        v = d.get(field)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise _fail(path, f"{where}.{field}", f"must be a whole number >= 0, not {v!r}")
    if not isinstance(d.get("identity", {}), dict):
        raise _fail(path, f"{where}.identity", "must be an object")
    _check_peers(path, f"{where}.remote", d.get("remote"))
    _check_peers(path, f"{where}.local", d.get("local"))
    _check_counts(path, f"{where}.dns", d.get("dns", {}))
    hours = d.get("hours")
    if not isinstance(hours, list) or len(hours) != 24 or not all(
            isinstance(h, int) and not isinstance(h, bool) and h >= 0 for h in hours):
        raise _fail(path, f"{where}.hours", "must be a list of 24 counts (flows per hour of the day, UTC)")
    windows = d.get("windows")
    if not isinstance(windows, dict) or not isinstance(windows.get("count"), int) \
            or not isinstance(windows.get("sample"), list):
        raise _fail(path, f"{where}.windows", "must be {\"count\": minutes, \"sample\": [[...], ...]}")
    for i, row in enumerate(windows["sample"]):
        if not isinstance(row, list) or len(row) != N_FEATURES or not all(
                isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in row):
            raise _fail(path, f"{where}.windows.sample[{i}]",
                        f"must be {N_FEATURES} counts ({', '.join(FEATURE_NAMES)})")


def check_baseline(path: str, doc: Any) -> dict[str, Any]:
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise _fail(path, "", f"not an iotscan baseline (no \"format\": \"{FORMAT}\"); make one with "
                              "`iotscan baseline learn`")
    if doc.get("version") != VERSION:
        raise _fail(path, "version", f"this iotscan reads baseline version {VERSION}, not {doc.get('version')!r}")
    if doc.get("window_s") != WINDOW_MS // 1000:
        raise _fail(path, "window_s", f"must be {WINDOW_MS // 1000} (the minute its statistics are counted over)")
    if doc.get("features") != list(FEATURE_NAMES):
        raise _fail(path, "features", f"must be {list(FEATURE_NAMES)}")
    devices = doc.get("devices")
    if not isinstance(devices, dict):
        raise _fail(path, "devices", "must be an object of device profiles by MAC")
    from iotscan.detect.density import check_model  # the model's own fields

    for mac, d in devices.items():
        check_profile(path, mac, d)
        if d.get("model") is not None:
            try:
                check_model(d["model"])
            except ValueError as exc:
                raise _fail(path, f"devices[{mac!r}].model", str(exc)) from None
    return doc


def read_json(path: str | os.PathLike[str]) -> Any:
    """A JSON file the user gave (a baseline or a MUD file); unreadable or not JSON is a one-line InputError."""
    name = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise InputError(f"{name}: cannot read the baseline: {exc.strerror or exc}") from None
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise BadBaseline(f"{name}: not valid JSON: {exc}") from None


def load_baseline(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check a baseline file; a bad one is a one-line InputError (exit 2)."""
    return check_baseline(str(path), read_json(path))


def save_baseline(doc: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write atomically (a temporary file renamed over the old one): a reader never sees half a file."""
    from iotscan import __version__

    doc["generator"] = f"iotscan {__version__}"
    doc["updated"] = iso_timestamp(int(time.time() * 1000))
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")
        tmp.replace(target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{target}: cannot write the baseline: {exc.strerror or exc}") from None


# -- the profile as scoring reads it ------------------------------------------------------------------------


def missing_mass(counts: Iterator[int] | list[int]) -> float:
    """Good-Turing: how likely the next observation is something never seen -- the share of observations that
    were the only one of their kind (smoothed: a device seen little is not sure of anything)."""
    total = once = 0
    for c in counts:
        total += c
        once += c == 1
    return (once + 1) / (total + 2)


def prefix_of(ip: str) -> str:
    """An address's /24 (IPv4) or /48 (IPv6): cloud services move within their blocks."""
    if ":" in ip:
        return ":".join(ip.split(":")[:3])
    return ip.rpartition(".")[0]


class DeviceProfile:
    """One device's profile, with what scoring asks of it computed once."""

    def __init__(self, mac: str, d: dict[str, Any], model: Any = None) -> None:
        self.mac = mac
        self.doc = d
        self.identity = d.get("identity") or {}
        self.flows = d["flows"]
        self.first_ms, self.last_ms = parse_time(d["first_seen"]), parse_time(d["last_seen"])
        self.days = max((self.last_ms - self.first_ms) / 86_400_000, 0.0)
        remote, local = d["remote"], d["local"]
        self.remote_names = {k for k, p in remote.items() if p.get("by", "name") == "name" and clean_name(k)}
        self.remote_addresses = set(remote) - self.remote_names
        self.domains = {registered_domain(k) for k in self.remote_names} - {None}
        self.prefixes = {prefix_of(k) for k in self.remote_addresses}
        self.local = set(local)
        self.services = {True: _sum_counts(p["out"] for p in (*remote.values(), *local.values())),
                         False: _sum_counts(p["in"] for p in (*remote.values(), *local.values()))}
        self.peer_services: dict[str, tuple[set[str], set[str]]] = {
            k: (set(p["out"]), set(p["in"])) for k, p in (*remote.items(), *local.items())}
        self.apps = _sum_counts(p["apps"] for p in (*remote.values(), *local.values()))
        self.remote_in = any(p["in"] for p in remote.values())
        remote_flows = sum(_peer_flows(p) for p in remote.values())
        named_flows = sum(_peer_flows(remote[k]) for k in self.remote_names)
        self.named_share = named_flows / remote_flows if remote_flows else 0.0
        self.dns = set(d.get("dns", {}))
        # how surprising something new is for this device (Good-Turing over its own history)
        self.novel_remote = missing_mass([_peer_flows(p) for p in remote.values()])
        self.novel_local = missing_mass([_peer_flows(p) for p in local.values()])
        self.novel_service = {True: missing_mass(list(self.services[True].values())),
                              False: missing_mass(list(self.services[False].values()))}
        self.novel_app = missing_mass(list(self.apps.values()))
        self.novel_dns = missing_mass(list(d.get("dns", {}).values()))
        hours = d["hours"]
        self.quiet_hours = {h for h in range(24) if not hours[h]} if d["days_active"] >= 3 else set()
        self.model = model
        self.memo: dict[tuple[Any, ...], Any] = {}  # the scoring stage's, per side (iotscan.detect.baseline)


def _sum_counts(parts: Iterator[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for counts in parts:
        for k, v in counts.items():
            total[k] = total.get(k, 0) + v
    return total


def days_text(days: float) -> str:
    """"14 days", "5 hours", "1 minute"."""
    if days >= 2:
        return f"{days:.0f} days"
    hours = days * 24
    if hours >= 2:
        return f"{hours:.0f} hours"
    minutes = max(1, round(hours * 60))
    return f"{minutes} minute{'s' if minutes > 1 else ''}"


def is_mac(text: str) -> bool:
    return bool(_MAC.match(text))


def quantile(values: list[float], q: float) -> float:
    """The q-quantile of values (linear interpolation, as numpy's default)."""
    if not values:
        return 0.0
    s = sorted(values)
    pos = (len(s) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)
