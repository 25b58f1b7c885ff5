"""Per-flow risks: the weak spots one flow shows, from what nDPI found and from iotscan's own rules.

Where nDPI detects a risk, its detection is used: the risk bitmap of nDPI's own flow structure, read by the
main pass's meter when the flow expires (iotscan.capture.source.NdpiFacts), mapped to the catalogue's risks
by nDPI's risk names (iotscan/data/risks.json). What nDPI does not give comes from

* the request pass, which reads the few packets its BPF filter lets through (request_risks: an MQTT CONNECT's
  credentials, tokens in plain HTTP, UPnP port mappings, and the census of the network's resolvers);
* the texts nDPI parsed (HTTP Server, SSDP SERVER and USER-AGENT, SSH banners) and the flow's user agent,
  against the catalogue's table of outdated software;
* the flow itself: a management port of a local device that accepted a connection from a public address
  (TCP: nDPI saw the SYN-ACK), DNS from a local device to a public resolver while the network has its own.

A finding is (risk id, evidence, side, detector): whose weakness it is, the flow's initiator ("src"), its
responder ("dst") or both (the device posture counts it for the local device(s) on that side), and whether nDPI
or one of iotscan's rules found it.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Sequence
from typing import Any

from iotscan.capture.ndpi_facts import NdpiFacts, nothing_of_note
from iotscan.detect.request_risks import DnsCensus, RiskFinding
from iotscan.detect.risk_catalogue import Catalogue, Software, version_tuple
from iotscan.output.records import is_local_address

Finding = tuple[str, str, str, str]  # (risk id, evidence, side, detector: NDPI or IOTSCAN)
NDPI, IOTSCAN = "nDPI", "iotscan"
_TCP, _UDP = 6, 17
_TEXT_NAMES = {"http_server": "HTTP Server", "ssdp_server": "SSDP SERVER", "ssdp_user_agent": "SSDP USER-AGENT",
               "ssh_server": "SSH server", "ssh_client": "SSH client", "user_agent": "User-Agent"}
MAX_TEXT_CHARS = 120  # of a header quoted in evidence


@functools.lru_cache(maxsize=65536)
def is_public(ip: str) -> bool:
    """An address of the Internet (globally routable unicast)."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return addr.is_global and not addr.is_multicast


@functools.lru_cache(maxsize=65536)
def is_local(ip: str) -> bool:
    return is_local_address(ip)


def _short(name: str) -> str:
    """nDPI's enum name in words: NDPI_TLS_WEAK_CIPHER -> "TLS weak cipher"."""
    words = name.removeprefix("NDPI_").lower().replace("_", " ")
    for upper in ("tls", "http", "ssh", "smb", "dns"):
        words = words.replace(upper, upper.upper())
    return words


def outdated(text: str, table: Sequence[Software]) -> str | None:
    """Why the software a header or banner names is outdated ("dropbear 2014.63, version from 2014: older than
    2018.76 (2018.76 fixed CVE-2018-15599...)"), or None. A year is said only when the version gives it."""
    for software in table:
        match = software.pattern.search(text)
        if match is None:
            continue
        version = match.group(1) if match.groups() else None
        numbers = version_tuple(version) if version else ()
        if software.older_than is not None and (not numbers or numbers >= software.older_than):
            continue
        said = f"{software.name} {version}" if version else software.name
        if numbers and 1990 <= numbers[0] <= 2099:
            said += f", version from {numbers[0]}"
        if software.older_than is not None:
            said += f": older than {'.'.join(map(str, software.older_than))}"
        return f"{said} ({software.why})"
    return None


def answered(record: dict[str, Any], facts: NdpiFacts) -> bool:
    """Whether the responder took part: over TCP it accepted the connection (nDPI saw its SYN-ACK; a connection
    begun before the capture, without a SYN, when it sent anything), else it sent anything. An application nDPI
    only guessed from the port is no evidence of the risks nDPI infers from the application unless the responder
    answered: a scanner's unanswered SYN to port 23 is no telnet."""
    if record["protocol"] == _TCP and facts.handshake & 1:
        return bool(facts.handshake & 2)
    return record["dst2src_packets"] > 0


class FlowRisks:
    """The findings of one flow (``of``), from the catalogue's nDPI mapping and rules."""

    def __init__(self, catalogue: Catalogue) -> None:
        self.catalogue = catalogue
        # (bit, risk id, side, nDPI's name in words, inferred from the application alone)
        self.ndpi_bits = [(bit, risk, side, _short(name), from_application)
                          for bit, (risk, side, name, from_application) in sorted(catalogue.ndpi_bits.items())]
        self.ndpi_mask = sum(1 << bit for bit, *_ in self.ndpi_bits)
        inbound = catalogue.risks.get("inbound_public_service")
        self.services: dict[tuple[int, int], str] = {}
        for service, ports in (inbound.params.get("services", {}) if inbound else {}).items():
            for proto, numbers in ports.items():
                for port in numbers:
                    self.services[(_TCP if proto == "tcp" else _UDP, port)] = service
        dns = catalogue.risks.get("dns_outside_resolver")
        self.dns_ports = frozenset(dns.params.get("ports", ())) if dns else frozenset()
        software = catalogue.risks.get("outdated_software")
        self.text_sides: dict[str, str] = software.params.get("texts", {}) if software else {}
        self._outdated = functools.lru_cache(maxsize=4096)(lambda text: outdated(text, catalogue.software))

    def of(self, record: dict[str, Any], facts: NdpiFacts | None, requested: list[RiskFinding],
           census: DnsCensus | None) -> list[Finding]:
        """The findings of a flow record, its nDPI facts, the request pass's risk findings of it and the DNS
        census; one per (risk, side): nDPI's, where it detected the risk, else iotscan's rules'. Facts of None
        stand for nothing of note (ndpi_facts.nothing_of_note). This runs for every flow: most are done with
        after a few lookups."""
        proto = record["protocol"]
        service_dst = self.services.get((proto, record["dst_port"]))
        service_src = self.services.get((proto, record["src_port"]))
        dns = census is not None and bool(census.resolvers) and record["dst_port"] in self.dns_ports
        agent = record["user_agent"]
        if facts is None:
            if not (requested or agent or service_dst or service_src or dns):
                return []
            facts = nothing_of_note(proto)
        elif not (facts.risk & self.ndpi_mask or facts.texts or requested or agent or service_dst or service_src
                  or dns):
            return []
        found: dict[tuple[str, str], tuple[str, str]] = {}  # (risk, side) -> (evidence, detector)
        if facts.risk & self.ndpi_mask:
            info = dict(facts.risk_info)
            app = record["app"] or f"port {record['dst_port']}"
            guess = record["app_guessed"] and not answered(record, facts)  # the application is no evidence
            for bit, risk, side, words, from_application in self.ndpi_bits:
                if facts.risk >> bit & 1 and not (from_application and guess):
                    found.setdefault((risk, side), (f"{app}: {info.get(bit) or words}", NDPI))
        src_ip, src_port = record["src_ip"], record["src_port"]
        for risk, evidence, sender_ip, sender_port in requested:
            sender_is_src = (sender_ip, sender_port) == (src_ip, src_port)
            other = record["dst_ip"] if sender_is_src else src_ip
            if risk == "http_credentials_to_cloud" and not is_public(other):
                continue  # a token to a local hub stays on the network
            side = "both" if risk == "cleartext_credentials" else "src" if sender_is_src else "dst"
            found.setdefault((risk, side), (evidence, IOTSCAN))
        texts = [*facts.texts, ("user_agent", agent)] if agent else facts.texts
        for name, text in texts:
            side = self.text_sides.get(name)
            why = self._outdated(text) if side else None
            if why:
                quoted = text if len(text) <= MAX_TEXT_CHARS else text[:MAX_TEXT_CHARS] + "…"
                found.setdefault(("outdated_software", side), (f"{_TEXT_NAMES[name]} {quoted!r}: {why}", IOTSCAN))
        if service_dst or service_src:
            self._inbound(record, facts, service_dst, service_src, found)
        if dns:
            self._dns(record, census, found)
        return [(risk, evidence, side, detector) for (risk, side), (evidence, detector) in found.items()]

    @staticmethod
    def _inbound(r: dict[str, Any], facts: NdpiFacts, service_dst: str | None, service_src: str | None,
                 found: dict[tuple[str, str], tuple[str, str]]) -> None:
        """A local device's management port that accepted a connection from a public address (TCP: the
        responder's SYN-ACK, as nDPI saw it). A TCP connection begun before the capture (no SYN seen) counts when
        the service answered, in either orientation: its first packet seen may be the service's."""
        proto = "tcp" if r["protocol"] == _TCP else "udp"
        if service_dst and is_public(r["src_ip"]) and is_local(r["dst_ip"]) and answered(r, facts):
            side, service, port, client = "dst", service_dst, r["dst_port"], r["src_ip"]
        elif service_src and proto == "tcp" and not facts.handshake & 1 and is_public(r["dst_ip"]) \
                and is_local(r["src_ip"]):
            side, service, port, client = "src", service_src, r["src_port"], r["dst_ip"]
        else:
            return
        found.setdefault(("inbound_public_service", side),
                         (f"{service} ({proto}/{port}) accepted a connection from {client}", IOTSCAN))

    @staticmethod
    def _dns(r: dict[str, Any], census: DnsCensus, found: dict[tuple[str, str], tuple[str, str]]) -> None:
        """DNS from a local device (not itself a resolver) to a public address while the network has its own."""
        src = r["src_ip"]
        if is_public(r["dst_ip"]) and is_local(src) and not census.is_resolver(src):
            own = sorted(census.resolvers, key=lambda ip: -census.resolvers[ip])[:2]
            found.setdefault(("dns_outside_resolver", "src"),
                             (f"DNS to {r['dst_ip']} (port {r['dst_port']}); the network's resolver: {', '.join(own)}",
                              IOTSCAN))
