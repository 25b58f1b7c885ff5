"""Device knowledge as data: loading the signature files and matching them.

Two files ship with iotscan, in one format: iotscan/data/device_signatures.json holds what is known
about products (their cloud domains, hostname patterns, UPnP strings, the model a device announces)
and iotscan/data/device_types.json what says a device's TYPE whatever its model: IEEE OUI
organisations that make one kind of device, product words in the names a device uses or resolves,
the services it offers and uses (mDNS, UPnP, HomeKit categories, ports, DHCP vendor classes). A
user's own files (``--signatures FILE``) extend both without a release. Each entry points to a
vendor, a device type (or a weighted set of types) and sometimes a model, with a weight in (0, 1]
saying how decisive it is, and says where the fact comes from (``source``). An entry written from
a labelled capture lists the device models of those captures (``models``): measuring on a model
leaves out the entries written from it (Signatures.without).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from iotscan.errors import InputError

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
KINDS = ("regex", "equals", "domain", "words")
BUNDLED_FILES = ("device_signatures.json", "device_types.json")
DEFAULT_OUI_TYPE_WEIGHT = 0.3  # what a maker's devices usually are: a prior, not an observation
_SIGNATURE_KEYS = frozenset({"signals", *KINDS, "weight", "vendor", "device_type", "types", "model", "points_to",
                             "source", "models"})
_VENDOR_KEYS = frozenset({"org", "vendor", "device_type", "types", "module", "weight", "source", "models"})


class SignatureError(InputError):
    """A signature file is unreadable or malformed: one line naming the file and the entry (exit 2)."""


@dataclass(frozen=True)
class Signature:
    signals: tuple[str, ...]
    kind: str  # "regex", "equals", "domain" or "words"
    pattern: str
    weight: float
    vendor: str | None = None
    types: tuple[tuple[str, float], ...] = ()
    model: str | None = None
    points_to: str | None = None
    regex: re.Pattern[str] | None = None
    source: str | None = None  # where the fact comes from
    models: tuple[str, ...] = ()  # device models whose labelled captures the entry was written from

    def match(self, value: str) -> re.Match[str] | bool:
        if self.kind == "regex":
            assert self.regex is not None
            return self.regex.search(value) or False
        if self.kind == "words":
            return self.words(word_text(value))
        lowered = value.lower()
        if self.kind == "equals":
            return lowered == self.pattern
        return lowered == self.pattern or lowered.endswith("." + self.pattern)  # domain

    def words(self, text: str) -> re.Match[str] | bool:
        """A "words" entry's match on a value already read as words (word_text)."""
        assert self.regex is not None
        return self.regex.search(text) or False


@dataclass(frozen=True)
class VendorEntry:
    """A row of the OUI table: IEEE organisations (a regex over the registry's name) and what they make."""

    regex: re.Pattern[str]
    vendor: str | None
    module_maker: bool
    types: tuple[tuple[str, float], ...]
    weight: float
    source: str | None = None
    models: tuple[str, ...] = ()


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
    type_weight: float = DEFAULT_OUI_TYPE_WEIGHT


_CAMEL = re.compile(r"(?<=[a-z])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
_NOT_ALNUM = re.compile(r"[^a-z0-9]+")
_LETTER_DIGIT = re.compile(r"(?<=[a-z])(?=[0-9])|(?<=[0-9])(?=[a-z])")


def word_text(value: str) -> str:
    """The words of a name, for "words" entries: "IPCamDesc.xml" -> "ip cam desc xml", "IoTHub" -> "io t hub",
    "vs-cam.u011.immedia-semi.com" -> "vs cam u 011 immedia semi com"."""
    text = _NOT_ALNUM.sub(" ", _CAMEL.sub(" ", value[:200]).lower())
    return _LETTER_DIGIT.sub(" ", text).strip()


@dataclass
class Signatures:
    signatures: list[Signature] = field(default_factory=list)
    mac_vendors: list[VendorEntry] = field(default_factory=list)
    by_signal: dict[str, list[Signature]] = field(default_factory=dict)

    def match(self, values: dict[str, list[str]]) -> list[Match]:
        """Every signature that matches one of a device's signal values (strongest first).

        One piece of evidence per signature and signal (and model); a "words" entry votes once whatever
        the number of names it matches: a device's name repeated in DHCP, mDNS and UPnP is one fact.
        """
        found: list[Match] = []
        seen: set[tuple[int, str, str | None]] = set()
        for signal, items in values.items():
            candidates = self.by_signal.get(signal)
            if not candidates:
                continue
            for value in items:
                words: str | None = None  # the value's words, read once for all "words" entries
                for sig in candidates:
                    key = (id(sig), "" if sig.kind == "words" else signal, None)
                    if sig.kind == "words":
                        if key in seen:
                            continue
                        if words is None:
                            words = word_text(value)
                        hit: re.Match[str] | bool = sig.words(words)
                    else:
                        hit = sig.match(value)
                    if not hit:
                        continue
                    model = _expand(sig.model, hit)
                    points_to = _expand(sig.points_to, hit) or _describe(sig.vendor, sig.types, model)
                    key = (key[0], key[1], model)
                    if key in seen:
                        continue
                    seen.add(key)
                    found.append(Match(signal, value, sig.weight, sig.vendor, sig.types, model, points_to))
        found.sort(key=lambda m: -m.weight)
        return found

    def mac_vendor(self, mac: str) -> MacVendor:
        """The vendor of a MAC from netaddr's bundled IEEE registry (none for a locally administered MAC)."""
        return _mac_vendor(self, mac.lower())

    def extended(self, other: Signatures) -> Signatures:
        """These signatures and another file's; the other file's OUI rows are tried first (a user's own
        file overrides what ships)."""
        return _index(self.signatures + other.signatures, other.mac_vendors + self.mac_vendors)

    def without(self, model: str) -> Signatures:
        """The signatures without any entry written from the captures of ``model`` or naming it."""
        return _index([s for s in self.signatures if model not in s.models and s.model != model],
                      [v for v in self.mac_vendors if model not in v.models])

    def naming(self, model: str) -> list[str]:
        """The entries that name ``model`` or were written from its captures (empty after without())."""
        return [f"{s.kind} {s.pattern!r}" for s in self.signatures if model in s.models or s.model == model] + \
            [f"org {v.regex.pattern!r}" for v in self.mac_vendors if model in v.models]


def _index(signatures: Iterable[Signature], mac_vendors: Iterable[VendorEntry]) -> Signatures:
    result = Signatures(list(signatures), list(mac_vendors))
    for sig in result.signatures:
        for signal in sig.signals:
            result.by_signal.setdefault(signal, []).append(sig)
    return result


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
    kind = describe_types(types) if types else "device"
    return f"{vendor} {kind}" if vendor else kind


def describe_types(types: Sequence[tuple[str, float]]) -> str:
    """"camera" for one type, "smart plug or light" for two or three, "..." beyond."""
    names = [t.replace("_", " ") for t, _ in types[:3]]
    return " or ".join(names) + (" or another" if len(types) > 3 else "")


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
    for entry in sigs.mac_vendors:
        if entry.regex.search(org):
            return MacVendor(org, entry.vendor, False, entry.module_maker, entry.types, entry.weight)
    return MacVendor(org, None, False)


def _types(entry: dict[str, Any], where: str) -> tuple[tuple[str, float], ...]:
    types: dict[str, float] = {}
    if entry.get("device_type"):
        types[entry["device_type"]] = 1.0
    given = entry.get("types") or {}
    if not isinstance(given, dict):
        raise SignatureError(f"{where}: types must be an object of type: share")
    for name, weight in given.items():
        types[name] = _number(weight, f"{where}: types.{name}")
    for name in types:
        if name not in DEVICE_TYPES or name == "unknown":
            raise SignatureError(f"{where}: unknown device type {name!r} (one of {', '.join(DEVICE_TYPES[:-1])})")
    return tuple(sorted(types.items(), key=lambda t: -t[1]))


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SignatureError(f"{where}: must be a number, not {value!r}")
    return float(value)


def _provenance(entry: dict[str, Any], where: str) -> tuple[str | None, tuple[str, ...]]:
    source, models = entry.get("source"), entry.get("models") or []
    if source is not None and not isinstance(source, str):
        raise SignatureError(f"{where}: source must be a string")
    if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
        raise SignatureError(f"{where}: models must be a list of model names")
    return source, tuple(models)


def _check_keys(entry: Any, allowed: frozenset[str], where: str) -> None:
    if not isinstance(entry, dict):
        raise SignatureError(f"{where}: must be an object")
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise SignatureError(f"{where}: unknown field {unknown[0]!r}")


def parse_signatures(data: Any, name: str = "signatures") -> Signatures:
    """Validate and compile one signature document (``name`` prefixes the error messages)."""
    if not isinstance(data, dict) or data.get("schema") != 1:
        found = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise SignatureError(f"{name}: unsupported signature schema {found!r} (expected \"schema\": 1)")
    signatures: list[Signature] = []
    for i, entry in enumerate(_list(data, "signatures", name)):
        where = f"{name}: signatures #{i}"
        _check_keys(entry, _SIGNATURE_KEYS, where)
        signals = entry.get("signals")
        if isinstance(signals, str):
            signals = [signals]
        if not signals or not isinstance(signals, list) or any(s not in SIGNALS for s in signals):
            raise SignatureError(f"{where}: unknown signal in {signals!r}")
        kinds = [k for k in KINDS if k in entry]
        if len(kinds) != 1:
            raise SignatureError(f"{where}: needs exactly one of {', '.join(KINDS)}")
        kind = kinds[0]
        pattern = str(entry[kind])
        weight = _number(entry.get("weight", 0.5), f"{where}: weight")
        if not 0.0 < weight <= 1.0:
            raise SignatureError(f"{where}: weight must be in (0, 1]")
        try:
            regex = re.compile(pattern, re.IGNORECASE) if kind in ("regex", "words") else None
        except re.error as exc:
            raise SignatureError(f"{where}: bad regex {pattern!r}: {exc}") from exc
        source, models = _provenance(entry, where)
        signatures.append(Signature(signals=tuple(signals), kind=kind, pattern=pattern.lower(), weight=weight,
                                    vendor=entry.get("vendor"), types=_types(entry, where), model=entry.get("model"),
                                    points_to=entry.get("points_to"), regex=regex, source=source, models=models))
    vendors: list[VendorEntry] = []
    for i, entry in enumerate(_list(data, "mac_vendors", name)):
        where = f"{name}: mac_vendors #{i}"
        _check_keys(entry, _VENDOR_KEYS, where)
        try:
            regex = re.compile(entry["org"], re.IGNORECASE)
        except (KeyError, TypeError, re.error) as exc:
            raise SignatureError(f"{where}: bad org pattern: {exc}") from exc
        weight = _number(entry.get("weight", DEFAULT_OUI_TYPE_WEIGHT), f"{where}: weight")
        if not 0.0 < weight <= 1.0:
            raise SignatureError(f"{where}: weight must be in (0, 1]")
        source, models = _provenance(entry, where)
        vendors.append(VendorEntry(regex, entry.get("vendor"), bool(entry.get("module")), _types(entry, where),
                                   weight, source, models))
    return _index(signatures, vendors)


def _list(data: dict[str, Any], key: str, name: str) -> list[Any]:
    value = data.get(key) or []
    if not isinstance(value, list):
        raise SignatureError(f"{name}: {key} must be a list")
    return value


def data_path(name: str) -> Path:
    try:
        return Path(str(resources.files("iotscan.data"))) / name
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "data" / name


def read_signature_file(path: Path) -> Signatures:
    try:
        data = json.loads(path.read_bytes())
    except OSError as exc:
        raise SignatureError(f"{path}: cannot read device signatures: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise SignatureError(f"{path}: not a JSON signature file: {exc}") from exc
    return parse_signatures(data, str(path))


@lru_cache(maxsize=8)
def load_signatures(extra: tuple[str, ...] = ()) -> Signatures:
    """The bundled signature files, extended by the user's own files (``--signatures FILE``), in order."""
    result = Signatures()
    for name in BUNDLED_FILES:
        result = result.extended(read_signature_file(data_path(name)))
    for path in extra:
        result = result.extended(read_signature_file(Path(path)))
    return result

