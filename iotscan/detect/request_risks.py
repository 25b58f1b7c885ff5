"""What the request pass reads for the risk stage: weak spots in the bytes of the packets it already sees.

nDPI finds clear-text logins of telnet, FTP, HTTP Basic, POP, IMAP and SMTP, but not an MQTT CONNECT's
user name and password, a token sent to a cloud in plain HTTP, or a device asking the router to open a port
(UPnP IGD's AddPortMapping). The request pass (iotscan.detect.request_pass) already reads HTTP request
heads; its filter also lets through segments that start an MQTT CONNECT (MQTT_CONNECT_FILTER). It also
tells which local hosts answer the others' DNS queries (the network's own resolvers: DnsCensus), from the
queries it reads for the tunnel signatures.

Evidence never holds a secret: it names the header, parameter or flag, not its value. The parsers read
untrusted bytes and return nothing for what they cannot read whole.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass, field
from urllib.parse import unquote_plus

from iotscan.detect.risk_catalogue import load_catalogue
from iotscan.output.records import is_local_address

MQTT_CONNECT = 0x10
MQTT_PROTOCOL_NAMES = (b"MQTT", b"MQIsdp")  # 3.1.1 and 5, 3.1
MAX_RISK_READS = 8  # request segments read per flow for risks: a device's first requests tell
MAX_RISK_FINDINGS = 100_000  # flows with risk findings kept per source; beyond, the oldest are forgotten
MAX_RESOLVERS = 4096
# (risk id, evidence, the sender's address and port) of one flow of the pass
RiskFinding = tuple[str, str, str, int]


def mqtt_connect_filter(start: str) -> str:
    """The BPF test of a TCP payload's first four bytes (``start``) for an MQTT CONNECT: type 1 with no flags,
    a remaining length of one byte then the protocol name's length (4, "MQTT"; 6, "MQIsdp"), or of two bytes
    then the name's length's first byte (0)."""
    return (f"({start} & 0xff00ffff = 0x10000004 or {start} & 0xff00ffff = 0x10000006 or "
            f"{start} & 0xff8000ff = 0x10800000)")


def mqtt_connect_credentials(payload: bytes) -> str | None:
    """The evidence of an MQTT CONNECT that carries a user name or password (its connect flags), or None."""
    if len(payload) < 12 or payload[0] != MQTT_CONNECT:
        return None
    i = 1
    for _ in range(4):  # the remaining length: a variable-length integer
        if i >= len(payload):
            return None
        more = payload[i] & 0x80
        i += 1
        if not more:
            break
    else:
        return None
    if i + 2 > len(payload):
        return None
    name_length = int.from_bytes(payload[i:i + 2], "big")
    name = payload[i + 2:i + 2 + name_length]
    flags_at = i + 2 + name_length + 1  # after the name, the protocol level
    if name not in MQTT_PROTOCOL_NAMES or flags_at >= len(payload):
        return None
    flags = payload[flags_at]
    user, password = bool(flags & 0x80), bool(flags & 0x40)
    if not (user or password):
        return None
    what = "a user name and a password" if user and password else "a user name" if user else "a password"
    return f"MQTT CONNECT (level {payload[flags_at - 1]}) carrying {what} without TLS"


_HEADER = re.compile(r"^([A-Za-z0-9-]{1,40})[ \t]*:[ \t]*(.*)$")


@dataclass(frozen=True)
class HttpRules:
    """The header and parameter names of http_credentials_to_cloud (lower case)."""

    headers: frozenset[str]
    parameter: re.Pattern[str]
    # what a segment must hold (lower-cased) for either rule to be read: the names no other name contains
    stems: tuple[bytes, ...]


def _http_rules() -> HttpRules:
    params = load_catalogue()["http_credentials_to_cloud"].params
    names = "|".join(re.escape(p) for p in sorted(params["parameters"], key=len, reverse=True))
    every = {*params["headers"], *params["parameters"], "addportmapping"}
    stems = tuple(sorted(n.encode() for n in every if not any(o != n and o in n for o in every)))
    return HttpRules(frozenset(params["headers"]), re.compile(rf"(?:^|[?&;\s])({names})=(?=[^&\s])", re.IGNORECASE),
                     stems)


_RULES: HttpRules | None = None


def http_request_risks(payload: bytes, to: str = "") -> list[tuple[str, str]]:
    """(risk id, evidence) of an HTTP request segment sent to ``to`` (an address, named when the segment has
    no Host header): credentials or a token (http_credentials_to_cloud: the risk stage keeps it for requests to
    the Internet only) and UPnP port mappings (upnp_port_mapping)."""
    global _RULES
    if _RULES is None:
        _RULES = _http_rules()
    lowered = payload[:4096].lower()
    if not any(stem in lowered for stem in _RULES.stems):  # most requests: nothing to read
        return []
    head, _, body = payload[:4096].decode("latin-1").partition("\r\n\r\n")
    lines = head.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) < 3:
        return []
    method, target = parts[0], parts[1]
    found: list[tuple[str, str]] = []
    host = ""
    secrets: list[str] = []
    soap_action = ""
    for line in lines[1:]:
        match = _HEADER.match(line)
        if match is None:
            continue
        name, value = match.group(1).lower(), match.group(2)
        if name == "host":
            host = value.strip()[:80]
        elif name == "soapaction":
            soap_action = value
        if name in _RULES.headers and value.strip():
            scheme = value.split()[0] if name.endswith("authorization") else ""
            secrets.append(f"{name} header" + (f" ({scheme[:20]})" if scheme else ""))
    query = target.partition("?")[2]
    for where, text in (("URL", query), ("form", body if method == "POST" else "")):
        if text:
            names = sorted({m.group(1).lower() for m in _RULES.parameter.finditer(unquote_plus(text))})
            secrets += [f"{where} parameter {n}" for n in names]
    if secrets:
        found.append(("http_credentials_to_cloud", f"plain HTTP {method} to {host or to or 'a host'} with "
                                                   f"{', '.join(dict.fromkeys(secrets))}"))
    if "addportmapping" in soap_action.lower() or (method == "POST" and "AddPortMapping" in body[:1024]):
        found.append(("upnp_port_mapping", "UPnP AddPortMapping" + _port_mapping_details(body)))
    return found


_MAPPING_FIELDS = re.compile(r"<(NewExternalPort|NewProtocol|NewInternalPort|NewInternalClient)>([^<]{1,45})<")


def _port_mapping_details(body: str) -> str:
    """": external TCP port 8080 to 192.168.1.20:80" when the request's segment holds the mapping."""
    values = {k: v.strip() for k, v in _MAPPING_FIELDS.findall(body)}
    if not values.get("NewExternalPort"):
        return ""
    protocol = values.get("NewProtocol", "").upper()
    client, internal = values.get("NewInternalClient"), values.get("NewInternalPort")
    target = f" to {client}:{internal}" if client and internal else f" to port {internal}" if internal else ""
    return f": external {protocol + ' ' if protocol else ''}port {values['NewExternalPort']}{target}"


@dataclass
class DnsCensus:
    """The network's own resolvers: local hosts that answered DNS queries of other local hosts (counted by the
    queries the request pass read; at most MAX_RESOLVERS hosts)."""

    resolvers: dict[str, int] = field(default_factory=dict)

    def add(self, client: str, resolver: str) -> None:
        if resolver in self.resolvers:
            self.resolvers[resolver] += 1
        elif len(self.resolvers) < MAX_RESOLVERS:
            self.resolvers[resolver] = 1

    def is_resolver(self, ip: str) -> bool:
        return ip in self.resolvers


def local_resolver(client: str, resolver: str) -> bool:
    """Whether a DNS query from ``client`` to ``resolver`` makes the resolver one of the network's own."""
    return client != resolver and is_local_address(resolver) and is_local_address(client)


@dataclass
class RiskFindings:
    """The risk findings of the request pass's flows, by their endpoints (either direction), with the DNS
    census; at most MAX_RISK_FINDINGS flows (the oldest go first). Filled by the pass's thread while the main
    one reads it on a live interface: each operation is one dict call, atomic under the GIL."""

    by_endpoints: OrderedDict[tuple[str, int, str, int], list[tuple[int, tuple[RiskFinding, ...]]]] = \
        field(default_factory=OrderedDict)
    census: DnsCensus = field(default_factory=DnsCensus)
    found: int = 0
    forgotten: int = 0

    def add(self, src_ip: str, src_port: int, dst_ip: str, dst_port: int, first_ms: int,
            risks: tuple[RiskFinding, ...]) -> None:
        self.found += 1
        self.by_endpoints.setdefault((src_ip, src_port, dst_ip, dst_port), []).append((first_ms, risks))
        while len(self.by_endpoints) > MAX_RISK_FINDINGS:
            self.forgotten += len(self.by_endpoints.pop(next(iter(self.by_endpoints))))

    def of_flow(self, src_ip: str, src_port: int, dst_ip: str, dst_port: int, first_ms: int,
                last_ms: int) -> list[RiskFinding]:
        """The findings of the pass's flows with a main-pass flow's endpoints (either direction) that began
        within its lifetime."""
        out: list[RiskFinding] = []
        for key in ((src_ip, src_port, dst_ip, dst_port), (dst_ip, dst_port, src_ip, src_port)):
            for seen_ms, risks in self.by_endpoints.get(key, ()):
                if first_ms <= seen_ms <= last_ms:
                    out.extend(risks)
        return out
