"""Ethernet frames and classic pcap files written by tests: captures of exactly the packets a test needs (nothing
is sent anywhere)."""

from __future__ import annotations

import ipaddress
import struct
from pathlib import Path

MAC_A = b"\x02\0\0\0\0\x02"
MAC_B = b"\x02\0\0\0\0\x01"


def write_timed_pcap(path: Path, frames: list[tuple[float, bytes]], start_s: int = 1_700_000_000) -> None:
    """A classic pcap (Ethernet) holding each frame at its time (seconds from start_s)."""
    with path.open("wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        for t, frame in sorted(frames, key=lambda tf: tf[0]):
            f.write(struct.pack("<IIII", start_s + int(t), round((t % 1) * 1e6), len(frame), len(frame)) + frame)


def write_pcap(path: Path, frames: list[bytes]) -> None:
    """A classic pcap (Ethernet) holding ``frames``, one millisecond apart."""
    write_timed_pcap(path, [(i / 1000, frame) for i, frame in enumerate(frames)])


def ether(ip_packet: bytes, src_mac: bytes = MAC_A, dst_mac: bytes = MAC_B) -> bytes:
    return dst_mac + src_mac + (b"\x86\xdd" if ip_packet[0] >> 4 == 6 else b"\x08\x00") + ip_packet


def ipv4(src: str, dst: str, proto: int, payload: bytes, ttl: int = 64) -> bytes:
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0x4000, ttl, proto, 0,
                       ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed) + payload


def tcp(sport: int, dport: int, flags: int, payload: bytes = b"", seq: int = 1, ack: int = 1) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 0x50, flags, 64240, 0, 0) + payload


def udp(sport: int, dport: int, payload: bytes) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def dns_message(name: str, answers: tuple[str, ...] = (), txid: int = 0x1234, rcode: int = 0) -> bytes:
    """A DNS query (no answers) or a response naming ``answers`` (IPv4 A records) for ``name``."""
    qname = b"".join(bytes([len(label)]) + label.encode() for label in name.split(".") if label) + b"\0"
    flags = 0x8180 | rcode if answers or rcode else 0x0100
    header = struct.pack("!HHHHHH", txid, flags, 1, len(answers), 0, 0)
    records = b"".join(b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + ipaddress.IPv4Address(a).packed
                       for a in answers)
    return header + qname + b"\0\x01\0\x01" + records


SYN, RST, ACK, PSH_ACK, SYN_ACK, RST_ACK = 0x02, 0x04, 0x10, 0x18, 0x12, 0x14
