"""Device signatures as data: loading iotscan/data/device_signatures.json and matching it.

The data file holds what is known about products (cloud domains, hostname patterns, mDNS services,
SSDP server strings, DHCP vendor classes and fingerprints, nDPI application labels, MAC vendors)
so that it can grow without touching code. Each signature points to a vendor, a device type (or
a weighted set of types), optionally a model, with a weight in 0..1 saying how decisive it is.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

DEVICE_TYPES: tuple[str, ...] = (
    "camera", "doorbell", "smart_plug", "light", "hub", "sensor", "alarm", "lock", "speaker", "tv",
    "thermostat", "health_monitor", "appliance", "printer", "phone", "computer", "router", "unknown",
)

SIGNALS: frozenset[str] = frozenset({
    "dhcp_hostname", "dhcp_vendor_class", "dhcp_fingerprint", "dhcp_fqdn", "dhcp_user_class",
    "mdns_service", "mdns_instance", "mdns_host", "mdns_txt", "mdns_query",
    "ssdp_server", "ssdp_usn", "ssdp_nt", "ssdp_st", "ssdp_location", "ssdp_header", "ssdp_user_agent",
    "ssdp_search", "user_agent", "server_name", "app", "app_server", "ja4", "listen_port",
    "cloud_model", "cloud_device_type",
})


class SignatureError(ValueError):
    """The signature file is malformed (a packaging bug, caught by the tests)."""


@dataclass(frozen=True)
class Signature:
    signals: tuple[str, ...]
    kind: str  # "regex", "equals" or "domain"
    pattern: str
    weight: float
    vendor: str | None = None
    types: tuple[tuple[str, float], ...] = ()
    model: str | None = None
    points_to: str | None = None
    regex: re.Pattern[str] | None = None

    def match(self, value: str) -> re.Match[str] | bool:
        if self.kind == "regex":
            assert self.regex is not None
            return self.regex.search(value) or False
        lowered = value.lower()
        if self.kind == "equals":
            return lowered == self.pattern
        return lowered == self.pattern or lowered.endswith("." + self.pattern)  # domain


@dataclass(frozen=True)
class Match:
    """One piece of evidence: a signal value that matched a signature."""

    signal: str
    value: str
    weight: float
    vendor: str | None
    types: tuple[tuple[str, float], ...]
    model: str | None
    points_to: str


@dataclass(frozen=True)
class MacVendor:
    org: str | None  # the IEEE registry's organisation; None when not registered
    vendor: str | None  # the short vendor name iotscan uses, when the signature file knows it
    locally_administered: bool
    module_maker: bool = False  # a Wi-Fi module maker: the product's vendor is someone else
    types: tuple[tuple[str, float], ...] = ()


@dataclass
class Signatures:
    signatures: list[Signature] = field(default_factory=list)
    mac_vendors: list[tuple[re.Pattern[str], str | None, bool, tuple[tuple[str, float], ...]]] = \
        field(default_factory=list)
    by_signal: dict[str, list[Signature]] = field(default_factory=dict)

    def match(self, values: dict[str, list[str]]) -> list[Match]:
        """Every signature that matches one of a device's signal values (strongest first)."""
        found: list[Match] = []
        seen: set[tuple[int, str, str | None]] = set()
        for signal, items in values.items():
            candidates = self.by_signal.get(signal)
            if not candidates:
                continue
            for value in items:
                for sig in candidates:
                    hit = sig.match(value)
                    if not hit:
                        continue
                    model = _expand(sig.model, hit)
                    points_to = _expand(sig.points_to, hit) or _describe(sig.vendor, sig.types, model)
                    key = (id(sig), signal, model)  # one piece of evidence per signature and signal
                    if key in seen:
                        continue
                    seen.add(key)
                    found.append(Match(signal, value, sig.weight, sig.vendor, sig.types, model, points_to))
        found.sort(key=lambda m: -m.weight)
        return found

    def mac_vendor(self, mac: str) -> MacVendor:
        """The vendor of a MAC from netaddr's bundled IEEE registry (none for a locally administered MAC)."""
        return _mac_vendor(self, mac.lower())


def _expand(template: str | None, hit: re.Match[str] | bool) -> str | None:
    """Fill {1}, {2}... with the regex groups, upper-cased (model codes are written that way)."""
    if not template or not isinstance(hit, re.Match):
        return template
    groups = [g.upper() if g else "" for g in hit.groups()]

    def group(m: re.Match[str]) -> str:
        i = int(m.group(1))
        return groups[i - 1] if 0 < i <= len(groups) else ""

    return re.sub(r"\{(\d)\}", group, template)


def _describe(vendor: str | None, types: tuple[tuple[str, float], ...], model: str | None) -> str:
    if model:
        return model
    kind = max(types, key=lambda t: t[1])[0].replace("_", " ") if types else "device"
    return f"{vendor} {kind}" if vendor else kind


@lru_cache(maxsize=8192)
def _oui_org(prefix: str) -> str | None:
    import netaddr  # deferred: the registry index loads on first use

    try:
        return netaddr.EUI(prefix + ":00:00:00").oui.registration().org
    except (netaddr.NotRegisteredError, netaddr.AddrFormatError, ValueError, IndexError):
        return None


def _mac_vendor(sigs: Signatures, mac: str) -> MacVendor:
    try:
        first = int(mac[:2], 16)
    except ValueError:
        return MacVendor(None, None, False)
    if first & 0x02:
        return MacVendor(None, None, True)
    org = _oui_org(mac[:8])
    if not org:
        return MacVendor(None, None, False)
    for regex, vendor, module, types in sigs.mac_vendors:
        if regex.search(org):
            return MacVendor(org, vendor, False, module, types)
    return MacVendor(org, None, False)


def _types(entry: dict[str, Any], where: str) -> tuple[tuple[str, float], ...]:
    types: dict[str, float] = {}
    if entry.get("device_type"):
        types[entry["device_type"]] = 1.0
    for name, weight in (entry.get("types") or {}).items():
        types[name] = float(weight)
    for name in types:
        if name not in DEVICE_TYPES:
            raise SignatureError(f"{where}: unknown device type {name!r}")
    return tuple(sorted(types.items(), key=lambda t: -t[1]))


def parse_signatures(data: dict[str, Any]) -> Signatures:
    """Validate and compile the signature document."""
    if data.get("schema") != 1:
        raise SignatureError(f"unsupported signature schema {data.get('schema')!r}")
    result = Signatures()
    for i, entry in enumerate(data.get("signatures") or []):
        where = f"signature #{i}"
        signals = entry.get("signals")
        if isinstance(signals, str):
            signals = [signals]
        if not signals or any(s not in SIGNALS for s in signals):
            raise SignatureError(f"{where}: unknown signal in {signals!r}")
        kinds = [k for k in ("regex", "equals", "domain") if k in entry]
        if len(kinds) != 1:
            raise SignatureError(f"{where}: needs exactly one of regex, equals, domain")
        kind = kinds[0]
        pattern = str(entry[kind])
        weight = float(entry.get("weight", 0.5))
        if not 0.0 < weight <= 1.0:
            raise SignatureError(f"{where}: weight must be in (0, 1]")
        try:
            regex = re.compile(pattern, re.IGNORECASE) if kind == "regex" else None
        except re.error as exc:
            raise SignatureError(f"{where}: bad regex {pattern!r}: {exc}") from exc
        sig = Signature(signals=tuple(signals), kind=kind, pattern=pattern.lower(), weight=weight,
                        vendor=entry.get("vendor"), types=_types(entry, where), model=entry.get("model"),
                        points_to=entry.get("points_to"), regex=regex)
        result.signatures.append(sig)
        for signal in sig.signals:
            result.by_signal.setdefault(signal, []).append(sig)
    for i, entry in enumerate(data.get("mac_vendors") or []):
        where = f"mac_vendors #{i}"
        try:
            regex = re.compile(entry["org"], re.IGNORECASE)
        except (KeyError, re.error) as exc:
            raise SignatureError(f"{where}: bad org pattern: {exc}") from exc
        result.mac_vendors.append((regex, entry.get("vendor"), bool(entry.get("module")),
                                   _types(entry, where)))
    return result


def signatures_path() -> Path:
    try:
        return Path(str(resources.files("iotscan.data"))) / "device_signatures.json"
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "data" / "device_signatures.json"


@lru_cache(maxsize=1)
def load_signatures(path: str | None = None) -> Signatures:
    file = Path(path) if path else signatures_path()
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise SignatureError(f"{file}: cannot read device signatures: {exc}") from exc
    return parse_signatures(data)
