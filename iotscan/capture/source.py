"""The source stage: NFStream flows from one capture file or one interface, streamed as they expire.

NFStream's own ``NFStreamer`` hangs when its meter process dies, keeps reading a capture in a
loop-forever state on read errors it does not report, orders its idle scan by flow creation (so
one long flow delays the expiry of every later one), never expires flows on a quiet interface and
drops the flows still active when it is interrupted. So iotscan runs its own meter loop, built
from NFStream's engine, ``NFlow`` and flow-key parts, in one child process:

* flows are sent in small batches over a bounded queue (back-pressure bounds memory), each
  reduced first (``MeterConfig.reduce``) to what the reader needs: the main pass sends the values
  a record is made of (records.MeteredFlow), side passes their few findings;
* the flow table is kept in last-activity order, so the idle scan is exact;
* ``max_flows`` caps the table: the least recently active flow is expired early;
* a read error in a file ends the file with a ``truncated`` report instead of hiding it;
* on a live interface, the meter reads without blocking and waits on the capture's descriptor
  with a time-out, so the clock advances and idle flows expire on a quiet link (libpcap's
  TPACKET_V3 read never times out when no packet arrives at all);
* ``stop()`` makes the meter flush every active flow and report, for Ctrl-C and SIGTERM;
* for a live view, it can send a bounded snapshot of the busiest active flows now and then
  (iotscan.capture.active), kept by the reader as ``FlowSource.active``;
* any exception in the meter (a plugin's too) comes back as an error, and a dead meter
  is detected by the reader instead of blocking it forever.
"""

from __future__ import annotations

import ctypes
import functools
import multiprocessing as mp
import os
import queue
import select
import signal
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
from nfstream.engine import create_engine, setup_capture, setup_dissector
from nfstream.engine.engine import setup_filter
from nfstream.flow import UDPS, NFlow
from nfstream.meter import get_flow_key_from_pkt
from nfstream.plugin import NFPlugin
from nfstream.utils import NFMode

from iotscan.capture.active import ActiveSnapshot, take_snapshot
from iotscan.errors import CaptureError, ExitCode, InputError

_BATCH_FLOWS = 128  # flows per queue message: amortises locking and pickling
_BATCH_MAX_AGE_S = 0.2  # a live batch waits at most this long
_QUEUE_BATCHES = 64  # at most 64 * 128 expired flows in flight: the back-pressure bound
_COUNTER_EVERY = 1024  # packets between updates of the shared counters
_SCAN_INTERVAL_MS = 10  # idle scan period in capture time, as in NFStream
_SCAN_BUDGET = 1000  # flows expired per idle scan at most, as in NFStream
_POLL_S = 0.25  # how often the reader checks that the meter is alive
_LIVE_BLOCK_MS = 250  # libpcap delivers live packets in blocks retired after at most this long
_LIVE_WAIT_MS = 100  # longest wait for packets before the clock moves on and stop() is checked


# Flows tracked at once unless told otherwise. A flow costs about 5 KB in the meter, so this bounds the
# table near 500 MB when every packet opens a flow (a flood of spoofed sources).
DEFAULT_MAX_FLOWS = 100_000

# Indices into the shared counter array.
PACKETS, IGNORED, ACTIVE, EVICTED, DROPPED, IFDROPPED = range(6)
_N_COUNTERS = 6


@dataclass(frozen=True)
class MeterConfig:
    """Everything the meter needs; the CLI options map onto it one to one."""

    source: str
    live: bool = False
    bpf: str | None = None
    idle_timeout: int = 120  # seconds
    active_timeout: int = 1800  # seconds
    max_flows: int = DEFAULT_MAX_FLOWS  # 0: no cap on the flow table
    statistics: bool = True
    splt: int = 0  # early packets whose sizes, directions and gaps are kept
    n_dissections: int = 20
    snaplen: int = 1536
    promisc: bool = True
    decode_tunnels: bool = True
    accounting_mode: int = 0
    plugins: tuple[NFPlugin, ...] = ()
    # What of each flow leaves the meter (None: nothing; without reduce, the NFlow itself). Unpickling
    # NFStream's 94-slot flows cost the reader more than anything it then did with them: the main pass
    # sends a MeteredFlow (records.metered_flow, or features.metered_flow_with_statistics with the flow's
    # block of C numbers: without plugins, flows are _BlockFlows), a side pass a few fields of a few of
    # its flows (with plugins, flows are _PayloadFlows). report.flows counts all.
    reduce: Callable[[NFlow], Any] | None = None
    # For a live view: every this many ms of capture time, a snapshot of the busiest active flows (0: none).
    # Taken with the idle scan, never per packet; main pass only (its flows keep what a snapshot reads).
    active_every_ms: int = 0


@dataclass
class SourceReport:
    """What the meter tells at the end of a source."""

    packets: int = 0
    ignored_packets: int = 0
    flows: int = 0
    evicted_flows: int = 0
    dropped_packets: int = 0
    read_error: bool = False
    stopped: bool = False
    warnings: list[str] = field(default_factory=list)


def _endpoints(ffi: Any, c: Any) -> tuple[str, str, str, str]:
    """A flow structure's source IP and MAC and destination IP and MAC, as NFlow decodes them."""
    string = ffi.string
    return (string(c.src_ip_str).decode("utf-8", errors="ignore"),
            string(c.src_mac_str).decode("utf-8", errors="ignore"),
            string(c.dst_ip_str).decode("utf-8", errors="ignore"),
            string(c.dst_mac_str).decode("utf-8", errors="ignore"))


class _BlockFlow(NFlow):
    """An NFlow of a pass without plugins whose flows are reduced (the main pass). NFStream's NFlow copies
    some 90 values of its C structure into Python slots when the flow starts and again when it expires
    (for plugins to read), and unpacks its early packets into lists at the start; without plugins, only
    the reduce reads them, once. So this one keeps nothing but its C structure while it lives, and when it
    expires sets the record's fields (records.FLOW_ATTRIBUTES) from C as NFlow would, and keeps the
    structure's numbers (ports to TCP flag counts) and early packets as one bytes block (``block``, laid
    out as flow_block_dtype says). On the benchmark capture the scored meter's CPU went 4.6 s -> 3.9 s."""

    __slots__ = ("block", "shown_bytes", "shown_packets")  # shown_*: counts at the last active-flow snapshot

    def __init__(self, packet: Any, ffi: Any, lib: Any, udps: Any, sync: Any, accounting_mode: int,
                 n_dissections: int, statistics: int, splt: int, dissector: Any, decode_tunnels: int,
                 system_visibility_mode: int) -> None:
        # what NFlow's update and is_idle read
        self.expiration_id = 0
        self.shown_bytes = self.shown_packets = 0
        self._C = lib.meter_initialize_flow(packet, accounting_mode, statistics, splt, n_dissections, dissector,
                                            sync)
        if self._C == ffi.NULL:
            raise OSError("Not enough memory for new flow creation.")

    def expire(self, udps: Any, sync: Any, n_dissections: int, statistics: int, splt: int, ffi: Any, lib: Any,
               dissector: Any) -> NFlow:
        c = self._C
        lib.meter_expire_flow(c, n_dissections, dissector)

        def text(chars: Any) -> str:
            return ffi.string(chars).decode("utf-8", errors="ignore")

        self.src_ip, self.src_mac, self.dst_ip, self.dst_mac = _endpoints(ffi, c)
        self.src_port, self.dst_port, self.protocol, self.ip_version = c.src_port, c.dst_port, c.protocol, c.ip_version
        self.vlan_id, self.tunnel_id = c.vlan_id, c.tunnel_id
        self.bidirectional_first_seen_ms, self.bidirectional_last_seen_ms, self.bidirectional_duration_ms = (
            c.bidirectional_first_seen_ms, c.bidirectional_last_seen_ms, c.bidirectional_duration_ms)
        self.bidirectional_packets, self.bidirectional_bytes = c.bidirectional_packets, c.bidirectional_bytes
        self.src2dst_packets, self.src2dst_bytes = c.src2dst_packets, c.src2dst_bytes
        self.dst2src_packets, self.dst2src_bytes = c.dst2src_packets, c.dst2src_bytes
        if n_dissections and c.detection_completed < 2:  # NFlow's condition for reading nDPI's results
            self.application_name, self.application_category_name = text(c.application_name), text(c.category_name)
            self.application_is_guessed, self.application_confidence = c.guessed, c.confidence
            self.requested_server_name, self.client_fingerprint, self.server_fingerprint = (
                text(c.requested_server_name), text(c.c_hash), text(c.s_hash))
            self.user_agent, self.content_type = text(c.user_agent), text(c.content_type)
        else:
            self.application_name = self.application_category_name = self.application_is_guessed = None
            self.application_confidence = self.requested_server_name = self.client_fingerprint = None
            self.server_fingerprint = self.user_agent = self.content_type = None
        start, end, _ = _block_fields()
        block = ffi.buffer(c)[start:end]
        if splt:
            block += ffi.buffer(c.splt_direction, splt)[:] + ffi.buffer(c.splt_ps, 4 * splt)[:]
        self.block = block
        lib.meter_free_flow(c, n_dissections, splt, 1)
        del self._C
        return self


class SidePacket(NamedTuple):
    """What a side pass's plugins read of a packet (NFStream hands them a tuple of 30 fields): its IP
    packet's bytes, the sender's address and MAC, its direction in the flow (0: from the flow's source)
    and time (ms)."""

    ip_packet: bytes
    src_ip: str
    src_mac: str
    direction: int
    time: int


class _PayloadFlow(NFlow):
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
    """The numpy record type of a _BlockFlow's block metered with ``splt`` early packets. Its values are
    NFStream's C ones: a standard deviation is still the sum of squared deviations, which NFlow divides by
    (n - 1) (sizes) or (n - 2) (gaps) and takes the root of, when there are enough packets."""
    start, end, fields = _block_fields()
    return np.dtype({"names": [name for name, _, _ in fields] + ["splt_direction", "splt_ps"],
                     "formats": [kind for _, kind, _ in fields] + [("i1", (splt,)), ("<i4", (splt,))],
                     "offsets": [offset for _, _, offset in fields] + [end - start, end - start + splt],
                     "itemsize": end - start + 5 * splt})


class _Batcher:
    """Collects expired flows into batches for the queue."""

    def __init__(self, channel: Any, reduce: Callable[[NFlow], Any] | None) -> None:
        self.channel = channel
        self.reduce = reduce
        self.batch: list[Any] = []
        self.since = time.monotonic()
        self.flows = 0

    def put(self, flow: NFlow) -> None:
        self.flows += 1
        item: Any = flow
        if self.reduce is not None:
            item = self.reduce(flow)
            if item is None:
                return
        if not self.batch:
            self.since = time.monotonic()
        self.batch.append(item)
        if len(self.batch) >= _BATCH_FLOWS:
            self.flush()

    def flush(self) -> None:
        if self.batch:
            self.channel.put(self.batch)
            self.batch = []

    def flush_if_old(self) -> None:
        if self.batch and time.monotonic() - self.since >= _BATCH_MAX_AGE_S:
            self.flush()


def _die_with_parent(parent: int) -> None:
    """Linux: the meter is killed with iotscan (SIGKILL, OOM killer) instead of capturing on, alone."""
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG; follows the forking thread
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before prctl
        os._exit(1)


def _meter_main(cfg: MeterConfig, channel: Any, counters: Any, stop: Any, parent: int) -> None:
    """Child process: read packets, meter flows, send batches; never raise, always end with a report."""
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        report = _meter_loop(cfg, channel, counters, stop)
        channel.put(("end", report))
    except _SetupError as exc:
        channel.put(("error", str(exc)))
    except BaseException as exc:  # a plugin bug must become an error message, not a hang
        channel.put(("error", f"flow meter failed: {type(exc).__name__}: {exc}"))


class _SetupError(Exception):
    pass


@functools.lru_cache(maxsize=1)
def _libpcap() -> ctypes.CDLL:
    """The libpcap linked into NFStream's engine, for the calls its cffi interface does not expose.

    Opening the same shared object again returns the instance already loaded, so a ``pcap_t``
    made by the engine can be passed to these functions.
    """
    import _lib_engine  # NFStream's compiled engine (nfstream.engine imports it too)

    pcap = ctypes.CDLL(_lib_engine.__file__)
    for name, args, restype in (
        ("pcap_set_timeout", [ctypes.c_void_p, ctypes.c_int], ctypes.c_int),
        ("pcap_activate", [ctypes.c_void_p], ctypes.c_int),
        ("pcap_geterr", [ctypes.c_void_p], ctypes.c_void_p),  # the address of the handle's error buffer
        ("pcap_close", [ctypes.c_void_p], None),
        ("pcap_setnonblock", [ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p], ctypes.c_int),
        ("pcap_get_selectable_fd", [ctypes.c_void_p], ctypes.c_int),
    ):
        function = getattr(pcap, name)
        function.argtypes, function.restype = args, restype
    return pcap


def _open_live(ffi: Any, capture: Any) -> tuple[int, ctypes.c_char]:
    """Activate an interface capture in non-blocking mode.

    Returns the descriptor to wait on, and the first byte of libpcap's error buffer: a read error
    (the interface went down or away) looks like "no packet" through ``capture_next``, and libpcap
    has consumed the socket's error by then, so its message is the only trace left.
    """
    pcap = _libpcap()
    handle = ctypes.c_void_p(int(ffi.cast("uintptr_t", capture)))
    errbuf = pcap.pcap_geterr(handle)
    pcap.pcap_set_timeout(handle, _LIVE_BLOCK_MS)
    status = pcap.pcap_activate(handle)  # > 0 is a warning (e.g. no promiscuous mode): capture works
    if status < 0:
        detail = ctypes.string_at(errbuf).decode("utf-8", errors="replace")
        pcap.pcap_close(handle)
        reason = _ACTIVATE_ERRORS.get(status, "cannot start capturing")
        raise _SetupError(f"{reason}: {detail}" if detail and detail not in reason else reason)
    nonblock_error = ctypes.create_string_buffer(256)
    if pcap.pcap_setnonblock(handle, 1, nonblock_error) < 0:
        pcap.pcap_close(handle)
        raise _SetupError(f"cannot read without blocking: {nonblock_error.value.decode(errors='replace')}")
    ctypes.memset(errbuf, 0, 1)  # forget activation warnings: from now on, text there is a read error
    return pcap.pcap_get_selectable_fd(handle), ctypes.c_char.from_address(errbuf)


# pcap_activate() error codes (pcap/pcap.h).
_ACTIVATE_ERRORS = {
    -5: "no such interface",
    -8: "permission denied",
    -11: "permission denied (promiscuous mode)",
    -9: "interface is down",
    -7: "monitor mode not supported",
}


def _meter_loop(cfg: MeterConfig, channel: Any, counters: Any, stop: Any) -> SourceReport:
    ffi, lib = create_engine()
    if lib is None:
        raise _SetupError("NFStream's engine library failed to load")
    mode = NFMode.INTERFACE if cfg.live else NFMode.SINGLE_FILE
    error = ffi.new("char[256]")
    capture = setup_capture(ffi, lib, cfg.source, cfg.snaplen, cfg.promisc, mode, error, os.getpid(), 0)
    if capture is None:
        raise _SetupError(ffi.string(error).decode("utf-8", errors="replace") or "cannot open capture")
    waiter = read_error = None
    if cfg.live:
        waiter = select.poll()
        fd, read_error = _open_live(ffi, capture)
        waiter.register(fd, select.POLLIN)
    if not setup_filter(capture, lib, error, cfg.bpf):
        raise _SetupError(ffi.string(error).decode("utf-8", errors="replace") or "cannot set the BPF filter")
    dissector = setup_dissector(ffi, lib, cfg.n_dissections)
    if dissector == ffi.NULL and cfg.n_dissections:
        raise _SetupError("nDPI failed to initialise")

    udps = cfg.plugins
    sync = bool(udps)
    idle_ms, active_ms = cfg.idle_timeout * 1000, cfg.active_timeout * 1000
    stats, splt, n_dis, acc, tunnels = cfg.statistics, cfg.splt, cfg.n_dissections, cfg.accounting_mode, \
        cfg.decode_tunnels
    out = _Batcher(channel, cfg.reduce)
    flow_class = NFlow if cfg.reduce is None else _PayloadFlow if udps else _BlockFlow
    cache: OrderedDict[tuple, NFlow] = OrderedDict()  # oldest activity first
    report = SourceReport()
    interface_stats = ffi.new("struct nf_stat *")

    def expire(flow: NFlow) -> None:
        out.put(flow.expire(udps, sync, n_dis, stats, splt, ffi, lib, dissector))

    def new_flow(packet: Any, key: tuple) -> None:
        try:
            flow = flow_class(packet, ffi, lib, udps, sync, acc, n_dis, stats, splt, dissector, tunnels, 0)
        except OSError:  # out of memory for this flow: skip it, as NFStream does
            return
        if flow.expiration_id == -1:  # a plugin expired it on its first packet
            expire(flow)
        else:
            cache[key] = flow

    snapshot_every = cfg.active_every_ms if flow_class is _BlockFlow else 0
    snapshot_at = 0  # capture time of the last snapshot (0: none yet)

    def scan(tick: int) -> None:
        """Every _SCAN_INTERVAL_MS of capture time: expire idle flows; now and then, a snapshot for a live view."""
        nonlocal snapshot_at
        scan_idle(tick)
        if snapshot_every and tick - snapshot_at >= snapshot_every:
            if snapshot_at:
                channel.put(("active", take_snapshot(cache, snapshot_at, tick, ffi)))
            snapshot_at = tick

    def scan_idle(tick: int) -> None:
        for _ in range(_SCAN_BUDGET):
            if not cache:
                return
            key = next(iter(cache))
            flow = cache[key]
            if not flow.is_idle(tick, idle_ms):
                return
            del cache[key]
            expire(flow)

    def publish() -> None:
        counters[PACKETS] = report.packets
        counters[IGNORED] = report.ignored_packets
        counters[ACTIVE] = len(cache)
        counters[EVICTED] = report.evicted_flows
        if cfg.live:
            lib.capture_stats(capture, interface_stats, int(mode))
            counters[DROPPED] = report.dropped_packets = interface_stats.dropped
            counters[IFDROPPED] = interface_stats.dropped_by_interface

    tick = scan_tick = 0
    last_publish = time.monotonic()
    try:
        while True:
            packet = ffi.new("struct nf_packet *")
            ret = lib.capture_next(capture, packet, int(tunnels), 1, 0, int(mode))
            if ret > 0:
                if packet.time > tick:
                    tick = packet.time
                else:
                    packet.time = tick  # keep time monotonic, as NFStream does
                if ret == 1:
                    report.packets += 1
                    key = get_flow_key_from_pkt(packet)
                    flow = cache.get(key)
                    if flow is None:
                        new_flow(packet, key)
                        if cfg.max_flows and len(cache) > cfg.max_flows:
                            report.evicted_flows += 1
                            expire(cache.pop(next(iter(cache))))
                    else:
                        done = flow.update(packet, idle_ms, active_ms, ffi, lib, udps, sync, acc, n_dis,
                                           stats, splt, dissector)
                        if done is None:
                            cache.move_to_end(key)
                        else:
                            del cache[key]
                            out.put(done)
                            if done.expiration_id >= 0:  # idle/active cut: this packet opens a new flow
                                new_flow(packet, key)
                    if report.packets % _COUNTER_EVERY == 0:
                        publish()
                        if stop.is_set():
                            report.stopped = True
                            break
                if tick - scan_tick >= _SCAN_INTERVAL_MS:
                    scan_tick = tick
                    scan(tick)
            elif ret == 0:
                report.ignored_packets += 1
            elif ret == -1:
                if not cfg.live:
                    report.read_error = True  # libpcap read error: the file is truncated or damaged
                    break
                # Nothing to read: the link is quiet. Wait a little for the next block of packets,
                # then let the clock move on so idle flows expire. It trails the wall clock by one
                # block time-out, since packets still in an unfinished block may be that old.
                assert waiter is not None and read_error is not None
                if read_error.value != b"\0":
                    message = ctypes.string_at(ctypes.addressof(read_error)).decode(errors="replace")
                    report.warnings.append(f"capture ended: {message}")
                    break
                ready = waiter.poll(_LIVE_WAIT_MS)
                if ready and ready[0][1] & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                    report.warnings.append("capture ended: the interface went down or disappeared")
                    break
                now = int(time.time() * 1000) - _LIVE_BLOCK_MS
                if now > tick:
                    tick = now
                if tick - scan_tick >= _SCAN_INTERVAL_MS:
                    scan_tick = tick
                    scan(tick)
            else:
                break  # end of file (or the capture was broken off)
            if cfg.live:
                out.flush_if_old()
                if time.monotonic() - last_publish >= 0.5:
                    last_publish = time.monotonic()
                    publish()
                    if stop.is_set():
                        report.stopped = True
                        break
        publish()
        for key in list(cache):  # flush what is still active: nothing is lost at the end
            expire(cache.pop(key))
        out.flush()
    finally:
        lib.capture_close(capture)
        if dissector != ffi.NULL:
            lib.dissector_cleanup(dissector)
    report.flows = out.flows
    counters[ACTIVE] = 0
    return report


class FlowSource:
    """Iterate over the flows of one capture file or interface, each as soon as the meter expires it
    (as the config's ``reduce`` made it: an NFlow without one).

    After iteration, ``report`` holds the meter's counts. ``stop()`` (from another thread or a
    signal handler) asks the meter to flush its active flows and finish; iteration then ends
    normally with ``report.stopped`` set. With ``heartbeat``, a None comes out whenever no flow
    has for a moment, so that stages buffering flows (scoring batches) can flush on a quiet link.
    """

    def __init__(self, config: MeterConfig, heartbeat: bool = False) -> None:
        self.config = config
        self.heartbeat = heartbeat
        self._ctx = mp.get_context("fork")
        self._counters = self._ctx.Array("q", _N_COUNTERS, lock=False)
        self._stop = self._ctx.Event()
        self.report = SourceReport()
        self.active: ActiveSnapshot | None = None  # the meter's latest snapshot of active flows (active_every_ms)
        self.snapshots = 0  # snapshots received
        self.pid: int | None = None
        self._meter: tuple[Any, Any] | None = None  # (process, queue) while it runs

    def counter(self, index: int) -> int:
        return int(self._counters[index])

    def stop(self) -> None:
        self._stop.set()

    def __iter__(self) -> Iterator[Any]:
        channel = self._ctx.Queue(maxsize=_QUEUE_BATCHES)
        proc = self._ctx.Process(target=_meter_main,
                                 args=(self.config, channel, self._counters, self._stop, os.getpid()),
                                 daemon=True, name="iotscan-meter")
        proc.start()
        self.pid = proc.pid
        self._meter = (proc, channel)
        try:
            while True:
                try:
                    item = channel.get(timeout=_POLL_S)
                except queue.Empty:
                    if proc.is_alive():
                        if self.heartbeat:
                            yield None
                        continue
                    try:  # it may have sent its last words just before dying
                        item = channel.get(timeout=1.0)
                    except queue.Empty:
                        raise CaptureError(
                            f"{self.config.source}: the flow meter process died (exit code {proc.exitcode})"
                            " before finishing") from None
                if type(item) is list:
                    yield from item
                    continue
                kind, payload = item
                if kind == "active":
                    self.active = payload
                    self.snapshots += 1
                    continue
                if kind == "error":
                    raise _classify_error(self.config, payload)
                self.report = payload
                self.active = None  # the capture ended: nothing is active
                return
        finally:
            self._end_meter(grace_s=2.0)

    def close(self) -> None:
        """End the meter now if it still runs: when a stage fails, the iteration is abandoned without being
        closed, and the meter would block on its full queue while the exit waits for it."""
        self._end_meter(grace_s=0.0)

    def _end_meter(self, grace_s: float) -> None:
        """Ask a running meter to stop and wait ``grace_s`` for it (it flushes its flows), then kill it."""
        if self._meter is None:
            return
        proc, channel = self._meter
        self._meter = None
        if proc.is_alive() and grace_s:
            self._stop.set()
            proc.join(timeout=grace_s)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=2.0)
        channel.cancel_join_thread()
        channel.close()


def _real_interpreter() -> str:
    """The interpreter binary itself: setcap refuses symlinks, and a venv's python is one."""
    try:
        return os.readlink("/proc/self/exe")
    except OSError:
        return os.path.realpath(sys.executable)


# What to run when capturing is not permitted.
PRIVILEGE_FIX = ("Run iotscan as root (sudo), or grant the Python interpreter capture rights: "
                 f"sudo setcap cap_net_raw,cap_net_admin=eip {_real_interpreter()}")


def _classify_error(cfg: MeterConfig, message: str) -> Exception:
    """Turn libpcap's and the meter's messages into one-line errors with the documented exit codes."""
    lowered = message.lower()
    if "bpf" in lowered or "filter" in lowered:
        return InputError(f"invalid BPF filter {cfg.bpf!r}: {message}")
    if cfg.live:
        if "permission" in lowered or "not permitted" in lowered:
            return CaptureError(f"{cfg.source}: no permission to capture ({message}). {PRIVILEGE_FIX}")
        return CaptureError(f"{cfg.source}: cannot capture: {message}")
    if "truncated" in lowered or "unknown file format" in lowered or "bad dump file" in lowered:
        return InputError(f"{cfg.source}: unreadable capture: {message}")
    return CaptureError(f"{cfg.source}: {message}", ExitCode.CAPTURE)
