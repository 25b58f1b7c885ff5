"""The output contract: the one place that defines iotscan's records and their fields.

Every record is a flat JSON object with an ``event_type``, in the manner of Suricata's EVE and
Zeek's JSON logs, so that jq, Elastic and Splunk take it as it is. Field names listed here are a
contract (docs/output.md, whose tables docs/make_tables.py generates from these); later stages add
fields, never rename these.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import shlex
import socket
import struct
import time
from collections import namedtuple
from collections.abc import Iterable, Sequence
from operator import attrgetter
from typing import Any

from communityid import CommunityID

# (name, meaning). Order is the CSV column order and the JSON key order.
FLOW_FIELDS: tuple[tuple[str, str], ...] = (
    # first, as in Suricata's EVE: Elastic and Splunk (which looks for a time in an event's first characters)
    # take it as the event's time
    ("timestamp", "the first packet's time, ISO 8601 UTC to the millisecond (2017-07-06T13:40:07.419Z); first in "
                  "the record, as in Suricata's EVE, so Elastic and Splunk take it as the event's time without a "
                  "mapping"),
    ("event_type", "always \"flow\""),
    ("flow_id", "64-bit id, the same for the same flow of the same capture in every run (with the same time-outs), "
                "unique within a run; `iotscan inspect` takes it, or its first digits as the table shows them"),
    ("community_id", "Community ID v1, to join with Zeek and Suricata records (null for ICMP: NFStream does not keep "
                     "the ICMP type and code it needs)"),
    ("source", "capture file or interface the flow came from"),
    ("first_seen_ms", "first packet, epoch milliseconds"),
    ("last_seen_ms", "last packet, epoch milliseconds"),
    ("duration_ms", "last_seen_ms - first_seen_ms"),
    ("src_ip", "initiator address"),
    ("src_port", "initiator port (0 without ports)"),
    ("src_mac", "initiator MAC as seen in the capture"),
    ("dst_ip", "responder address"),
    ("dst_port", "responder port"),
    ("dst_mac", "responder MAC"),
    ("protocol", "IANA protocol number"),
    ("ip_version", "4 or 6"),
    ("vlan_id", "802.1Q VLAN id, 0 if none"),
    ("app", "nDPI application, e.g. TLS.Amazon, MQTT, DNS"),
    ("app_guessed", "true when nDPI guessed the application from ports"),
    ("category", "nDPI application category"),
    ("server_name", "TLS SNI, HTTP host, DNS or mDNS query name"),
    ("ja4", "JA4 fingerprint of a TLS or QUIC client hello"),
    ("server_fingerprint", "nDPI's server fingerprint (JA3S for TLS)"),
    ("client_hash", "nDPI's client fingerprint for other protocols (HASSH for SSH)"),
    ("dhcp_hostname", "hostname a DHCP client announced"),
    ("dhcp_fingerprint", "DHCP parameter request list (option 55)"),
    ("user_agent", "HTTP User-Agent"),
    ("content_type", "HTTP Content-Type"),
    ("packets", "packets, both directions"),
    ("bytes", "bytes on the wire, both directions"),
    ("src2dst_packets", "packets from initiator"),
    ("src2dst_bytes", "bytes from initiator"),
    ("dst2src_packets", "packets from responder"),
    ("dst2src_bytes", "bytes from responder"),
)
FLOW_FIELD_NAMES: tuple[str, ...] = tuple(name for name, _ in FLOW_FIELDS)

# The NFStream attributes a flow record is built from (see flow_record). The main pass's meter sends
# each flow as a tuple of these instead of the NFlow itself (a tuple of values is a fifth as costly to
# unpickle as NFStream's 94-slot object, and the main process unpickles every flow), which the reader
# makes a MeteredFlow (MeterConfig.item_type). The last field, ``statistics``, carries what the
# classifier reads of the flow: the meter's block of NFStream's C numbers for it, as bytes
# (iotscan.capture.flows.flow_block_dtype), or None when nothing is scored.
FLOW_ATTRIBUTES: tuple[str, ...] = (
    "src_ip", "src_mac", "src_port", "dst_ip", "dst_mac", "dst_port", "protocol", "ip_version", "vlan_id",
    "tunnel_id", "bidirectional_first_seen_ms", "bidirectional_last_seen_ms", "bidirectional_duration_ms",
    "bidirectional_packets", "bidirectional_bytes", "src2dst_packets", "src2dst_bytes", "dst2src_packets",
    "dst2src_bytes", "application_name", "application_category_name", "application_is_guessed",
    "requested_server_name", "client_fingerprint", "server_fingerprint", "user_agent", "content_type",
)
# ``ndpi``: what nDPI found that NFStream does not hand over (iotscan.capture.ndpi_facts.NdpiFacts: its risk bitmap,
# some header texts), when the meter reads it (MeterConfig.ndpi_facts, for the risk stage), else None.
MeteredFlow = namedtuple("MeteredFlow", (*FLOW_ATTRIBUTES, "statistics", "ndpi"), defaults=(None,))
flow_attributes = attrgetter(*FLOW_ATTRIBUTES)


class HeldFlow(MeteredFlow):
    """A flow the meter held (iotscan.capture.hold): one packet to a flooded service, without nDPI's fields or
    statistics, which the scoring stage folds into its flood record."""

    __slots__ = ()


_held_flow = functools.partial(tuple.__new__, HeldFlow)


class HeldFlows(list[HeldFlow]):
    """The HeldFlows of one batch of the meter, in order (MeterConfig.held_type): one event down the stages for all of
    them, which the scoring stage folds (a flood's flows cost the main process per batch what they can)."""

    def __init__(self, values: Iterable[tuple]) -> None:
        super().__init__(map(_held_flow, values))


def metered_flow(flow: Any) -> tuple:
    """What the main pass's meter sends of a flow when nothing is scored (MeterConfig.reduce), and of a held
    packet alone (MeterConfig.held_reduce): a MeteredFlow's values."""
    return (*flow_attributes(flow), None, flow.ndpi)

# The device record contract (docs/devices.md): these names are fixed; more fields may follow.
DEVICE_FIELDS: tuple[tuple[str, str], ...] = (
    ("timestamp", "first packet of the device's first flow, ISO 8601 UTC to the millisecond (as flows have it)"),
    ("event_type", "always \"device\""),
    ("mac", "the device's MAC address"),
    ("ips", "local addresses the device sent from, most used first (never remote ones: a gateway relaying Internet "
            "traffic does not own them)"),
    ("vendor", "vendor, when a signal names one (null otherwise)"),
    ("device_type", "camera, doorbell, smart_plug, light, hub, sensor, alarm, lock, speaker, tv, thermostat, "
                    "health_monitor, appliance, printer, phone, computer, router or unknown"),
    ("model", "product model, null unless the signals name one clearly (look-alikes get an ambiguous_model evidence)"),
    ("confidence", "0..1, how strongly the signals agree on the type (and model)"),
    ("type_guess", "for an unknown device, the best-supported type and its score, {device_type, confidence}, "
                   "too weak or contradicted to be its device_type; null when device_type is known or nothing "
                   "points to a type"),
    ("evidence", "list of {signal, value, points_to}, strongest first"),
    ("first_seen_ms", "first packet of the device's first flow, epoch milliseconds"),
    ("last_seen_ms", "last packet of its last flow"),
    ("flows", "flows in which the device took part"),
    ("bytes", "bytes of those flows, both directions"),
    ("mac_vendor", "organisation of the MAC prefix in the IEEE registry (null if none or randomised)"),
    ("sources", "captures or interfaces the device was seen in"),
)
DEVICE_FIELD_NAMES: tuple[str, ...] = tuple(name for name, _ in DEVICE_FIELDS)

# Fields later stages add to flow records (devices, scoring, analyze --explain); the names are listed so CSV
# writers know them.
DEVICE_LINK_FIELD_MEANINGS: tuple[tuple[str, str], ...] = (
    ("src_device", "MAC of the local device at the initiator's end, to join with device records (absent with "
                   "--no-devices)"),
    ("dst_device", "MAC of the local device at the responder's end"),
)
DEVICE_LINK_FIELDS = tuple(name for name, _ in DEVICE_LINK_FIELD_MEANINGS)
VERDICT_FIELD_MEANINGS: tuple[tuple[str, str], ...] = (
    ("verdict", "benign or attack (absent with --no-score)"),
    ("score", "calibrated probability that the flow is an attack, 0..1"),
    ("family", "null for benign; else ddos, dos, scan, bruteforce, c2, exploit or spoofing"),
    ("reasons", "for attacks, in words: the signature or rule that decided, or the feature groups that pushed the "
                "score most; the first is the strongest"),
    ("evidence_community_id", "for an attack marked by another flow's signature match (a flow of the same two hosts "
                              "matched, or an exploit request one of them received named the other), that flow's "
                              "community_id; else null"),
)
VERDICT_FIELDS = tuple(name for name, _ in VERDICT_FIELD_MEANINGS)
# ... the baseline stage (analyze/live --baseline FILE, iotscan.detect.baseline) ...
BASELINE_FIELD_MEANINGS: tuple[tuple[str, str], ...] = (
    ("anomaly", "with --baseline, 0..1: how far the flow departs from the baseline of its local device (the "
                "strongest of its two ends); null when neither end is a device of the baseline"),
    ("anomaly_reasons", "what departs, strongest first: \"first contact with irc.example.net:6667/IRC (a new "
                        "peer, a port it never used), never seen in 14 days of this device\", \"340 distinct "
                        "destinations in one minute; baseline p99 is 4\", the MUD ACL that does not allow it"),
)
BASELINE_FIELDS = tuple(name for name, _ in BASELINE_FIELD_MEANINGS)
EXPLAIN_FIELDS: tuple[tuple[str, str], ...] = (
    ("inspect", "with analyze --explain, on attack flows of capture files: the ready-to-run `iotscan inspect` "
                "command that shows the flow's packets"),
)

# The risk stage (iotscan/detect/risk_stage.py; the catalogue is iotscan/data/risks.json; docs/risks.md).
# Severities from the least to the worst: `--fail-on risk:high` fails on high and critical.
RISK_SEVERITIES = ("low", "medium", "high", "critical")
RISK_FIELDS: tuple[tuple[str, str], ...] = (
    ("risks", "weak spots the flow shows, worst first: list of {risk, severity, evidence, detector} (risk: an id of "
              "the catalogue; evidence: what was seen, in words; detector: nDPI or iotscan); [] when none"),
)
RISK_FIELD_NAMES: tuple[str, ...] = tuple(name for name, _ in RISK_FIELDS)
# ... and adds these to device records
DEVICE_RISK_FIELDS: tuple[tuple[str, str], ...] = (
    ("risks", "the device's weak spots, worst first: list of {risk, severity, title, flows, first_seen_ms, "
              "last_seen_ms, internet (a flow of it had a public address at its other end), community_ids "
              "(up to 3 examples), evidence (up to 3 distinct), fix (what to do, one line)}"),
    ("risk_score", "0..100: 100 x (1 - product over its risks of (1 - severity x exposure x often)), "
                   "see docs/risks.md"),
    ("risk_grade", "A (risk_score under 10), B (under 30), C (under 50), D (under 70) or F"),
)
DEVICE_RISK_FIELD_NAMES: tuple[str, ...] = tuple(name for name, _ in DEVICE_RISK_FIELDS)
# ... and this to the summary
RISK_SUMMARY_FIELDS: tuple[tuple[str, str], ...] = (
    ("risks", "flows per risk id, most first ({} when no flow showed one)"),
)

SUMMARY_FIELDS: tuple[tuple[str, str], ...] = (
    ("event_type", "always \"summary\", the last record of every run"),
    ("packets", "packets read"),
    ("flows", "flows metered (each written as a record, unless --attacks-only keeps only the attacks)"),
    ("devices", "device records written"),
    ("attacks", "flows with verdict attack"),
    ("attack_families", "flows with verdict attack per family, most first ({} when none or nothing was scored)"),
    ("folded_flows", "flows folded into flood records instead of flow records (--flood-records summary); counted in "
                     "flows, attacks and attack_families"),
    ("floods", "flood records written"),
    ("elapsed_s", "wall-clock seconds"),
    ("packets_per_s", "packets / elapsed_s"),
    ("warnings", "list of {source, code, message}; codes truncated, link_type, flow_cap, no_ip, interrupted, "
                 "dropped, capture, and the stages' (identity_pass, request_pass, device_cap, explain...)"),
    ("errors", "list of {source, message}: inputs that could not be analysed"),
    ("inputs", "list of {source, packets, flows, status} per capture or interface; status ok, truncated, "
               "interrupted, error (live: stopped)"),
)

# A flood's one- and two-packet flows folded into one record per target service and minute of capture time
# (--flood-records summary; iotscan.detect.flood folds them, once the scoring stage has named the flood).
FLOOD_WINDOW_S = 60
FLOOD_FIELDS: tuple[tuple[str, str], ...] = (
    ("timestamp", "first packet of the earliest flow folded in, ISO 8601 UTC to the millisecond (as flows have it)"),
    ("event_type", "always \"flood\""),
    ("source", "capture file or interface"),
    ("dst_ip", "the target's address"),
    ("dst_port", "the target's port (0 without ports)"),
    ("protocol", "IANA protocol number"),
    ("dst_mac", "the target's MAC, as the first flow folded in saw it"),
    ("family", "ddos (many sources) or dos (mostly one), as the scoring stage's flood rule named most of the flows"),
    ("reasons", "why, one phrase: the flood rule's"),
    ("window_start_ms", f"the window of the record: the flows folded in started in [window_start_ms, window_end_ms), "
                        f"{FLOOD_WINDOW_S} s of capture time aligned to multiples of {FLOOD_WINDOW_S} s"),
    ("window_end_ms", "end of the window, epoch milliseconds"),
    ("first_seen_ms", "first packet of the earliest flow folded in, epoch milliseconds"),
    ("last_seen_ms", "last packet of the latest flow folded in"),
    ("flows", "flows folded in: one- and two-packet flows of the flood, each counted as an attack in the summary"),
    ("packets", "their packets, both directions"),
    ("bytes", "their bytes, both directions"),
    ("answered_flows", "flows the target answered (a SYN-ACK, a RST, a reply: the second packet of a two-packet flow)"),
    ("packets_per_s", "packets / (last_seen_ms - first_seen_ms), per second (0 within one millisecond)"),
    ("distinct_sources", "distinct source addresses: a HyperLogLog estimate (Apache DataSketches, 4,096 registers: "
                         "exact below a few hundred, about 1.6% off beyond)"),
    ("spoofed_share", "share of the distinct sources that look spoofed: an address no host sends from (unspecified, "
                      "loopback, multicast, broadcast or reserved, documentation or benchmarking ranges, the "
                      "target's own) or one that sent the target this one flow in the window, measured on a "
                      "sample of up to 1,024 of them drawn by a hash of the address"),
    ("top_sources", "up to 5 sources that sent a share of the flows no other could have, most first: "
                    "[{ip, flows}] (flows at least this many; [] when none stands out, as in a spoofed flood)"),
    ("top_src_ports", "the same for source ports: [{port, flows}] (a reflection flood comes from its service's port)"),
    ("example_community_ids", "Community IDs of the first 3 flows folded in, to find them in Zeek or Suricata"),
)
FLOOD_FIELD_NAMES: tuple[str, ...] = tuple(name for name, _ in FLOOD_FIELDS)

# `iotscan live` adds these to its summary record.
LIVE_SUMMARY_FIELDS: tuple[tuple[str, str], ...] = (
    ("dropped_packets", "packets the kernel dropped because iotscan did not keep up (its buffer was full)"),
    ("ifdropped_packets", "packets the interface or its driver dropped, where it reports them"),
    ("unread_packets", "packets still waiting in the kernel's buffer when the capture stopped, not metered: once "
                       "stopped, iotscan meters what arrived before the stop for 2 s, then counts the rest for 2 s "
                       "(at least this many)"),
    ("stop_reason", "\"signal\" (Ctrl-C, SIGTERM), \"duration\", \"count\", or \"error\""),
)

# `iotscan analyze --jobs N` or `--scheduler ADDRESS` adds this to its summary record.
CLUSTER_SUMMARY_FIELDS: tuple[tuple[str, str], ...] = (
    ("workers", "per worker process: worker (its address), captures, packets, flows, bytes (of the captures), "
                "busy_s (seconds analysing them) and packets_per_s (packets / busy_s)"),
)

# `iotscan live --stats-interval S` writes one of these every S seconds, between the flow records.
STATS_FIELDS: tuple[tuple[str, str], ...] = (
    ("timestamp", "when the record was made, ISO 8601 UTC to the millisecond (as flow records)"),
    ("event_type", "always \"stats\""),
    ("source", "the interface"),
    ("timestamp_ms", "when the record was made, epoch milliseconds"),
    ("elapsed_s", "seconds since the capture started"),
    ("interval_s", "seconds since the previous stats record (or the start)"),
    ("packets", "packets metered since the start"),
    ("flows", "flows metered since the start (each written as a record, unless --attacks-only)"),
    ("active_flows", "flows in the meter's table now, not yet written"),
    ("attacks", "flows with verdict attack since the start"),
    ("dropped_packets", "packets the kernel dropped since the start (iotscan did not keep up)"),
    ("ifdropped_packets", "packets the interface or its driver dropped since the start"),
    ("packets_per_s", "packets metered in the interval / interval_s"),
    ("flows_per_s", "flow records written in the interval / interval_s"),
    ("dropped_per_s", "packets dropped by the kernel in the interval / interval_s"),
)
STATS_FIELD_NAMES: tuple[str, ...] = tuple(name for name, _ in STATS_FIELDS)

# What the host-behaviour stage (iotscan.detect.hosts) writes when it decides about a host: once per
# decision, when it is made; the flows of the activity are marked as attacks too (verdict, family, reasons).
# The baseline stage (iotscan.detect.baseline) writes the same record for a device that departs from its
# baseline, and for a device that is not in it.
ALERT_FIELDS: tuple[tuple[str, str], ...] = (
    ("timestamp", "when the decision was made (capture time), ISO 8601 UTC to the millisecond"),
    ("event_type", "always \"alert\""),
    ("source", "capture file or interface"),
    ("kind", "\"scan\" (a host probing others), \"compromised\" (a device behaving as an infected one), "
             "\"anomaly\" (a device departing from its baseline: --baseline) or \"new_device\" (a device the "
             "baseline does not know)"),
    ("detail", "scan: \"horizontal\" (many hosts), \"vertical\" (many ports of a host) or \"sweep\" "
               "(host discovery); compromised: the strongest indicator; anomaly: the strongest evidence "
               "(new_peer, new_local_peer, new_service, new_app, new_dns, inbound, no_dns, volume, hour, mud); "
               "new_device: the MAC's vendor"),
    ("family", "the attack family of the activity: scan, c2, ...; null for anomaly and new_device (behaviour "
               "that departs is not yet an attack)"),
    ("score", "0..1, how sure the decision is"),
    ("host_ip", "the host the alert is about"),
    ("host_mac", "its MAC as the flows show it"),
    ("host_device", "the local device (MAC) it is, as flow records' src_device name it; null if not local"),
    ("message", "one line for a person"),
    ("reasons", "the indicators, strongest first"),
    ("evidence", "counts behind the decision (failed first contacts, hosts, ports, ...)"),
    ("first_seen_ms", "the first evidence, epoch milliseconds"),
    ("last_seen_ms", "the last evidence before the decision"),
    ("decided_ms", "when the decision was made, epoch milliseconds"),
    ("evidence_community_ids", "Community IDs of a few evidence flows, to find them in flow records"),
)
ALERT_FIELD_NAMES: tuple[str, ...] = tuple(name for name, _ in ALERT_FIELDS)
# ... and adds these to the summary record
HOST_SUMMARY_FIELDS: tuple[tuple[str, str], ...] = (
    ("alerts", "alert records written"),
    ("alert_kinds", "alert records per kind, most first ({} when none)"),
)
# ... and the baseline stage this
BASELINE_SUMMARY_FIELDS: tuple[tuple[str, str], ...] = (
    ("baseline", "with --baseline: {devices: profiles in the baseline, new_devices: devices it did not know, "
                 "anomalous_flows: flows at or above the threshold, threshold}"),
)

_TLS_LIKE = ("TLS", "QUIC", "DTLS", "IMAPS", "POPS", "SMTPS", "FTPS")
_ICMP = (1, 58)
_PORT_PROTOCOLS = (6, 17, 132)
_PORT = struct.Struct("!H")
_community = CommunityID()


class _PackedTuple:
    """A flow tuple already packed, validated and ordered here, in the shape the communityid package's
    ``hash`` reads (its FlowTuple re-validates every address by trial and error: 9 us of the 17 us a
    flow cost; ``calc`` also logs every tuple)."""

    __slots__ = ("daddr", "dport", "proto", "saddr", "sport")

    def __init__(self, proto: int, saddr: bytes, daddr: bytes, sport: bytes | None = None,
                 dport: bytes | None = None) -> None:
        self.proto, self.saddr, self.daddr, self.sport, self.dport = proto, saddr, daddr, sport, dport

    def has_ports(self) -> bool:
        return self.sport is not None


def community_id(src_ip: str, dst_ip: str, protocol: int, src_port: int, dst_port: int) -> str | None:
    """Community ID v1 (seed 0, base64), the hash Zeek and Suricata write, computed by the communityid
    package from the tuple packed and ordered here."""
    if protocol in _ICMP:
        return None  # needs ICMP type and code, which NFStream does not keep
    try:
        family = socket.AF_INET6 if ":" in src_ip else socket.AF_INET
        saddr, daddr = socket.inet_pton(family, src_ip), socket.inet_pton(family, dst_ip)
    except (OSError, ValueError):
        return None
    if protocol in _PORT_PROTOCOLS:
        if (daddr, dst_port) < (saddr, src_port):
            saddr, daddr, src_port, dst_port = daddr, saddr, dst_port, src_port
        tpl = _PackedTuple(protocol, saddr, daddr, _PORT.pack(src_port), _PORT.pack(dst_port))
    else:
        if daddr < saddr:
            saddr, daddr = daddr, saddr
        tpl = _PackedTuple(protocol, saddr, daddr)
    return _community.render(_community.hash(tpl))


@functools.lru_cache(maxsize=4096)  # flows end roughly in time order: many share a second
def _utc_second(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


def iso_timestamp(epoch_ms: int) -> str:
    """Epoch milliseconds as ISO 8601 UTC, as Suricata's EVE writes times: "2017-07-06T13:40:07.419Z"."""
    seconds, ms = divmod(epoch_ms, 1000)
    return f"{_utc_second(seconds)}.{ms:03d}Z"


def iso_timestamp_text(epoch: str) -> str:
    """Epoch seconds written as text ("1472729311.407793000", as tshark gives them) as ISO 8601 UTC to the
    microsecond, without a float's rounding: "2016-09-01T11:28:31.407793Z"."""
    seconds, _, fraction = epoch.partition(".")
    return f"{_utc_second(int(seconds))}.{(fraction + '000000')[:6]}Z"


def flow_id(source_name: str, key: str, first_seen_ms: int) -> int:
    """A 63-bit id from the capture's name, the flow key and its start: the same flow gets the same id
    in every run over the same capture (so `iotscan inspect` can find it again)."""
    digest = hashlib.blake2b(f"{source_name}|{key}|{first_seen_ms}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


# How a person (and `iotscan inspect --5tuple`) names a flow's protocol and endpoints.
PROTOCOL_LABELS = {6: "tcp", 17: "udp", 132: "sctp", 1: "icmp", 58: "icmpv6"}


def endpoint_text(ip: str, port: int | None) -> str:
    """ip:port, IPv6 in brackets ([fe80::1]:5353)."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def five_tuple_text(src_ip: str, src_port: int, dst_ip: str, dst_port: int, protocol: int) -> str:
    """SRC:PORT-DST:PORT/PROTO, the 5-tuple form `iotscan inspect` reads."""
    return (f"{endpoint_text(src_ip, src_port)}-{endpoint_text(dst_ip, dst_port)}/"
            f"{PROTOCOL_LABELS.get(protocol, protocol)}")


def inspect_command(record: dict[str, Any], *, idle_timeout: int = 120, active_timeout: int = 1800,
                    program: str = "iotscan", flow: str | None = None, extra: Sequence[str] = ()) -> str:
    """The ready-to-run, shell-quoted command that shows the packets of a flow record of a capture file.

    It names the flow by its id (or ``flow``: a prefix of it unique in the capture) and gives its 5-tuple too,
    so that on a large capture the flow pass meters only that 5-tuple's packets. Flow ids depend on the
    meter's time-outs: pass the ones analyze ran with when they are not the defaults (or as ``extra``
    arguments), and the command carries them. (A record of `iotscan live` names an interface, which has no
    packets to show afterwards.)
    """
    argv = [program, "inspect", str(record["source"]), flow or str(record["flow_id"]), "--5tuple",
            five_tuple_text(record["src_ip"], record["src_port"], record["dst_ip"], record["dst_port"],
                            record["protocol"])]
    if idle_timeout != 120:
        argv += ["--idle-timeout", str(idle_timeout)]
    if active_timeout != 1800:
        argv += ["--active-timeout", str(active_timeout)]
    return shlex.join([*argv, *extra])


def flow_record(flow: Any, source: str, source_name: str) -> dict[str, Any]:
    """Build the contract record of one NFStream flow."""
    app = flow.application_name or None
    base_app = app.split(".", 1)[0] if app else ""
    client_fp = flow.client_fingerprint or None
    server_name = flow.requested_server_name or None
    is_dhcp = base_app == "DHCP"
    src_ip, dst_ip, proto = flow.src_ip, flow.dst_ip, flow.protocol
    src_port, dst_port = flow.src_port, flow.dst_port
    cid = community_id(src_ip, dst_ip, proto, src_port, dst_port)
    first = flow.bidirectional_first_seen_ms
    key = cid or f"{proto}:{src_ip}:{src_port}-{dst_ip}:{dst_port}"
    return {
        "timestamp": iso_timestamp(first),
        "event_type": "flow",
        "flow_id": flow_id(source_name, f"{key}|{flow.vlan_id}|{flow.tunnel_id}", first),
        "community_id": cid,
        "source": source,
        "first_seen_ms": first,
        "last_seen_ms": flow.bidirectional_last_seen_ms,
        "duration_ms": flow.bidirectional_duration_ms,
        "src_ip": src_ip,
        "src_port": src_port,
        "src_mac": flow.src_mac,
        "dst_ip": dst_ip,
        "dst_port": dst_port,
        "dst_mac": flow.dst_mac,
        "protocol": proto,
        "ip_version": flow.ip_version,
        "vlan_id": flow.vlan_id,
        "app": app,
        "app_guessed": bool(flow.application_is_guessed),
        "category": flow.application_category_name or None,
        "server_name": None if is_dhcp else server_name,
        "ja4": client_fp if base_app in _TLS_LIKE else None,
        "server_fingerprint": flow.server_fingerprint or None,
        "client_hash": client_fp if not is_dhcp and base_app not in _TLS_LIKE else None,
        "dhcp_hostname": server_name if is_dhcp else None,
        "dhcp_fingerprint": client_fp if is_dhcp else None,
        "user_agent": flow.user_agent or None,
        "content_type": flow.content_type or None,
        "packets": flow.bidirectional_packets,
        "bytes": flow.bidirectional_bytes,
        "src2dst_packets": flow.src2dst_packets,
        "src2dst_bytes": flow.src2dst_bytes,
        "dst2src_packets": flow.dst2src_packets,
        "dst2src_bytes": flow.dst2src_bytes,
    }


@functools.lru_cache(maxsize=65536)  # ipaddress's checks cost 20 us; bounded: a spoofed flood's addresses
def is_local_address(ip: str) -> bool:
    """Private, link-local or unique-local: an address of the local network, not the Internet."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if addr.is_multicast or addr.is_unspecified or addr.is_loopback:
        return False
    return addr.is_private or addr.is_link_local


@functools.lru_cache(maxsize=65536)
def is_group_address(ip: str) -> bool:
    """Multicast or broadcast (the limited broadcast, or a /24's): a destination no host answers as one."""
    if ip.endswith(".255") or ip.startswith(("ff", "FF")):
        return True
    try:
        return ipaddress.ip_address(ip).is_multicast
    except ValueError:
        return False


def alert_record(*, decided_ms: int, **values: Any) -> dict[str, Any]:
    """An alert, its fields in ALERT_FIELDS order."""
    record: dict[str, Any] = {"timestamp": iso_timestamp(decided_ms), "event_type": "alert"}
    for name in ALERT_FIELD_NAMES[2:]:
        record[name] = decided_ms if name == "decided_ms" else values.get(name)
    return record


def flood_record(**values: Any) -> dict[str, Any]:
    """A flood record of FLOOD_FIELDS (timestamp and event_type made here), in their order."""
    values["timestamp"] = iso_timestamp(values["first_seen_ms"])
    values["event_type"] = "flood"
    return {name: values[name] for name in FLOOD_FIELD_NAMES}


def summary_record(**values: Any) -> dict[str, Any]:
    record = {"event_type": "summary"}
    for name, _ in SUMMARY_FIELDS[1:]:
        record[name] = values.get(name)
    for name, value in values.items():
        record.setdefault(name, value)
    return record
