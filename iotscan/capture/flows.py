"""The meter's flows: what iotscan's meter loop (iotscan.capture.source) keeps of a flow while it lives and hands
on when it expires, lighter than NFStream's NFlow, which copies its C structure into 94 Python slots (for plugins to
read) when a flow starts and expires, and, with plugins, at every packet.

* BlockFlow, a main-pass flow (no plugins, reduced): its C structure alone while it lives; when it expires, the
  record's fields read from the structure's bytes at once, and its numbers and early packets as one bytes block
  (flow_block_dtype), which the classifier decodes a batch at a time;
* PayloadFlow, a side pass's flow (plugins that read packets' bytes): its endpoints once, a SidePacket of five
  fields per packet for the plugins, its counters when it expires.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable
from operator import itemgetter
from typing import Any, NamedTuple

import numpy as np
from nfstream.engine import create_engine
from nfstream.flow import UDPS, NFlow

from iotscan.capture.ndpi_facts import read_ndpi_facts


def _endpoints(ffi: Any, c: Any) -> tuple[str, str, str, str]:
    """A flow structure's source IP and MAC and destination IP and MAC, as NFlow decodes them."""
    string = ffi.string
    return (string(c.src_ip_str).decode("utf-8", errors="ignore"),
            string(c.src_mac_str).decode("utf-8", errors="ignore"),
            string(c.dst_ip_str).decode("utf-8", errors="ignore"),
            string(c.dst_mac_str).decode("utf-8", errors="ignore"))


# What a BlockFlow decodes of its C structure when it expires, in this order: NFlow's names for the fields
# (records.FLOW_ATTRIBUTES takes them by name), the C structure's for the ones read from it.
_BLOCK_NUMBERS = ("src_port", "dst_port", "protocol", "ip_version", "vlan_id", "tunnel_id",
                  "bidirectional_first_seen_ms", "bidirectional_last_seen_ms", "bidirectional_duration_ms",
                  "bidirectional_packets", "bidirectional_bytes", "src2dst_packets", "src2dst_bytes",
                  "dst2src_packets", "dst2src_bytes")
_BLOCK_ENDPOINTS = (("src_mac", "src_mac_str"), ("dst_mac", "dst_mac_str"), ("src_ip", "src_ip_str"),
                    ("dst_ip", "dst_ip_str"))
_BLOCK_DPI = (("application_name", "application_name"), ("application_category_name", "category_name"),
              ("requested_server_name", "requested_server_name"), ("client_fingerprint", "c_hash"),
              ("server_fingerprint", "s_hash"), ("user_agent", "user_agent"), ("content_type", "content_type"))
_BLOCK_DPI_NUMBERS = (("application_is_guessed", "guessed"), ("application_confidence", "confidence"))


@functools.cache
def _flow_layout() -> tuple[Callable[[bytes], tuple], Callable[[bytes], tuple], Callable[[bytes], tuple], int]:
    """How a BlockFlow reads its C structure's bytes: a reader of the endpoints and numbers, one of nDPI's
    strings, one of nDPI's numbers (each gives the fields in the order they are listed here, read with one
    struct.unpack at their offsets in struct nf_flow, from the engine's own declaration: a cffi attribute
    read per field cost a fifth of the meter's time on a flood of one-packet flows), and the offset of
    detection_completed."""
    ffi, _ = create_engine()
    fields = dict(ffi.typeof("struct nf_flow").fields)
    codes = {"uint8_t": "B", "uint16_t": "H", "unsigned int": "I", "uint64_t": "Q", "double": "d"}

    def reader(names: list[str]) -> Callable[[bytes], tuple]:
        in_structure = sorted(names, key=lambda n: fields[n].offset)
        parts, at = ["<"], 0
        for name in in_structure:
            f = fields[name]
            parts.append(f"{f.offset - at}x" if f.offset > at else "")
            parts.append(f"{ffi.sizeof(f.type)}s" if f.type.kind == "array" else "i" if f.type.kind == "enum"
                         else codes[f.type.cname])
            at = f.offset + ffi.sizeof(f.type)
        unpack = struct.Struct("".join(parts)).unpack_from
        if in_structure == names:
            return unpack
        order = itemgetter(*(in_structure.index(n) for n in names))
        return lambda raw: order(unpack(raw))

    return (reader([*(c for _, c in _BLOCK_ENDPOINTS), *_BLOCK_NUMBERS]), reader([c for _, c in _BLOCK_DPI]),
            reader([c for _, c in _BLOCK_DPI_NUMBERS]), fields["detection_completed"].offset)


def _text(chars: bytes) -> str:
    """A C string read from a fixed-size char array, as NFlow decodes it."""
    return chars.split(b"\0", 1)[0].decode("utf-8", errors="ignore")


class BlockFlow:
    """A flow of a pass without plugins whose flows are reduced (the main pass), with what NFStream's NFlow
    reads and writes of itself in the meter loop (update, is_idle, expire). NFStream's NFlow copies some 90
    values of its C structure into Python slots when the flow starts and again when it expires (for plugins
    to read), and unpacks its early packets into lists at the start; without plugins, only the reduce reads
    them, once. So this one keeps nothing but its C structure while it lives (and none of NFlow's 94 slots:
    700 bytes less per tracked flow), and when it expires sets the record's fields (records.FLOW_ATTRIBUTES)
    from the structure's bytes, read at once, as NFlow would, and keeps the structure's numbers (ports to TCP
    flag counts) and early packets as one bytes block (``block``, laid out as flow_block_dtype says)."""

    # shown_*: the flow's counts at the last snapshot of active flows for a live view (iotscan.capture.active);
    # ndpi: NdpiFacts (when reads_ndpi, else None)
    __slots__ = ("_C", "block", "expiration_id", "ndpi", "shown_bytes", "shown_packets", *_BLOCK_NUMBERS,
                 *(n for n, _ in _BLOCK_ENDPOINTS), *(n for n, _ in _BLOCK_DPI), *(n for n, _ in _BLOCK_DPI_NUMBERS))
    reads_ndpi = False  # set on FactsBlockFlow
    risk_mask = 0  # the nDPI risks kept (MeterConfig.ndpi_risk_mask)

    def __init__(self, packet: Any, ffi: Any, lib: Any, udps: Any, sync: Any, accounting_mode: int,
                 n_dissections: int, statistics: int, splt: int, dissector: Any, decode_tunnels: int,
                 system_visibility_mode: int) -> None:
        self.expiration_id = 0
        self.shown_bytes = self.shown_packets = 0
        self._C = lib.meter_initialize_flow(packet, accounting_mode, statistics, splt, n_dissections, dissector,
                                            sync)
        if self._C == ffi.NULL:
            raise OSError("Not enough memory for new flow creation.")

    def update(self, packet: Any, idle_timeout: int, active_timeout: int, ffi: Any, lib: Any, udps: Any, sync: Any,
               accounting_mode: int, n_dissections: int, statistics: int, splt: int, dissector: Any
               ) -> BlockFlow | None:
        """NFlow.update without plugins: the flow itself when this packet ended it (an idle or active
        time-out: the packet then opens the next flow), else None."""
        ret = lib.meter_update_flow(self._C, packet, idle_timeout, active_timeout, accounting_mode, statistics, splt,
                                    n_dissections, dissector, sync)
        if ret > 0:
            self.expiration_id = ret - 1
            return self.expire(udps, sync, n_dissections, statistics, splt, ffi, lib, dissector)
        return None

    def is_idle(self, tick: int, idle_timeout: int) -> bool:
        return (tick - idle_timeout) >= self._C.bidirectional_last_seen_ms

    def expire(self, udps: Any, sync: Any, n_dissections: int, statistics: int, splt: int, ffi: Any, lib: Any,
               dissector: Any) -> BlockFlow:
        c = self._C
        lib.meter_expire_flow(c, n_dissections, dissector)
        read_base, read_dpi, read_dpi_numbers, completed_at = _flow_layout()
        raw = ffi.buffer(c)[:]
        (src_mac, dst_mac, src_ip, dst_ip, self.src_port, self.dst_port, self.protocol, self.ip_version, self.vlan_id,
         self.tunnel_id, self.bidirectional_first_seen_ms, self.bidirectional_last_seen_ms,
         self.bidirectional_duration_ms, self.bidirectional_packets, self.bidirectional_bytes, self.src2dst_packets,
         self.src2dst_bytes, self.dst2src_packets, self.dst2src_bytes) = read_base(raw)
        self.src_ip, self.src_mac, self.dst_ip, self.dst_mac = _text(src_ip), _text(src_mac), _text(dst_ip), \
            _text(dst_mac)
        if n_dissections and raw[completed_at] < 2:  # NFlow's condition for reading nDPI's results
            (self.application_name, self.application_category_name, self.requested_server_name,
             self.client_fingerprint, self.server_fingerprint, self.user_agent, self.content_type) = map(
                _text, read_dpi(raw))
            self.application_is_guessed, self.application_confidence = read_dpi_numbers(raw)
        else:
            self.application_name = self.application_category_name = self.application_is_guessed = None
            self.application_confidence = self.requested_server_name = self.client_fingerprint = None
            self.server_fingerprint = self.user_agent = self.content_type = None
        self.ndpi = read_ndpi_facts(ffi, c, self.protocol, self.application_name, self.risk_mask) \
            if self.reads_ndpi else None
        start, end, _ = _block_fields()
        block = raw[start:end]
        if splt:
            block += ffi.buffer(c.splt_direction, splt)[:] + ffi.buffer(c.splt_ps, 4 * splt)[:]
        self.block = block
        lib.meter_free_flow(c, n_dissections, splt, 1)
        del self._C
        return self


class FactsBlockFlow(BlockFlow):
    """A BlockFlow that also keeps its NdpiFacts (MeterConfig.ndpi_facts), with the risks of ``risk_mask``: a
    meter uses a subclass of it that sets the mask (keeping)."""

    __slots__ = ()
    reads_ndpi = True

    @classmethod
    def keeping(cls, risk_mask: int) -> type[FactsBlockFlow]:
        return type("FactsBlockFlowMasked", (cls,), {"__slots__": (), "risk_mask": risk_mask})


class SidePacket(NamedTuple):
    """What a side pass's plugins read of a packet (NFStream hands them a tuple of 30 fields): its IP
    packet's bytes, the sender's address and MAC, its direction in the flow (0: from the flow's source)
    and time (ms)."""

    ip_packet: bytes
    src_ip: str
    src_mac: str
    direction: int
    time: int


class PayloadFlow(NFlow):
    """An NFlow of a side pass (plugins that read packets' bytes, then a reduce). NFStream's NFlow with
    plugins copies some 90 values of its C structure into Python slots when the flow starts and 40 more at
    every packet, and builds a 30-field packet for the plugins; a side pass's plugins read a packet's bytes
    and sender (SidePacket), and its reduce the flow's endpoints, start, packets and bytes and the plugins'
    ``udps``. So this one copies the endpoints once and the counters when it expires. On the benchmark
    capture the request pass's meter CPU went 0.95 s -> 0.83 s, the identity pass's 0.28 s -> 0.24 s."""

    def __init__(self, packet: Any, ffi: Any, lib: Any, udps: Any, sync: Any, accounting_mode: int,
                 n_dissections: int, statistics: int, splt: int, dissector: Any, decode_tunnels: int,
                 system_visibility_mode: int) -> None:
        self.expiration_id = 0
        c = self._C = lib.meter_initialize_flow(packet, accounting_mode, statistics, splt, n_dissections,
                                                dissector, sync)
        if c == ffi.NULL:
            raise OSError("Not enough memory for new flow creation.")
        self.src_ip, self.src_mac, self.dst_ip, self.dst_mac = _endpoints(ffi, c)
        self.src_port, self.dst_port, self.protocol, self.ip_version = c.src_port, c.dst_port, c.protocol, c.ip_version
        self.vlan_id, self.bidirectional_first_seen_ms = c.vlan_id, c.bidirectional_first_seen_ms
        self.udps = UDPS()
        side_packet = self._side_packet(packet, ffi)
        for udp in udps:
            udp.on_init(side_packet, self)

    def _side_packet(self, packet: Any, ffi: Any) -> SidePacket:
        data = bytes(ffi.buffer(packet.ip_content, packet.ip_content_len))
        if packet.direction:
            return SidePacket(data, self.dst_ip, self.dst_mac, 1, packet.time)
        return SidePacket(data, self.src_ip, self.src_mac, 0, packet.time)

    def update(self, packet: Any, idle_timeout: int, active_timeout: int, ffi: Any, lib: Any, udps: Any, sync: Any,
               accounting_mode: int, n_dissections: int, statistics: int, splt: int, dissector: Any) -> NFlow | None:
        ret = lib.meter_update_flow(self._C, packet, idle_timeout, active_timeout, accounting_mode, statistics, splt,
                                    n_dissections, dissector, sync)
        if ret > 0:  # idle (1) or active (2) timeout: the packet belongs to the next flow
            self.expiration_id = ret - 1
            return self.expire(udps, sync, n_dissections, statistics, splt, ffi, lib, dissector)
        side_packet = self._side_packet(packet, ffi)
        for udp in udps:
            udp.on_update(side_packet, self)
        if self.expiration_id == -1:  # a plugin ended the flow
            return self.expire(udps, sync, n_dissections, statistics, splt, ffi, lib, dissector)
        return None

    def expire(self, udps: Any, sync: Any, n_dissections: int, statistics: int, splt: int, ffi: Any, lib: Any,
               dissector: Any) -> NFlow:
        c = self._C
        lib.meter_expire_flow(c, n_dissections, dissector)
        self.bidirectional_last_seen_ms, self.bidirectional_duration_ms = (c.bidirectional_last_seen_ms,
                                                                           c.bidirectional_duration_ms)
        self.bidirectional_packets, self.bidirectional_bytes = c.bidirectional_packets, c.bidirectional_bytes
        for udp in udps:
            udp.on_expire(self)
        lib.meter_free_flow(c, n_dissections, splt, 1)
        del self._C
        return self


# The C types of NFStream's flow structure (struct nf_flow) that flow blocks hold, as numpy types.
_C_TYPES = {"uint8_t": "u1", "uint16_t": "u2", "unsigned int": "u4", "uint64_t": "u8", "double": "f8"}


@functools.cache
def _block_fields() -> tuple[int, int, list[tuple[str, str, int]]]:
    """Start and end of the block in struct nf_flow (src_port to dst2src_fin_packets), and its numeric
    fields (name, numpy type, offset in the block), read from the engine's own declaration."""
    ffi, _ = create_engine()
    fields = ffi.typeof("struct nf_flow").fields
    names = [name for name, _ in fields]
    first, last = names.index("src_port"), names.index("dst2src_fin_packets")
    start = fields[first][1].offset
    end = fields[last][1].offset + ffi.sizeof(fields[last][1].type)
    return start, end, [(name, _C_TYPES[f.type.cname], f.offset - start) for name, f in fields[first:last + 1]
                        if f.type.cname in _C_TYPES]


@functools.cache
def flow_block_dtype(splt: int) -> np.dtype:
    """The numpy record type of a BlockFlow's block metered with ``splt`` early packets. Its values are
    NFStream's C ones: a standard deviation is still the sum of squared deviations, which NFlow divides by
    (n - 1) (sizes) or (n - 2) (gaps) and takes the root of, when there are enough packets."""
    start, end, fields = _block_fields()
    return np.dtype({"names": [name for name, _, _ in fields] + ["splt_direction", "splt_ps"],
                     "formats": [kind for _, kind, _ in fields] + [("i1", (splt,)), ("<i4", (splt,))],
                     "offsets": [offset for _, _, offset in fields] + [end - start, end - start + splt],
                     "itemsize": end - start + 5 * splt})
