"""Held packets: the new flows of a flooded service that the meter never makes NFStream flows of.

The scoring stage folds a flood's one- and two-packet flows into flood records (iotscan.detect.flood), and from
then on takes the flows of the service it claimed before they are made records. Under a spoofed flood every
packet opens a flow, and each cost the meter an NFStream flow with nDPI's state, made, expired and read (about
25 us, most of the meter's time), for a flow whose fields nobody reads. So the stage tells the meter which
services it claims (FlowSource.hold), and the meter *holds* a packet that opens a flow to one of them while the
service receives new flows at the flood rule's rate (the meter counts them as the rule does, decayed):

* the packet is kept, its IP bytes copied, and no flow is made;
* a second packet of its flow makes it an NFStream flow from the held packet on, as it would have been: nDPI
  and the statistics see both packets in order, and the flow is scored or folded as any other;
* a held packet alone when its flow would have expired (idle, the cap on embryonic flows, the end) leaves the
  meter as a one-packet flow without nDPI's fields or statistics (records.HeldFlow), which the scoring stage
  folds into its flood record whatever its source (it was held because the service was flooded).

The meter keeps its own count because it runs ahead of the main process: it learns of a claim when the stage
made it, and of its end when the stage saw a flow below the flood's rate, by which time the meter may be far
past the flood's end; its count stops the holding there.
"""

from __future__ import annotations

import math
import socket
import struct
from typing import Any

# The service key the meter matches a packet against: NFStream's two 64-bit halves of the destination address
# (an IPv4 address in the first, as its bytes read little-endian), port and protocol.
ServiceKey = tuple[int, int, int, int]


def service_key(dst_ip: str, dst_port: int, protocol: int) -> ServiceKey:
    """The key of a service as a packet's fields give it (nf_packet.dst_ip holds the address's bytes)."""
    if ":" in dst_ip:
        high, low = struct.unpack("<QQ", socket.inet_pton(socket.AF_INET6, dst_ip))
        return high, low, dst_port, protocol
    return struct.unpack("<I", socket.inet_aton(dst_ip))[0], 0, dst_port, protocol


_V4, _V6 = struct.Struct("<I").pack, struct.Struct("<QQ").pack
_MACS_KEPT = 4096  # MAC strings remembered (a flood comes through few: its router's, its target's)


def _address(version: int, halves: Any) -> str:
    """An address as NFStream writes it (inet_ntop)."""
    if version == 4:
        return socket.inet_ntoa(_V4(halves[0]))
    return socket.inet_ntop(socket.AF_INET6, _V6(halves[0], halves[1]))


class HeldPacket:
    """A held packet (its nf_packet, and a copy of the IP bytes it points to: libpcap reuses its buffer), and the
    one-packet flow it is if nothing follows, under NFlow's attribute names (records.metered_flow reads them)."""

    __slots__ = ("_ip", "_view", "bidirectional_bytes", "bidirectional_first_seen_ms", "bidirectional_last_seen_ms",
                 "dst_ip", "dst_mac", "dst_port", "ip_version", "packet", "protocol", "src2dst_bytes", "src_ip",
                 "src_mac", "src_port", "tunnel_id", "vlan_id")
    bidirectional_duration_ms = 0
    bidirectional_packets = src2dst_packets = 1
    dst2src_packets = dst2src_bytes = 0
    application_name = application_category_name = requested_server_name = ""
    client_fingerprint = server_fingerprint = user_agent = content_type = ""
    application_is_guessed = 0
    ndpi = None

    def __init__(self, packet: Any, ffi: Any, accounting_mode: int, dst_ip: str, src_mac: str, dst_mac: str) -> None:
        self.packet = packet
        self._ip = ffi.buffer(packet.ip_content, packet.ip_content_len)[:]
        self.src_port, self.dst_port, self.protocol = packet.src_port, packet.dst_port, packet.protocol
        self.ip_version, self.vlan_id, self.tunnel_id = packet.ip_version, packet.vlan_id, packet.tunnel_id
        self.bidirectional_first_seen_ms = self.bidirectional_last_seen_ms = packet.time
        # what NFStream counts of a packet in each accounting mode: link layer, IP, transport, payload
        self.bidirectional_bytes = self.src2dst_bytes = (packet.raw_size, packet.ip_size, packet.transport_size,
                                                         packet.payload_size)[accounting_mode]
        self.src_ip, self.dst_ip = _address(packet.ip_version, packet.src_ip), dst_ip
        self.src_mac, self.dst_mac = src_mac, dst_mac

    def is_idle(self, tick: int, idle_ms: int) -> bool:
        return tick - self.bidirectional_last_seen_ms >= idle_ms

    def packet_copy(self, ffi: Any) -> Any:
        """The held packet, pointing at its copied IP bytes (valid while this HeldPacket lives)."""
        self._view = ffi.from_buffer("uint8_t[]", self._ip)
        self.packet.ip_content = self._view
        return self.packet


class HeldServices:
    """The services the main process claims, each with its decayed count of new flows as the flood rule counts a
    target's (a half-life, and the count at which it names a flood)."""

    def __init__(self) -> None:
        # key -> [last time (s), count, flood count, decay rate, the address as the reader wrote it]
        self.services: dict[ServiceKey, list[Any]] = {}
        self.macs: dict[bytes, str] = {}

    def update(self, message: tuple[Any, ...]) -> None:
        """("hold", dst_ip, dst_port, protocol, flood_flows, decay_per_s) or ("release", dst_ip, dst_port, protocol)."""
        key = service_key(*message[1:4])
        if message[0] == "hold":
            self.services.setdefault(key, [0.0, 0.0, float(message[4]), float(message[5]), message[1]])
        else:
            self.services.pop(key, None)

    def hold(self, packet: Any, ffi: Any, accounting_mode: int) -> HeldPacket | None:
        """``packet``, which opens a flow, held when its service is claimed and, counting it, receives new flows at
        the flood rule's rate; else None."""
        dst = packet.dst_ip
        state = self.services.get((dst[0], dst[1], packet.dst_port, packet.protocol))
        if state is None:
            return None
        t = packet.time / 1000.0
        elapsed = t - state[0]
        state[1] = (state[1] * math.exp(-elapsed * state[3]) if elapsed > 0 else state[1]) + 1.0
        state[0] = max(t, state[0])
        if state[1] < state[2]:
            return None
        macs = self.macs
        src_mac, dst_mac = bytes(packet.src_mac), bytes(packet.dst_mac)
        if src_mac not in macs or dst_mac not in macs:
            if len(macs) >= _MACS_KEPT:
                macs.clear()
            macs[src_mac], macs[dst_mac] = src_mac.hex(":"), dst_mac.hex(":")
        return HeldPacket(packet, ffi, accounting_mode, state[4], macs[src_mac], macs[dst_mac])
