"""The transport headers and DNS names of the raw IP packets that side-pass plugins read (NFStream's
``ip_packet``), for the identity pass (iotscan.devices.identity) and the request pass.

The bytes are untrusted: the header functions return None for anything they cannot read whole, and
read_dns_name raises ValueError. IPv6 packets with extension headers are not followed (the side
passes' BPF filters do not follow them either).
"""

from __future__ import annotations

import struct
from typing import NamedTuple

ICMP, TCP, UDP, ICMP6 = 1, 6, 17, 58
_PORTS = struct.Struct("!HH")
MAX_NAME_JUMPS = 32  # DNS name compression pointers followed per name


def transport_offset(ip_packet: bytes, protocol: int, header_size: int) -> int | None:
    """Where the ``protocol`` header of an IPv4 packet, or of an IPv6 one without extension headers,
    starts; None for another protocol or a packet too short to hold ``header_size`` bytes of it."""
    version = ip_packet[0] >> 4 if ip_packet else 0
    if version == 4:
        offset = (ip_packet[0] & 0x0F) * 4
        if offset < 20 or len(ip_packet) < 20 or ip_packet[9] != protocol:
            return None
    elif version == 6:
        offset = 40
        if len(ip_packet) < 40 or ip_packet[6] != protocol:
            return None
    else:
        return None
    return offset if len(ip_packet) >= offset + header_size else None


def udp_payload(ip_packet: bytes) -> tuple[int, int, bytes] | None:
    """(source port, destination port, payload) of a UDP datagram, or None."""
    offset = transport_offset(ip_packet, UDP, 8)
    if offset is None:
        return None
    sport, dport = _PORTS.unpack_from(ip_packet, offset)
    return sport, dport, ip_packet[offset + 8:]


class TcpSegment(NamedTuple):
    src_port: int
    flags: int
    window: int
    dont_fragment: bool  # the IPv4 header's DF bit (False over IPv6, which has none)
    payload: bytes


def tcp_segment(ip_packet: bytes) -> TcpSegment | None:
    """The header fields and payload of a TCP segment, or None."""
    offset = transport_offset(ip_packet, TCP, 20)
    if offset is None:
        return None
    return TcpSegment(int.from_bytes(ip_packet[offset:offset + 2], "big"), ip_packet[offset + 13],
                      int.from_bytes(ip_packet[offset + 14:offset + 16], "big"),
                      ip_packet[0] >> 4 == 4 and bool(ip_packet[6] & 0x40),
                      ip_packet[offset + (ip_packet[offset + 12] >> 4) * 4:])


def echo_request_data(ip_packet: bytes) -> int | None:
    """How many data bytes an ICMP (or ICMPv6) echo request carries, by its IP header's length (a
    short frame's Ethernet padding is no data); None for any other packet."""
    offset = transport_offset(ip_packet, ICMP, 8)
    if offset is not None:
        total, echo = int.from_bytes(ip_packet[2:4], "big"), 8
    else:
        offset = transport_offset(ip_packet, ICMP6, 8)
        if offset is None:
            return None
        total, echo = 40 + int.from_bytes(ip_packet[4:6], "big"), 128
    return max(total - offset - 8, 0) if ip_packet[offset] == echo else None


def read_dns_name(msg: bytes, offset: int) -> tuple[str, int]:
    """A DNS name at offset (with compression); returns (name, offset after it in the record)."""
    labels: list[str] = []
    jumps = 0
    end_offset = -1
    total = 0
    while True:
        if offset >= len(msg):
            raise ValueError("name runs past the message")
        length = msg[offset]
        if length == 0:
            offset += 1
            break
        if length & 0xC0 == 0xC0:
            if offset + 1 >= len(msg):
                raise ValueError("truncated pointer")
            if end_offset < 0:
                end_offset = offset + 2
            jumps += 1
            if jumps > MAX_NAME_JUMPS:
                raise ValueError("pointer loop")
            offset = ((length & 0x3F) << 8) | msg[offset + 1]
            continue
        if length & 0xC0:
            raise ValueError("unsupported label type")
        label = msg[offset + 1:offset + 1 + length]
        total += length + 1
        if total > 255:
            raise ValueError("name too long")
        labels.append(label.decode("utf-8", errors="replace"))
        offset += 1 + length
    return ".".join(labels), (end_offset if end_offset >= 0 else offset)
