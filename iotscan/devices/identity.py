"""The identity pass: what devices say about themselves in DHCP, mDNS, SSDP and cloud hellos.

nDPI (through NFStream) gives the DHCP hostname and parameter list on the main pass, but not the
DHCP vendor class, mDNS service and instance names, TXT hints, SSDP/UPnP headers or the model a
device reports to its vendor's cloud. Reading payloads needs a Python plugin, and a plugin on the
main pass runs for every packet (+57% time). So these are read by a second pass over the same file
(on an interface, a second capture of it) that a BPF filter limits to UDP 67/68, 5353, 1900 and
8765 (Edimax's cloud): libpcap drops everything else in C, and the plugin sees only the few packets
that matter.

The parsers read untrusted bytes: every packet is parsed inside a catch-all, so a malformed packet
costs its own hints and nothing else, and each flow keeps a bounded number of hints.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from nfstream.plugin import NFPlugin

from iotscan.capture.packets import read_dns_name, udp_payload
from iotscan.capture.side_pass import SidePass, side_pass
from iotscan.capture.source import MeterConfig
from iotscan.output.records import is_local_address

EDIMAX_CLOUD_PORT = 8765
IDENTITY_PORTS = (67, 68, 5353, 1900, EDIMAX_CLOUD_PORT)
IDENTITY_FILTER = "udp and (" + " or ".join(f"port {p}" for p in IDENTITY_PORTS) + ")"

MAX_PACKETS_PER_FLOW = 64  # packets parsed per flow; announcements repeat, the first ones tell all
MAX_HINTS_PER_FLOW = 48
MAX_VALUE_CHARS = 160
MAX_VALUES_PER_SIGNAL = 24  # per device, when hints are merged
MAX_MACS = 4096  # devices with hints (the device stage tracks as many)
_MAX_RECORDS = 64  # DNS questions + records read per mDNS packet

# TXT keys that describe a product, not a unit (ids, serials and addresses are left out).
MDNS_TXT_KEYS = frozenset({
    "md", "model", "mdl", "modelid", "manufacturer", "mf", "ty", "product", "am", "rpmd", "vendor", "vn",
    "dt", "devtype", "type", "usb_mfg", "usb_mdl", "ct", "ci", "fv",
})
# SSDP headers whose value describes the product; others are recorded by name only.
_SSDP_VALUE_HEADERS = {"server": "ssdp_server", "user-agent": "ssdp_user_agent",
                       "x-user-agent": "ssdp_user_agent", "nt": "ssdp_nt", "st": "ssdp_st"}
_SSDP_STANDARD = frozenset({"host", "cache-control", "location", "nts", "usn", "man", "mx", "date", "ext",
                            "content-length", "bootid.upnp.org", "configid.upnp.org", "searchport.upnp.org",
                            "opt", "01-nls", "server", "user-agent", "x-user-agent", "nt", "st"})
_SERVICE_RE = re.compile(r"(?:^|\.)(_[a-z0-9-]{1,40}\._(?:tcp|udp))(?:\.|$)")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
_DHCP_MAGIC = b"\x63\x82\x53\x63"
_DNS_HEADER = struct.Struct("!HHHHHH")
_RR = struct.Struct("!HHIH")


def clean(value: str | bytes) -> str:
    """A printable, bounded string from untrusted bytes."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    return _CONTROL.sub(" ", value).strip()[:MAX_VALUE_CHARS]


# -- DHCP ----------------------------------------------------------------------------------------


def parse_dhcp(payload: bytes) -> list[tuple[str, str, str]]:
    """Hints of a DHCP client message: [(client MAC, signal, value)]. Server messages give none."""
    if len(payload) < 240 or payload[0] != 1 or payload[236:240] != _DHCP_MAGIC:
        return []
    hlen = payload[2]
    if payload[1] != 1 or hlen != 6:  # Ethernet client hardware addresses only
        return []
    mac = ":".join(f"{b:02x}" for b in payload[28:34])
    hints: list[tuple[str, str, str]] = []
    i, end = 240, len(payload)
    while i < end:
        code = payload[i]
        if code == 255:
            break
        if code == 0:
            i += 1
            continue
        if i + 1 >= end:
            break
        length = payload[i + 1]
        data = payload[i + 2:i + 2 + length]
        i += 2 + length
        if code == 12 and data:
            hints.append((mac, "dhcp_hostname", clean(data)))
        elif code == 60 and data:
            hints.append((mac, "dhcp_vendor_class", clean(data)))
        elif code == 55 and data:
            hints.append((mac, "dhcp_fingerprint", ",".join(str(b) for b in data)))
        elif code == 81 and len(data) > 3:
            hints.append((mac, "dhcp_fqdn", clean(data[3:])))
        elif code == 77 and data:
            hints.append((mac, "dhcp_user_class", clean(data)))
    return [h for h in hints if h[2]]


# -- mDNS ----------------------------------------------------------------------------------------


def _service_of(name: str) -> str | None:
    match = _SERVICE_RE.search(name.lower())
    if match and match.group(1) != "_services._dns-sd._udp":
        return match.group(1)
    return None


def _instance_of(name: str) -> str | None:
    """"Philips Hue - 1A2B3C._hue._tcp.local" -> "Philips Hue - 1A2B3C"."""
    match = _SERVICE_RE.search(name.lower())
    if match and match.start() > 0:
        return name[:match.start()]
    return None


def parse_mdns(payload: bytes) -> list[tuple[str, str]]:
    """Hints of an mDNS message: [(signal, value)] for the sender."""
    if len(payload) < 12:
        return []
    _id, flags, qd, an, ns, ar = _DNS_HEADER.unpack_from(payload, 0)
    is_response = bool(flags & 0x8000)
    hints: list[tuple[str, str]] = []
    offset = 12
    for _ in range(min(qd, _MAX_RECORDS)):
        name, offset = read_dns_name(payload, offset)
        offset += 4
        service = _service_of(name)
        if service and not is_response:
            hints.append(("mdns_query", service))
    for _ in range(min(an + ns + ar, _MAX_RECORDS)):
        if offset + 10 > len(payload):
            break
        name, offset = read_dns_name(payload, offset)
        if offset + 10 > len(payload):
            break
        rtype, _cls, _ttl, rdlength = _RR.unpack_from(payload, offset)
        offset += 10
        rdata_at, offset = offset, offset + rdlength
        if offset > len(payload):
            break
        if rtype == 12:  # PTR: service type -> instance
            target, _ = read_dns_name(payload, rdata_at)
            if name.lower().startswith("_services._dns-sd._udp"):
                service = _service_of(target)
                if service:
                    hints.append(("mdns_service", service))
            else:
                service = _service_of(name) or _service_of(target)
                if service:
                    hints.append(("mdns_service", service))
                instance = _instance_of(target)
                if instance:
                    hints.append(("mdns_instance", clean(instance)))
        elif rtype == 33 and rdlength > 6:  # SRV: instance -> host
            service = _service_of(name)
            if service:
                hints.append(("mdns_service", service))
            instance = _instance_of(name)
            if instance:
                hints.append(("mdns_instance", clean(instance)))
            target, _ = read_dns_name(payload, rdata_at + 6)
            if target:
                hints.append(("mdns_host", clean(target.removesuffix(".local"))))
        elif rtype == 16:  # TXT: product hints
            i = rdata_at
            while i < offset:
                length = payload[i]
                item = payload[i + 1:i + 1 + length]
                i += 1 + length
                key, sep, value = item.partition(b"=")
                if sep and value and key.lower().decode("ascii", errors="replace") in MDNS_TXT_KEYS:
                    hints.append(("mdns_txt", clean(key.lower() + b"=" + value)))
        elif rtype in (1, 28) and is_response and name.lower().endswith(".local"):
            host = name[:-len(".local")]
            if host and "." not in host:
                hints.append(("mdns_host", clean(host)))
    return [h for h in hints if h[1]]


# -- SSDP ----------------------------------------------------------------------------------------


def parse_ssdp(payload: bytes) -> list[tuple[str, str]]:
    """Hints of an SSDP message: [(signal, value)] for the sender."""
    head = payload[:12].upper()
    if not (head.startswith(b"NOTIFY") or head.startswith(b"M-SEARCH") or head.startswith(b"HTTP/")):
        return []
    searching = head.startswith(b"M-SEARCH")
    hints: list[tuple[str, str]] = []
    for line in payload.split(b"\r\n" if b"\r\n" in payload else b"\n")[1:40]:
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        key = name.strip().lower().decode("ascii", errors="replace")
        text = clean(value)
        if not text:
            continue
        if key in ("nt", "st") and text.lower().startswith("uuid:"):
            continue  # a unit's id, not its kind
        if key == "st" and searching:
            hints.append(("ssdp_search", text))
        elif key in _SSDP_VALUE_HEADERS:
            hints.append((_SSDP_VALUE_HEADERS[key], text))
        elif key == "usn":
            # "uuid:<unit id>::urn:Belkin:device:insight:1": the unit id is dropped, the type kept.
            kind = text.partition("::")[2]
            if kind:
                hints.append(("ssdp_usn", kind))
        elif key == "location":
            # The path names the description document (/description.xml, /setup.xml); the host is an address.
            path = re.sub(r"^[a-z]+://[^/]*", "", text, flags=re.IGNORECASE)
            if path:
                hints.append(("ssdp_location", path[:80]))
        elif key not in _SSDP_STANDARD and len(key) <= 40:
            hints.append(("ssdp_header", key))  # vendor headers (hue-bridgeid, x-rincon-...): name only
    return hints


# -- vendor cloud hellos ------------------------------------------------------------------------------

_EDIMAX_MARK = b"param>"
_EDIMAX_FIELDS = re.compile(rb'<(model|type) value="([^"]{1,40})"')
_EDIMAX_SIGNALS = {b"model": "cloud_model", b"type": "cloud_device_type"}


def parse_edimax_cloud(payload: bytes) -> list[tuple[str, str]]:
    """Hints of a device's hello to Edimax's cloud (UDP 8765): [(signal, value)] for the sender.

    Edimax plugs and cameras register with an XML message (``<param><model value="SP-2101W" />
    <type value="SmartPlug" />...``) whose bytes are each rotated left by a few bits, the count
    varying per message; the product's model and kind are read, the unit's id, alias and
    addresses are not. The rotation that makes "param>" appear decodes the message.
    """
    head = payload[:16]
    for k in range(8):
        if k:
            head = bytes(((b >> 1) | (b << 7)) & 0xFF for b in head)  # rotate right by one more bit
        if _EDIMAX_MARK in head:
            text = bytes(((b >> k) | (b << (8 - k))) & 0xFF for b in payload) if k else payload
            return [(_EDIMAX_SIGNALS[key], clean(value)) for key, value in _EDIMAX_FIELDS.findall(text)]
    return []


# -- the plugin and the pass ---------------------------------------------------------------------


class IdentityPlugin(NFPlugin):
    """Collect identity hints per flow into ``flow.udps.identity``: [(mac, ip, signal, value)].

    Never raises: a packet that fails to parse adds nothing. Bounded per flow.
    """

    def on_init(self, packet: Any, flow: Any) -> None:
        flow.udps.identity = {}
        flow.udps.identity_packets = 0
        self.on_update(packet, flow)

    def on_update(self, packet: Any, flow: Any) -> None:
        try:
            udps = flow.udps
            if udps.identity_packets >= MAX_PACKETS_PER_FLOW or len(udps.identity) >= MAX_HINTS_PER_FLOW:
                return
            udps.identity_packets += 1
            parsed = udp_payload(packet.ip_packet)
            if parsed is None:
                return
            sport, dport, payload = parsed
            if not payload:
                return
            found: list[tuple[str, str, str, str]] = []
            if 67 in (sport, dport) or 68 in (sport, dport):
                for mac, signal, value in parse_dhcp(payload):
                    found.append((mac, "", signal, value))
            elif 5353 in (sport, dport):
                found = [(packet.src_mac, packet.src_ip, s, v) for s, v in parse_mdns(payload)]
            elif 1900 in (sport, dport):
                found = [(packet.src_mac, packet.src_ip, s, v) for s, v in parse_ssdp(payload)]
            elif dport == EDIMAX_CLOUD_PORT:
                found = [(packet.src_mac, packet.src_ip, s, v) for s, v in parse_edimax_cloud(payload)]
            hints = udps.identity
            for hint in found:
                if len(hints) >= MAX_HINTS_PER_FLOW:
                    break
                hints.setdefault(hint, None)
        except Exception:  # untrusted bytes: a malformed packet must not end the pass
            return

    def on_expire(self, flow: Any) -> None:
        try:
            flow.udps.identity = list(flow.udps.identity)
        except Exception:
            flow.udps.identity = []


@dataclass
class IdentityHints:
    """What the identity pass learnt, per device MAC: signal -> {value: count}."""

    by_mac: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    packets: int = 0
    flows: int = 0

    def add(self, mac: str, signal: str, value: str, count: int = 1) -> None:
        signals = self.by_mac.get(mac)
        if signals is None:
            if len(self.by_mac) >= MAX_MACS:  # a flood of forged DHCP clients; a capture that never ends
                return
            signals = self.by_mac[mac] = {}
        values = signals.setdefault(signal, {})
        if value in values:
            values[value] += count
        elif len(values) < MAX_VALUES_PER_SIGNAL:
            values[value] = count

    def merge(self, other: IdentityHints) -> None:
        for mac, signals in other.by_mac.items():
            for signal, values in signals.items():
                for value, count in values.items():
                    self.add(mac, signal, value, count)
        self.packets += other.packets
        self.flows += other.flows


def _hints(flow: Any) -> tuple[int, list[tuple[str, str, str, str]]]:
    """What leaves the pass's meter of a flow: its packet count and its hints."""
    return flow.bidirectional_packets, getattr(flow.udps, "identity", None) or []


def collect(flows: Iterable[tuple[int, list[tuple[str, str, str, str]]]]) -> IdentityHints:
    """Merge the hints of the identity pass's flows (see _hints) by sender MAC (DHCP: by client hardware
    address)."""
    result = IdentityHints()
    for packets, hints in flows:
        result.flows += 1
        result.packets += packets
        for mac, ip, signal, value in hints:
            if not mac or mac in ("00:00:00:00:00:00", "ff:ff:ff:ff:ff:ff"):
                continue
            if ip and not is_local_address(ip):
                continue  # hints are about local devices; a remote sender is not one
            result.add(mac, signal, value)
    return result


def identity_pass(path: str, config: MeterConfig) -> SidePass:
    """The identity pass over one capture file, or a second capture of an interface (``config``: the
    main pass's settings), to start; on an interface, stop() it to have its hints."""
    return side_pass("iotscan-identity", path, config, IDENTITY_FILTER, IdentityPlugin(), collect, snaplen=2048,
                     reduce=_hints)


def read_identity(path: str, config: MeterConfig) -> IdentityHints:
    """Run the identity pass over one capture file, here."""
    return identity_pass(path, config).outcome()
