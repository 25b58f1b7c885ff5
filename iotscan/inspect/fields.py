"""Per-protocol field extraction: the fields of tshark's dissection that matter, read from a pyshark
layer into a packet record (IP, TCP, UDP, ICMP, DNS, HTTP, SSDP, TLS, MQTT, DHCP, Telnet, CoAP, IRC,
FTP, TFTP).
"""

from __future__ import annotations

import re
from typing import Any

from iotscan.errors import CaptureError


class _Fields:
    """A pyshark layer's fields by their full tshark names (pyshark's get_field scans all fields on
    a miss, and most of the names asked for here are absent)."""

    __slots__ = ("by_name", "name")

    def __init__(self, layer: Any) -> None:
        self.name: str = layer.layer_name
        try:
            containers = layer._all_fields  # XmlLayer's own index (pyshark 0.5, 0.6)
        except AttributeError:
            raise CaptureError("this pyshark version keeps packet fields where iotscan does not look: install "
                               "pyshark 0.6 (pip install 'pyshark>=0.6,<0.7')") from None
        self.by_name: dict[str, list[Any]] = {n: c.all_fields for n, c in containers.items()}

    def all(self, name: str) -> list[Any]:
        return self.by_name.get(name, [])

    def first(self, name: str) -> Any | None:
        found = self.by_name.get(name)
        return found[0] if found else None

    def show(self, name: str) -> str | None:
        f = self.first(name)
        if f is None:
            return None
        value = f.show if f.show is not None else f.raw_value
        return value if value != "" else None

    def int(self, name: str) -> int | None:
        value = self.show(name)
        if value is None:
            return None
        try:
            return int(value, 0) if value.lower().startswith("0x") else int(value)
        except ValueError:
            return None

    def flag(self, name: str) -> bool | None:
        value = self.show(name)
        return None if value is None else value in ("1", "True", "true")

    def label(self, name: str) -> str | None:
        """The value part of the showname without the trailing number: 'Type: A (Host Address) (1)' -> 'A (Host
        Address)'."""
        f = self.first(name)
        return _label(f) if f is not None else None

    def text(self, name: str) -> str | None:
        """Bytes fields (raw hex) as text, undecodable bytes escaped."""
        parts = [bytes.fromhex(f.raw_value) for f in self.all(name) if f.raw_value and _is_hex(f.raw_value)]
        if not parts:
            return None
        return b"".join(parts).decode("utf-8", errors="backslashreplace")


def _is_hex(value: str) -> bool:
    return len(value) % 2 == 0 and all(c in "0123456789abcdefABCDEF" for c in value)


def _label(f: Any) -> str | None:
    showname = f.showname or ""
    value = showname.split(": ", 1)[1] if ": " in showname else showname
    value = re.sub(r"\s*\((?:0x)?[0-9a-fA-F]+\)$", "", value.strip())
    return value or None


# In Wireshark's order: "SYN,ACK", "PSH,ACK", "FIN,ACK".
TCP_FLAG_NAMES = ((0x01, "FIN"), (0x02, "SYN"), (0x04, "RST"), (0x08, "PSH"), (0x10, "ACK"), (0x20, "URG"),
                  (0x40, "ECE"), (0x80, "CWR"), (0x100, "AE"))
MQTT_TYPES = {1: "CONNECT", 2: "CONNACK", 3: "PUBLISH", 4: "PUBACK", 5: "PUBREC", 6: "PUBREL", 7: "PUBCOMP",
              8: "SUBSCRIBE", 9: "SUBACK", 10: "UNSUBSCRIBE", 11: "UNSUBACK", 12: "PINGREQ", 13: "PINGRESP",
              14: "DISCONNECT", 15: "AUTH"}
TLS_HANDSHAKE_TYPES = {0: "hello_request", 1: "client_hello", 2: "server_hello", 4: "new_session_ticket",
                       5: "end_of_early_data", 8: "encrypted_extensions", 11: "certificate",
                       12: "server_key_exchange", 13: "certificate_request", 14: "server_hello_done",
                       15: "certificate_verify", 16: "client_key_exchange", 20: "finished", 24: "key_update"}
TLS_VERSIONS = {0x0300: "SSL 3.0", 0x0301: "TLS 1.0", 0x0302: "TLS 1.1", 0x0303: "TLS 1.2", 0x0304: "TLS 1.3",
                0xFEFF: "DTLS 1.0", 0xFEFD: "DTLS 1.2", 0xFEFC: "DTLS 1.3"}
DHCP_MESSAGE_TYPES = {1: "DISCOVER", 2: "OFFER", 3: "REQUEST", 4: "DECLINE", 5: "ACK", 6: "NAK", 7: "RELEASE",
                      8: "INFORM"}
COAP_TYPES = {0: "CON", 1: "NON", 2: "ACK", 3: "RST"}
SSDP_HEADERS = ("st", "nt", "nts", "usn", "man", "mx")


def _put(out: dict[str, Any], key: str, value: Any) -> None:
    """The first PDU of a protocol in a packet fills its fields; later ones do not overwrite them."""
    if value is not None and value != [] and key not in out:
        out[key] = value


def _ip(f: _Fields, out: dict[str, Any]) -> None:
    _put(out, "ttl", f.int("ip.ttl"))


def _ipv6(f: _Fields, out: dict[str, Any]) -> None:
    _put(out, "ttl", f.int("ipv6.hlim"))


def _tcp(f: _Fields, out: dict[str, Any]) -> None:
    flags = f.int("tcp.flags")
    if flags is not None:
        _put(out, "tcp_flags", ",".join(name for bit, name in TCP_FLAG_NAMES if flags & bit) or "none")
    _put(out, "tcp_seq", f.int("tcp.seq"))
    _put(out, "tcp_ack", f.int("tcp.ack"))
    _put(out, "tcp_window", f.int("tcp.window_size_value"))
    _put(out, "payload_length", f.int("tcp.len"))


def _udp(f: _Fields, out: dict[str, Any]) -> None:
    length = f.int("udp.length")
    if length is not None:
        _put(out, "payload_length", max(length - 8, 0))


def _icmp(f: _Fields, out: dict[str, Any]) -> None:
    prefix = f.name  # icmp or icmpv6
    _put(out, "icmp_type", f.int(f"{prefix}.type"))
    _put(out, "icmp_code", f.int(f"{prefix}.code"))
    label = f.label(f"{prefix}.type")  # ICMP: "8 (Echo (ping) request)"; ICMPv6: "Neighbor Solicitation"
    m = re.fullmatch(r"\d+ \((.*)\)", label or "")
    _put(out, "icmp_label", m.group(1) if m else label)


def _dns(f: _Fields, out: dict[str, Any]) -> None:
    # mDNS and LLMNR layers carry the same dns.* fields.
    _put(out, "dns_id", f.int("dns.id"))
    _put(out, "dns_response", f.flag("dns.flags.response"))
    _put(out, "dns_query", f.show("dns.qry.name"))
    qtype = f.label("dns.qry.type")
    _put(out, "dns_qtype", qtype.split()[0] if qtype else None)
    if f.flag("dns.flags.response"):
        _put(out, "dns_rcode", f.int("dns.flags.rcode"))
        _put(out, "dns_answers", _dns_answers(f))


# Fields of a resource record's header: everything after them in the record is its data.
_DNS_RR_HEADER = {"dns.resp.name", "dns.resp.type", "dns.resp.class", "dns.resp.ttl", "dns.resp.len",
                  "dns.resp.cache_flush", "dns.resp.ext_rcode", "dns.resp.edns0_version", "dns.resp.z",
                  "dns.resp.z.do", "dns.resp.z.reserved", "dns.rr.udp_payload_size"}


def _dns_answers(f: _Fields) -> list[dict[str, Any]]:
    """The answer section as [{name, type, ttl, data}], data as dig shows it (fields joined by spaces)."""
    count = f.int("dns.count.answers") or 0
    names, types, ttls = f.all("dns.resp.name"), f.all("dns.resp.type"), f.all("dns.resp.ttl")
    lengths = f.all("dns.resp.len")
    answers: list[dict[str, Any]] = []
    for i in range(min(count, len(names), len(types), len(lengths))):
        start = int(lengths[i].pos) + int(lengths[i].size)
        end = start + int(lengths[i].show or 0)
        data = [fld for name, flds in f.by_name.items() if name.startswith("dns.") and name not in _DNS_RR_HEADER
                and not name.endswith((".len", ".length")) for fld in flds
                if fld.pos is not None and start <= int(fld.pos) < end and fld.show]
        data.sort(key=lambda fld: int(fld.pos))
        rtype = _label(types[i]) or types[i].show
        answers.append({"name": names[i].show, "type": rtype.split()[0] if rtype else None,
                        "ttl": int(ttls[i].show) if i < len(ttls) and ttls[i].show else None,
                        "data": " ".join(fld.show for fld in data) or None})
    return answers


def _http(f: _Fields, out: dict[str, Any]) -> None:
    _put(out, "http_method", f.show("http.request.method"))
    _put(out, "http_host", f.show("http.host"))
    _put(out, "http_uri", f.show("http.request.uri"))
    _put(out, "http_user_agent", f.show("http.user_agent"))
    _put(out, "http_status", f.int("http.response.code"))
    _put(out, "http_reason", f.show("http.response.phrase"))
    _put(out, "http_content_type", f.show("http.content_type"))
    _put(out, "http_server", f.show("http.server"))
    _put(out, "http_location", f.show("http.location"))


def _ssdp(f: _Fields, out: dict[str, Any]) -> None:
    _http(f, out)
    for fld in f.all("http.unknown_header"):
        name, sep, value = (fld.show or "").partition(":")
        key = name.strip().lower()
        if sep and key in SSDP_HEADERS:
            _put(out, f"ssdp_{key}", value.strip().removesuffix("\\r\\n").strip())


def _tls(f: _Fields, out: dict[str, Any]) -> None:
    types = [TLS_HANDSHAKE_TYPES.get(int(x.show), x.show) for x in f.all(f"{f.name}.handshake.type")
             if x.show and x.show.isdigit()]
    if types:
        out.setdefault("tls_handshake_types", []).extend(types)
    _put(out, "tls_sni", f.show(f"{f.name}.handshake.extensions_server_name"))
    versions = [int(x.show, 16) for x in f.all(f"{f.name}.handshake.extensions.supported_version")
                if x.show and x.show.startswith("0x")]
    hello_version = f.int(f"{f.name}.handshake.version")
    if versions:
        # A client offers several (the best first after GREASE), a server hello names the chosen one.
        real = [v for v in versions if v in TLS_VERSIONS]
        _put(out, "tls_version", TLS_VERSIONS.get(max(real)) if real else None)
    elif hello_version is not None:
        _put(out, "tls_version", TLS_VERSIONS.get(hello_version, hex(hello_version)))
    record_version = f.int(f"{f.name}.record.version")
    if record_version is not None:
        _put(out, "tls_record_version", TLS_VERSIONS.get(record_version, hex(record_version)))
    _put(out, "tls_alpn", [x.show for x in f.all(f"{f.name}.handshake.extensions_alpn_str") if x.show])
    if "server_hello" in types:
        _put(out, "tls_cipher_suite", f.label(f"{f.name}.handshake.ciphersuite"))
    _put(out, "tls_ja3", f.show(f"{f.name}.handshake.ja3"))
    _put(out, "tls_ja3s", f.show(f"{f.name}.handshake.ja3s"))


def _mqtt(f: _Fields, out: dict[str, Any]) -> None:
    msgtype = f.int("mqtt.msgtype")
    if msgtype is None:
        return
    _put(out, "mqtt_msgtype", MQTT_TYPES.get(msgtype, str(msgtype)))
    _put(out, "mqtt_topic", f.show("mqtt.topic"))
    _put(out, "mqtt_qos", f.int("mqtt.qos"))
    _put(out, "mqtt_client_id", f.show("mqtt.clientid"))
    _put(out, "mqtt_username", f.show("mqtt.username"))
    _put(out, "mqtt_message", f.text("mqtt.msg"))


def _dhcp(f: _Fields, out: dict[str, Any]) -> None:
    p = f.name  # "dhcp" (tshark >= 3.0) or "bootp"
    kind = f.int(f"{p}.option.dhcp")
    _put(out, "dhcp_msgtype", DHCP_MESSAGE_TYPES.get(kind, str(kind)) if kind is not None else None)
    _put(out, "dhcp_client_mac", f.show(f"{p}.hw.mac_addr"))
    _put(out, "dhcp_hostname", f.show(f"{p}.option.hostname"))
    _put(out, "dhcp_vendor_class", f.show(f"{p}.option.vendor_class_id"))
    _put(out, "dhcp_param_list", [int(x.show) for x in f.all(f"{p}.option.request_list_item")
                                  if x.show and x.show.isdigit()])
    _put(out, "dhcp_requested_ip", f.show(f"{p}.option.requested_ip_address"))
    your = f.show(f"{p}.ip.your")
    _put(out, "dhcp_your_ip", your if your and your != "0.0.0.0" else None)


def _telnet(f: _Fields, out: dict[str, Any]) -> None:
    _put(out, "telnet_data", f.text("telnet.data"))


def _coap(f: _Fields, out: dict[str, Any]) -> None:
    kind = f.int("coap.type")
    _put(out, "coap_type", COAP_TYPES.get(kind) if kind is not None else None)
    _put(out, "coap_code", f.label("coap.code"))
    _put(out, "coap_mid", f.int("coap.mid"))
    _put(out, "coap_uri", f.show("coap.opt.uri_path_recon"))


def _irc(f: _Fields, out: dict[str, Any]) -> None:
    lines = [x.show for name in ("irc.request", "irc.response") for x in f.all(name) if x.show]
    if lines:
        out.setdefault("irc_lines", []).extend(lines)


def _ftp(f: _Fields, out: dict[str, Any]) -> None:
    _put(out, "ftp_command", f.show("ftp.request.command"))
    _put(out, "ftp_arg", f.show("ftp.request.arg"))
    _put(out, "ftp_response_code", f.int("ftp.response.code"))
    _put(out, "ftp_response_arg", f.show("ftp.response.arg"))


def _reassembly(f: _Fields, out: dict[str, Any]) -> None:
    _put(out, "reassembled_frames", [int(x.show) for x in f.all("tcp.segment") if x.show and x.show.isdigit()])


def _tftp(f: _Fields, out: dict[str, Any]) -> None:
    _put(out, "tftp_opcode", f.label("tftp.opcode"))
    _put(out, "tftp_file", f.show("tftp.source_file") or f.show("tftp.destination_file"))


# pyshark's name for tshark's "fake-field-wrapper": the reassembly facts of a TCP PDU, not a protocol.
_REASSEMBLY = "DATA"

LAYER_FIELDS = {
    "ip": _ip, "ipv6": _ipv6, "tcp": _tcp, "udp": _udp, "icmp": _icmp, "icmpv6": _icmp,
    "dns": _dns, "mdns": _dns, "llmnr": _dns, "http": _http, "ssdp": _ssdp, "tls": _tls, "dtls": _tls,
    "mqtt": _mqtt, "dhcp": _dhcp, "bootp": _dhcp, "telnet": _telnet, "coap": _coap, "irc": _irc, "ftp": _ftp,
    "tftp": _tftp, _REASSEMBLY: _reassembly,
}

# The frame facts every packet record has (README, "inspect"); the layers' fields follow them.
PACKET_FIELDS: tuple[tuple[str, str], ...] = (
    ("timestamp", "capture time, ISO 8601 UTC to the microsecond (as flow records, to the millisecond)"),
    ("event_type", "always \"packet\""),
    ("flow_id", "the flow the packet belongs to (as in analyze's flow records)"),
    ("community_id", "the flow's Community ID"),
    ("source", "capture file"),
    ("frame_number", "Wireshark's frame number in the capture (Go to packet)"),
    ("timestamp_ms", "capture time, epoch milliseconds (as first_seen_ms of flow records)"),
    ("direction", "src2dst (from the flow's initiator) or dst2src"),
    ("length", "bytes on the wire"),
    ("captured_length", "bytes captured"),
    ("layers", "tshark's protocol layers, outermost first, e.g. [eth, ip, udp, dns]"),
    ("reassembled_frames", "frames whose TCP payloads tshark joined into the PDU dissected here"),
)
